"""Fixtures for chaos tests: servers of the test's own (Redis, a PostgreSQL cluster, a tiny disk).

The shared PostgreSQL (5432) and Redis (6379) are never stopped or restarted: a test that kills a
server starts its own on a free port first, and kills it by the PID it recorded. A missing system
tool fails the test when CI is set (so a broken CI image is noticed) and skips it otherwise.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ARTIFACTS, settings_env
from support.hub_fixtures import fake_hub, fake_hub_url  # noqa: F401  (fixtures)
from chaos.helpers import alive
from support.processes import Stack, free_port

PG_BIN = Path(os.environ.get("QAAS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def need(tool: str, path: str | None = None) -> str:
    """The tool's path; a hard failure in CI, a skip elsewhere."""
    found = path if path and Path(path).exists() else shutil.which(tool)
    if not found:
        msg = f"chaos test needs {tool!r} (install it in .ci/run)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return found


def need_root(what: str) -> None:
    if os.geteuid() != 0:
        msg = f"chaos test needs root for {what}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture
def chaos_stack(tmp_path) -> Iterator[callable]:
    """make(settings, **extra_env) -> Stack; every process stopped and its log kept at teardown."""
    stacks: list[Stack] = []

    def make(settings, **extra_env: str) -> Stack:
        # rate limiting is tested in tests/security; here tests poll many jobs fast
        s = Stack(tmp_path, {**settings_env(settings), "QAAS_LOG_FORMAT": "json", "QAAS_RATE_LIMIT_PER_MINUTE": "0",
                             **extra_env})
        stacks.append(s)
        return s

    yield make
    for s in stacks:
        s.stop_all()
        s.save_logs(ARTIFACTS, tmp_path.name)


# --- Redis of our own ------------------------------------------------------------------------------


@dataclass
class OwnRedis:
    port: int
    workdir: Path
    binary: str

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pidfile(self) -> Path:
        return self.workdir / "redis.pid"

    def start(self) -> None:
        self.pidfile.unlink(missing_ok=True)
        subprocess.run([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                        "--daemonize", "yes", "--pidfile", str(self.pidfile), "--dir", str(self.workdir),
                        "--logfile", str(self.workdir / "redis.log")], check=True)
        import redis

        deadline = time.monotonic() + 10
        while True:
            try:
                if self.pidfile.exists() and redis.Redis(port=self.port, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("own redis-server did not start")
            time.sleep(0.05)

    def pid(self) -> int:
        return int(self.pidfile.read_text().strip())

    def kill(self) -> None:
        """kill -9 by the recorded PID: nothing is saved (it keeps nothing on disk anyway)."""
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive(pid):
            if time.monotonic() > deadline:
                raise TimeoutError("redis did not die")
            time.sleep(0.05)




@pytest.fixture
def own_redis(tmp_path) -> Iterator[OwnRedis]:
    binary = need("redis-server")
    d = tmp_path / "redis"
    d.mkdir()
    r = OwnRedis(free_port(), d, binary)
    r.start()
    yield r
    try:
        r.kill()
    except (OSError, ValueError, TimeoutError):
        pass


# --- PostgreSQL cluster of our own -----------------------------------------------------------------


@dataclass
class OwnPostgres:
    port: int
    datadir: Path
    pg_ctl: str

    def _as_postgres(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=check, capture_output=True, text=True,
                              timeout=60)

    def start(self) -> None:
        self._as_postgres(self.pg_ctl, "-D", str(self.datadir), "-l", str(self.datadir / "server.log"), "-w",
                          "-o", f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 -c fsync=off",
                          "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(self.pg_ctl, "-D", str(self.datadir), "-m", mode, "-w", "stop", check=False)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def create_database(self) -> str:
        import psycopg

        name = f"qaas_chaos_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


@pytest.fixture
def own_postgres(tmp_path_factory) -> Iterator[OwnPostgres]:
    need_root("running a PostgreSQL cluster as the postgres user")
    initdb = need("initdb", str(PG_BIN / "initdb"))
    pg_ctl = need("pg_ctl", str(PG_BIN / "pg_ctl"))
    need("runuser")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("no 'postgres' system user to run the test's own PostgreSQL cluster")
    base = Path(f"/tmp/qaas-chaos-pg-{uuid.uuid4().hex[:8]}")
    base.mkdir(mode=0o700)
    shutil.chown(base, "postgres", "postgres")
    datadir = base / "data"
    subprocess.run(["runuser", "-u", "postgres", "--", initdb, "-D", str(datadir), "-A", "trust", "-U", "postgres",
                    "--no-sync"], check=True, capture_output=True, timeout=120)
    pg = OwnPostgres(free_port(), datadir, pg_ctl)
    pg.start()
    yield pg
    pg.stop("immediate")
    shutil.rmtree(base, ignore_errors=True)


# --- a small disk ----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for this test (root); unmounted at teardown."""
    need_root("mounting a size-limited tmpfs")
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        msg = f"cannot mount a tmpfs here: {r.stderr.strip()}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path, leave_bytes: int) -> Path:
    """Fill the filesystem holding `path` until only about `leave_bytes` are free."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    filler = path / "filler.bin"
    with open(filler, "wb") as f:
        remaining = max(0, free - leave_bytes)
        chunk = b"\0" * (1 << 16)
        while remaining > 0:
            n = min(len(chunk), remaining)
            try:
                f.write(chunk[:n])
                f.flush()
            except OSError:
                break
            remaining -= n
    return filler


