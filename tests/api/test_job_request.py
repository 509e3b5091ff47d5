"""The request schema's answers about the model: one error that names the real problem."""

from __future__ import annotations

import pytest
from conftest import STORIES, auth

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


@pytest.mark.parametrize("model, field, says", [
    ({"id": "org//name"}, "model.id", "owner/name"),
    ({"id": "-org/name", "revision": "main"}, "model.id", "owner/name"),
    ({"id": "org/name", "revision": "a b"}, "model.revision", "branch"),
    ({"path": str(STORIES), "id": "org/name"}, "model", "exactly one"),
    ({}, "model", "exactly one"),
    ({"revision": "main"}, "model", "exactly one"),
])
def test_a_bad_model_is_one_error_naming_the_real_problem(client, api_key, model, field, says):
    r = client.post("/v1/jobs", json={"model": model, "quantization_config": NF4}, headers=auth(api_key))
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert len(errors) == 1 and errors[0]["field"] == field and says in errors[0]["message"], errors
