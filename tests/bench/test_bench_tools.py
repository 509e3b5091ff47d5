"""The benchmark tooling that one GPU call depends on, checked on the CPU: the engine functions the profiler names
still exist (a renamed engine function must fail here, not silently drop out of a profile), the trace analysis
attributes work to the innermost phase, the Nsight Compute and py-spy summaries parse their inputs, the load
report judges the goals, and gptq_speed.py's e2e and profile modes run the real engine end to end at a tiny shape.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.append(str(BENCH))
sys.path.append(str(BENCH / "load"))

import engine_phases  # noqa: E402
import load_report  # noqa: E402
import ncu_summary  # noqa: E402
import pyspy_summary  # noqa: E402
import trace_summary  # noqa: E402


def _qaas_objects():
    """Every function and class attribute reachable from a loaded qaas module."""
    for name, mod in list(sys.modules.items()):
        if mod is None or not (name == "qaas" or name.startswith("qaas.")):
            continue
        for obj in list(vars(mod).values()):
            yield obj
            if isinstance(obj, type):
                yield from list(vars(obj).values())


def test_every_named_engine_phase_is_wrapped_then_restored():
    labels = []

    def wrap(label, fn):
        labels.append(label)

        def inner(*a, **k):
            return fn(*a, **k)

        inner.bench_phase = label
        return inner

    phases = {**engine_phases.GPTQ_PHASES, **engine_phases.EVAL_PHASES}
    with engine_phases.instrument(phases, wrap):
        # labels are strings; objects that answer any attribute (sqlalchemy's `func`) are not wrapped phases
        wrapped = {label for o in _qaas_objects() if isinstance(label := getattr(o, "bench_phase", None), str)}
        from qaas.worker.engine.methods.gptq import GPTQMethod

        assert getattr(GPTQMethod.read_back_weight, "bench_phase", None) == "eval: read back quantized layers"
    assert sorted(set(labels)) == sorted(set(phases.values()))
    assert wrapped == set(phases.values())
    assert not any(isinstance(getattr(o, "bench_phase", None), str) for o in _qaas_objects())


def test_an_unknown_engine_function_is_an_error():
    with pytest.raises(LookupError, match="no_such_engine_function"):
        with engine_phases.instrument({"no_such_engine_function": "x"}, lambda label, fn: fn):
            pass


def _x(cat, name, ts, dur, tid=1, corr=None):
    e = {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "pid": 1}
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def test_trace_summary_attributes_device_work_to_the_innermost_phase_open_at_launch(tmp_path):
    p = engine_phases.PREFIX
    events = [
        _x("user_annotation", p + "outer", 0, 100),
        _x("user_annotation", p + "inner", 0, 50),  # opens together with outer: still the innermost
        _x("cuda_runtime", "cudaLaunchKernel", 10, 2, corr=1),
        _x("cuda_driver", "cuLaunchKernel", 60, 2, corr=2),
        _x("cpu_op", "aten::item", 62, 30),
        _x("cuda_runtime", "cudaMemcpyAsync", 120, 2, corr=3),
        _x("kernel", "void gemm<float, 128>(int)", 20, 30, tid=7, corr=1),
        _x("kernel", "orphan", 52, 3, tid=7, corr=99),  # no launch recorded: the phase before it on its stream
        _x("kernel", "_triton_kernel", 80, 10, tid=7, corr=2),  # 25 µs after the last kernel ended
        _x("gpu_memcpy", "Memcpy DtoH", 125, 5, tid=7, corr=3),
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    s = trace_summary.summarize(path)
    rows = {r["phase"]: r for r in s["phases"]}
    assert rows["inner"]["launches"] == 2  # the gemm and the orphan after it
    assert s["placed_by_stream_order"] == 1
    assert rows["outer"]["device_busy_ms"] == pytest.approx(0.010)
    assert rows["outer"]["device_idle_before_ms"] == pytest.approx(0.025)
    assert rows[trace_summary.OUTSIDE]["launches"] == 1
    assert rows["inner"]["host_wall_ms"] == pytest.approx(0.050)
    assert rows["outer"]["host_wall_ms"] == pytest.approx(0.050)  # its 100 µs less the nested 50
    assert s["top_kernels"][0]["kernel"] == "void gemm<…>"
    gap = next(g for g in s["longest_gaps"] if g["before_phase"] == "outer")
    assert gap["host_was_in"] == "aten::item"
    assert "| inner |" in trace_summary.markdown(s, "t")


def test_ncu_summary_reads_units_labels_launches_and_ranks_stalls():
    text = "\n".join([
        '"ID","Kernel Name","gpu__time_duration.sum","dram__bytes_read.sum","dram__bytes_write.sum",'
        '"sm__warps_active.avg.pct_of_peak_sustained_active",'
        '"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",'
        '"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio"',
        '"","","usecond","Mbyte","Mbyte","%","",""',
        '"0","_quantize4_pairs_kernel","100","400","100","61.5","4.5","7.25"',
    ])
    rec = ncu_summary.parse_raw(text)
    assert rec[0]["gpu__time_duration.sum"] == pytest.approx(100e-6)
    d = ncu_summary.describe(rec[0], copy_gbps=5000)
    assert d["achieved_GBps"] == pytest.approx(5000)
    assert d["of_copy"] == pytest.approx(1.0)
    assert [k for k, _ in d["stalls"]] == ["wait", "long_scoreboard"]
    table, labelled = ncu_summary.summary_text([d], {"launches": [{"shape": "4096x4096", "call": "nf4",
                                                                    "kernel": "quantize"}]})
    assert labelled[0]["shape"] == "4096x4096" and labelled[0]["planned"] == "quantize"
    assert "| 4096x4096 | nf4 | quantize | 100.0 |" in table
    _, unlabelled = ncu_summary.summary_text([d, d], {"launches": [{"shape": "a", "call": "b", "kernel": "c"}]})
    assert unlabelled[0]["shape"] == "?"  # the report does not hold the planned launches: no guessing


def test_pyspy_summary_charges_self_time_to_the_leaf_package(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    site = "/venv/lib/python3.11/site-packages"
    raw = tmp_path / "raw.txt"
    raw.write_text(
        f"process 1;<module> ({repo}/api/jobs/endpoints.py:10);execute ({site}/psycopg/cursor.py:5) 3\n"
        f"process 1;<module> ({repo}/api/jobs/endpoints.py:10);run (/usr/lib/python3.11/asyncio/runners.py:1) 1\n")
    s = pyspy_summary.summarize([raw])
    assert s["samples"] == 4
    assert s["self_by_package"][0] == ["psycopg", 75.0]
    assert ["asyncio", 25.0] in s["self_by_package"]
    assert s["inclusive_ours"] == [["api/jobs/endpoints.py:<module>", 100.0]]


def _run(rps, p99=10.0, half_p99=5.0):
    r = {"rps": rps, "p50_ms": 1.0, "p99_ms": p99, "non2xx": 0, "errors": 0, "server_cpu_ms_per_request": 0.5}
    return {"closed": r, "half_rate": {**r, "rps": rps / 2, "offered_rps": rps / 2, "p99_ms": half_p99}}


def test_load_report_judges_each_scenario_against_the_yardstick_run_beside_it(tmp_path):
    results = {
        "machine": {"cpus": 2, "cpu_model": "x", "memory_bytes": 2**30, "kernel": "k", "python": "3", "postgresql": "15",
                    "redis": "7", "wrk": "wrk"},
        "date": "now", "command": "run.py", "api_workers": 2, "connections": 32, "duration_s": 5,
        "yardstick": {"body_bytes": 900, "runs": [_run(10_000), _run(12_000), _run(11_000)]},
        "scenarios": {"submit": {**_run(1_000, half_p99=150.0), "yardstick_rps": 10_000},
                      "status": {**_run(4_500), "yardstick_rps": 11_000},
                      "list": {**_run(2_000)}},  # no paired run: the mean of the yardstick runs
    }
    v = load_report.verdicts(results)
    assert v["status"]["fraction"] == pytest.approx(4_500 / 11_000)
    assert v["status"]["rate_met"] and v["status"]["p99_met"]
    assert v["submit"]["fraction"] == pytest.approx(0.10)
    assert v["submit"]["rate_met"] and not v["submit"]["p99_met"]  # 150 ms at half rate > 100 ms
    assert v["list"]["fraction"] == pytest.approx(2_000 / 11_000)
    md = load_report.write_md(results, tmp_path / "load.md")
    assert "missed by POST /v1/jobs (p99)." in md
    assert "a noisy run" in md  # 10k..12k is an 18 % spread
    results["yardstick"]["runs"] = [_run(10_000), _run(10_500)]
    assert "a noisy run" not in load_report.write_md(results, tmp_path / "load.md")


def test_load_report_judges_the_rate_goals_against_the_one_route_fastapi_app_and_keeps_the_bare_asgi_column(tmp_path):
    results = {
        "machine": {"cpus": 2, "cpu_model": "x", "memory_bytes": 2**30, "kernel": "k", "python": "3", "postgresql": "15",
                    "redis": "7", "wrk": "wrk"},
        "date": "now", "command": "run.py", "api_workers": 2, "connections": 32, "duration_s": 5,
        "yardstick": {"body_bytes": 900, "runs": [_run(30_000), _run(30_000)],
                      "trivial_fastapi": _run(12_000), "fastapi_runs": [_run(12_000), _run(10_000)]},
        "scenarios": {"status": {**_run(4_500), "yardstick_rps": 30_000, "fastapi_yardstick_rps": 10_000},
                      "submit": {**_run(1_000), "yardstick_rps": 30_000},  # no paired FastAPI run: their mean
                      "list": {**_run(2_000), "yardstick_rps": 30_000, "fastapi_yardstick_rps": 12_000}},
    }
    v = load_report.verdicts(results)
    assert v["status"]["fraction"] == pytest.approx(0.15) and v["status"]["fraction_fastapi"] == pytest.approx(0.45)
    assert v["status"]["rate_met"]  # 45 % of FastAPI, though 15 % of the bare callable
    assert v["submit"]["fraction_fastapi"] == pytest.approx(1_000 / 11_000) and not v["submit"]["rate_met"]
    md = load_report.write_md(results, tmp_path / "load.md")
    assert "| of bare ASGI | of one-route FastAPI |" in md
    assert "| GET /v1/jobs/{id} | 4,500 | 15.0% | **45.0%** | ≥ 40% met |" in md
    assert "judged against the one-route FastAPI app" in md and "missed by POST /v1/jobs (rate)." in md


def _gptq_speed(tmp_path, *args):
    out = subprocess.run(
        [sys.executable, "-P", str(BENCH / "gptq_speed.py"), "--out", str(tmp_path / "res"), "--workdir",
         str(tmp_path / "work"), "--shape", "tiny", "--nsamples", "2", "--seqlen", "32", "--tag", "t", *args],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("SUMMARY t")
    return json.loads((tmp_path / "res" / "gptq_speed-t.json").read_text())


@pytest.mark.parametrize("read_back", [False, True])
def test_gptq_speed_e2e_times_blocks_phases_and_the_evaluation(tmp_path, read_back):
    """The evaluation beside the quantization (its own clock: its block passes run inside the quantize stage),
    or after it from the exported files read back (the evaluate stage); parts named by `EVAL_PHASES`."""
    r = _gptq_speed(tmp_path, "--blocks", "2", "--evaluate", "--eval-windows", "2",
                    *(["--eval-read-back"] if read_back else []))
    e = r["e2e"]
    assert len(e["block_s"]) == 2 and all(b > 0 for b in e["block_s"])
    assert {"forward + Hessians", "gptq", "pack + write"} <= set(e["phases_s"])
    assert e["extrapolated_full_model"]["blocks"] == 4
    ev = e["evaluation"]
    common = {"eval: windows to the first block", "eval: windows through the blocks", "eval: head (logits, NLL)"}
    if read_back:
        assert set(ev["parts_s"]) == common | {"eval: streamed passes (read back)", "eval: read back quantized layers"}
        assert ev["mode"] == "streamed block by block" and ev["stage_s"] == ev["evaluate_stage_s"]
    else:
        assert set(ev["parts_s"]) == common
        assert ev["mode"] == "streamed beside the quantization" and ev["stage_s"] == ev["passes_s"]["total"]
        assert 0 < ev["evaluate_stage_s"] and ev["parts_s"]["eval: windows through the blocks"] < ev["stage_s"]
        assert 0 < e["eval_in_blocks_s"] < ev["stage_s"]  # taken off the block times
    assert e["job_without_evaluation_s"] == pytest.approx(e["wall_s"] - ev["stage_s"], abs=0.02)
    assert ev["windows"] == 2 and ev["perplexity_after"] > 1 and ev["passes_s"]["total"] > 0
    assert ev["extrapolated_full_model"]["blocks"] == 4
    assert "partial" not in r


def test_gptq_speed_profile_puts_every_phase_of_one_block_in_the_tables(tmp_path):
    r = _gptq_speed(tmp_path, "--mode", "profile")
    rows = {x["phase"]: x for x in r["profile"]["summary"]["phases"]}
    for label in set(engine_phases.GPTQ_PHASES.values()):
        assert rows[label]["launches"] > 0, label
    assert len(r["profile"]["job"]["block_s"]) == 3
    assert "## Profile of one block" in (tmp_path / "res" / "gptq_speed-t.md").read_text()


@pytest.mark.slow
def test_qlora_speed_smoke_runs_both_loops_with_and_without_checkpointing(tmp_path):
    """bench/qlora_speed.py at a tiny shape on the CPU: every phase runs and the report holds its figures."""
    out = tmp_path / "qlora.json"
    subprocess.run([sys.executable, "-P", str(BENCH / "qlora_speed.py"), "--smoke", "--blocks", "2", "--steps", "2",
                    "--seq", "32", "--workdir", str(tmp_path / "work"), "--out", str(out)], check=True, timeout=600)
    report = json.loads(out.read_text())
    phases = [(p["impl"].split()[0], p["gradient_checkpointing"]) for p in report["phases"]]
    assert phases == [("qaas", True), ("peer", True), ("qaas", False), ("peer", False)], report["phases"]
    for p in report["phases"]:
        assert p["steps"] == 2 and p["tokens_per_s"] > 0 and p["trainable_parameters"] > 0
    assert report["phases"][0]["trainable_parameters"] == report["phases"][1]["trainable_parameters"]
    base = report["base"]
    assert base["quantized_parameters"] == 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128)  # q,o; k,v; the MLP
    # 4 bits + constants; at this size each layer's 1 KB copy of the double quantization's code table costs more
    # than 8-bit absmax saves (the 8B shape is where it saves ~0.37 bits)
    assert 4.12 < base["bits_per_parameter_nf4_dq"] and 4.5 < base["bits_per_parameter_nf4_alone"] < 4.55
    assert "| qaas | on |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_gguf_speed_smoke_times_every_phase_and_checks_the_peer_bytes(tmp_path):
    """bench/gguf_speed.py at a tiny 256-wide shape on the CPU: every phase timed, and when the peer runs, our
    Q4_K_M file is byte-identical to llama_model_quantize's."""
    out = tmp_path / "gguf.json"
    r = subprocess.run([sys.executable, "-P", str(BENCH / "gguf_speed.py"), "--smoke", "--blocks", "1",
                        "--budget", "100000", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    phases = report["ours"]["phases_s"]
    assert {"read", "convert", "quantize Q4_K_M", "to host + queue write Q4_K_M", "quantize Q8_0",
            "finish writes + sha256"} <= set(phases)
    assert set(report["ours"]["files"]) == {"F16", "Q4_K_M", "Q5_K_M", "Q8_0"}
    peer = report["peer"]
    if "wall_s" in peer:
        assert peer["byte_identical_to_ours"] is True
    else:
        assert "llama-cpp-python" in peer["skipped"]


# ---- gptq_vs_gptqmodel.py: comparing two GPTQ tools by their means over calibration window orders ------------------
def _gvg():
    import gptq_vs_gptqmodel

    return gptq_vs_gptqmodel


def test_window_orders_are_seeded_permutations_and_order_zero_is_the_draw():
    gvg = _gvg()
    assert gvg.window_permutation(16, 0) is None
    p1, p2 = gvg.window_permutation(16, 1), gvg.window_permutation(16, 2)
    assert sorted(p1.tolist()) == list(range(16))  # the same windows, none dropped or repeated
    assert p1.tolist() == gvg.window_permutation(16, 1).tolist()  # both sides and every rerun get the same order
    assert p1.tolist() != p2.tolist()


def test_qaas_gets_the_permuted_windows_only_inside_the_probe():
    from transformers import AutoTokenizer

    from conftest import SHAKESPEARE, STORIES
    from qaas.worker.engine.methods.gptq import run as gptq_run
    from qaas.worker.engine.options import EngineOptions

    gvg = _gvg()
    tok = AutoTokenizer.from_pretrained(str(STORIES))
    kw = dict(nsamples=8, seqlen=32, seed=0,
              sources=EngineOptions(allowed_roots=(str(SHAKESPEARE.parent),)).calibration_sources())
    draw = gptq_run.load_calibration
    plain = draw(str(SHAKESPEARE), tok, **kw)
    perm = gvg.window_permutation(8, 3)
    with gvg.qaas_windows_permuted(perm):
        shuffled = gptq_run.load_calibration(str(SHAKESPEARE), tok, **kw)
    assert gptq_run.load_calibration is draw  # restored
    assert shuffled.input_ids.tolist() == plain.input_ids[perm].tolist()
    assert shuffled.sha256 != plain.sha256  # the bench checks qaas drew what GPTQModel gets: the permuted windows


def test_float32_writeback_probe_keeps_the_loops_scales_only_inside_it():
    import torch

    from qaas.worker.engine.methods.gptq import run as gptq_run

    gvg = _gvg()
    torch.manual_seed(0)
    W, X = torch.randn(16, 128), torch.randn(512, 128)
    H = 2 * X.t() @ X / X.shape[0]
    opts = dict(bits=3, group_size=64, sym=True, damp_percent=0.1, backend="torch")
    stacked = gptq_run.gptq_quantize_stacked

    def fp16_valued(s):
        return torch.equal(s, s.half().float())

    (stored,) = stacked([W], H, **opts)
    with gvg.qaas_float32_writeback(True):
        (probe,) = gptq_run.gptq_quantize_stacked([W], H, **opts)
    assert gptq_run.gptq_quantize_stacked is stacked  # restored
    assert fp16_valued(stored.scales) and not fp16_valued(probe.scales)  # the write-back uses the loop's scales
    assert torch.equal(probe.codes, stored.codes)  # the same codes: the layer's checkpoint is the same
    assert torch.equal(probe.scales.half(), stored.scales.half())
    assert torch.equal(probe.Q, (probe.codes - probe.zeros[probe.g_idx.long()].t()) * probe.scales[probe.g_idx.long()].t())


def test_ratio_interval_is_welchs_t_on_log_perplexity():
    import math

    gvg = _gvg()
    q, g = [120.0, 125.0, 130.0, 122.0], [100.0, 95.0, 105.0, 98.0]
    lq, lg = [math.log(x) for x in q], [math.log(x) for x in g]
    mq, mg = sum(lq) / 4, sum(lg) / 4
    vq, vg = (sum((x - mq) ** 2 for x in lq) / 3) / 4, (sum((x - mg) ** 2 for x in lg) / 3) / 4
    df = (vq + vg) ** 2 / (vq**2 / 3 + vg**2 / 3)
    t = gvg.T975[int(df) - 1]
    lo, hi = (float(x) for x in gvg.ratio_interval(q, g).split("-"))
    assert lo == pytest.approx(math.exp(mq - mg - t * math.sqrt(vq + vg)), abs=5e-4)
    assert hi == pytest.approx(math.exp(mq - mg + t * math.sqrt(vq + vg)), abs=5e-4)
    assert lo > 1.0  # this qaas is worse beyond the spread
    lo, hi = (float(x) for x in gvg.ratio_interval(g, g).split("-"))
    assert lo < 1.0 < hi and lo * hi == pytest.approx(1.0, abs=2e-3)  # the same runs: parity, symmetric in log
    assert gvg.ratio_interval([100.0], [90.0]) == "–"  # one run per side has no spread to judge by


def test_means_table_averages_window_orders_and_keeps_other_probes_apart():
    gvg = _gvg()

    def row(order, q, g, **extra):
        return {"bits": 3, "group_size": 64, "ordering": "act", "sym": True, "window_order": order,
                "qaas": {"ppl": {"consumer": {"ppl": q}}}, "gptqmodel": {"ppl": {"consumer": {"ppl": g}}}, **extra}

    doc = {"rows": {
        "m|3:64|act|sym": row(0, 200.0, 160.0),
        "m|3:64|act|sym|windows1": row(1, 180.0, 200.0),
        "m|3:64|act|sym|seed1": row(0, 999.0, 1.0, calibration_seed=1),  # other tokens: not an order of these
        "m|3:64|act|sym|peer-batch4": row(0, 999.0, 1.0, gptqmodel_batch_size=4),
        "m|3:64|act|sym|qaas-f32-writeback": row(0, 150.0, 160.0, qaas_float32_writeback=True),
        "other|3:64|act|sym": row(0, 1.0, 1.0),
    }}
    lines = gvg.means_over_window_orders(doc, "m")
    body = [ln for ln in lines if ln.startswith("| 3 |")]
    assert len(body) == 1  # the probe has one order only: no mean of it
    cells = [c.strip() for c in body[0].split("|")]
    assert cells[5] == "0, 1" and cells[6] == "200.0, 180.0" and cells[7] == "160.0, 200.0"
    assert float(cells[8]) == pytest.approx((200 * 180) ** 0.5, abs=1e-3)
    assert float(cells[10]) == pytest.approx(((200 * 180) / (160 * 200)) ** 0.5, abs=1e-4)
    assert cells[12] == "1 of 2"
