"""Fine-tuning requests at the API: what is stored, and every refusal a 422 naming its field (nothing stored)."""

from __future__ import annotations

import uuid

import pytest
from conftest import ASSETS, STORIES, auth, make_settings
from sqlalchemy import func, select

from qaas import job_store
from qaas.db.models import Job, JobStatus
from qaas.db.session import session_scope

TEXTS = ["Once upon a time there was a cat.", "The dog ran to the park and played all day."]
WIKI = ASSETS / "text" / "wikitext-2-raw-v1" / "test.jsonl"


def ft(**over):
    b = {"kind": "finetune", "model": {"path": str(STORIES)}, "dataset": list(TEXTS)}
    b.update(over)
    return b


def job_count(settings) -> int:
    with session_scope(settings.resolved_database_url) as s:
        return s.scalar(select(func.count()).select_from(Job))


def test_a_finetune_job_is_stored_with_its_kind_and_every_default(client, api_key, settings):
    r = client.post("/v1/jobs", json=ft(lora={"r": 16, "target_modules": ["q_proj", "v_proj"]},
                                        training={"max_steps": 30, "optim": "adamw_torch"}), headers=auth(api_key))
    assert r.status_code == 202, r.text
    doc = r.json()
    assert doc["kind"] == "finetune" and doc["method"] == "qlora" and doc["bits"] == 4
    req = doc["request"]
    assert req["lora"]["r"] == 16 and req["lora"]["lora_alpha"] == 8 and req["lora"]["bias"] == "none"
    assert req["training"]["max_steps"] == 30 and req["training"]["gradient_checkpointing"] is True
    assert req["training"]["save_steps"] == 30  # never later than the last step
    assert req["quantization_config"] is None  # the engine's default: NF4 + double quant, compute dtype auto
    with session_scope(settings.resolved_database_url) as s:
        assert s.get(Job, uuid.UUID(doc["id"])).kind == "finetune"
    # a quantization job is unchanged, and says its kind
    q = client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True}}, headers=auth(api_key)).json()
    assert q["kind"] == "quantize" and "kind" not in q["request"]
    assert client.get(f"/v1/jobs/{doc['id']}", headers=auth(api_key)).json()["kind"] == "finetune"


def test_default_lora_and_base_follow_the_qlora_recipe():
    from qaas.quantization_rules import finetune, lora

    assert lora.normalize({})["target_modules"] == "all-linear"
    base = finetune.normalize_base(None)
    assert base["bnb_4bit_quant_type"] == "nf4" and base["bnb_4bit_use_double_quant"] is True
    assert base["bnb_4bit_compute_dtype"] == "auto"
    given = finetune.normalize_base({"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16"})
    assert given["bnb_4bit_compute_dtype"] == "bfloat16" and given["bnb_4bit_quant_type"] == "fp4"  # as BitsAndBytesConfig


@pytest.mark.parametrize("over, field, says", [
    ({"kind": "train"}, "body", "kind must be"),
    ({"lora": {"r": 0}}, "lora.r", "between 1"),
    ({"lora": {"rank": 8}}, "lora.rank", "not a LoraConfig option"),
    ({"lora": {"loftq_config": {}}}, "lora.loftq_config", "unquantized"),
    ({"lora": {"target_modules": "(unclosed"}}, "lora.target_modules", "regular expression"),
    ({"lora": {"bias": "some"}}, "lora.bias", "'none'"),
    ({"lora": {"init_lora_weights": "pissa"}}, "lora.init_lora_weights", "4-bit"),
    ({"lora": {"layers_pattern": "layers"}}, "lora.layers_pattern", "layers_to_transform"),
    ({"training": {"optim": "adam"}}, "training.optim", "paged_adamw_8bit"),
    ({"training": {"warmup_steps": 10, "warmup_ratio": 0.1}}, "training.warmup_steps", "not both"),
    ({"training": {"learning_rate": 0}}, "training.learning_rate", "strictly"),
    ({"training": {"max_steps": 0}}, "training.max_steps", "-1"),
    ({"training": {"bf16": True}}, "training.bf16", "bnb_4bit_compute_dtype"),
    ({"training": {"output_dir": "/tmp/x"}}, "training.output_dir", "service"),
    ({"training": {"lr_scheduler_type": "constant", "warmup_steps": 5}}, "training.lr_scheduler_type", "warmup"),
    ({"training": {"max_seq_length": 4}}, "training.max_seq_length", "between 8"),
    ({"dataset": []}, "dataset", "empty"),
    ({"dataset": ["a text", 3]}, "dataset.1", "string"),
    ({"dataset": [[{"role": "user", "content": "hi"}], [{"role": "robot", "content": "x"}]]}, "dataset.1.0.role", "one of"),
    ({"dataset": [[{"role": "user"}]]}, "dataset.0.0", "content"),
    ({"dataset": "relative/file.jsonl"}, "dataset", "absolute"),
    ({"dataset": "/data/train.csv"}, "dataset", ".jsonl"),
    ({"dataset": "not-a-hub-id"}, "dataset", "owner/name"),
    ({"eval_dataset": []}, "eval_dataset", "empty"),
    ({"merge": {"quantization_config": {"quant_method": "gptq", "dataset": "c4"}}},
     "merge.quantization_config.bits", "field required"),
    ({"merge": {"quantization_config": {"quant_method": "gptq", "bits": 5, "dataset": "c4"}}},
     "merge.quantization_config.bits", "2, 3, 4"),
    ({"merge": {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                        "bnb_4bit_quant_type": "int4"}}},
     "merge.quantization_config.bnb_4bit_quant_type", "nf4"),
    ({"merge": {"quantization_config": {"quant_method": "awq", "bits": 4, "dataset": "c4"}}},
     "merge.quantization_config.quant_method", "gptq or bitsandbytes"),
    ({"merge": {"quantization_config": {"quant_method": "gptq", "bits": 4, "dataset": "/outside/roots.txt"}}},
     "merge.quantization_config.dataset", "outside"),
    ({"merge": {"quant_method": "gptq", "bits": 4}}, "merge.quantization_config", "required"),
    ({"lora": {"use_dora": True}, "merge": {"quantization_config": {"quant_method": "bitsandbytes",
                                                                     "load_in_4bit": True}}}, "merge", "DoRA"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config.quant_method", "bitsandbytes"),
    ({"quantization_config": {"load_in_8bit": True}}, "quantization_config.load_in_8bit", "4-bit"),
    ({"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "int4"}},
     "quantization_config.bnb_4bit_quant_type", "nf4"),
    ({"model": {"job": "not-a-uuid"}}, "model.job", "UUID"),
    ({"model": {"job": str(uuid.uuid4()), "path": "/x"}}, "model", "exactly one"),
    ({"dataset": None}, "dataset", "training data"),
])
def test_bad_finetune_requests_are_422_naming_the_field(client, api_key, settings, over, field, says):
    r = client.post("/v1/jobs", json=ft(**over), headers=auth(api_key))
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert any(e["field"] == field and says in e["message"] for e in errors), errors
    assert job_count(settings) == 0


def test_training_files_must_exist_under_the_roots(client, api_key, settings, tmp_path):
    inside = tmp_path / "train.jsonl"
    inside.write_text('{"text": "hello there"}\n')
    assert client.post("/v1/jobs", json=ft(dataset=str(inside), eval_dataset=str(WIKI)),
                       headers=auth(api_key)).status_code == 202
    for value, says in ((str(tmp_path / "missing.jsonl"), "no such"), ("/etc/hosts.txt", "outside")):
        r = client.post("/v1/jobs", json=ft(dataset=value), headers=auth(api_key))
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == "dataset", r.text
        assert says in r.json()["errors"][0]["message"]
    r = client.post("/v1/jobs", json=ft(eval_dataset=str(tmp_path / "missing.txt")), headers=auth(api_key))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "eval_dataset", r.text


def test_a_hub_dataset_is_refused_at_submission_when_it_cannot_be_had(client, api_key, settings, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    r = client.post("/v1/jobs", json=ft(dataset="someone/stories"), headers=auth(api_key))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "dataset", r.text
    assert "hub" in r.json()["errors"][0]["message"]


def test_paged_optimizers_are_refused_on_a_cpu_server_not_replaced(tmp_path, clean_db, redis_db):
    from fastapi.testclient import TestClient

    from conftest import new_key
    from qaas.api.app import create_app

    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, device="cpu")
    key = new_key(settings, "alice")
    with TestClient(create_app(settings)) as c:
        for optim in ("paged_adamw_8bit", "paged_adamw_32bit"):
            r = c.post("/v1/jobs", json=ft(training={"optim": optim}), headers=auth(key))
            assert r.status_code == 422, r.text
            e = r.json()["errors"][0]
            assert e["field"] == "training.optim" and "CUDA" in e["message"] and "cpu" in e["message"].lower()
        assert c.post("/v1/jobs", json=ft(training={"optim": "auto"}), headers=auth(key)).status_code == 202


def _finished(settings, jid: str, *, method: str, bits: int, status=JobStatus.succeeded) -> None:
    with session_scope(settings.resolved_database_url) as s:
        job = s.get(Job, uuid.UUID(jid))
        job.method, job.bits = method, bits  # test setup: the row of a finished job of that method
        s.flush()
        claimed = job_store.claim(s, job.id, worker="w", lease_s=5)
        assert job_store.finish(s, claimed.id, claimed.attempt, status, result={"files": []})


def test_a_job_base_must_be_the_callers_own_succeeded_4bit_output(client, api_key, other_key, settings):
    nf4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    submit = lambda key, **b: client.post("/v1/jobs", json=b, headers=auth(key))  # noqa: E731
    mine = submit(api_key, model={"path": str(STORIES)}, quantization_config=nf4).json()["id"]

    def refused(key, base, says, field="model.job", **over):
        r = submit(key, **ft(model={"job": base}, **over))
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["field"] == field and says in r.json()["errors"][0]["message"], r.json()

    refused(api_key, mine, "not succeeded")  # still queued
    _finished(settings, mine, method="bitsandbytes", bits=4)
    refused(other_key, mine, "no such job")  # another tenant's job does not exist for them
    refused(api_key, str(uuid.uuid4()), "no such job")
    refused(api_key, mine, "already quantized", field="quantization_config", quantization_config=nf4)
    r = submit(api_key, **ft(model={"job": mine}))
    assert r.status_code == 202, r.text
    assert r.json()["model"] == f"job:{mine}"

    gptq = submit(api_key, model={"path": str(STORIES)}, quantization_config=nf4).json()["id"]
    _finished(settings, gptq, method="gptq", bits=4)
    refused(api_key, gptq, "gptq 4-bit")
    adapter = r.json()["id"]
    _finished(settings, adapter, method="qlora", bits=4)
    with session_scope(settings.resolved_database_url) as s:
        assert s.get(Job, uuid.UUID(adapter)).kind == "finetune"
    refused(api_key, adapter, "LoRA adapter")
