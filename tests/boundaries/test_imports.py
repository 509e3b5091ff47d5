"""The layering, checked in fresh interpreters: what each side imports, and what it must never pull in.

- the engine (`qaas.worker.engine.*`) runs on GPU machines where only the ML stack is installed, and as a
  library: no web, queue or database stack;
- the API process never pays for (or depends on) the ML stack;
- the worker's own modules and the webhooks domain run in the Celery worker: no web framework.
"""

from __future__ import annotations

import json
import subprocess
import sys

WEB_AND_QUEUE = {"sqlalchemy", "celery", "kombu", "fastapi", "starlette", "pydantic", "pydantic_settings", "psycopg"}
ML_STACK = {"torch", "triton", "transformers", "safetensors", "accelerate"}
WEB = {"fastapi", "starlette"}


def _top_level_modules_after(code: str) -> set[str]:
    """The top-level packages loaded by `code` in a fresh `python -P` (no repository root on sys.path)."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-P", "-c", probe], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_engine_pipeline_loads_no_web_queue_or_database_module():
    loaded = _top_level_modules_after("import qaas.worker.engine.pipeline")
    assert "torch" in loaded  # the probe really imported the engine
    assert not loaded & WEB_AND_QUEUE, sorted(loaded & WEB_AND_QUEUE)


def test_the_api_app_loads_no_ml_module():
    loaded = _top_level_modules_after("from qaas.api.app import create_app\ncreate_app()")
    assert {"fastapi", "sqlalchemy"} <= loaded
    assert not loaded & ML_STACK, sorted(loaded & ML_STACK)


WORKER_SIDE = ("qaas.worker.tasks", "qaas.worker.attempt", "qaas.worker.publishing", "qaas.worker.sweeper",
               "qaas.webhooks.sender", "qaas.webhooks.service", "qaas.job_store")


def test_the_worker_side_loads_no_web_framework_and_no_ml_module():
    loaded = _top_level_modules_after("import " + ", ".join(WORKER_SIDE))
    assert {"celery", "sqlalchemy", "standardwebhooks"} <= loaded
    assert not loaded & (WEB | ML_STACK), sorted(loaded & (WEB | ML_STACK))
