"""What the dashboard computes from rows and events: metric shapes of both methods, timeline, labels, ETA."""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from types import SimpleNamespace

from qaas.api.dashboard import eta, views

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
    job = SimpleNamespace(method="awq", bits=4, request={"quantization_config": {"group_size": 64}})
    assert views.method_label(job) == "AWQ 4-bit g64"
    assert views.duration(75) == "1 min 15 s" and views.size(2048) == "2.0 KiB"


def test_model_label_is_the_part_that_tells_local_models_apart():
    roots = [Path("/srv/models"), Path("/data/uploads")]
    assert views.model_label("/srv/models/llama/7b", roots) == "llama/7b"
    assert views.model_label("/srv/models/mistral/7b", roots) == "mistral/7b"
    assert views.model_label("/data/uploads/alice/stories260K", roots) == "alice/stories260K"
    # rows stored before paths were resolved at submission still read well
    assert views.model_label("/srv/models/tmp/../llama/7b/", roots) == "llama/7b"
    assert views.model_label("/elsewhere/x/../model", roots) == "/elsewhere/model"  # outside every root: the path
    assert views.model_label("/srv/models", roots) == "/srv/models"
    assert views.model_label("HuggingFaceTB/SmolLM2-135M", roots) == "HuggingFaceTB/SmolLM2-135M"


GPTQ_REQ = {"quantization_config": {"quant_method": "gptq"}, "options": {"evaluate": True}}
NF4_REQ = {"quantization_config": {"quant_method": "bitsandbytes"}, "options": {"evaluate": False},
           "push_to_hub": {"repo_id": "me/x"}}
PAST = {"resolve": 1.0, "load": 2.0, "calibrate": 4.0, "quantize": 20.0, "evaluate": 10.0, "export": 3.0}


def test_planned_stages_follow_the_request():
    assert eta.planned_stages(GPTQ_REQ) == ["resolve", "load", "calibrate", "quantize", "evaluate", "export"]
    assert eta.planned_stages(NF4_REQ) == ["resolve", "load", "quantize", "export", "publish"]


def test_eta_of_the_same_model_adds_the_stages_to_come_at_their_typical_durations():
    history = [eta.Past("m", PAST), eta.Past("m", {**PAST, "quantize": 30.0, "evaluate": 14.0}),
               eta.Past("m", {**PAST, "quantize": 40.0, "evaluate": 12.0})]
    # in load (no progress): the rest of load by its typical time, then calibrate, quantize, evaluate, export
    est = eta.estimate(GPTQ_REQ, "m", "load", 0.0, 0.5, {"resolve": 1.0}, history)
    assert est == eta.Estimate(2.0, 4.0 + 30.0 + 12.0 + 3.0)
    assert eta.remaining_s(est, 0.0, 0.5) == 1.5 + 49.0
    # in quantize, a quarter done after 10 s: 30 s more at that rate, then evaluate and export
    est = eta.estimate(GPTQ_REQ, "m", "quantize", 0.25, 10.0, {}, history)
    assert eta.remaining_s(est, 0.25, 10.0) == 30.0 + 12.0 + 3.0
    # the page ticks from the same two figures: a stage slower than its typical time is not "done"
    assert eta.remaining_s(eta.Estimate(2.0, 5.0), 0.0, 9.0) == 5.0


def test_eta_from_other_models_scales_by_this_jobs_quantize_time():
    history = [eta.Past("small", PAST)]  # quantize 20 s, evaluate 10 s, export 3 s
    # before this job's quantize says how big it is, nothing to scale by
    assert eta.estimate(GPTQ_REQ, "big", "calibrate", 0.5, 2.0, {}, history) == eta.Estimate(None, None)
    # quantize 10 % done after 20 s: 200 s projected, 10x the past model -> evaluate 100 s, export 30 s
    est = eta.estimate(GPTQ_REQ, "big", "quantize", 0.1, 20.0, {}, history)
    assert est.rest_s == 130.0 and eta.remaining_s(est, 0.1, 20.0) == 180.0 + 130.0
    # after quantize, its real duration is the scale
    est = eta.estimate(GPTQ_REQ, "big", "evaluate", 0.0, 0.0, {"quantize": 40.0}, history)
    assert est == eta.Estimate(20.0, 6.0)


def test_no_eta_without_history_or_for_a_stage_no_past_job_ran():
    assert eta.estimate(GPTQ_REQ, "m", "quantize", 0.5, 5.0, {}, []) == eta.Estimate(None, None)
    assert eta.remaining_s(eta.Estimate(None, None), 0.5, 5.0) is None
    # NF4 with publishing, but no past job published: the stages to come are not known
    est = eta.estimate(NF4_REQ, "m", "quantize", 0.5, 5.0, {}, [eta.Past("m", PAST)])
    assert est.rest_s is None and eta.remaining_s(est, 0.5, 5.0) is None


def test_deliveries_placeholder_is_empty_without_deliveries(settings):
    from qaas.db.session import session_scope

    with session_scope(settings.resolved_database_url) as s:
        assert views.list_deliveries(s, uuid.uuid4()) == []
