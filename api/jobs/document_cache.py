"""Job documents cached per API process, dropped when PostgreSQL says the job changed (LISTEN/NOTIFY).

Status polls are most of the API's traffic and most of a poll's cost was the one-row SELECT. Here a
status read's answer (the JobOut document, serialized) is kept in the process for at most
QAAS_JOB_CACHE_S seconds and dropped as soon as the job changes: the `jobs` table's triggers (migration
0004) send `NOTIFY qaas_job_changed, '<id>:<owner>'` at the commit of every change a document shows, from
whichever process made it, and one connection per process LISTENs.

What a reader can see, the staleness bound:
- while the listener is subscribed, a change is served from the next poll after its notification
  arrives (the commit's round trip to this process: milliseconds);
- whatever happens to notifications (a connection that dies silently, a change made with triggers
  disabled), no document is served more than `max_age_s` after the SELECT that read it began;
- while the listener is not subscribed (not yet, or its connection was lost), nothing is served and
  nothing is stored: reads go to the database. A lost connection empties the cache; on re-subscribing it
  starts empty, because changes made in between were announced to nobody.
A read that was in flight when its job changed is not stored (it may have read the old row): each
notification bumps an epoch, and an answer is stored only if its job was not announced since the read
began.

Tenant isolation: entries are keyed by (job id, owner) and a lookup names the caller's owner, so one
tenant's cached document can never answer another tenant (who gets the database's answer: not found).
Only found jobs are cached (a 404 is never cached: the job may be created next).

LISTEN needs a session of its own: behind a transaction-mode connection pooler notifications do not
arrive, and only the age bound holds (set QAAS_JOB_CACHE_S=0 there, or give the API a direct URL).

The cache belongs to the event loop of its listener connection (one per server process; tests make one
per TestClient): `cache_for(settings)`. None on SQLite (embedded mode), or with QAAS_JOB_CACHE_S=0.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import psycopg

from qaas.db.direct import conninfo_of
from qaas.loop_local import LoopLocal
from qaas.settings import Settings

log = logging.getLogger("qaas.api.document_cache")

#: The channel the `jobs` triggers notify (migration 0004_job_change_notify).
CHANNEL = "qaas_job_changed"
#: How the listener connections show in pg_stat_activity.
APPLICATION_NAME = "qaas-document-cache"
#: Pause before subscribing again after the listener connection was lost (or could not be opened).
RESUBSCRIBE_S = 1.0
#: The listener connection is probed after this long without a notification (at most; sooner with a
#: shorter age bound): one that died without a word (no reset reached us) stops the serving that soon.
PROBE_AFTER_QUIET_S = 5.0
#: Longest a liveness probe of the listener connection may take before the connection counts as lost.
PROBE_TIMEOUT_S = 2.0
#: How many recently announced job ids are remembered for the in-flight check; a read that began before
#: the oldest remembered announcement is not stored (it cannot be told apart from one that raced a change).
RECENT_CHANGES = 4096


class DocumentCache:
    def __init__(self, url: str, *, max_age_s: float, max_entries: int) -> None:
        self.conninfo = conninfo_of(url)
        self.max_age_s = max_age_s
        self.max_entries = max_entries
        #: (job id, owner) -> (monotonic time it expires, the document's JSON)
        self._entries: dict[tuple[uuid.UUID, str], tuple[float, bytes]] = {}
        #: Only while True are documents served or stored: the listener is subscribed.
        self.subscribed = False
        #: Counts announcements (and subscriptions); a read's ticket is the epoch it began in.
        self.epoch = 0
        #: job id -> the epoch of its last announcement (the newest RECENT_CHANGES of them)
        self._recent: dict[uuid.UUID, int] = {}
        #: A read whose ticket is older than this is never stored (subscription began, or ids were forgotten).
        self._floor = 0
        #: How many times the listener subscribed (the first time, then after each lost connection).
        self.subscriptions = 0
        self._task: asyncio.Task | None = None
        self._conn: psycopg.AsyncConnection | None = None

    # --- the readers' side -----------------------------------------------------------------------

    def get(self, job_id: uuid.UUID, owner: str) -> bytes | None:
        """The owner's job's cached document, or None (not cached, expired, or the listener is down)."""
        if not self.subscribed:
            return None
        hit = self._entries.get((job_id, owner))
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            del self._entries[(job_id, owner)]
            return None
        return hit[1]

    def ticket(self) -> tuple[int, float] | None:
        """Taken right before reading a job from the database: what `put` needs to tell whether the answer
        may be stored. None while the listener is not subscribed (the answer will not be stored)."""
        return (self.epoch, time.monotonic()) if self.subscribed else None

    def put(self, ticket: tuple[int, float] | None, job_id: uuid.UUID, owner: str, document: bytes) -> None:
        """Store a document read from the database after `ticket`, unless its job was announced since."""
        if ticket is None or not self.subscribed:
            return
        epoch, began = ticket
        if epoch < self._floor or self._recent.get(job_id, -1) > epoch:
            return  # the row may predate a change whose announcement has already come and gone
        if len(self._entries) >= self.max_entries:
            # oldest stored first (dicts keep insertion order): bounded memory, whatever the pattern
            for key in list(self._entries)[: max(1, self.max_entries // 8)]:
                del self._entries[key]
        self._entries.pop((job_id, owner), None)
        self._entries[(job_id, owner)] = (began + self.max_age_s, document)

    def __len__(self) -> int:
        return len(self._entries)

    # --- the listener's side ---------------------------------------------------------------------

    def _announced(self, payload: str) -> None:
        self.epoch += 1
        try:
            job_id, owner = uuid.UUID(payload[:36]), payload[37:]
        except ValueError:  # a TRUNCATE ('*'), or a payload this code does not know: forget everything
            self._forget_all()
            return
        self._entries.pop((job_id, owner), None)
        self._recent.pop(job_id, None)
        self._recent[job_id] = self.epoch
        if len(self._recent) > RECENT_CHANGES:
            oldest = next(iter(self._recent))
            self._floor = max(self._floor, self._recent.pop(oldest))

    def _forget_all(self) -> None:
        """Drop every document, and make every read in flight unstorable."""
        self._entries.clear()
        self._recent.clear()
        self.epoch += 1
        self._floor = self.epoch

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="qaas-document-cache")

    async def _listen(self) -> None:
        while True:
            try:
                self._conn = await psycopg.AsyncConnection.connect(
                    self.conninfo, autocommit=True, connect_timeout=5, application_name=APPLICATION_NAME)
                await self._conn.execute(f"LISTEN {CHANNEL}")
                # Subscribed from here on: anything changed before this point was announced to nobody, so
                # nothing read before it may be stored (the floor), and the cache starts empty.
                self._forget_all()
                self.subscribed = True
                self.subscriptions += 1
                await self._follow(self._conn)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: stop serving, subscribe again
                if self.subscribed:
                    log.warning("document cache: listener lost (%s); reads go to the database until it is back",
                                exc.__class__.__name__)
            finally:
                self.subscribed = False
                self._forget_all()
                conn, self._conn = self._conn, None
                if conn is not None:
                    try:
                        await conn.close()
                    except Exception:  # noqa: BLE001 - it is being thrown away
                        pass
            await asyncio.sleep(RESUBSCRIBE_S)

    async def _follow(self, conn: psycopg.AsyncConnection) -> None:
        """Apply announcements as they come, and probe the connection every PROBE_AFTER_QUIET_S (or the age
        bound, if shorter) so that one that died silently stops the serving (the age bound holds regardless)."""
        quiet_s = max(0.5, min(self.max_age_s, PROBE_AFTER_QUIET_S))
        while True:
            async for note in conn.notifies(timeout=quiet_s):
                self._announced(note.payload)
            await asyncio.wait_for(conn.execute("SELECT 1"), PROBE_TIMEOUT_S)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None


_caches: LoopLocal[DocumentCache] = LoopLocal()


def cache_for(settings: Settings) -> DocumentCache | None:
    """The running loop's cache of job documents (started on first use), or None where there is none."""
    db = settings.database
    if not db.direct or settings.job_cache_s <= 0:
        return None

    def make() -> DocumentCache:
        cache = DocumentCache(db.url, max_age_s=settings.job_cache_s, max_entries=settings.job_cache_entries)
        cache.start()
        return cache

    return _caches.get((db.url, settings.job_cache_s, settings.job_cache_entries), make)


def caches() -> list[DocumentCache]:
    """Every event loop's cache in this process (their state: subscribed, size)."""
    return _caches.values()


async def close_caches() -> None:
    """Stop the running loop's listeners (the API's shutdown)."""
    for cache in _caches.pop_running():
        await cache.close()
