"""Every quantization method through the API and a real Celery worker, on stories260K (CPU).

bitsandbytes NF4, FP4, NF4 + double quant and LLM.int8, GPTQ 4-bit and AWQ 4-bit: each job succeeds, reports
perplexity before/after, and its output loads (bitsandbytes through transformers; GPTQ's and AWQ's through
independent dequantizations and their consumers are tested in tests/engine).
"""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import SHAKESPEARE, STORIES, WIKITEXT, auth, fresh_redis_url, new_key, running_service, truncate_all
from support.processes import wait_job

pytestmark = pytest.mark.slow

CALIBRATION = [p for p in SHAKESPEARE.read_text().split("\n\n") if len(p) > 200][:64]

VARIANTS = {
    "awq-4bit": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                 "dataset": CALIBRATION, "model_seqlen": 256},
    "nf4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "nf4-dq": {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
               "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"},
    "int8": {"quant_method": "bitsandbytes", "load_in_8bit": True},
    "gptq-4bit": {"quant_method": "gptq", "bits": 4, "group_size": 32, "dataset": CALIBRATION, "model_seqlen": 256},
    # a named dataset, from the operator's registered local copy (no `datasets` library, no hub)
    "gptq-registered-dataset": {"quant_method": "gptq", "bits": 4, "group_size": 32, "dataset": "wikitext2",
                                "model_seqlen": 256},
}
REGISTERED = {"wikitext2": str(WIKITEXT)}


@pytest.fixture(scope="module")
def service(tmp_path_factory, pg_url):
    tmp = tmp_path_factory.mktemp("methods")
    try:
        with running_service(tmp, "methods", database_url=pg_url, broker_url=fresh_redis_url(15),
                             calibration_datasets=REGISTERED) as (settings, stack, url):
            key = new_key(settings, "methods-tenant")
            with httpx.Client(base_url=url, headers=auth(key), timeout=30) as client:
                yield client, stack
    finally:
        truncate_all(pg_url)


@pytest.fixture(scope="module")
def submitted(service):
    client, _ = service
    ids = {}
    for name, qc in VARIANTS.items():
        r = client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": qc,
                                          "options": {"calibration_samples": 16}})
        assert r.status_code == 202, r.text
        ids[name] = r.json()["id"]
    return ids


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_succeeds_with_perplexity(service, submitted, name, tmp_path):
    client, stack = service
    job = wait_job(client, submitted[name], {"succeeded", "failed"}, timeout=600)
    assert job["status"] == "succeeded", (json.dumps(job["error"]), stack.procs[-1].log()[-3000:])
    ev = job["result"]["evaluation"]
    assert ev["perplexity_before"] > 1 and ev["perplexity_after"] > 1
    # 4-bit costs a little quality on this tiny model, never a collapse
    assert ev["perplexity_after"] < ev["perplexity_before"] * 3, ev
    files = {f["name"] for f in job["files"]}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    cfg = json.loads(client.get(f"/v1/jobs/{job['id']}/files/config.json").content)
    qc = cfg["quantization_config"]
    if name == "awq-4bit":
        assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc["group_size"] == 32
        # stories' MLP (172 wide) cannot be packed: named for the loaders, every block's three
        assert len(qc["modules_to_not_convert"]) == 5 * 3 and job["result"]["quantized_modules"] == 5 * 4
        assert "quantize_config.json" not in files and len(job["result"]["calibration"]["sha256"]) == 64
        events = client.get(f"/v1/jobs/{job['id']}/events").json()["items"]
        searched = [e["data"]["metrics"]["alphas"] for e in events if e["kind"] == "progress"
                    and "alphas" in ((e.get("data") or {}).get("metrics") or {})]
        assert len(searched) == 5 and all("input_layernorm" in a for a in searched), searched
        return
    if name.startswith("gptq"):
        assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 32
        assert "quantize_config.json" in files
        calibration = job["result"]["calibration"]
        assert calibration and len(calibration.get("text_sha256") or calibration.get("sha256") or "") == 64, calibration
        if name == "gptq-registered-dataset":
            assert calibration["source"] == "wikitext2 (local copy test.joined.txt)", calibration
        return
    assert qc["quant_method"] == "bitsandbytes"
    out = tmp_path / "model"
    out.mkdir()
    for f in files:
        (out / f).write_bytes(client.get(f"/v1/jobs/{job['id']}/files/{f}").content)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # no quantization config passed: it is in config.json
    assert model.config.quantization_config.load_in_8bit == (name == "int8")
    if name != "int8":
        assert model.config.quantization_config.bnb_4bit_quant_type == VARIANTS[name]["bnb_4bit_quant_type"]
