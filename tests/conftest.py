"""Fixtures shared by every test: real PostgreSQL and Redis, settings, API keys, service processes.

Tests run against the real services on loopback (PostgreSQL 127.0.0.1:5432, Redis 127.0.0.1:6379,
see .ci/run). Each test session gets its own PostgreSQL database built by `alembic upgrade head`,
and each test that starts processes gets its own Celery queue names so that nothing crosses over.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))  # `support.*`; never the repository root (it would shadow `kernels`)

REPO = TESTS.parent
ASSETS = Path(os.environ.get("QAAS_TEST_ASSETS", REPO.parent / "shared" / "assets")).resolve()
STORIES = ASSETS / "models" / "stories260K"
WIKITEXT = ASSETS / "text" / "wikitext-2-raw-v1" / "test.joined.txt"
SHAKESPEARE = ASSETS / "text" / "tinyshakespeare" / "input.txt"
ARTIFACTS = Path(os.environ.get("QAAS_TEST_ARTIFACTS", REPO / "test-artifacts"))

PG_ADMIN_URL = os.environ.get("QAAS_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("QAAS_TEST_REDIS_URL", "redis://127.0.0.1:6379")
TEST_SECRET = "test-secret-key-0123456789abcdef0123456789abcdef"


def _admin_connect():
    import psycopg

    return psycopg.connect(PG_ADMIN_URL, autocommit=True)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated to head."""
    from qaas.db.migrate import upgrade

    name = f"qaas_test_{uuid.uuid4().hex[:12]}"
    with _admin_connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    upgrade(url)
    yield url
    from qaas.db.session import get_engine

    get_engine(url).dispose()
    with _admin_connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def clean_db(pg_url: str) -> Iterator[str]:
    """The session database, emptied after the test."""
    yield pg_url
    truncate_all(pg_url)


def truncate_all(db_url: str) -> None:
    """Empty every table of the service (keys, jobs and everything hanging off them)."""
    from sqlalchemy import text

    from qaas.db.session import get_engine

    with get_engine(db_url).begin() as conn:
        conn.execute(text("TRUNCATE webhook_delivery_attempts, webhook_deliveries, webhook_endpoints, "
                          "hub_credentials, job_events, jobs, api_keys CASCADE"))


def fresh_redis_url(n: int | None = None) -> str:
    """A Redis database number of its own (default: one per test process), emptied first."""
    import redis

    url = f"{REDIS_URL}/{1 + (os.getpid() % 14) if n is None else n}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture
def redis_db() -> str:
    return fresh_redis_url()


@contextmanager
def running_service(tmp: Path, label: str, *, database_url: str, broker_url: str, extra_env: dict[str, str] | None = None,
                    start: bool = True, **overrides):
    """The API and a worker as real processes on these settings: yields (settings, stack, api url or None).

    With start=False the test starts the processes itself (stack.start_api / start_worker). Every process
    is stopped at the end and its log kept under ARTIFACTS as `<label>-<name>.log`.
    """
    from support.processes import Stack

    settings = make_settings(tmp, database_url=database_url, broker_url=broker_url, **overrides)
    stack = Stack(tmp, {**settings_env(settings), **(extra_env or {})})
    try:
        url = None
        if start:
            _, url = stack.start_api()
            stack.start_worker()
        yield settings, stack, url
    finally:
        stack.stop_all()
        stack.save_logs(ARTIFACTS, label)


def make_settings(tmp: Path, **overrides):
    from qaas.settings import Settings

    values = dict(
        env="test",
        data_dir=tmp / "data",
        secret_key=TEST_SECRET,
        local_model_roots=f"{ASSETS},{tmp}",
        eval_text=str(WIKITEXT),
        eval_max_windows=2,
        heartbeat_interval_s=0.5,
        lease_s=5.0,
        sweep_interval_s=0.5,
        redispatch_after_s=30.0,
        cancel_grace_s=3.0,
        webhook_retry_schedule_s="1,1,2,2,3",  # seconds, not hours: retries happen within the test
        gpu_queue=f"gpu-{uuid.uuid4().hex[:8]}",
        io_queue=f"io-{uuid.uuid4().hex[:8]}",
    )
    values.update(overrides)
    settings = Settings(**values)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings


def settings_env(settings) -> dict[str, str]:
    """The same settings as QAAS_* environment variables, for child processes."""
    env = {
        "QAAS_ENV": settings.env,
        "QAAS_DATA_DIR": str(settings.data_dir),
        "QAAS_DATABASE_URL": settings.database_url,
        "QAAS_BROKER_URL": settings.broker_url,
        "QAAS_SECRET_KEY": settings.secret_key.get_secret_value(),
        "QAAS_LOCAL_MODEL_ROOTS": settings.local_model_roots,
        "QAAS_EVAL_TEXT": settings.eval_text,
        "QAAS_EVAL_MAX_WINDOWS": str(settings.eval_max_windows),
        "QAAS_HEARTBEAT_INTERVAL_S": str(settings.heartbeat_interval_s),
        "QAAS_LEASE_S": str(settings.lease_s),
        "QAAS_SWEEP_INTERVAL_S": str(settings.sweep_interval_s),
        "QAAS_REDISPATCH_AFTER_S": str(settings.redispatch_after_s),
        "QAAS_CANCEL_GRACE_S": str(settings.cancel_grace_s),
        "QAAS_GPU_QUEUE": settings.gpu_queue,
        "QAAS_IO_QUEUE": settings.io_queue,
        "QAAS_JOB_MAX_ATTEMPTS": str(settings.job_max_attempts),
        "QAAS_JOB_TIME_LIMIT_S": str(settings.job_time_limit_s),
        "QAAS_DEVICE": "cpu",
        "QAAS_WEBHOOK_ALLOWLIST": settings.webhook_allowlist,
        "QAAS_WEBHOOK_RETRY_SCHEDULE_S": settings.webhook_retry_schedule_s,
        "QAAS_HUB_ENDPOINT": settings.hub_endpoint,
        "QAAS_CALIBRATION_DATASETS": json.dumps(settings.calibration_datasets),
        "HF_HUB_DISABLE_XET": "1",
    }
    return {k: v for k, v in env.items() if v is not None}


@pytest.fixture
def settings(tmp_path: Path, clean_db: str, redis_db: str):
    return make_settings(tmp_path, database_url=clean_db, broker_url=redis_db)


def new_key(settings, owner: str, name: str = "test") -> str:
    from qaas.db.session import session_scope
    from qaas.keys import create_key

    with session_scope(settings.resolved_database_url) as s:
        return create_key(s, settings, name=name, owner=owner)


@pytest.fixture
def api_key(settings) -> str:
    return new_key(settings, "alice")


@pytest.fixture
def other_key(settings) -> str:
    return new_key(settings, "mallory")


@pytest.fixture
def client(settings):
    """The API in-process (FastAPI TestClient) over the real PostgreSQL and Redis."""
    from fastapi.testclient import TestClient

    from qaas.api.app import create_app

    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
