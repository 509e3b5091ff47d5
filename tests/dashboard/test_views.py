"""What the dashboard computes from rows and events: metric shapes of both methods, timeline, labels, ETA."""

from __future__ import annotations

import datetime as dt
import uuid
from types import SimpleNamespace

from qaas.api.dashboard import views

T0 = dt.datetime(2026, 11, 22, 10, 0, 0, tzinfo=dt.UTC)


def _ev(i, kind, *, stage=None, data=None, seconds=0.0):
    return SimpleNamespace(id=i, kind=kind, stage=stage, data=data, message=None, created_at=T0 + dt.timedelta(seconds=seconds))


def test_metric_points_read_both_methods_shapes():
    bnb = {"block": 0, "rel_error": {"model.layers.0.self_attn.q_proj": 0.09}, "max_rel_error": 0.09}
    gptq = {"layers": {"model.layers.0.mlp.up_proj": {"rel_error": 0.02, "gptq_loss": 1.0, "damp_percent": 0.1}}}
    assert views.metric_points(bnb) == {"model.layers.0.self_attn.q_proj": 0.09}
    assert views.metric_points(gptq) == {"model.layers.0.mlp.up_proj": 0.02}
    assert views.metric_points({"layer": "x", "rel_error": 0.5}) == {"x": 0.5}
    assert views.metric_points({"nll": 3.2}) == {} and views.metric_points(None) == {}


def test_layer_errors_from_events_else_from_the_result():
    events = [_ev(1, "progress", data={"done": 1, "total": 2, "metrics": {"rel_error": {"a": 0.1, "b": 0.2}}}),
              _ev(2, "progress", data={"done": 1, "total": 4, "metrics": {"nll": 2.0}}),
              _ev(3, "progress", data={"done": 2, "total": 2, "metrics": {"layers": {"c": {"rel_error": 0.3}}}})]
    assert [p["layer"] for p in views.layer_errors(events, None)] == ["a", "b", "c"]
    result = {"layer_errors": {"per_layer": {"z": 0.4}}}
    assert views.layer_errors([], result) == [{"layer": "z", "rel_error": 0.4}]


def test_timeline_uses_the_last_attempt_and_timings():
    job = SimpleNamespace(status="running", timings={"resolve": 1.0, "load": 2.5}, finished_at=None)
    events = [_ev(1, "status", data={"status": "running"}), _ev(2, "stage", stage="resolve"),
              _ev(3, "status", data={"status": "running"}, seconds=5),  # the retry
              _ev(4, "stage", stage="resolve", seconds=5), _ev(5, "stage", stage="load", seconds=6),
              _ev(6, "stage", stage="quantize", seconds=8.5)]
    spans = views.timeline(job, events, now=T0 + dt.timedelta(seconds=12.5))
    assert [(s.name, s.seconds, s.current) for s in spans] == [("resolve", 1.0, False), ("load", 2.5, False),
                                                               ("quantize", 4.0, True)]
    assert spans[2].fraction == 1.0


def test_labels_and_eta():
    job = SimpleNamespace(method="bitsandbytes", bits=4, request={"quantization_config": {
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}})
    assert views.method_label(job) == "bitsandbytes NF4 4-bit +DQ"
    job = SimpleNamespace(method="gptq", bits=4, request={"quantization_config": {"group_size": 128}})
    assert views.method_label(job) == "GPTQ 4-bit g128"
    assert views.eta_s("running", 0.25, T0, T0 + dt.timedelta(seconds=10)) == 30.0
    assert views.eta_s("running", 0.0, T0, T0) is None and views.eta_s("queued", 0.5, T0, T0) is None
    assert views.duration(75) == "1 min 15 s" and views.size(2048) == "2.0 KiB"
    assert views.short_model("/work/shared/assets/models/stories260K") == "…/models/stories260K"
    assert views.short_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"


def test_deliveries_placeholder_is_empty_without_deliveries(settings):
    from qaas.db.session import session_scope

    with session_scope(settings.resolved_database_url) as s:
        assert views.list_deliveries(s, uuid.uuid4()) == []
