"""The status read's per-process document cache (api/jobs/document_cache.py) on real PostgreSQL.

What must hold: a change is seen through its NOTIFY long before the cache's age bound; a change that
sends no notification (triggers disabled) is seen once the bound has passed, never later; a lost listener
connection (its backend killed) makes the cache stop serving, so a change made meanwhile is seen, and it
subscribes again; a read in flight when its job changed is not stored; one tenant's cached document never
answers another tenant; SQLite (embedded mode) has no cache and still answers.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import psycopg
from conftest import auth, make_settings, new_key
from fastapi.testclient import TestClient

from qaas import job_store
from qaas.api.app import create_app
from qaas.api.jobs import document_cache
from qaas.db import direct
from qaas.db.migrate import upgrade
from qaas.db.models import Job
from qaas.db.session import session_scope
from support.job_rows import listener_pids, store_job, wait_for





def _set_message(db: str, job_id: uuid.UUID, message: str, *, announce: bool = True) -> None:
    """Change what the job's document shows, from outside the API; announce=False changes it with the
    table's triggers off (session_replication_role = replica), so no notification is sent."""
    with psycopg.connect(direct.conninfo_of(db), autocommit=True) as conn:
        if not announce:
            conn.execute("SET session_replication_role = replica")
        conn.execute("UPDATE jobs SET progress_message = %s WHERE id = %s", (message, job_id))


def _message(client: TestClient, key: str, job_id: uuid.UUID) -> str | None:
    r = client.get(f"/v1/jobs/{job_id}", headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()["progress_message"]






def _cached_client(tmp_path, clean_db, redis_db, max_age_s: float):
    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, job_cache_s=max_age_s)
    return settings, TestClient(create_app(settings), raise_server_exceptions=False)


def _subscribed_and_cached(client, key, db, job_id) -> str:
    """Read until the listener is subscribed and the job's document is in the cache; its message."""
    first = _message(client, key, job_id)
    wait_for(lambda: listener_pids(db), 10, "the listener subscribes")
    time.sleep(0.1)  # LISTEN runs right after the connection shows up
    _message(client, key, job_id)  # now stored
    return first


def test_a_change_is_seen_through_its_notification_long_before_the_age_bound(tmp_path, clean_db, redis_db):
    settings, client = _cached_client(tmp_path, clean_db, redis_db, max_age_s=60)
    key = new_key(settings, "alice")
    job_id = store_job(clean_db, "alice")
    with client:
        assert _subscribed_and_cached(client, key, clean_db, job_id) is None
        # proof that reads are served from the cache: an unannounced change is not seen
        _set_message(clean_db, job_id, "hidden", announce=False)
        assert _message(client, key, job_id) is None
        t0 = time.monotonic()
        _set_message(clean_db, job_id, "block 3/12")
        wait_for(lambda: _message(client, key, job_id) == "block 3/12", 2, "the announced change is served")
        assert time.monotonic() - t0 < 2  # against an age bound of 60 s: the notification did it


def test_an_unannounced_change_is_seen_once_the_age_bound_has_passed(tmp_path, clean_db, redis_db):
    max_age_s = 1.5
    settings, client = _cached_client(tmp_path, clean_db, redis_db, max_age_s=max_age_s)
    key = new_key(settings, "alice")
    job_id = store_job(clean_db, "alice")
    with client:
        _subscribed_and_cached(client, key, clean_db, job_id)
        stored_by = time.monotonic()  # the stored read began before this: its age bound ends before stored_by + max_age
        _set_message(clean_db, job_id, "missed by the listener", announce=False)
        assert _message(client, key, job_id) is None  # served from the cache (no notification came)
        wait_for(lambda: _message(client, key, job_id) == "missed by the listener", max_age_s + 2, "the bound")
        seen_after = time.monotonic() - stored_by
        # never later than the bound (plus a poll and a loaded machine's slack), and not much before it:
        # the cache served the old document until it expired
        assert max_age_s - 0.5 <= seen_after <= max_age_s + 1.0, seen_after


def test_a_lost_listener_stops_the_serving_until_it_subscribes_again(tmp_path, clean_db, redis_db):
    settings, client = _cached_client(tmp_path, clean_db, redis_db, max_age_s=60)
    key = new_key(settings, "alice")
    job_id = store_job(clean_db, "alice")
    with client:
        _subscribed_and_cached(client, key, clean_db, job_id)
        [listener] = listener_pids(clean_db)
        with psycopg.connect(direct.conninfo_of(clean_db), autocommit=True) as conn:
            assert conn.execute("SELECT pg_terminate_backend(%s)", (listener,)).fetchone()[0]
        wait_for(lambda: listener not in listener_pids(clean_db), 5, "the listener's backend ends")
        # the API's listener reads the server's goodbye and stops serving (it subscribes again after
        # RESUBSCRIBE_S; by then the cache starts empty anyway)
        [cache] = document_cache.caches()
        wait_for(lambda: not cache.subscribed or cache.subscriptions > 1, 5, "the cache notices the loss")
        # made while nobody listens, and with the triggers off: only a cache that stopped serving shows it
        _set_message(clean_db, job_id, "changed meanwhile", announce=False)
        assert _message(client, key, job_id) == "changed meanwhile"
        # it subscribes again (a new backend), and announced changes are followed again
        [again] = wait_for(lambda: [p for p in listener_pids(clean_db) if p != listener], 10, "re-subscription")
        time.sleep(0.1)
        _message(client, key, job_id)
        _set_message(clean_db, job_id, "after the re-subscription")
        wait_for(lambda: _message(client, key, job_id) == "after the re-subscription", 2, "notifications again")
        assert listener_pids(clean_db) == [again]


def test_one_tenants_cached_job_never_answers_another_tenant(tmp_path, clean_db, redis_db):
    settings, client = _cached_client(tmp_path, clean_db, redis_db, max_age_s=60)
    alice, mallory = new_key(settings, "alice"), new_key(settings, "mallory")
    job_id = store_job(clean_db, "alice")
    with client:
        _subscribed_and_cached(client, alice, clean_db, job_id)
        for _ in range(3):
            r = client.get(f"/v1/jobs/{job_id}", headers=auth(mallory))
            assert r.status_code == 404
            assert client.get(f"/v1/jobs/{job_id}", headers=auth(alice)).status_code == 200

    # the cache itself: a document stored for one owner is not found under another
    async def lookups():
        cache = document_cache.DocumentCache(clean_db, max_age_s=60, max_entries=10)
        cache.start()
        try:
            deadline = time.monotonic() + 10
            while not cache.subscribed and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            cache.put(cache.ticket(), job_id, "alice", b"{}")
            return cache.get(job_id, "alice"), cache.get(job_id, "mallory")
        finally:
            await cache.close()

    assert asyncio.run(lookups()) == (b"{}", None)


async def _subscribed_cache(db: str, **kw) -> document_cache.DocumentCache:
    cache = document_cache.DocumentCache(db, **{"max_age_s": 60, "max_entries": 100, **kw})
    cache.start()
    deadline = time.monotonic() + 10
    while not cache.subscribed:
        assert time.monotonic() < deadline, "the listener did not subscribe"
        await asyncio.sleep(0.02)
    return cache


def test_a_read_in_flight_when_its_job_changed_is_not_stored(clean_db):
    job_id, other = store_job(clean_db, "alice"), store_job(clean_db, "alice")

    async def race():
        cache = await _subscribed_cache(clean_db)
        try:
            ticket = cache.ticket()  # a read of the old row begins ...
            epoch = cache.epoch
            await asyncio.to_thread(_set_message, clean_db, job_id, "changed during the read")
            deadline = time.monotonic() + 5
            while cache.epoch == epoch:  # ... the change's notification arrives before its answer does
                assert time.monotonic() < deadline, "no notification"
                await asyncio.sleep(0.01)
            cache.put(ticket, job_id, "alice", b"old")
            after_stale = cache.get(job_id, "alice")
            cache.put(ticket, other, "alice", b"other")  # another job's read from the same moment is fine
            cache.put(cache.ticket(), job_id, "alice", b"new")  # a read begun after the notification is stored
            return after_stale, cache.get(other, "alice"), cache.get(job_id, "alice")
        finally:
            await cache.close()

    assert asyncio.run(race()) == (None, b"other", b"new")


def test_the_cache_is_bounded_in_size_and_forgets_on_truncate(clean_db):
    ids = [uuid.uuid4() for _ in range(50)]

    async def fill():
        cache = await _subscribed_cache(clean_db, max_entries=16)
        try:
            for i in ids:
                cache.put(cache.ticket(), i, "alice", b"{}")
                assert len(cache) <= 16
            assert cache.get(ids[-1], "alice") == b"{}"  # the newest stay
            assert cache.get(ids[0], "alice") is None
            with psycopg.connect(direct.conninfo_of(clean_db), autocommit=True) as conn:
                conn.execute("TRUNCATE jobs CASCADE")
            deadline = time.monotonic() + 5
            while len(cache):
                assert time.monotonic() < deadline, "TRUNCATE did not empty the cache"
                await asyncio.sleep(0.01)
        finally:
            await cache.close()

    asyncio.run(fill())


def test_the_trigger_watches_every_column_a_document_shows(clean_db):
    with psycopg.connect(direct.conninfo_of(clean_db), autocommit=True) as conn:
        definition = conn.execute("SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'jobs_document_changed'"
                                  " AND tgrelid = 'jobs'::regclass").fetchone()[0]
    for column in job_store.JOB_COLUMNS:
        assert f"old.{column}" in definition.lower() and f"new.{column}" in definition.lower(), column


def test_bookkeeping_updates_send_no_notification(clean_db):
    """The submission path's dispatched mark must not cost every API process a notification."""
    job_id = store_job(clean_db, "alice")
    with psycopg.connect(direct.conninfo_of(clean_db), autocommit=True) as listener, \
            psycopg.connect(direct.conninfo_of(clean_db), autocommit=True) as writer:
        listener.execute(f"LISTEN {document_cache.CHANNEL}")
        writer.execute("UPDATE jobs SET dispatched_at = now() WHERE id = %s", (job_id,))
        writer.execute("UPDATE jobs SET progress = 0.5 WHERE id = %s", (job_id,))
        got = [n.payload for n in listener.notifies(timeout=1.0)]
    assert got == [f"{job_id}:alice"]


def test_sqlite_has_no_cache_and_answers(tmp_path):
    settings = make_settings(tmp_path, database_url="", broker_url="")
    upgrade(settings.resolved_database_url)
    assert document_cache.cache_for(settings) is None
    key = new_key(settings, "alice")
    job_id = store_job(settings.resolved_database_url, "alice")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        assert _message(client, key, job_id) is None
        with session_scope(settings.resolved_database_url) as s:
            s.get(Job, job_id).progress_message = "seen at once"
        assert _message(client, key, job_id) == "seen at once"


def test_the_cache_can_be_turned_off(tmp_path, clean_db, redis_db):
    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, job_cache_s=0)
    assert document_cache.cache_for(settings) is None
