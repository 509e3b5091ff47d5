"""One set of quantization_config rules: every row of the table gets the same answer from the API (202, or a
422 problem+json naming the field), from the engine (`pipeline.quantize` stops with InvalidConfig naming the
same field before it touches a model) and from `qaas quantize` (exit 2 naming the same field); what is
accepted is normalized to the same dict by the API (stored with the job) and by the engine, and is valid
against the OpenAPI schema the API publishes.

The table is `support/quantization_rule_cases.py`; its rows marked "drift" are where the API's schema and the
engine's methods disagreed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import STORIES, WIKITEXT, auth, make_settings, new_key
from support.quantization_rule_cases import ROWS, config_of

@dataclass
class Surfaces:
    client: object
    key: str
    settings: object
    tmp: Path


@pytest.fixture
def surfaces(tmp_path, clean_db, redis_db, monkeypatch):
    from fastapi.testclient import TestClient

    from qaas.api.app import create_app
    from qaas.settings import get_settings

    # A named dataset without a local copy must be refused whether or not `datasets` is installed here.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    registered = {"wikitext2": str(WIKITEXT)}
    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, calibration_datasets=registered)
    # `qaas quantize` reads the operator's settings from the environment
    monkeypatch.setenv("QAAS_LOCAL_MODEL_ROOTS", settings.local_model_roots)
    monkeypatch.setenv("QAAS_CALIBRATION_DATASETS", json.dumps(registered))
    get_settings.cache_clear()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Surfaces(client, new_key(settings, "alice"), settings, tmp_path)
    get_settings.cache_clear()


def api_verdict(s: Surfaces, qc: dict) -> tuple[str | None, dict | None]:
    body = {"model": {"path": str(STORIES)}, "quantization_config": qc, "options": {"evaluate": False}}
    r = s.client.post("/v1/jobs", json=body, headers=auth(s.key))
    if r.status_code == 202:
        job = s.client.get(r.headers["Location"], headers=auth(s.key)).json()
        return None, job["request"]["quantization_config"]
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), r.text
    field = r.json()["errors"][0]["field"]
    assert field.startswith("quantization_config."), r.text
    return field.removeprefix("quantization_config."), None


def engine_verdict(s: Surfaces, qc: dict) -> tuple[str | None, dict | None]:
    from qaas.worker.engine.errors import InvalidConfig, SourceRejected
    from qaas.worker.engine.methods.base import get_method
    from qaas.worker.engine.options import EngineOptions
    from qaas.worker.engine.pipeline import quantize

    options = EngineOptions(device="cpu", evaluate=False, allowed_roots=tuple(str(r) for r in s.settings.model_roots),
                            calibration_datasets=s.settings.calibration_datasets)
    try:
        quantize({"path": str(s.tmp / "no-model-here")}, qc, s.tmp / "engine-out", options=options)
    except InvalidConfig as exc:
        return exc.field, None
    except SourceRejected:  # past every check of the request: it stopped at the missing model
        return None, get_method(qc["quant_method"]).validate(qc)
    raise AssertionError("the engine ran without a model")


def cli_verdict(s: Surfaces, qc: dict, capsys) -> str | None:
    from qaas import cli

    empty = s.tmp / "empty-model"
    empty.mkdir(exist_ok=True)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["quantize", str(empty), "--config", json.dumps(qc), "--out", str(s.tmp / "cli-out"), "--no-eval",
                  "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    named = re.search(r"^error: quantization_config\.([\w.]+): ", err, re.M)
    if named:
        return named.group(1)
    assert "error (source_rejected)" in err, err  # accepted: it stopped at the empty model directory
    return None


@pytest.mark.parametrize("name, qc, field", ROWS, ids=[r[0] for r in ROWS])
def test_api_engine_and_cli_give_the_same_verdict(surfaces, capsys, name, qc, field):
    qc = config_of(qc)
    api_field, stored = api_verdict(surfaces, qc)
    engine_field, normalized = engine_verdict(surfaces, qc)
    cli_field = cli_verdict(surfaces, qc, capsys)
    assert (api_field, engine_field, cli_field) == (field, field, field)
    if field is None:
        assert stored == normalized
        import jsonschema_rs  # what schemathesis validates with

        openapi = surfaces.client.get("/openapi.json").json()
        schema = openapi["components"]["schemas"]["JobRequest"]["properties"]["quantization_config"]
        jsonschema_rs.validate(schema, qc)
        jsonschema_rs.validate(schema, stored)
