"""The rules of `options.gpus`: how many GPUs of one worker host a job runs on.

Plain Python, shared by the request schema (the fixed rules), the API's service (the operator's bound,
`QAAS_MAX_GPUS_PER_JOB`), the worker's settings and the engine (which folds the calibration Hessians over
`MOST` fixed shards, so that any count of GPUs up to `MOST` writes the same bytes as one GPU).
"""

from __future__ import annotations

from .fields import FieldError

#: The most GPUs one job may be given: one host's GPUs, and the engine's count of calibration shards (a rank
#: owns whole shards; with more ranks than shards some would have nothing to do).
MOST = 8
#: The methods whose engine spreads one job over several GPUs (GPTQ's calibration and Hessians first).
METHODS_ON_SEVERAL = ("gptq",)


def check(gpus: int, *, method: str, bound: int = MOST) -> None:
    """FieldError naming `options.gpus` unless a `method` job may run on `gpus` GPUs where jobs are given at
    most `bound` (the operator's setting)."""
    if not 1 <= gpus <= MOST:
        raise FieldError("options.gpus", f"must be 1 to {MOST}")
    if gpus > 1 and method not in METHODS_ON_SEVERAL:
        raise FieldError("options.gpus", f"only {', '.join(METHODS_ON_SEVERAL)} jobs run on several GPUs "
                                         f"({method} runs on one)")
    if gpus > bound:
        raise FieldError("options.gpus", f"this server gives a job at most {bound} GPU{'s' if bound > 1 else ''} "
                                         "(QAAS_MAX_GPUS_PER_JOB)")


def of_request(request: dict) -> int:
    """The GPUs a stored job request asks for (1 when it names none: requests stored before the option)."""
    return int((request.get("options") or {}).get("gpus") or 1)
