"""Helpers of the API's storage tests (tests/api/test_document_cache.py, test_cached_status.py,
test_direct_twins.py, test_job_inserts.py): a new job's fields, a job row stored directly, the document
cache's listener connections as PostgreSQL sees them, and waiting for a condition."""

from __future__ import annotations

import time
import uuid

import psycopg
from conftest import STORIES

from qaas import job_store
from qaas.api.jobs import document_cache
from qaas.db import direct
from qaas.db.session import session_scope

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


def job_fields(owner: str = "alice", key: str | None = None, **over) -> dict:
    """The fields of a new job's row (`job_store.new_job_row`), as a submission makes them."""
    return {**dict(owner=owner, request={"model": {"path": str(STORIES)}, "quantization_config": NF4},
                   request_hash="h" * 64, idempotency_key=key, method="bitsandbytes", bits=4,
                   source_model=str(STORIES), priority=3, max_attempts=3, hf_token_encrypted=b"tok",
                   webhook_secret_encrypted=b"sec"), **over}


def store_job(db: str, owner: str) -> uuid.UUID:
    with session_scope(db) as s:
        return job_store.create_job(s, owner=owner, request={"model": {"path": str(STORIES)}, "quantization_config": NF4},
                                    request_hash="h", idempotency_key=None, method="bitsandbytes", bits=4,
                                    source_model=str(STORIES), priority=3, max_attempts=3).id


def listener_pids(db: str) -> list[int]:
    with psycopg.connect(direct.conninfo_of(db), autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
            (document_cache.APPLICATION_NAME,))]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout_s} s: {what}")
