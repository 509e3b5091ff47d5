"""Run one attempt of one job: claim it, supervise its GPU child, record what happens.

Everything the child reports goes to the job row and the event table; the lease is renewed
every heartbeat; cancellation, the time limit and a lost lease stop the child. The verdict is
written with a fenced update, so a worker that lost the job cannot overwrite the next attempt.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qaas import job_store
from qaas.db.config import Database
from qaas.db.models import JobStatus
from qaas.db.retry import with_db_retry
from qaas.kit.file_digest import sha256_file
from qaas.kit.redaction import redact
from qaas.logging_setup import job_context, set_attempt
from qaas.quantization_rules import gpus as gpu_rules
from qaas.queue import send_publish, send_run_job
from qaas.security import decrypt_secret
from qaas.settings import Settings
from qaas.worker.child import ChildProcess, start_child
from qaas.worker.verdict import finish_job

log = logging.getLogger("qaas.worker")

#: Progress rows are written at most this often (stage changes and metrics always are).
PROGRESS_MIN_INTERVAL_S = 0.5


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class _State:
    stage: str | None = None
    stage_started: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    last_progress_write: float = 0.0
    ended: bool = False
    #: Highest resident memory of the engine process seen (host RAM; VmHWM), bytes.
    peak_rss: int = 0

    def close_stage(self) -> None:
        if self.stage is not None:
            self.timings[self.stage] = round(self.timings.get(self.stage, 0.0) + time.monotonic() - self.stage_started, 3)


def build_spec(settings: Settings, job_request: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    if job_request.get("kind") == "finetune":
        return build_finetune_spec(settings, job_request, out_dir)
    options = job_request.get("options") or {}
    model = job_request["model"]
    source = {"path": model["path"]} if "path" in model else {"id": model["id"], "revision": model.get("revision")}
    return {
        "source": source,
        "quantization_config": engine_quantization_config(job_request["quantization_config"], options),
        "out_dir": str(out_dir),
        "options": {**_engine_options(settings, options),
                    # quantization only: engines the output must load in, bitsandbytes' CPU-runnable shapes
                    "targets": list(options.get("targets") or []),
                    "cpu_compatible": bool(options.get("cpu_compatible", False))},
    }


def engine_quantization_config(config: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The request's quantization_config as the engine takes it: a calibrated method's sample count filled
    in from the job's `options.calibration_samples` (GPTQConfig and AwqConfig have no field for it)."""
    qc = dict(config)
    calibrated = (qc.get("quant_method") in ("gptq", "awq")
                  or (qc.get("quant_method") == "compressed-tensors" and qc.get("dataset") is not None)
                  or (qc.get("quant_method") == "gguf" and qc.get("imatrix") is True))
    if calibrated and not qc.get("nsamples"):
        qc["nsamples"] = int(options.get("calibration_samples") or 128)
    return qc


def _engine_options(settings: Settings, options: dict[str, Any]) -> dict[str, Any]:
    return {
        "device": settings.device,
        "hub_endpoint": settings.hub_endpoint,
        "cache_dir": str((settings.data_dir / "hub-cache").resolve()),
        "allowed_roots": [str(p) for p in settings.model_roots],
        "calibration_datasets": dict(settings.calibration_datasets),
        "allow_pickle": settings.allow_pickle,
        "allow_remote_code": settings.allow_remote_code,
        "evaluate": bool(options.get("evaluate", True)),
        "eval_text_path": settings.eval_text or None,
        "eval_text": options.get("eval_text"),
        "eval_max_windows": options.get("eval_max_windows") or settings.eval_max_windows,
        "gpus": gpu_rules.of_request({"options": options}),
    }


#: Under a fine-tuning attempt's directory: the checkpoints it writes, and the one it resumes from.
CHECKPOINTS, RESUME = "checkpoints", "resume"


def build_finetune_spec(settings: Settings, job_request: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """The engine spec of a fine-tuning job. A {"job": id} base is that job's output in the artifacts
    directory (the owner was checked at submission), read as a local source under that directory."""
    model = job_request["model"]
    engine_options = _engine_options(settings, job_request.get("options") or {})
    base_name = None
    if "job" in model:
        source = {"path": str((settings.artifacts_dir / str(model["job"])).resolve())}
        engine_options["allowed_roots"] = [*engine_options["allowed_roots"], str(settings.artifacts_dir.resolve())]
        base_name = f"job:{model['job']}"
    elif "path" in model:
        source = {"path": model["path"]}
    else:
        source = {"id": model["id"], "revision": model.get("revision")}
    work = out_dir.parent
    return {
        "kind": "finetune",
        "source": source,
        "base_name": base_name,
        "quantization_config": job_request.get("quantization_config"),
        "lora": job_request.get("lora"),
        "training": job_request.get("training"),
        "dataset": job_request.get("dataset"),
        "eval_dataset": job_request.get("eval_dataset"),
        # the second output (merged, re-quantized): merge.quantization_config as a quantization job's
        "merge": {"quantization_config": engine_quantization_config(
            job_request["merge"]["quantization_config"], job_request.get("options") or {})}
        if job_request.get("merge") else None,
        "out_dir": str(out_dir),
        "checkpoint_dir": str(work / CHECKPOINTS),
        "resume_dir": str(work / RESUME),
        "options": engine_options,
    }


def _carry_checkpoint(job_dir: Path) -> Path | None:
    """The newest training checkpoint an earlier attempt on this host left (a lost worker's), moved out of
    its attempt directory before that is removed; None when there is none."""
    found = []
    for d in [*job_dir.glob(f"attempt-*/{CHECKPOINTS}/step-*"), *job_dir.glob(f"attempt-*/{RESUME}/step-*"),
              *job_dir.glob(".resume-step-*")]:
        if (d / "state.json").is_file():
            try:
                found.append((int(d.name.rsplit("-", 1)[1]), d))
            except ValueError:
                continue
    if not found:
        return None
    step, newest = max(found)
    kept = job_dir / f".resume-step-{step}"
    if newest != kept:
        shutil.rmtree(kept, ignore_errors=True)
        shutil.move(str(newest), str(kept))
    for old in job_dir.glob(".resume-step-*"):
        if old != kept:
            shutil.rmtree(old, ignore_errors=True)
    return kept


def run_attempt(settings: Settings, job_id: uuid.UUID) -> str:
    """Claim and run the job; returns what happened ("duplicate", "succeeded", ...)."""
    with job_context(job_id):  # every log line of this job's work names it
        outcome = _run_attempt(settings, job_id)
        log.info("job %s: attempt ended: %s", job_id, outcome)
        return outcome


def _run_attempt(settings: Settings, job_id: uuid.UUID) -> str:
    db = settings.database
    me = worker_name()
    elsewhere = with_db_retry(db, lambda s: _for_other_workers(s, job_id, settings.worker_gpus))
    if elsewhere is not None:
        # Only a worker whose -Q names another GPU count's queue gets here: the job is left unclaimed and its
        # message goes to the queue of its size.
        gpus, priority = elsewhere
        log.warning("job %s asks for %d GPUs and this worker holds %d: sent to the queue of its size",
                    job_id, gpus, settings.worker_gpus)
        _redispatch(settings, job_id, priority, gpus)
        return "misrouted"
    job = with_db_retry(db, lambda s: _claim_snapshot(s, job_id, me, settings.lease_s))
    if job is None:
        log.info("job %s: nothing to claim (duplicate delivery, cancelled or taken)", job_id)
        return "duplicate"
    attempt = job["attempt"]
    set_attempt(attempt)
    log.info("job %s: claimed attempt %d", job_id, attempt)
    token = decrypt_secret(job["hf_token_encrypted"], settings.secret_key.get_secret_value()) if job["hf_token_encrypted"] else None

    work = settings.work_dir / str(job_id) / f"attempt-{attempt}"
    # The job is ours now (the claim is fenced): whatever earlier attempts left behind on this host --
    # a worker killed with -9 never cleans up -- is garbage.
    # A fine-tuning job keeps the newest checkpoint of a lost attempt: this one resumes from it.
    finetune = job["request"].get("kind") == "finetune"
    carried = _carry_checkpoint(settings.work_dir / str(job_id)) if finetune else None
    for stale in (settings.work_dir / str(job_id)).glob("attempt-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    if carried is not None:
        (work / RESUME).mkdir()
        shutil.move(str(carried), str(work / RESUME / carried.name.removeprefix(".resume-")))
    out_dir = work / "out"
    spec = build_spec(settings, job["request"], out_dir)
    time_limit = float((job["request"].get("options") or {}).get("time_limit_s") or settings.job_time_limit_s)

    env_extra = {"QAAS_CHILD_HF_TOKEN": token} if token else {}
    if settings.hub_endpoint:
        env_extra["HF_ENDPOINT"] = settings.hub_endpoint
    module = None
    if settings.fake_engine:  # tests only (the settings refuse it outside QAAS_ENV=test)
        module = "qaas.worker.fake_engine"
        spec["options"]["fake_step_s"] = settings.fake_engine_step_s
    try:
        child = start_child(spec, cwd=work, log_path=work / "child.log", env_extra=env_extra,
                            standby_log=settings.work_dir / "engine-standby.log" if settings.engine_standby else None,
                            **({"module": module} if module else {}))
    except OSError as exc:
        return _fail(settings, job_id, attempt, {"code": "internal_error", "message": f"could not start the engine: {exc}"}, {})
    log.info("job %s attempt %d: child pid %d", job_id, attempt, child.pid)
    with_db_retry(db, lambda s: job_store.add_event(s, job_id, "log", message="engine started",
                                                     data={"pid": child.pid, "worker": me, "attempt": attempt}))
    outcome = _supervise(settings, job_id, attempt, child, time_limit, token, out_dir,
                         bool(job["request"].get("push_to_hub")), job["priority"], gpu_rules.of_request(job["request"]))
    if finetune and outcome == "requeued":
        _carry_checkpoint(work.parent)  # the engine died: the next attempt resumes from its last checkpoint
    elif finetune:
        for kept in work.parent.glob(".resume-step-*"):
            shutil.rmtree(kept, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    if outcome in ("failed", "cancelled"):
        shutil.rmtree(settings.artifacts_dir / str(job_id), ignore_errors=True)
    return outcome


def _for_other_workers(session, job_id: uuid.UUID, worker_gpus: int) -> tuple[int, int] | None:
    """(GPUs asked, priority) of a queued job that asks another count of GPUs than this worker holds, else
    None (the job is this worker's size, or there is nothing to claim)."""
    job = job_store.get_job(session, job_id)
    if job is None or job.status != JobStatus.queued.value:
        return None
    gpus = gpu_rules.of_request(job.request)
    return None if gpus == worker_gpus else (gpus, job.priority)


def _claim_snapshot(session, job_id: uuid.UUID, me: str, lease_s: float) -> dict[str, Any] | None:
    job = job_store.claim(session, job_id, worker=me, lease_s=lease_s)
    if job is None:
        return None
    return {"attempt": job.attempt, "request": job.request, "priority": job.priority,
            "hf_token_encrypted": job_store.hub_token_encrypted(session, job)}


def _supervise(
    settings: Settings, job_id: uuid.UUID, attempt: int, child: ChildProcess, time_limit: float, token: str | None,
    out_dir: Path, push_requested: bool, priority: int, gpus: int,
) -> str:
    db = settings.database
    state = _State()
    started = time.monotonic()
    next_beat = started + settings.heartbeat_interval_s
    cancel_sent_at: float | None = None
    stop_reason: str | None = None  # "cancel" | "time_limit" | "lost"

    while True:
        try:
            event = child.events.get(timeout=min(settings.heartbeat_interval_s, 1.0))
        except queue.Empty:
            event = False
        if event is None:
            state.ended = True
        elif event:
            _handle_event(db, job_id, attempt, state, event, token)

        now = time.monotonic()
        if now >= next_beat or state.ended:
            next_beat = now + settings.heartbeat_interval_s
            ours, cancel = with_db_retry(db, lambda s: job_store.heartbeat(s, job_id, attempt, lease_s=settings.lease_s))
            if not ours and not state.ended:
                log.warning("job %s attempt %d: lease lost; stopping the engine", job_id, attempt)
                stop_reason = "lost"
                child.kill()
            elif cancel and cancel_sent_at is None and not state.ended:
                stop_reason = "cancel"
                cancel_sent_at = now
                child.terminate()
        if stop_reason is None and now - started > time_limit:
            stop_reason = "time_limit"
            child.kill()
        if cancel_sent_at is not None and child.poll() is None and now - cancel_sent_at > settings.cancel_grace_s:
            child.kill()
        state.peak_rss = max(state.peak_rss, child.peak_rss_bytes())
        if state.ended:
            break

    code, why = _wait_for_exit(settings, job_id, attempt, child, started + time_limit)
    stop_reason = stop_reason or why
    state.close_stage()
    if stop_reason is None and code < 0:
        log.warning("job %s attempt %d: engine killed by signal %d in stage %s", job_id, attempt, -code, state.stage)
    if stop_reason == "lost":
        return "lost"
    if stop_reason == "cancel" or (state.error or {}).get("code") == "cancelled":
        ok = finish_job(settings, job_id, attempt, JobStatus.cancelled, timings=state.timings)
        return "cancelled" if ok else "lost"
    if stop_reason == "time_limit":
        return _fail(settings, job_id, attempt, {"code": "time_limit", "stage": state.stage,
                                                   "message": f"the job exceeded its time limit of {time_limit:.0f} s and was stopped"}, state.timings)
    if state.result is not None and code == 0:
        return _succeed(settings, job_id, attempt, state, out_dir, push_requested)
    if state.error is not None:
        return _fail(settings, job_id, attempt, state.error, state.timings)
    # The child died without a verdict: killed (-9), out of memory, a crash in native code.
    reason = f"the engine process died (exit status {code}) during stage {state.stage or 'start-up'}"
    requeued = with_db_retry(db, lambda s: job_store.requeue_for_retry(s, job_id, attempt, reason))
    if requeued:
        _redispatch(settings, job_id, priority, gpus)
        return "requeued"
    return _fail(settings, job_id, attempt, {"code": "engine_crashed", "message": reason + "; no attempts left",
                                              "stage": state.stage}, state.timings)


def _wait_for_exit(settings: Settings, job_id: uuid.UUID, attempt: int, child: ChildProcess,
                   deadline: float) -> tuple[int, str | None]:
    """(the engine's exit status, a stop reason) once its output stream has ended. It may take a while to
    exit after its last line (interpreter shutdown, a loaded machine): the lease is kept meanwhile, or the
    sweeper would hand a finished job to another worker. The engine is killed if the lease is lost
    ("lost") or the job's time limit passes ("time_limit") first."""
    while True:
        try:
            return child.proc.wait(timeout=settings.heartbeat_interval_s), None
        except subprocess.TimeoutExpired:
            pass
        ours, _cancel = with_db_retry(settings.database,
                                      lambda s: job_store.heartbeat(s, job_id, attempt, lease_s=settings.lease_s))
        why = "lost" if not ours else "time_limit" if time.monotonic() > deadline else None
        if why is not None:
            log.warning("job %s attempt %d: the engine did not exit after its output ended (%s)", job_id, attempt, why)
            child.kill()
            return child.proc.wait(), why


def _handle_event(db: Database, job_id: uuid.UUID, attempt: int, state: _State, event: dict[str, Any], token: str | None) -> None:
    kind = event.get("type")
    clean = lambda text: redact(str(text or ""), token)[:2000]  # noqa: E731 - never let a token reach the database
    if kind == "stage":
        log.info("job %s: stage %s", job_id, event.get("stage"))
        state.close_stage()
        state.stage, state.stage_started = str(event.get("stage"))[:32], time.monotonic()
        timings = dict(state.timings)
        with_db_retry(db, lambda s: job_store.record_stage(s, job_id, attempt, state.stage, message=clean(event.get("message")), timings=timings))
        state.last_progress_write = 0.0
    elif kind == "progress":
        done, total = int(event.get("done") or 0), int(event.get("total") or 0)
        metrics = event.get("metrics")
        now = time.monotonic()
        final = total and done >= total
        if not metrics and not final and now - state.last_progress_write < PROGRESS_MIN_INTERVAL_S:
            return
        state.last_progress_write = now
        data = {"done": done, "total": total, **({"metrics": metrics} if metrics else {})}
        with_db_retry(db, lambda s: job_store.record_progress(
            s, job_id, attempt, stage=state.stage, fraction=(done / total) if total else 0.0,
            message=clean(event.get("message")) or f"{state.stage} {done}/{total}", data=data))
    elif kind == "log":
        with_db_retry(db, lambda s: job_store.add_event(s, job_id, "log", stage=state.stage, message=clean(event.get("message")),
                                                         data={"level": event.get("level", "info"), **(event.get("data") or {})}))
    elif kind == "result":
        state.result = event.get("result") or {}
    elif kind == "error":
        state.error = {"code": str(event.get("code") or "internal_error")[:64], "message": clean(event.get("message")),
                       "stage": event.get("stage") or state.stage, "field": event.get("field")}


def _succeed(settings: Settings, job_id: uuid.UUID, attempt: int, state: _State, out_dir: Path, push_requested: bool) -> str:
    db = settings.database
    final_dir = settings.artifacts_dir / str(job_id)
    result = dict(state.result or {})
    source_dir = out_dir if out_dir and out_dir.is_dir() else None
    if source_dir is None:
        return _fail(settings, job_id, attempt, {"code": "internal_error", "message": "the engine reported success but wrote no output"}, state.timings)
    shutil.rmtree(final_dir, ignore_errors=True)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(source_dir), str(final_dir))
    result.pop("out_dir", None)  # an internal path; not part of the public result
    # Digests once, here, while the files are fresh in the page cache: the API's listing serves them.
    result["files"] = [{**f, "sha256": sha256_file(final_dir / f["name"])} for f in result.get("files") or []]
    # Peak memory: host RSS as the supervisor saw it; GPU peak when the engine reports one.
    resources = {"peak_rss_bytes": state.peak_rss or None}
    gpu_peak = result.get("gpu_peak_memory_bytes") or (result.get("memory") or {}).get("gpu_peak_bytes")
    if gpu_peak:
        resources["gpu_peak_bytes"] = int(gpu_peak)
    result["resources"] = resources
    result["timings"] = {**(result.get("timings") or {}), **state.timings}
    revision = (result.get("source") or {}).get("revision")
    if push_requested:
        # The GPU is done: the upload runs on the I/O queue so a slow network never holds it.
        ok = with_db_retry(db, lambda s: job_store.hand_over_to_publish(s, job_id, attempt, result=result,
                                                                        timings=state.timings, source_revision=revision))
        if ok:
            send_publish(settings, job_id)
            return "publishing"
    elif finish_job(settings, job_id, attempt, JobStatus.succeeded, result=result, timings=state.timings,
                    source_revision=revision):
        return "succeeded"
    shutil.rmtree(final_dir, ignore_errors=True)
    return "lost"


def _fail(settings: Settings, job_id: uuid.UUID, attempt: int, error: dict[str, Any], timings: dict[str, float]) -> str:
    ok = finish_job(settings, job_id, attempt, JobStatus.failed, error=error, timings=timings)
    return "failed" if ok else "lost"


def _redispatch(settings: Settings, job_id: uuid.UUID, priority: int, gpus: int) -> None:
    if send_run_job(settings, job_id, priority=priority, gpus=gpus):
        with_db_retry(settings.database, lambda s: job_store.mark_dispatched(s, job_id))
