"""The rules package on its own: plain Python, normalizing twice changes nothing, the written bitsandbytes config
is one transformers accepts, and where calibration data may come from."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ASSETS, SHAKESPEARE, WIKITEXT, make_settings
from support.quantization_rule_cases import accepted

from qaas import quantization_rules
from qaas.quantization_rules import CalibrationSources, FieldError, InvalidQuantizationConfig
from qaas.quantization_rules.calibration import MIN_CALIBRATION_TOKENS, check_source


def test_importing_the_rules_loads_neither_pydantic_nor_torch():
    code = ("import sys, qaas.quantization_rules as r; r.normalize({'quant_method': 'bitsandbytes', 'load_in_8bit': True});"
            "bad = [m for m in ('pydantic', 'torch', 'transformers', 'fastapi') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name, qc", accepted())
def test_normalizing_a_normalized_config_changes_nothing(name, qc):
    once = quantization_rules.normalize(qc)
    assert quantization_rules.normalize(once) == once
    assert json.loads(json.dumps(once)) == once  # stored as JSON


@pytest.mark.parametrize("name, qc", [(n, q) for n, q in accepted() if q["quant_method"] == "bitsandbytes"])
def test_every_accepted_bitsandbytes_config_is_one_transformers_builds(name, qc):
    from transformers import BitsAndBytesConfig

    fields = {k: v for k, v in quantization_rules.normalize(qc).items() if k != "quant_method"}
    written = BitsAndBytesConfig(**fields).to_dict()
    assert quantization_rules.normalize(json.loads(json.dumps(written)))["load_in_4bit"] == fields["load_in_4bit"]


def test_awq_searches_as_autoawq_and_llm_compressor_do_by_default():
    """AutoAWQ's quantize() and llm-compressor's AWQModifier both default to duo scaling and the clipping search
    over a 20-point grid; a request naming neither gets the same search."""
    from qaas.quantization_rules.awq import N_GRID

    qc = quantization_rules.normalize({"quant_method": "awq", "dataset": "wikitext2"})
    assert (qc["duo_scaling"], qc["apply_clip"], N_GRID) == (True, True, 20)


def test_all_broken_rules_are_reported_in_field_order():
    with pytest.raises(InvalidQuantizationConfig) as exc:
        quantization_rules.normalize({"quant_method": "gptq", "bits": 5, "group_size": 0, "damp_percent": 2})
    assert [e.field for e in exc.value.errors] == ["bits", "group_size", "dataset", "damp_percent"]


def test_a_named_dataset_is_available_with_a_hub_or_a_registered_copy(tmp_path):
    with_hub = CalibrationSources(hub_problem=lambda: None)
    without = CalibrationSources(hub_problem=lambda: "no hub here")
    check_source("c4", with_hub)
    check_source("allenai/c4", with_hub)
    with pytest.raises(FieldError) as exc:
        check_source("c4", without)
    assert exc.value.field == "dataset" and "no hub here" in exc.value.message and "list of strings" in exc.value.message
    check_source("c4", CalibrationSources(registered={"c4": str(WIKITEXT)}, hub_problem=lambda: "no hub here"))
    with pytest.raises(FieldError, match="registered"):
        check_source("c4", CalibrationSources(registered={"c4": str(tmp_path / "gone.txt")}))


def test_a_calibration_file_below_the_minimum_is_refused(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("x" * (MIN_CALIBRATION_TOKENS - 1))
    with pytest.raises(FieldError, match="fewer than"):
        check_source(str(small), CalibrationSources.here([tmp_path]))
    small.write_text("x" * MIN_CALIBRATION_TOKENS)
    check_source(str(small), CalibrationSources.here([tmp_path]))
    with pytest.raises(FieldError, match="not allowed"):
        check_source(str(small), CalibrationSources())


def test_registered_copies_are_checked_when_the_service_starts(tmp_path):
    make_settings(tmp_path, calibration_datasets={"wikitext2": str(WIKITEXT)})
    for bad in ({"c4": "/etc/hostname"}, {"c4": str(ASSETS / "no-such.txt")}, {"c4": str(SHAKESPEARE.parent)},
                {"c4": "relative.txt"}):
        with pytest.raises(ValueError, match="QAAS_CALIBRATION_DATASETS"):
            make_settings(tmp_path, calibration_datasets=bad)
