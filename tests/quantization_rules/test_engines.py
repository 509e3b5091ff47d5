"""The engine-compatibility table: which GPTQ configs and layer shapes each engine loads, `options.targets`
refused at submission with the field that excludes the engine, and the format qaas writes for `sym: false`."""

from __future__ import annotations

import pytest
from conftest import SHAKESPEARE, STORIES, auth

from qaas import quantization_rules
from qaas.quantization_rules import engines
from qaas.quantization_rules.fields import FieldError
from qaas.quantization_rules.gptq import written_format

TEXT = SHAKESPEARE.read_text()[:20000]


def gptq(**fields):
    return quantization_rules.normalize({"quant_method": "gptq", "bits": 4, "dataset": [TEXT], **fields})


def loads(config, shapes=((64, 64),)):
    return {e["engine"]: e["loads"] for e in engines.gptq_engines(config, shapes)}


def test_asymmetric_is_written_as_v2_with_the_reason_and_symmetric_as_asked():
    assert written_format(gptq()) == ("gptq", None)
    fmt, why = written_format(gptq(sym=False))  # GPTQConfig(sym=False).to_dict() says format "gptq"
    assert fmt == "gptq_v2" and "GPTQModel" in why
    assert written_format(gptq(sym=False, format="gptq_v2")) == ("gptq_v2", None)
    assert written_format(gptq(format="gptq_v2")) == ("gptq_v2", None)


@pytest.mark.parametrize("fields, excluded", [
    ({}, set()),
    ({"group_size": 256}, {"exllamav2", "marlin"}),
    ({"sym": False}, {"vllm", "sglang", "marlin"}),                       # v2, which vLLM/SGLang read as v1
    ({"format": "gptq_v2"}, {"vllm", "sglang"}),
    ({"desc_act": True}, {"vllm"}),                                       # act-order with groups
    ({"desc_act": True, "group_size": -1}, set()),
    ({"bits": 3}, {"vllm", "exllamav2", "marlin"}),
    ({"bits": 2}, {"vllm", "exllamav2", "marlin"}),
    ({"bits": 8}, {"exllamav2"}),
])
def test_config_rules(fields, excluded):
    got = loads(gptq(**fields))
    assert {e for e, ok in got.items() if not ok} == excluded
    assert got["transformers"] and got["gptqmodel"]


def test_shape_rules():
    c8 = gptq(bits=8, group_size=-1)
    # a 172-wide layer written padded at 4 bits (22 words): GPTQModel reads it, vLLM/SGLang size qweight
    # in // pack_factor exactly; at 8 bits 172 is 43 whole words
    got = loads(gptq(group_size=-1), [(172, 64)])
    assert got["gptqmodel"] and got["transformers"] and not got["vllm"] and not got["sglang"]
    assert loads(c8, [(172, 64)])["vllm"]
    # 4-bit: transformers' CPU kernels need out % 32 (GPTQModel's AVX-512 / fused int4pack)
    assert engines.layer_refusal(engines.BY_NAME["transformers"], 64, 172, 4)
    assert engines.layer_refusal(engines.BY_NAME["transformers"], 172, 64, 4) is None
    assert engines.layer_refusal(engines.BY_NAME["exllamav2"], 48, 64, 4)
    assert [e.name for e in engines.required(["vllm", "transformers"])] == ["transformers", "gptqmodel", "vllm"]
    for row in engines.gptq_engines(c8, [(64, 64)]):
        assert row["source"] and any(ch.isdigit() for ch in row["source"])  # every rule says where it was read


def test_check_targets_names_the_field():
    engines.check_targets(gptq(), ["vllm", "marlin", "exllamav2"])
    with pytest.raises(FieldError) as e:
        engines.check_targets(gptq(sym=False), ["vllm"])
    assert e.value.field == "quantization_config.sym"
    with pytest.raises(FieldError) as e:
        engines.check_targets(gptq(bits=3), ["exllamav2"])
    assert e.value.field == "quantization_config.bits"
    with pytest.raises(FieldError) as e:
        engines.check_targets(gptq(desc_act=True), ["vllm"])
    assert e.value.field == "quantization_config.desc_act"
    with pytest.raises(FieldError) as e:
        engines.check_targets(gptq(), ["tensorrt"])
    assert e.value.field == "options.targets"


def _post(client, api_key, qc, options):
    return client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": qc,
                                         "options": options}, headers=auth(api_key))


def test_submission_with_an_excluded_target_is_a_422_naming_the_fields(client, api_key):
    qc = {"quant_method": "gptq", "bits": 4, "sym": False, "dataset": [TEXT]}
    r = _post(client, api_key, qc, {"targets": ["vllm"]})
    assert r.status_code == 422, r.text
    fields = {e["field"]: e["message"] for e in r.json()["errors"]}
    assert set(fields) == {"quantization_config.sym", "options.targets"}, fields
    assert "symmetric" in fields["options.targets"]
    r = _post(client, api_key, qc, {"targets": ["nope"]})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "options.targets", r.text
    nf4 = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    r = _post(client, api_key, {**qc, "sym": True}, {"cpu_compatible": True})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "options.cpu_compatible", r.text
    r = _post(client, api_key, nf4, {"targets": ["vllm"]})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "options.targets", r.text
    # accepted and stored as asked
    r = _post(client, api_key, {**qc, "sym": True}, {"targets": ["vllm", "exllamav2"]})
    assert r.status_code == 202, r.text
    assert client.get(r.headers["Location"], headers=auth(api_key)).json()["request"]["options"]["targets"] == [
        "vllm", "exllamav2"]
    r = _post(client, api_key, nf4, {"cpu_compatible": True})
    assert r.status_code == 202, r.text
