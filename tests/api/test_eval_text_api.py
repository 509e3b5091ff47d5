"""`options.eval_text` at submission: the rules of `qaas.eval_text`, a 422 naming the field, nothing stored."""

from __future__ import annotations

import pytest
from conftest import ASSETS, SHAKESPEARE, STORIES, WIKITEXT, auth
from sqlalchemy import func, select

from qaas.db.models import Job
from qaas.db.session import session_scope

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}

GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "dataset": str(SHAKESPEARE)}


def _jobs(settings) -> int:
    with session_scope(settings.resolved_database_url) as s:
        return s.scalar(select(func.count()).select_from(Job))


@pytest.mark.parametrize("qc, eval_text, why", [
    (GPTQ, str(SHAKESPEARE), "calibration dataset itself"),
    ({**GPTQ, "dataset": ["a calibration text " * 40]}, ["a calibration text " * 40], "calibration dataset itself"),
    (NF4, "/etc/passwd", "outside the allowed roots"),
    (NF4, str(ASSETS / "text" / "nope.txt"), "no such evaluation file"),
    (NF4, "relative.txt", "absolute path"),
    (NF4, 42, None),
    (NF4, [], "empty"),
])
def test_bad_eval_text_is_a_422_naming_options_eval_text(client, api_key, settings, qc, eval_text, why):
    r = client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": qc,
                                      "options": {"eval_text": eval_text}}, headers=auth(api_key))
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), r.text
    errors = r.json()["errors"]
    assert [e["field"] for e in errors] == ["options.eval_text"], errors
    if why:
        assert why in errors[0]["message"], errors
    assert _jobs(settings) == 0


def test_eval_text_reaches_the_engine_spec(client, api_key, settings):
    from qaas.worker.attempt import build_spec

    r = client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": GPTQ,
                                      "options": {"eval_text": str(WIKITEXT)}}, headers=auth(api_key))
    assert r.status_code == 202, r.text
    job = client.get(r.headers["Location"], headers=auth(api_key)).json()
    assert job["request"]["options"]["eval_text"] == str(WIKITEXT)
    spec = build_spec(settings, job["request"], settings.work_dir / "x")
    assert spec["options"]["eval_text"] == str(WIKITEXT)
