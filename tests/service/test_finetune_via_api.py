"""QLoRA fine-tuning jobs through the API and a real Celery worker, on the CPU.

A tiny Llama built here (widths that bitsandbytes' CPU inference path takes) fine-tunes on chat
conversations rendered with its chat template, the loss on the assistant's turns only; stories260K is first quantized to NF4 by a quantization job
and then fine-tuned from that job's output (`{"job": id}`). Each time the loss goes down, progress events
carry step, loss, learning rate, tokens/s, memory and ETA, and the delivered adapter loads with
`peft.PeftModel.from_pretrained` on the 4-bit base and reproduces the worker's final logits. With `merge`, the
job's second output (merged/) is the adapter merged into the de-quantized base -- peft's merge_and_unload on
the base transformers de-quantizes gives the same logits -- re-quantized with GPTQ, which transformers (through
GPTQModel's torch kernel) loads.
"""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from conftest import SHAKESPEARE, STORIES, auth, fresh_redis_url, new_key, running_service, truncate_all
from support.consumers import require
from support.processes import wait_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
         "One day, she saw a big red ball in the park.")
TEXTS = [STORY, "Lily and her dog Max ran to the park. They played with the ball all day.",
         "The sun was warm and the sky was blue. Lily was very happy."] * 4
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}")
CONVERSATIONS = [[{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": STORY}],
                 [{"role": "user", "content": "Who is Lily?"},
                  {"role": "assistant", "content": "Lily is a little girl who loves to play outside."}]] * 4
TRAINING = {"max_steps": 24, "learning_rate": 2e-2, "per_device_train_batch_size": 4, "max_seq_length": 48,
            "logging_steps": 4, "eval_steps": 8, "save_steps": 8, "optim": "adamw_torch", "warmup_steps": 2}


def tiny_llama(directory):
    """A 2-layer Llama with random weights (seeded) and stories260K's tokenizer plus a chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(directory, safe_serialization=True)
    tok = AutoTokenizer.from_pretrained(STORIES)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def service(tmp_path_factory, pg_url):
    tmp = tmp_path_factory.mktemp("finetune")
    try:
        with running_service(tmp, "finetune", database_url=pg_url, broker_url=fresh_redis_url(13)) as (settings, stack, url):
            key = new_key(settings, "ft-tenant")
            with httpx.Client(base_url=url, headers=auth(key), timeout=30) as client:
                yield client, stack, tmp
    finally:
        truncate_all(pg_url)


def _progress(client, jid):
    items = client.get(f"/v1/jobs/{jid}/events").json()["items"]
    return [e for e in items if e["kind"] == "progress" and e["stage"] == "train"]


def _download(client, job, into):
    into.mkdir(parents=True)
    for f in job["files"]:
        (into / f["name"]).parent.mkdir(parents=True, exist_ok=True)  # a merged output's merged/...
        r = client.get(f"/v1/jobs/{job['id']}/files/{f['name']}")
        assert r.status_code == 200, (f["name"], r.text)
        (into / f["name"]).write_bytes(r.content)
    return into


def _check_adapter_reproduces_the_worker(base_dir, adapter_dir, result, *, prequantized):
    torch = require("torch")
    peft = require("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = {k: v for k, v in result["quantization_config"].items() if k != "quant_method"}
    kwargs = {} if prequantized else {"quantization_config": BitsAndBytesConfig(**qc)}
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, device_map={"": "cpu"}, **kwargs)
    if any(m.out_features % 32 for m in base.modules() if type(m).__name__ == "Linear4bit"):
        # bitsandbytes' CPU inference path cannot repack layers this wide (stories260K's 172-wide MLP):
        # the dequantizing path, the one the engine trains and evaluates with
        for m in base.modules():
            if type(m).__name__ == "Linear4bit":
                m.support_avx512bf16_for_cpu = False
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    probe = result["probe"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([probe["input_ids"]]), use_cache=False).logits[0, -1].float()
    top = torch.tensor(probe["top_logits"])
    got = logits[torch.tensor(probe["top_indices"])]
    # the same model: the worker's logits, up to the CPU kernels' rounding
    assert torch.allclose(got, top, atol=2e-2 * float(top.abs().max()), rtol=0), (got[:8], top[:8])
    # and not the untrained base: the adapter changed what the model says
    with torch.no_grad(), model.disable_adapter():
        untrained = model(input_ids=torch.tensor([probe["input_ids"]]), use_cache=False).logits[0, -1].float()
    assert not torch.allclose(untrained[torch.tensor(probe["top_indices"])], top, atol=1e-2)


def _check_training(client, job, *, drop):
    """The loss fell by `drop` nats at least (first tenth of the steps against the last), the held-out loss
    fell at every evaluation point, and the events carried what a user follows training by."""
    result = job["result"]
    loss = result["loss"]
    assert loss["mean_last_10pct"] < loss["mean_first_10pct"] - drop, loss
    evals = [v for _, v in loss["evals"]]
    assert all(b < a for a, b in zip(evals, evals[1:])), evals
    ev = result["evaluation"]
    assert ev["perplexity_after"] < ev["perplexity_before"], ev
    assert [s for s, _ in loss["evals"]][0] == 0 and len(loss["evals"]) >= 3  # before, every eval_steps, after
    progress = _progress(client, job["id"])
    stepped = [e["data"]["metrics"] for e in progress if "loss" in (e["data"].get("metrics") or {})]
    assert [m["step"] for m in stepped] == list(range(4, 25, 4)), [m["step"] for m in stepped]
    for m in stepped:
        assert m["loss"] > 0 and m["lr"] > 0 and m["tokens_per_s"] > 0 and m["memory_bytes"] > 0 and m["eta_s"] >= 0
    assert any("eval_loss" in e["data"]["metrics"] for e in progress)
    files = {f["name"] for f in job["files"]}
    assert {"adapter_model.safetensors", "adapter_config.json", "training_log.json"} <= files, files
    assert result["training"]["optim"] == "adamw_torch" and result["training"]["total_steps"] == 24
    assert result["resumed_from_step"] is None
    assert len(result["data"]["dataset_sha256"]) == 64


def test_tiny_llama_on_chat_conversations_learns_and_its_adapter_reproduces_the_worker(service, tmp_path):
    client, stack, tmp = service
    base = tiny_llama(tmp / "tiny-llama")
    r = client.post("/v1/jobs", json={"kind": "finetune", "model": {"path": str(base)}, "dataset": CONVERSATIONS,
                                      "lora": {"r": 8, "lora_alpha": 16},
                                      "training": {**TRAINING, "assistant_only_loss": True}})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], {"succeeded", "failed"}, timeout=500)
    assert job["status"] == "succeeded", (job["error"], stack.procs[-1].log()[-3000:])
    _check_training(client, job, drop=0.4)  # from ln(512): random weights know nothing yet
    result = job["result"]
    assert result["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert result["quantization_config"]["bnb_4bit_use_double_quant"] is True
    assert result["quantization_config"]["bnb_4bit_compute_dtype"] == "float32"  # "auto" on a CPU worker
    assert result["data"]["held_out"].startswith("no eval_dataset: 1 of 8")
    assert "full_precision_perplexity" in result["evaluation"]
    adapter = _download(client, job, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["base_model_name_or_path"] == "tiny-llama"
    # all-linear: every linear layer of both blocks, not the output head
    assert len(config["target_modules"]) == 14 and {m.rsplit(".", 1)[-1] for m in config["target_modules"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    _check_adapter_reproduces_the_worker(base, adapter, result, prequantized=False)


def test_quantize_then_finetune_stories260k_from_the_jobs_output(service, tmp_path):
    client, stack, _ = service
    nf4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
           "bnb_4bit_use_double_quant": True}
    q = client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": nf4,
                                      "options": {"evaluate": False}}).json()
    quantized = wait_job(client, q["id"], {"succeeded", "failed"}, timeout=300)
    assert quantized["status"] == "succeeded", quantized["error"]
    r = client.post("/v1/jobs", json={"kind": "finetune", "model": {"job": q["id"]}, "dataset": TEXTS,
                                      "eval_dataset": TEXTS[:3], "training": TRAINING})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], {"succeeded", "failed"}, timeout=500)
    assert job["status"] == "succeeded", (job["error"], stack.procs[-1].log()[-3000:])
    _check_training(client, job, drop=0.1)
    result = job["result"]
    assert result["base_prequantized"] is True and result["base_model"] == f"job:{q['id']}"
    assert result["data"]["held_out"] == "eval_dataset" and result["data"]["eval_examples"] == 3
    base = _download(client, quantized, tmp_path / "base")
    adapter = _download(client, job, tmp_path / "adapter")
    _check_adapter_reproduces_the_worker(base, adapter, result, prequantized=True)
    shutil.rmtree(base)


GPTQ_CONSUMER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, GPTQConfig
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu", quantization_config=GPTQConfig(bits=4, backend="torch"))
kinds = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
n = sum(1 for m in model.modules() if hasattr(m, "qweight"))
with torch.no_grad():
    logits = model(torch.tensor([json.loads(sys.argv[2])])).logits[0, -1].float()
print(json.dumps({"kinds": kinds, "quantized": n, "logits": logits.tolist()}))
"""


def test_merge_is_a_second_output_equal_to_peft_merge_and_unload_and_its_gptq_model_loads(service, tmp_path):
    import os
    import subprocess
    import sys

    torch = require("torch")
    peft = require("peft")
    require("gptqmodel")
    require("optimum")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    client, stack, tmp = service
    base = tiny_llama(tmp / "tiny-llama-merged")
    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 32, "dataset": str(SHAKESPEARE), "nsamples": 4,
            "model_seqlen": 64}
    r = client.post("/v1/jobs", json={"kind": "finetune", "model": {"path": str(base)}, "dataset": TEXTS,
                                      "lora": {"r": 8, "lora_alpha": 16, "use_rslora": True},
                                      "training": {**TRAINING, "max_steps": 12}, "merge": {"quantization_config": gptq}})
    assert r.status_code == 202, r.text
    assert r.json()["request"]["merge"]["quantization_config"]["group_size"] == 32
    job = wait_job(client, r.json()["id"], {"succeeded", "failed"}, timeout=500)
    assert job["status"] == "succeeded", (job["error"], stack.procs[-1].log()[-3000:])
    result, merged = job["result"], job["result"]["merged"]
    names = {f["name"] for f in job["files"]}
    assert {"adapter_model.safetensors", "merged/config.json", "merged/model.safetensors",
            "merged/quantize_config.json", "merged/tokenizer.json"} <= names, names
    assert merged["folder"] == "merged" and merged["method"] == "gptq" and merged["merged_layers"] == 14
    assert merged["quantization_config"]["bits"] == 4 and merged["quantized_modules"] == 14
    assert {"merge", "merge quantize"} <= set(result["timings"]), result["timings"]
    # evaluated: the merged float model on the held-out data is the adapter on its 4-bit base, merged
    assert merged["float_model"]["perplexity"] == pytest.approx(result["evaluation"]["perplexity_after"], rel=1e-3)
    assert merged["evaluation"]["perplexity_after"] > 0 and merged["evaluation"]["perplexity_before"] > 0

    files = _download(client, job, tmp_path / "out")
    qc = {k: v for k, v in result["quantization_config"].items() if k != "quant_method"}
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map={"": "cpu"},
                                                     quantization_config=BitsAndBytesConfig(**qc)).dequantize()
    reference = peft.PeftModel.from_pretrained(reference, str(files)).merge_and_unload().eval()
    probe = result["probe"]
    untrained = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map={"": "cpu"},
                                                     quantization_config=BitsAndBytesConfig(**qc)).dequantize().eval()
    with torch.no_grad():
        want = reference(torch.tensor([probe["input_ids"]])).logits[0, -1]
        before = untrained(torch.tensor([probe["input_ids"]])).logits[0, -1]
    scale = float(want.abs().max())
    # the worker's merged float model (its logits at the probe's top indices) is peft's merge
    got = torch.tensor(merged["float_model"]["probe_logits"])
    assert torch.allclose(got, want[torch.tensor(probe["top_indices"])], atol=1e-3 * scale, rtol=0)

    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1", "TORCHDYNAMO_DISABLE": "1"}
    run = subprocess.run([sys.executable, "-P", "-c", GPTQ_CONSUMER, str(files / "merged"),
                          json.dumps(probe["input_ids"])], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded["kinds"] == ["TorchLinear"] and loaded["quantized"] == 14, loaded["kinds"]
    quantized = torch.tensor(loaded["logits"])
    # 4-bit GPTQ of the merged model: near the merged model, much nearer than the base without the adapter
    assert float((quantized - want).abs().max()) < 0.5 * float((before - want).abs().max())
