"""A short text summary of an Nsight Compute report of the NF4 quantize kernels: per profiled launch, achieved
DRAM throughput, occupancy and the top issue-stall reasons, labelled by the plan `bnb_kernels.py --ncu-target`
wrote; then ncu's own details page (every section, with its rule-based hints) for the record.

    python bench/ncu_summary.py REPORT.ncu-rep PLAN.json OUT.txt [--ncu PATH] [--copy-gbps 4220]

Achieved bandwidth = (DRAM bytes read + written, as counted by the hardware) / kernel duration; "of copy" is
against the device-to-device copy ceiling measured on this machine (PERFORMANCE.md: 4.22 TB/s on the H200).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

_SCALE = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_STALL = re.compile(r"^smsp__average_warps_issue_stalled_(?P<why>\w+?)_per_issue_active\.ratio$")
_STALL_SAMPLED = re.compile(r"^smsp__pcsamp_warps_issue_stalled_(?P<why>\w+?)$")


def _value(raw: str, unit: str) -> float | None:
    """A raw-page cell in base units (bytes, seconds, ...), or None when it is not a number."""
    try:
        v = float(raw.replace(",", ""))
    except (ValueError, AttributeError):
        return None
    unit = unit or ""
    if unit.endswith("second") and len(unit) > len("second"):
        return v * _SCALE.get(unit[0], 1.0)
    if unit.endswith("byte") and len(unit) > len("byte"):
        return v * _SCALE.get(unit[0], 1.0)
    return v


def read_raw(ncu: str, report: Path) -> list[dict[str, float | str | None]]:
    """Every profiled launch of the report as {metric: value}, from `ncu --import --page raw --csv`."""
    return parse_raw(subprocess.run([ncu, "--import", str(report), "--page", "raw", "--csv"], check=True,
                                    capture_output=True, text=True).stdout)


def parse_raw(text: str) -> list[dict[str, float | str | None]]:
    """The raw page's CSV: a row of metric names, a row of units, then one row per launch."""
    rows = list(csv.reader(io.StringIO(text)))
    if len(rows) < 3:
        return []
    names, units = rows[0], rows[1]
    out = []
    for row in rows[2:]:
        rec: dict[str, float | str | None] = {}
        for name, unit, cell in zip(names, units, row):
            v = _value(cell, unit)
            rec[name] = v if v is not None else cell
        out.append(rec)
    return out


def describe(rec: dict, copy_gbps: float) -> dict:
    def num(key: str) -> float | None:
        v = rec.get(key)
        return v if isinstance(v, float) else None

    t = num("gpu__time_duration.sum")
    rd, wr = num("dram__bytes_read.sum"), num("dram__bytes_write.sum")
    gbps = (rd + wr) / t / 1e9 if t and rd is not None and wr is not None else None
    stalls = {m.group("why"): rec[k] for k in rec if (m := _STALL.match(k)) and isinstance(rec[k], float)}
    how = "cycles per issued instruction"
    if not stalls:
        sampled = {m.group("why"): rec[k] for k in rec if (m := _STALL_SAMPLED.match(k)) and isinstance(rec[k], float)}
        total = sum(sampled.values()) or 1.0
        stalls = {k: 100 * v / total for k, v in sampled.items()}
        how = "% of sampled stalls"
    top = sorted(stalls.items(), key=lambda kv: -kv[1])[:5]
    return {
        "kernel": str(rec.get("Kernel Name", "?")), "grid": rec.get("Grid Size"), "block": rec.get("Block Size"),
        "duration_us": t * 1e6 if t else None, "dram_read_MB": rd / 1e6 if rd is not None else None,
        "dram_write_MB": wr / 1e6 if wr is not None else None, "achieved_GBps": gbps,
        "of_copy": gbps / copy_gbps if gbps else None,
        "dram_pct_of_peak": num("dram__throughput.avg.pct_of_peak_sustained_elapsed"),
        "sm_pct_of_peak": num("sm__throughput.avg.pct_of_peak_sustained_elapsed"),
        "achieved_occupancy_pct": num("sm__warps_active.avg.pct_of_peak_sustained_active"),
        "theoretical_occupancy_pct": num("sm__maximum_warps_per_active_cycle_pct"),
        "registers": num("launch__registers_per_thread"),
        "issue_active_pct": num("smsp__issue_active.avg.pct_of_peak_sustained_active"),
        "stalls": [[k, round(v, 2)] for k, v in top], "stall_unit": how,
    }


def _fmt(v: float | None, spec: str) -> str:
    return format(v, spec) if isinstance(v, float) else "n/a"


def summary_text(launches: list[dict], plan: dict | None) -> tuple[str, list[dict]]:
    labels = (plan or {}).get("launches", [])
    if labels and len(labels) != len(launches):
        labels = []  # the report does not hold exactly the planned launches: no guessing
    lines = ["| shape | call | kernel | µs | DRAM MB r/w | GB/s | of copy | DRAM % peak | occupancy achieved/theor. % "
             "| regs | issue active % | top stalls |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    out = []
    for i, d in enumerate(launches):
        lab = labels[i] if labels else {"shape": "?", "call": "?", "kernel": ""}
        d = {**d, "shape": lab["shape"], "call": lab["call"], "planned": lab["kernel"]}
        out.append(d)
        lines.append(
            f"| {lab['shape']} | {lab['call']} | {lab['kernel'] or d['kernel'][:40]} | {_fmt(d['duration_us'], '.1f')} | "
            f"{_fmt(d['dram_read_MB'], '.0f')}/{_fmt(d['dram_write_MB'], '.0f')} | {_fmt(d['achieved_GBps'], '.0f')} | "
            f"{_fmt(d['of_copy'], '.0%')} | {_fmt(d['dram_pct_of_peak'], '.0f')} | "
            f"{_fmt(d['achieved_occupancy_pct'], '.0f')}/{_fmt(d['theoretical_occupancy_pct'], '.0f')} | "
            f"{_fmt(d['registers'], '.0f')} | {_fmt(d['issue_active_pct'], '.0f')} | "
            + ", ".join(f"{k} {v}" for k, v in d["stalls"]) + " |")
    unit = launches[0]["stall_unit"] if launches else ""
    return "\n".join(lines) + f"\n\nStalls in {unit}.\n", out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("plan")
    ap.add_argument("out")
    ap.add_argument("--ncu", default="ncu")
    ap.add_argument("--copy-gbps", type=float, default=4220.0)
    a = ap.parse_args()
    plan = json.loads(Path(a.plan).read_text()) if Path(a.plan).exists() else None
    launches = [describe(r, a.copy_gbps) for r in read_raw(a.ncu, Path(a.report))]
    table, labelled = summary_text(launches, plan)
    details = subprocess.run([a.ncu, "--import", a.report, "--page", "details"], capture_output=True,
                             text=True).stdout
    Path(a.out).write_text(f"# Nsight Compute: NF4 quantize kernels ({a.report})\n\n{table}\n"
                           f"## ncu --page details\n\n{details}")
    Path(a.out).with_suffix(".json").write_text(json.dumps(labelled, indent=1))
    print(table)
    q = [d for d in labelled if d["planned"] == "quantize" or (not d["planned"] and "quantize" in d["kernel"])]
    print("SUMMARY ncu: " + ", ".join(f"{d.get('shape')} {d.get('call')} {_fmt(d['of_copy'], '.0%')} of copy, occupancy "
                                      f"{_fmt(d['achieved_occupancy_pct'], '.0f')}%" for d in q))
    return 0


if __name__ == "__main__":
    sys.exit(main())
