"""How long a running job has left, for the dashboard's ETA.

Two parts, because the page ticks the first every second between server renders:
- the current stage: what is left of it at the rate seen so far in it (fraction done in the time spent),
  or, before it reports any progress, its typical duration minus the time spent;
- the stages still to come: their typical durations.

Typical durations come from the owner's recent succeeded jobs of the same method: those on the same model
(the same size, so taken as they are), else those on any model, scaled by how long this job's quantize stage
takes against theirs (quantize and evaluate both grow with the model's size). No estimate (None) rather than a
guess when there is nothing to go on: a first job, a stage no past job went through.
"""

from __future__ import annotations

import datetime as dt
import statistics
from dataclasses import dataclass
from typing import Any

HISTORY_JOBS = 20
MIN_PROGRESS = 0.01  # below this the rate says nothing yet


@dataclass(frozen=True)
class Past:
    """One finished job the estimate may learn from."""

    source_model: str
    timings: dict[str, float]


@dataclass(frozen=True)
class Estimate:
    #: The current stage's typical duration (None: not known); the page subtracts the time spent in it.
    stage_typical_s: float | None
    #: The stages after the current one together (None: not known).
    rest_s: float | None


def planned_stages(request: dict[str, Any]) -> list[str]:
    """The stages a job with this request goes through, in order."""
    qc = request.get("quantization_config") or {}
    options = request.get("options") or {}
    stages = ["resolve", "load"]
    stages += ["calibrate", "quantize"] if qc.get("quant_method") == "gptq" else ["quantize"]
    if options.get("evaluate", True):
        stages.append("evaluate")
    stages.append("export")
    if request.get("push_to_hub"):
        stages.append("publish")
    return stages


def stage_left_s(progress: float, in_stage_s: float, typical_s: float | None) -> float | None:
    """What is left of the current stage: from its rate once it reports progress, else from its typical time."""
    if MIN_PROGRESS <= progress < 1.0:
        return in_stage_s * (1.0 - progress) / progress
    if typical_s is not None:
        return max(0.0, typical_s - in_stage_s)
    return None


def _median(pasts: list[Past], stage: str) -> float | None:
    values = [float(p.timings[stage]) for p in pasts if isinstance(p.timings.get(stage), (int, float))]
    return statistics.median(values) if values else None


def estimate(request: dict[str, Any], source_model: str, stage: str | None, progress: float, in_stage_s: float,
             timings: dict[str, float], history: list[Past]) -> Estimate:
    """The estimate for a job running `stage` (`progress` of it done after `in_stage_s`), given the stages it
    already finished (`timings`) and `history`, its owner's recent succeeded jobs of the same method."""
    plan = planned_stages(request)
    if stage not in plan:
        return Estimate(None, None)
    same_model = [p for p in history if p.source_model == source_model]
    reference, scale = same_model, 1.0
    if not same_model:
        reference, scale = history, None
        theirs = _median(history, "quantize")
        if stage == "quantize" and MIN_PROGRESS <= progress:
            mine = in_stage_s / progress
        else:
            mine = timings.get("quantize")
        if theirs and mine is not None:
            scale = float(mine) / theirs
    if not reference or scale is None:
        return Estimate(None, None)

    def typical(name: str) -> float | None:
        m = _median(reference, name)
        return None if m is None else m * scale

    rest: float | None = 0.0
    for name in plan[plan.index(stage) + 1:]:
        t = typical(name)
        if t is None:
            rest = None
            break
        rest += t
    return Estimate(typical(stage), rest)


def remaining_s(est: Estimate, progress: float, in_stage_s: float) -> float | None:
    """The whole job's time left (the page computes the same from the row's data attributes)."""
    left = stage_left_s(progress, in_stage_s, est.stage_typical_s)
    if left is None or est.rest_s is None:
        return None
    return left + est.rest_s


def in_stage_s(stage_started: dt.datetime | None, now: dt.datetime) -> float:
    return max(0.0, (now - stage_started).total_seconds()) if stage_started else 0.0
