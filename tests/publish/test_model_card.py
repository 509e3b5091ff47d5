"""The model card renders valid Hub metadata, says how the model was made, and its snippets parse."""

import ast
import json
import re

import pytest
from huggingface_hub import ModelCard, snapshot_download
from huggingface_hub.repocard import metadata_load

from qaas.worker.publish.hub import publish_folder
from qaas.worker.publish.model_card import parse_front_matter, render_model_card
from support.hub_fixtures import WRITE_TOKEN

GPTQ_QC = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
           "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": True, "static_groups": False,
           "lm_head": False, "dataset": "c4", "meta": {"quantizer": ["qaas:0.1.0"]}}
BNB_QC = {"_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16",
          "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
          "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None,
          "llm_int8_threshold": 6.0, "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes"}


def gptq_info(**over):
    info = {
        "repo_id": "alice/Llama-3.2-1B-GPTQ-4bit-g128",
        "source": {"id": "meta-llama/Llama-3.2-1B", "revision": "4e20de362430cd3b72f300e6b0f18e50e7166e08"},
        "quantization_config": GPTQ_QC,
        "calibration": {"dataset": "c4", "num_samples": 128, "seqlen": 2048, "tokens": 262144},
        "evaluation": {"dataset": "wikitext2", "seqlen": 2048, "perplexity_before": 9.1234, "perplexity_after": 9.4567},
        "size": {"before_bytes": 2_471_645_608, "after_bytes": 1_009_431_552},
        "license": "llama3.2", "job_id": "job_123", "qaas_version": "0.1.0",
    }
    info.update(over)
    return info


def python_blocks(card):
    return re.findall(r"```python\n(.*?)```", card, re.S)


def test_gptq_card_metadata_and_body():
    card = render_model_card(gptq_info())
    meta = metadata_load_from_text(card)
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B"
    assert meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["gptq", "4-bit", "qaas"]
    assert meta["source_revision"] == "4e20de362430cd3b72f300e6b0f18e50e7166e08"
    mc = ModelCard(card)
    assert mc.data.base_model == "meta-llama/Llama-3.2-1B" and mc.data.library_name == "transformers"
    assert mc.data.to_dict()["base_model_relation"] == "quantized"
    for needle in ['"group_size": 128', "`c4`", "128 samples", "262,144 tokens", "9.1234", "9.4567", "+3.65%",
                   "2.47 GB", "1.01 GB", "AutoModelForCausalLM.from_pretrained", "from vllm import LLM", "vllm serve"]:
        assert needle in card, needle
    blocks = python_blocks(card)
    assert len(blocks) == 2
    for b in blocks:
        ast.parse(b)


def test_bnb_card_has_no_calibration_and_no_vllm():
    info = {"repo_id": "org/Qwen2.5-0.5B-bnb-nf4", "source": {"id": "Qwen/Qwen2.5-0.5B"},
            "quantization_config": BNB_QC, "revision": "nf4"}
    card = render_model_card(info)
    meta = parse_front_matter(card)
    assert meta["tags"] == ["bitsandbytes", "4-bit", "qaas"] and "source_revision" not in meta
    assert "data-free" in card and "Not evaluated" in card and "vllm" not in card.lower()
    assert 'revision="nf4"' in card and "NF4" in card
    ast.parse(python_blocks(card)[0])


def test_bnb_8bit():
    qc = {**BNB_QC, "load_in_4bit": False, "_load_in_4bit": False, "load_in_8bit": True, "_load_in_8bit": True}
    card = render_model_card({"repo_id": "o/m-bnb-8bit", "source": {"id": "o/m"}, "quantization_config": qc})
    assert parse_front_matter(card)["tags"] == ["bitsandbytes", "8-bit", "qaas"] and "LLM.int8" in card


def test_unknown_method_refused():
    with pytest.raises(ValueError):
        render_model_card({"repo_id": "a/b", "source": {"id": "a/c"}, "quantization_config": {"quant_method": "hqq"}})


def test_awq_card_names_the_recipe_its_calibration_and_both_loaders():
    from transformers import AwqConfig

    qc = json.loads(json.dumps(AwqConfig(bits=4, group_size=128, modules_to_not_convert=["model.layers.0.mlp.down_proj"]).to_dict()))
    info = {"repo_id": "alice/SmolLM2-135M-AWQ-4bit-g128", "source": {"id": "HuggingFaceTB/SmolLM2-135M"},
            "quantization_config": qc,
            # what the engine records (CalibrationSet.describe())
            "calibration": {"source": "wikitext2", "samples": 128, "seqlen": 512, "tokens": 65536},
            "evaluation": {"perplexity_before": 19.1, "perplexity_after": 20.2}}
    card = render_model_card(info)
    assert parse_front_matter(card)["tags"] == ["awq", "4-bit", "qaas"]
    for needle in ["4-bit AWQ quantization", "AWQ (GEMM)", "`gemm`", "model.layers.0.mlp.down_proj",
                   "AWQ searches per-channel scales", "`wikitext2`", "128 samples", "65,536 tokens",
                   "pip install transformers accelerate gptqmodel", "from vllm import LLM",
                   "vllm serve alice/SmolLM2-135M-AWQ-4bit-g128"]:
        assert needle in card, needle
    assert "data-free" not in card
    blocks = python_blocks(card)
    assert len(blocks) == 2
    for b in blocks:
        ast.parse(b)


def test_user_text_cannot_break_the_yaml():
    card = render_model_card(gptq_info(source={"id": "o/m", "revision": "x\n---\nevil: true"}, license="mit: \"x\""))
    meta = metadata_load_from_text(card)
    assert meta["source_revision"] == "x\n---\nevil: true" and "evil" not in meta


def test_card_passes_hub_validation_and_round_trips(fake_hub, tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.json").write_text('{"quantization_config": {"quant_method": "gptq"}}')
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    card = render_model_card(gptq_info(repo_id="alice/card-test"))
    (folder / "README.md").write_text(card)
    res = publish_folder(folder, repo_id="alice/card-test", token=WRITE_TOKEN, endpoint=fake_hub.url)
    assert fake_hub.hub.count("POST", "validate_yaml") == 1
    local = snapshot_download("alice/card-test", token=WRITE_TOKEN, local_dir=tmp_path / "dl")
    assert (tmp_path / "dl" / "README.md").read_text() == card
    assert ModelCard.load("alice/card-test", token=WRITE_TOKEN).data.base_model == "meta-llama/Llama-3.2-1B"
    assert res["created"] and local


def metadata_load_from_text(card):
    import os
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".md", delete=False) as f:
        f.write(card)
    try:
        return metadata_load(f.name)
    finally:
        os.unlink(f.name)


def test_card_says_what_the_perplexity_was_measured_on():
    ev = {"perplexity_before": 6.5, "perplexity_after": 6.9, "windows": 16, "seqlen": 2048, "tokens": 32768,
          "text_sha256": "dcaff93caf9105f6", "text": {"source": "packaged tinyshakespeare-eval.txt", "sha256": "d"},
          "windows_left_out": 3, "mode": "streamed block by block", "seconds": {"total": 12.34},
          "measured": {"original": "the source checkpoint's tensors, float16 on cuda",
                       "quantized": "the exported checkpoint as written: every quantized layer dequantized by X"}}
    card = render_model_card(gptq_info(evaluation=ev))
    for needle in ["packaged tinyshakespeare-eval.txt", "`dcaff93caf9105f6`", "16 windows of 2048 tokens",
                   "32,768 tokens", "- quantized: the exported checkpoint as written", "3 windows of the text were left out",
                   "12.3 s (streamed block by block)"]:
        assert needle in card, needle
    skipped = render_model_card(gptq_info(evaluation={"skipped": "all 40 windows share text with the calibration"}))
    assert "Not evaluated: all 40 windows share text" in skipped


def test_gptq_card_says_which_format_was_written_and_where_it_loads():
    from qaas import quantization_rules
    from qaas.quantization_rules.engines import gptq_engines
    from qaas.quantization_rules.gptq import written_format

    normalized = quantization_rules.normalize({"quant_method": "gptq", "bits": 4, "sym": False,
                                               "dataset": ["word " * 300]})
    fmt, why = written_format(normalized)
    info = gptq_info(quantization_config={**GPTQ_QC, "sym": False, "checkpoint_format": fmt},
                     gptq={"checkpoint_format": {"written": fmt, "requested": "gptq", "reason": why},
                           "engines": gptq_engines(normalized, [(2048, 2048)])})
    card = render_model_card(info)
    assert "## Where it loads" in card and "Checkpoint format: `gptq_v2` (asked: `gptq`;" in card
    assert "| vLLM (gptq / gptq_marlin) | no | vLLM (gptq / gptq_marlin) loads symmetric GPTQ only" in card
    assert "| GPTQModel.load | yes |" in card
    assert "from vllm import LLM" not in card  # no snippet for an engine that does not load it
    sym = quantization_rules.normalize({"quant_method": "gptq", "bits": 4, "dataset": ["word " * 300]})
    card = render_model_card(gptq_info(gptq={"engines": gptq_engines(sym, [(2048, 2048)])}))
    assert "| vLLM (gptq / gptq_marlin) | yes |" in card and "from vllm import LLM" in card


def test_bnb_card_says_where_it_runs():
    info = {"repo_id": "org/m-bnb-nf4", "source": {"id": "org/m"}, "quantization_config": BNB_QC,
            "bitsandbytes": {"runs_on": {"devices": ["cuda"],
                                         "note": "runs on CUDA; on the CPU, bitsandbytes' repacked 4-bit kernel asserts x"}}}
    card = render_model_card(info)
    assert "## Where it runs" in card and "Devices: cuda. runs on CUDA; on the CPU" in card
