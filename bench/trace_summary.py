"""Where the time of a profiled stretch goes, phase by phase, from a torch.profiler (Kineto) Chrome trace.

Every device activity (kernel, memcpy, memset) is attributed to the phase whose range ("phase: <label>", see
`engine_phases.ranged`) was innermost on the launching thread when it was launched (the runtime or driver call
with the same correlation id). Per phase:
  * host wall: the time the phase's ranges were open on the host, nested phases excluded;
  * device busy: the summed duration of its kernels and copies, and their count and median length;
  * device idle: the gaps on the device timeline (> 2 µs) just before each of its kernels: time the GPU
    waited for the host to launch the next piece of work. A phase whose idle time is close to its host wall
    is launch- or host-bound (many small kernels, a host sync, Python work between launches).
Also: the top kernels by device time (overall and per phase) and the longest device gaps with what the host
was doing meanwhile (the host operation overlapping the gap the most).

Without CUDA (CPU smoke tests) host operations stand in for device work, so the same tables come out.
"""

from __future__ import annotations

import bisect
import json
import statistics
from collections import defaultdict
from pathlib import Path

from engine_phases import PREFIX

OUTSIDE = "(outside the named phases)"
DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}
GAP_MIN_US = 2.0


def short(name: str, width: int = 90) -> str:
    """Kernel names without template arguments and parameter lists, cut to `width`."""
    out, depth = [], 0
    for ch in name:
        if ch in "<(":
            if depth == 0:
                out.append("<…>" if ch == "<" else "")
            depth += 1
        elif ch in ">)" and depth:
            depth -= 1
        elif depth == 0:
            out.append(ch)
    s = "".join(out).strip()
    return s if len(s) <= width else s[: width - 1] + "…"


def _innermost(ranges: list[tuple[float, float, str]], items: list[tuple[float, object]]) -> dict[object, str]:
    """For each (time, key) item, the label of the innermost range open at that time (ranges are nested)."""
    # at equal times: ranges before items, and the outer (longer) of two ranges that open together first
    events = sorted([(s, 0, e, lab) for s, e, lab in ranges] + [(t, 1, k, None) for t, k in items],
                    key=lambda x: (x[0], x[1], -x[2] if x[1] == 0 else 0))
    stack: list[tuple[float, str]] = []
    out: dict[object, str] = {}
    for t, kind, a, lab in events:
        while stack and stack[-1][0] <= t:
            stack.pop()
        if kind == 0:
            stack.append((a, lab))
        else:
            out[a] = stack[-1][1] if stack else OUTSIDE
    return out


def _by_launch(device: list[dict], launch_phase: dict[object, str]) -> tuple[list[tuple[dict, str]], int]:
    """(event, phase) for each device event by its launch's correlation id. An event whose launch the trace does
    not hold (a launch path the profiler did not record) takes the phase of the event before it on its stream
    (a stream runs its work in launch order); returns how many were placed that way."""
    out, inferred, last = [], 0, {}
    for e in sorted(device, key=lambda e: e["ts"]):
        stream = (e.get("pid"), e.get("tid"))
        phase = launch_phase.get(e.get("args", {}).get("correlation"))
        if phase is None:
            phase = last.get(stream, OUTSIDE)
            inferred += 1
        last[stream] = phase
        out.append((e, phase))
    return out, inferred


def _outermost(ops: list[dict]) -> list[dict]:
    """The operations not nested in another operation of the same thread."""
    out = []
    ends: dict[object, float] = {}
    for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
        if e["ts"] >= ends.get(e["tid"], float("-inf")):
            out.append(e)
            ends[e["tid"]] = e["ts"] + e["dur"]
    return out


def _exclusive_wall(ranges: list[tuple[float, float, str]]) -> dict[str, float]:
    """Host time per label with nested ranges subtracted from their parents."""
    wall: dict[str, float] = defaultdict(float)
    stack: list[list] = []  # [end, label, child_time]
    for s, e, lab in sorted(ranges, key=lambda r: (r[0], -r[1])):
        while stack and stack[-1][0] <= s:
            end, label, child, start = stack.pop()
            wall[label] += (end - start) - child
            if stack:
                stack[-1][2] += end - start
        stack.append([e, lab, 0.0, s])
    while stack:
        end, label, child, start = stack.pop()
        wall[label] += (end - start) - child
        if stack:
            stack[-1][2] += end - start
    return wall


def summarize(trace_path: str | Path, top: int = 15) -> dict:
    events = json.loads(Path(trace_path).read_text())["traceEvents"]
    xs = [e for e in events if e.get("ph") == "X" and "dur" in e]
    ranges_by_tid: dict[object, list] = defaultdict(list)
    for e in xs:
        if e.get("cat") == "user_annotation" and e["name"].startswith(PREFIX):
            ranges_by_tid[e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["name"][len(PREFIX):]))
    device = [e for e in xs if e.get("cat") in DEVICE_CATS]
    on_gpu = bool(device)
    if on_gpu:
        launches = [e for e in xs if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})]
        launch_phase: dict[object, str] = {}
        by_tid: dict[object, list] = defaultdict(list)
        for e in launches:
            by_tid[e["tid"]].append((e["ts"], e["args"]["correlation"]))
        for tid, items in by_tid.items():
            launch_phase.update(_innermost(ranges_by_tid.get(tid, []), items))
        work, inferred = _by_launch(device, launch_phase)
    else:  # CPU: the outermost host operations are the work
        inferred = 0
        ops = _outermost([e for e in xs if e.get("cat") == "cpu_op"])
        phase_of: dict[object, str] = {}
        by_tid = defaultdict(list)
        for i, e in enumerate(ops):
            by_tid[e["tid"]].append((e["ts"], i))
        for tid, items in by_tid.items():
            phase_of.update(_innermost(ranges_by_tid.get(tid, []), items))
        work = [(e, phase_of[i]) for i, e in enumerate(ops)]
    all_ranges = [r for rs in ranges_by_tid.values() for r in rs]
    wall: dict[str, float] = defaultdict(float)
    for rs in ranges_by_tid.values():
        for label, t in _exclusive_wall(rs).items():
            wall[label] += t
    t_first = min([r[0] for r in all_ranges] + [e["ts"] for e, _ in work] or [0.0])
    t_last = max([r[1] for r in all_ranges] + [e["ts"] + e["dur"] for e, _ in work] or [0.0])

    busy: dict[str, float] = defaultdict(float)
    lengths: dict[str, list[float]] = defaultdict(list)
    idle: dict[str, float] = defaultdict(float)
    kernels: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    gaps: list[tuple[float, float, float, str]] = []
    work.sort(key=lambda w: w[0]["ts"])
    end_prev = None
    for e, phase in work:
        busy[phase] += e["dur"]
        lengths[phase].append(e["dur"])
        k = kernels[(phase, short(e["name"]))]
        k[0] += e["dur"]
        k[1] += 1
        if on_gpu and end_prev is not None and e["ts"] - end_prev > GAP_MIN_US:
            idle[phase] += e["ts"] - end_prev
            gaps.append((e["ts"] - end_prev, end_prev, e["ts"], phase))
        end_prev = e["ts"] + e["dur"] if end_prev is None else max(end_prev, e["ts"] + e["dur"])

    phases = sorted(set(wall) | set(busy), key=lambda p: -(busy.get(p, 0) + wall.get(p, 0)))
    table = [{"phase": p, "host_wall_ms": round(wall.get(p, 0) / 1e3, 3), "device_busy_ms": round(busy.get(p, 0) / 1e3, 3),
              "device_idle_before_ms": round(idle.get(p, 0) / 1e3, 3), "launches": len(lengths.get(p, [])),
              "median_us": round(statistics.median(lengths[p]), 1) if lengths.get(p) else None} for p in phases]
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for (phase, name), (t, n) in kernels.items():
        by_name[name][0] += t
        by_name[name][1] += n
    top_overall = [{"kernel": n, "device_ms": round(t / 1e3, 2), "calls": c, "mean_us": round(t / c, 1)}
                   for n, (t, c) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]]
    per_phase = {}
    for p in phases:
        rows = sorted(((n, t, c) for (ph, n), (t, c) in kernels.items() if ph == p), key=lambda r: -r[1])[:5]
        per_phase[p] = [{"kernel": n, "device_ms": round(t / 1e3, 2), "calls": c} for n, t, c in rows]
    return {
        "device": "cuda" if on_gpu else "cpu (host operations stand in for kernels)",
        "window_ms": round((t_last - t_first) / 1e3, 1),
        "device_busy_ms": round(sum(busy.values()) / 1e3, 1),
        "device_idle_ms": round(sum(idle.values()) / 1e3, 1),
        "placed_by_stream_order": inferred,
        "phases": table, "top_kernels": top_overall, "top_kernels_per_phase": per_phase,
        "longest_gaps": _explain_gaps(sorted(gaps, reverse=True)[:10], xs),
    }


def _explain_gaps(gaps: list[tuple[float, float, float, str]], xs: list[dict]) -> list[dict]:
    """For each device gap, the host operation (cpu_op or runtime call) that overlaps it the most: what the host
    was doing while the device waited."""
    host = sorted((e for e in xs if e.get("cat") in ({"cpu_op"} | LAUNCH_CATS)), key=lambda e: e["ts"])
    starts = [e["ts"] for e in host]
    out = []
    for length, a, b, phase in gaps:
        best, best_key = None, None
        for e in host[: bisect.bisect_right(starts, b)]:
            overlap = min(b, e["ts"] + e["dur"]) - max(a, e["ts"])
            if overlap > 0 and (best_key is None or (overlap, -e["dur"]) > best_key):
                best, best_key = e, (overlap, -e["dur"])
        out.append({"gap_ms": round(length / 1e3, 2), "before_phase": phase,
                    "host_was_in": short(best["name"], 60) if best else None,
                    "of_the_gap": round(best_key[0] / length, 2) if best else None})
    return out


def markdown(s: dict, title: str) -> str:
    L = [f"### {title}", "",
         f"Profiled window {s['window_ms']:.0f} ms; device busy {s['device_busy_ms']:.0f} ms, idle between "
         f"launches {s['device_idle_ms']:.0f} ms ({s['device']})"
         + (f"; {s['placed_by_stream_order']} device events without a recorded launch placed by stream order"
            if s.get("placed_by_stream_order") else "") + ".", "",
         "| phase | host wall ms | device busy ms | device idle before its launches ms | launches | median µs |",
         "|---|---:|---:|---:|---:|---:|"]
    for r in s["phases"]:
        L.append(f"| {r['phase']} | {r['host_wall_ms']:.1f} | {r['device_busy_ms']:.1f} | "
                 f"{r['device_idle_before_ms']:.1f} | {r['launches']} | {r['median_us'] if r['median_us'] is not None else ''} |")
    L += ["", "Top kernels by device time:", "", "| kernel | ms | calls | mean µs |", "|---|---:|---:|---:|"]
    L += [f"| `{k['kernel']}` | {k['device_ms']:.1f} | {k['calls']} | {k['mean_us']:.1f} |" for k in s["top_kernels"]]
    L += ["", "Per phase, top 5:", ""]
    for p, rows in s["top_kernels_per_phase"].items():
        if rows:
            L.append(f"- {p}: " + "; ".join(f"`{r['kernel']}` {r['device_ms']:.1f} ms × {r['calls']}" for r in rows))
    if s["longest_gaps"]:
        L += ["", "Longest device gaps: " + "; ".join(
            f"{g['gap_ms']:.1f} ms before {g['before_phase']} (host in `{g['host_was_in']}` for {g['of_the_gap']:.0%} of it)"
            if g["host_was_in"] else f"{g['gap_ms']:.1f} ms before {g['before_phase']} (no host operation)"
            for g in s["longest_gaps"])]
    return "\n".join(L) + "\n"
