"""The `qaas` command.

  qaas up [--host H] [--port P]     API + worker together (embedded defaults unless configured)
  qaas api [--host H] [--port P]    the API alone
  qaas worker                       a GPU worker (one job at a time)
  qaas migrate                      upgrade the database to the latest schema
  qaas keys create NAME [--owner O] print a new API key (alone on stdout)
  qaas keys revoke PREFIX           revoke keys whose shown prefix matches
  qaas quantize SOURCE --config JSON|FILE --out DIR
                                    the worker's pipeline in-process, no service
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from qaas.kit.parent_death import die_with_parent


def _settings():
    from qaas.settings import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings


def _setup_logging(level: str | None = None, log_file: str | None = None) -> None:
    from qaas.logging_setup import setup_logging
    from qaas.settings import get_settings

    settings = get_settings()
    setup_logging(settings.log_format, level or settings.log_level, log_file=log_file)


# --- service processes ----------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    from qaas.db.migrate import upgrade

    settings = _settings()
    upgrade(settings.resolved_database_url)
    print("database is at the latest schema", file=sys.stderr)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from qaas.api.app import create_app

    settings = _settings()
    _setup_logging()
    # log_config=None: uvicorn's loggers propagate to the one JSON handler set up above.
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info", proxy_headers=True,
                log_config=None, access_log=args.access_log)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import socket

    from celery.signals import setup_logging as celery_setup_logging
    from celery.signals import worker_ready

    # before the tasks module is imported: what it logs while it loads goes to the same place
    _setup_logging(args.loglevel, args.log_file)
    from qaas.worker.tasks import app, settings

    # A receiver on this signal tells Celery to leave logging alone: our JSON handler stays the only one.
    celery_setup_logging.connect(lambda **_: None, weak=False)
    if args.ready_file:
        ready_file = Path(args.ready_file)
        worker_ready.connect(lambda **_: ready_file.touch(), weak=False)
    from qaas.queue import gpu_queue_name

    # the queue of the jobs of this worker's GPU count (QAAS_WORKER_GPUS), and the I/O queue
    queues = args.queues or f"{gpu_queue_name(settings, settings.worker_gpus)},{settings.io_queue}"
    # --quiet: no banner on stdout; what it says (queues, transport) is in the log lines.
    argv = ["--quiet", "worker", "-Q", queues, "-c", "1", "-P", "solo", "--loglevel", args.loglevel,
            "-n", f"qaas-{os.getpid()}@{socket.gethostname()}", "--without-gossip", "--without-mingle"]
    app.worker_main(argv)
    return 0


def _ensure_first_key(settings) -> str | None:
    from sqlalchemy import func, select

    from qaas.db.models import ApiKey
    from qaas.db.session import session_scope
    from qaas.keys import create_key

    with session_scope(settings.resolved_database_url) as s:
        if s.scalar(select(func.count()).select_from(ApiKey)):
            return None
        return create_key(s, settings, name="first key", owner="default")


def _exit_on_sigterm(_signum, _frame) -> None:
    raise SystemExit(0)


#: How long `qaas up` waits for its worker to report ready before it says so and prints the key anyway.
WORKER_READY_TIMEOUT_S = 180.0


def _announce_when_ready(server, worker: subprocess.Popen, ready_file: Path, settings, url: str, log_file: Path) -> None:
    """Once the API listens and the worker is ready: the summary, then the URL and the first key as the
    last lines (the key alone on stdout). Everything else the service says goes to `log_file`."""
    import time

    deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
    while not (server.started and ready_file.exists()):
        if server.should_exit:
            return  # the API did not start: uvicorn has logged why (an error, so on the terminal)
        if worker.poll() is not None:
            print(f"error: the worker exited with status {worker.returncode} before it was ready; see {log_file}",
                  file=sys.stderr, flush=True)
            server.should_exit = True
            return
        if time.monotonic() > deadline:
            print(f"warning: the worker has not reported ready after {WORKER_READY_TIMEOUT_S:.0f} s; jobs wait "
                  f"until it is (see {log_file})", file=sys.stderr)
            break
        time.sleep(0.1)
    key = _ensure_first_key(settings)  # made only now, so a start that failed never swallows it
    mode = "embedded: SQLite + filesystem broker" if settings.embedded else "configured database and broker"
    lines = [
        f"qaas is running ({mode}; data in {settings.data_dir.resolve()})",
        f"  API docs   {url}/docs",
        f"  dashboard  {url}/dashboard",
        f"  logs       {log_file}",
        f"  URL        {url}",
    ]
    lines.append("  API key    (the first one, shown once: keep it)" if key else
                 "  API key    keys exist already; make another with `qaas keys create NAME`")
    print("\n" + "\n".join(lines), file=sys.stderr, flush=True)
    if key:
        print(key, flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    import threading

    import uvicorn

    from qaas.api.app import create_app
    from qaas.db.migrate import upgrade

    settings = _settings()
    log_file = (settings.data_dir / "qaas-up.log").resolve()
    _setup_logging(log_file=str(log_file))
    upgrade(settings.resolved_database_url)
    ready_file = settings.data_dir / f".worker-ready-{os.getpid()}"
    ready_file.unlink(missing_ok=True)
    # The worker logs to the same file (its stdout too: Celery prints its shutdown notices there).
    # SIGKILL if this process is killed outright: a worker left behind would keep taking jobs (the running
    # one's lease lapses and it is retried, as for any lost worker).
    with open(log_file, "ab") as worker_stdout:
        worker = subprocess.Popen([sys.executable, "-P", "-c", "from qaas.cli import main; main()", "worker",
                                   "--log-file", str(log_file), "--ready-file", str(ready_file)],
                                  stdout=worker_stdout, preexec_fn=die_with_parent(signal.SIGKILL))
    url = f"http://{args.host}:{args.port}"
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=args.host, port=args.port, log_level="info",
                                           log_config=None))
    threading.Thread(target=_announce_when_ready, args=(server, worker, ready_file, settings, url, log_file),
                     name="announce", daemon=True).start()
    # uvicorn handles SIGTERM itself (graceful shutdown), then restores the previous handler and raises
    # the signal again: with the default handler that ends the process before `finally` could stop the
    # worker. This handler turns it into SystemExit, so the worker below is stopped gracefully.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        server.run()
    finally:
        worker_died = worker.poll() is not None  # before it is told to stop
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
        ready_file.unlink(missing_ok=True)
    return 0 if server.started and not worker_died else 1


# --- keys -----------------------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    from qaas.db.session import session_scope
    from qaas.keys import create_key

    settings = _settings()
    with session_scope(settings.resolved_database_url) as s:
        key = create_key(s, settings, name=args.name, owner=args.owner or args.name)
    print(key)  # alone on stdout, so scripts can capture it
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from qaas.db.session import session_scope
    from qaas.keys import revoke_keys

    settings = _settings()
    with session_scope(settings.resolved_database_url) as s:
        n = revoke_keys(s, args.prefix)
    print(f"revoked {n} key(s)", file=sys.stderr)
    return 0 if n else 1


# --- in-process quantization ----------------------------------------------------------------------


def _load_config(raw: str) -> dict:
    path = Path(raw)
    text = path.read_text() if not raw.lstrip().startswith("{") and path.is_file() else raw
    try:
        return json.loads(text)
    except ValueError as exc:
        raise SystemExit(f"--config: not JSON and not a readable JSON file: {exc}")


def _config_errors(exc) -> int:
    for e in exc.errors:
        print(f"error: quantization_config.{e.field}: {e.message}", file=sys.stderr)
    return 2


def cmd_quantize(args: argparse.Namespace) -> int:
    from qaas import quantization_rules
    from qaas.quantization_rules import InvalidQuantizationConfig

    try:
        qc = quantization_rules.normalize(_load_config(args.config))
    except InvalidQuantizationConfig as exc:
        return _config_errors(exc)

    from qaas.settings import get_settings
    from qaas.worker.engine.errors import EngineError
    from qaas.worker.engine.pipeline import EngineOptions, quantize
    from qaas.worker.terminal_progress import TerminalReporter

    settings = get_settings()
    src = Path(args.source)
    source = {"path": str(src.resolve())} if src.exists() else {"id": args.source, "revision": args.revision}
    # the model directory named here, and the service's roots (calibration files, registered copies)
    roots = [source["path"]] if "path" in source else []
    roots += [str(r) for r in settings.model_roots]
    options = EngineOptions(
        device=args.device,
        hub_endpoint=os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
        hub_token=os.environ.get("HF_TOKEN"),
        allowed_roots=roots,
        calibration_datasets=settings.calibration_datasets,
        evaluate=not args.no_eval,
        eval_text_path=args.eval_text or os.environ.get("QAAS_EVAL_TEXT") or None,
        targets=tuple(args.target or ()),
        cpu_compatible=args.cpu_compatible,
    )
    try:  # what the engine would refuse before loading the model, told the same way as the rules above
        quantization_rules.check_sources(qc, options.calibration_sources())
    except InvalidQuantizationConfig as exc:
        return _config_errors(exc)
    try:
        with TerminalReporter(sys.stderr) as reporter:
            result = quantize(source, qc, args.out, options=options, reporter=reporter)
    except EngineError as exc:
        print(f"error ({exc.code}): {exc.message}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


# --- entry ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qaas", description="Quantization as a service.")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run API + worker together")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.set_defaults(func=cmd_up)

    api = sub.add_parser("api", help="run the API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--no-access-log", dest="access_log", action="store_false", help="no line per request")
    api.set_defaults(func=cmd_api)

    worker = sub.add_parser("worker", help="run a worker (one job at a time)")
    worker.add_argument("--queues", default=None, help="comma-separated queues (default: gpu,io)")
    worker.add_argument("--loglevel", default="INFO")
    # used by `qaas up`: its log file, and a file to touch once the worker takes jobs
    worker.add_argument("--log-file", default=None, help="log to this file; only errors on stderr")
    worker.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    worker.set_defaults(func=cmd_worker)

    mig = sub.add_parser("migrate", help="upgrade the database schema")
    mig.set_defaults(func=cmd_migrate)

    keys = sub.add_parser("keys", help="manage API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create a key and print it")
    kc.add_argument("name")
    kc.add_argument("--owner", help="tenant the key belongs to (default: NAME)")
    kc.set_defaults(func=cmd_keys_create)
    kr = ksub.add_parser("revoke", help="revoke keys by their shown prefix")
    kr.add_argument("prefix")
    kr.set_defaults(func=cmd_keys_revoke)

    q = sub.add_parser("quantize", help="quantize a model in-process (no service)")
    q.add_argument("source", help="a local model directory or a Hub model id")
    q.add_argument("--config", required=True, help="quantization_config as JSON or a JSON file")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--revision", default=None)
    q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    q.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")
    q.add_argument("--eval-text", default=None, help="text file for perplexity")
    q.add_argument("--target", action="append", default=None, metavar="ENGINE",
                   help="GPTQ: an engine the output must load in (vllm, sglang, exllamav2, marlin; repeatable), "
                        "as options.targets")
    q.add_argument("--cpu-compatible", action="store_true",
                   help="bitsandbytes 4-bit: keep in float the layers its CPU kernels cannot run (options.cpu_compatible)")
    q.set_defaults(func=cmd_quantize)

    try:
        from qaas.client_cli import register as register_client
    except ImportError:  # the terminal client is optional
        register_client = None
    if register_client:
        register_client(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # service processes (api, worker, up) set up their logging themselves: the configured format, JSON
    # lines by default; `quantize` draws progress bars
    if args.command not in ("api", "worker", "up", "quantize"):
        from qaas.logging_setup import setup_logging

        setup_logging("text", "INFO")
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
