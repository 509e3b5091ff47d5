"""The one settings object of the service (environment variables prefixed `QAAS_`).

With no configuration at all the service runs in embedded mode: SQLite and a filesystem broker
under the data directory, so `qaas up` works on a bare machine. Outside development, settings that
would be unsafe in production (the built-in secret key) are refused at start-up.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from qaas.db.config import Database
from qaas.quantization_rules import CalibrationSources, FieldError, gpus
from qaas.quantization_rules.calibration import LOCAL_SUFFIXES, local_file

DEV_SECRET_KEY = "qaas-development-secret-key-do-not-use-in-production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QAAS_", env_file=None, extra="ignore")

    env: Literal["development", "test", "production"] = "development"

    #: Where SQLite (embedded mode), the filesystem broker, job work dirs and artefacts live.
    data_dir: Path = Path("qaas-data")
    #: SQLAlchemy URL; empty means SQLite under data_dir (embedded mode).
    database_url: str = ""
    #: Celery broker URL; empty means kombu's filesystem transport under data_dir (embedded mode).
    broker_url: str = ""

    #: Keys API keys are hashed with (HMAC-SHA256) and Hub tokens are encrypted with.
    secret_key: SecretStr = SecretStr(DEV_SECRET_KEY)

    #: Comma-separated directories under which `model.path` may point.
    local_model_roots: str = ""
    #: Hub server for downloads and uploads (huggingface_hub's own HF_ENDPOINT is the fallback).
    hub_endpoint: str = Field(default_factory=lambda: os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    allow_pickle: bool = False
    allow_remote_code: bool = False

    #: Device the engine uses: auto (CUDA when present), cpu or cuda.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Local copies of named calibration datasets, a JSON object: {"wikitext2": "/data/wikitext2-train.txt",
    #: "allenai/c4": "/data/c4-part.jsonl"}. A job naming one calibrates on the file, with no `datasets`
    #: library or hub needed; each must be a .txt/.jsonl/.json file under QAAS_LOCAL_MODEL_ROOTS.
    calibration_datasets: dict[str, str] = Field(default_factory=dict)
    #: Text used for perplexity evaluation (a file); empty means the job must name one or skip it.
    eval_text: str = ""
    eval_max_windows: int = 16

    # Reliability model (see README "Operations").
    job_max_attempts: int = Field(default=3, ge=1, le=20)
    job_time_limit_s: float = Field(default=6 * 3600, gt=0)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    lease_s: float = Field(default=60.0, gt=0)
    sweep_interval_s: float = Field(default=10.0, gt=0)
    #: A queued job whose message was sent this long ago without being claimed is sent again.
    redispatch_after_s: float = Field(default=300.0, gt=0)
    cancel_grace_s: float = Field(default=10.0, ge=0)

    #: Webhook destinations at private/loopback addresses are refused unless listed here
    #: (comma-separated host names or CIDRs, e.g. "127.0.0.1,10.0.0.0/8").
    webhook_allowlist: str = ""
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=30)
    #: Backoff between webhook attempts, comma-separated seconds; empty = 5s, 5m, 30m, 2h, ... (~3 days).
    webhook_retry_schedule_s: str = ""
    #: Attempts at publishing a finished model to the Hub before the job fails.
    publish_max_attempts: int = Field(default=5, ge=1, le=50)

    max_request_bytes: int = 8 * 1024 * 1024

    #: Requests per minute per API key (token bucket; in Redis when the broker is Redis, so all API
    #: processes share it). 0 turns rate limiting off.
    rate_limit_per_minute: int = Field(default=1200, ge=0)
    #: Bucket size: how many requests a key may send at once before the per-minute rate applies.
    rate_limit_burst: int = Field(default=120, ge=1)
    #: Seconds an API-key lookup is cached in each API process (a revoked key keeps working that long
    #: in processes other than the one that revoked it). 0 turns the cache off.
    auth_cache_s: float = Field(default=5.0, ge=0, le=60)
    #: Longest a status read's answer is served from an API process's cache of job documents
    #: (api/jobs/document_cache.py; PostgreSQL only). Changes are seen at once through LISTEN/NOTIFY;
    #: this bounds what a lost notification can cost. 0 turns the cache off.
    job_cache_s: float = Field(default=5.0, ge=0, le=60)
    #: Documents each API process keeps at most (about a kilobyte each).
    job_cache_entries: int = Field(default=20_000, ge=1)
    #: Database connections each process keeps open (and may add under bursts). Every API process also
    #: caps its request threads at api_threads, so that requests wait for a thread, not for a connection.
    db_pool_size: int = Field(default=20, ge=1, le=200)
    db_max_overflow: int = Field(default=10, ge=0, le=200)
    api_threads: int = Field(default=20, ge=1, le=400)
    #: Serve GET /metrics (Prometheus text format, computed from the database at scrape time).
    metrics_enabled: bool = True
    #: Log format of the service processes: "json" (one JSON object a line) or "text".
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"
    #: Start each job's engine process ahead, during the previous job, with its imports done (worker/child.py):
    #: a job's fixed cost loses torch's and transformers' imports. Off: every job starts a cold interpreter.
    engine_standby: bool = True
    #: Test only (refused unless QAAS_ENV=test): the worker runs a fake engine that sleeps
    #: `fake_engine_step_s` per block instead of quantizing, for chaos and drain tests.
    fake_engine: bool = False
    fake_engine_step_s: float = Field(default=0.0, ge=0)
    #: The most GPUs a job may ask for (`options.gpus`; a larger ask is a 422): the largest QAAS_WORKER_GPUS
    #: among this service's workers. 1: every job runs on one GPU.
    max_gpus_per_job: int = Field(default=1, ge=1, le=gpus.MOST)
    #: GPUs this worker holds (its visible devices) and gives each job it takes. It consumes the queue of the
    #: jobs asking exactly that many (`qaas.queue.gpu_queue_name`): a several-GPU job has its GPUs to itself,
    #: and a one-GPU job never lands on a worker holding several.
    worker_gpus: int = Field(default=1, ge=1, le=gpus.MOST)
    #: The one-GPU jobs' queue; a job of N GPUs goes to "<gpu_queue>-x<N>".
    gpu_queue: str = "gpu"
    io_queue: str = "io"

    @model_validator(mode="after")
    def _refuse_unsafe_defaults(self) -> "Settings":
        if self.fake_engine and self.env != "test":
            raise ValueError("QAAS_FAKE_ENGINE is a test-only setting; it is refused unless QAAS_ENV=test")
        if self.env == "production":
            problems = []
            if self.secret_key.get_secret_value() == DEV_SECRET_KEY or len(self.secret_key.get_secret_value()) < 32:
                problems.append("QAAS_SECRET_KEY must be set to a random value of at least 32 characters")
            if not self.database_url or self.database_url.startswith("sqlite"):
                problems.append("QAAS_DATABASE_URL must point at PostgreSQL")
            if not self.broker_url or self.broker_url.startswith("filesystem"):
                problems.append("QAAS_BROKER_URL must point at Redis")
            if problems:
                raise ValueError("unsafe settings for production: " + "; ".join(problems))
        return self

    @model_validator(mode="after")
    def _check_calibration_datasets(self) -> "Settings":
        roots = tuple(str(r) for r in self.model_roots)
        for name, path in self.calibration_datasets.items():
            where = f"QAAS_CALIBRATION_DATASETS[{name!r}]"
            if not Path(path).is_absolute() or Path(path).suffix.lower() not in LOCAL_SUFFIXES:
                raise ValueError(f"{where}: must be the absolute path of a {'/'.join(LOCAL_SUFFIXES)} file")
            try:
                local_file(path, roots)
            except FieldError as exc:
                raise ValueError(f"{where}: {exc.message} ({path})") from None
        return self

    # Derived values -------------------------------------------------------------------------

    @property
    def calibration_sources(self) -> CalibrationSources:
        """Where jobs' calibration data may come from on this host (qaas.quantization_rules)."""
        return CalibrationSources.here(self.model_roots, self.calibration_datasets)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'qaas.db').resolve()}"

    @property
    def database(self) -> Database:
        """The database and this process's pool sizes, for whatever opens connections."""
        return Database(self.resolved_database_url, pool_size=self.db_pool_size, max_overflow=self.db_max_overflow)

    @property
    def resolved_broker_url(self) -> str:
        # The filesystem transport ignores the host, but kombu warns on every connection without one.
        return self.broker_url or "filesystem://localhost/"

    @property
    def broker_folder(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def embedded(self) -> bool:
        return not self.database_url or not self.broker_url

    @property
    def model_roots(self) -> list[Path]:
        """The allowed roots of local paths, symlinks followed (resolved once per process and value: every
        submission checks its model path against them, and resolving each root each time was 7 % of it)."""
        return list(_resolved_roots(self.local_model_roots, os.getcwd()))

    @property
    def webhook_schedule(self) -> tuple[float, ...] | None:
        parts = [p for p in self.webhook_retry_schedule_s.split(",") if p.strip()]
        return tuple(float(p) for p in parts) or None

    @property
    def artifacts_dir(self) -> Path:
        return (self.data_dir / "artifacts").resolve()

    @property
    def work_dir(self) -> Path:
        return (self.data_dir / "work").resolve()


@lru_cache(maxsize=64)
def _resolved_roots(local_model_roots: str, cwd: str) -> tuple[Path, ...]:
    # Keyed by the setting's text (a copy of the settings with other roots gets its own) and the working
    # directory (a relative root resolves against it; resolve() reads it). A root that is
    # re-pointed (a symlink changed) while the process runs keeps its old target here until a restart,
    # like every other setting of the process.
    return tuple(Path(p).expanduser().resolve() for p in local_model_roots.split(",") if p.strip())


@lru_cache
def get_settings() -> Settings:
    return Settings()
