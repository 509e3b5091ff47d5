"""The dashboard knows GGUF: the submit form's types field becomes the request's `types`, errors on one type
show beside that field, the job list labels the types, and a job page tabulates each file's quality."""

from __future__ import annotations

from types import SimpleNamespace

from qaas.api.dashboard import views
from qaas.api.dashboard.routes import FORM_DEFAULTS, build_request
from qaas.schemas.job_request import JobRequest


def test_the_form_builds_a_gguf_request():
    values = {**FORM_DEFAULTS, "model": "/models/stories260K", "method": "gguf", "gguf_types": "Q4_K_M, Q8_0 F16"}
    body, errors = build_request(values)
    assert not errors
    assert body["quantization_config"] == {"quant_method": "gguf", "types": ["Q4_K_M", "Q8_0", "F16"]}
    assert JobRequest.model_validate(body).quantization_config["types"] == ["Q4_K_M", "Q8_0", "F16"]


def test_labels_and_per_type_rows():
    job = SimpleNamespace(method="gguf", bits=4, request={"quantization_config": {"types": ["Q4_K_M", "Q8_0"]}})
    assert views.method_label(job) == "GGUF Q4_K_M Q8_0"
    result = {"gguf": {"outputs": [{"type": "Q8_0", "size": 340000, "bits_per_weight": 10.1511}]},
              "evaluation": {"perplexity_before": 100.0, "per_type": {"Q8_0": {"perplexity": 101.0}}}}
    (row,) = views.gguf_rows(result)
    assert row["type"] == "Q8_0" and row["bpw"] == "10.15" and row["ppl"] == "101.000" and row["change"] == "+1.00 %"


def test_the_client_cli_prints_a_line_per_type():
    import io

    from qaas.client_cli import describe

    job = {"id": "j", "status": "succeeded", "stage": "export", "progress": 1.0, "model": "m", "method": "gguf",
           "created_at": "now", "attempt": 1, "max_attempts": 3, "files": [],
           "result": {"size_before_bytes": 1, "size_after_bytes": 1,
                      "gguf": {"outputs": [{"type": "Q8_0", "size": 340000, "bits_per_weight": 10.15}]},
                      "evaluation": {"perplexity_before": 100.0, "per_type": {"Q8_0": {"perplexity": 101.0}}}}}
    out = io.StringIO()
    describe(job, out)
    assert "gguf      Q8_0" in out.getvalue() and "10.15 bpw  perplexity 101.000" in out.getvalue()
