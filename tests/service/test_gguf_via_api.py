"""A GGUF job through the API and a real Celery worker, on stories260K (CPU): three types in one job, each
file listed with size, sha256 and bits per weight, perplexity per type through llama.cpp, every file
downloadable and loaded by llama.cpp; a model llama.cpp's Llama graph cannot take is refused at submission."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest
from conftest import STORIES, auth, fresh_redis_url, new_key, running_service, truncate_all
from support.consumers import require
from support.processes import wait_job

pytestmark = pytest.mark.slow

TYPES = ["Q8_0", "Q4_0", "Q6_K"]


@pytest.fixture(scope="module")
def service(tmp_path_factory, pg_url):
    tmp = tmp_path_factory.mktemp("gguf-api")
    try:
        with running_service(tmp, "gguf", database_url=pg_url, broker_url=fresh_redis_url(14)) as (settings, stack, url):
            key = new_key(settings, "gguf-tenant")
            with httpx.Client(base_url=url, headers=auth(key), timeout=30) as client:
                yield client, stack, tmp
    finally:
        truncate_all(pg_url)


def test_three_types_in_one_job(service, tmp_path):
    client, stack, _ = service
    r = client.post("/v1/jobs", json={"model": {"path": str(STORIES)},
                                      "quantization_config": {"quant_method": "gguf", "types": TYPES},
                                      "options": {"eval_max_windows": 2}})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], {"succeeded", "failed"}, timeout=600)
    assert job["status"] == "succeeded", (json.dumps(job["error"]), stack.procs[-1].log()[-3000:])
    result = job["result"]
    outputs = {o["type"]: o for o in result["gguf"]["outputs"]}
    assert list(outputs) == TYPES
    per_type = result["evaluation"]["per_type"]
    before = result["evaluation"]["perplexity_before"]
    assert set(per_type) == set(TYPES)
    assert abs(per_type["Q8_0"]["perplexity"] - before) < 0.05 * before  # 8-bit: the source's quality
    assert per_type["Q4_0"]["perplexity"] < 3 * before
    llama_cpp = require("llama_cpp")
    for t, o in outputs.items():
        (f,) = o["files"]
        data = client.get(f"/v1/jobs/{job['id']}/files/{f['name']}").content
        assert len(data) == f["size"] and hashlib.sha256(data).hexdigest() == f["sha256"]
        path = tmp_path / f["name"]
        path.write_bytes(data)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
        assert llm(b"Once upon a time".decode(), max_tokens=4, temperature=0.0)["choices"][0]["text"].strip(), t
        llm.close()


def test_an_imatrix_job_computes_the_matrix_and_quantizes_with_it(service, tmp_path):
    from conftest import SHAKESPEARE

    client, stack, _ = service
    qc = {"quant_method": "gguf", "types": ["Q4_K_M", "IQ4_NL"], "imatrix": True,
          "dataset": [SHAKESPEARE.read_text()[:20000]], "nsamples": 4, "model_seqlen": 64}
    r = client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": qc,
                                      "options": {"evaluate": False}})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], {"succeeded", "failed"}, timeout=600)
    assert job["status"] == "succeeded", (json.dumps(job["error"]), stack.procs[-1].log()[-3000:])
    result = job["result"]
    assert result["gguf"]["imatrix"]["file"] == "imatrix.gguf" and result["gguf"]["imatrix"]["entries"] == 5 * 7
    names = {f["name"] for f in result["files"]}
    assert {"model-Q4_K_M.gguf", "model-IQ4_NL.gguf", "imatrix.gguf"} <= names
    llama_cpp = require("llama_cpp")
    for t in ("Q4_K_M", "IQ4_NL"):
        path = tmp_path / f"model-{t}.gguf"
        path.write_bytes(client.get(f"/v1/jobs/{job['id']}/files/{path.name}").content)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
        assert llm("Once upon a time", max_tokens=4, temperature=0.0)["choices"][0]["text"].strip(), t
        llm.close()


@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "Qwen2MoeForCausalLM"])
def test_an_architecture_outside_the_llama_and_qwen_graphs_is_refused_at_submission(service, arch):
    client, _, tmp = service
    model = tmp / f"not-converted-{arch}"
    model.mkdir()
    cfg = json.loads((STORIES / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "architectures": [arch]}))
    r = client.post("/v1/jobs", json={"model": {"path": str(model)},
                                      "quantization_config": {"quant_method": "gguf", "types": ["Q8_0"]}})
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert [e["field"] for e in r.json()["errors"]] == ["model"]
    assert "Qwen2ForCausalLM" in r.text and arch in r.text


def test_an_unknown_type_is_refused_at_submission(service):
    client, _, _ = service
    r = client.post("/v1/jobs", json={"model": {"path": str(STORIES)},
                                      "quantization_config": {"quant_method": "gguf", "types": ["Q8_0", "Q4_K_X"]}})
    assert r.status_code == 422
    assert [e["field"] for e in r.json()["errors"]] == ["quantization_config.types.1"]
