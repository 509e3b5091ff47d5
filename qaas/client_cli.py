"""The terminal client: `qaas submit`, `qaas jobs`, `qaas status`, `qaas cancel`, against a running service.

  qaas submit MODEL --config FILE [--push-to-hub REPO] [--follow]   (MODEL: id, path or job:<id>)
  qaas jobs [--status S] [--limit N]
  qaas status ID [--follow] [--json]
  qaas cancel ID

Where the service is, and the key:
  QAAS_URL and QAAS_API_KEY, else `url` and `api_key` in ~/.config/qaas/client.toml (or client.json;
  $XDG_CONFIG_HOME is honoured; QAAS_CLIENT_CONFIG names another file). `--url` overrides the URL.
  The key is never taken from the command line (it would show in `ps` and shell history).

Exit codes (for scripts), the same for every command:
  0  success: the job succeeded, is still queued or running (status without --follow), was submitted or
     cancelled, or the list was printed
  1  the job failed or was cancelled (status, with or without --follow; submit --follow), or cancel of a
     job that had already finished
  2  usage or validation error: bad arguments, unreadable config, the service refused the request (422), no such job
  3  authentication error: no API key, or the service refused it (401/403)
  4  the service is unreachable (connection refused, timeout, DNS) or answered with a server error (5xx)
  130  interrupted (Ctrl-C); a job being followed goes on

Progress is drawn on stderr (bars on a terminal, plain lines otherwise) from the job's event stream,
`GET /v1/jobs/{id}/events` with `Accept: text/event-stream`, resumed with Last-Event-ID when the
connection drops. `submit` without --follow prints only the job id on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from qaas.kit.stage_bars import StageBars

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
TERMINAL = ("succeeded", "failed", "cancelled")


class ClientError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code


# --- configuration --------------------------------------------------------------------------------


def config_paths() -> list[Path]:
    if os.environ.get("QAAS_CLIENT_CONFIG"):
        return [Path(os.environ["QAAS_CLIENT_CONFIG"]).expanduser()]
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "qaas"
    return [base / "client.toml", base / "client.json"]


def load_config(url_override: str | None = None) -> tuple[str, str]:
    """(url, key) from the environment, else the config file."""
    file_values: dict[str, Any] = {}
    for path in config_paths():
        if not path.is_file():
            continue
        try:
            if path.suffix == ".toml":
                import tomllib

                file_values = tomllib.loads(path.read_text(encoding="utf-8"))
            else:
                file_values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ClientError(f"cannot read the client config {path}: {exc}", EXIT_USAGE)
        if not isinstance(file_values, dict):
            raise ClientError(f"the client config {path} must hold a table/object with url and api_key", EXIT_USAGE)
        break
    url = url_override or os.environ.get("QAAS_URL") or file_values.get("url") or ""
    key = os.environ.get("QAAS_API_KEY") or file_values.get("api_key") or ""
    if not url:
        raise ClientError("no service URL: set QAAS_URL (e.g. http://127.0.0.1:8000), pass --url, "
                          f"or put url = \"...\" in {config_paths()[0]}", EXIT_USAGE)
    if not str(url).startswith(("http://", "https://")):
        raise ClientError(f"the service URL must start with http:// or https://, not {url!r}", EXIT_USAGE)
    if not key:
        raise ClientError(f"no API key: set QAAS_API_KEY or put api_key = \"...\" in {config_paths()[0]}", EXIT_AUTH)
    return str(url).rstrip("/"), str(key)


# --- HTTP -----------------------------------------------------------------------------------------


class Api:
    def __init__(self, url: str, key: str, timeout: float = 30.0) -> None:
        import httpx

        self.httpx = httpx
        self.url = url
        self.client = httpx.Client(base_url=url, timeout=timeout,
                                   headers={"Authorization": f"Bearer {key}", "User-Agent": "qaas-client"})

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, path: str, **kw) -> Any:
        try:
            r = self.client.request(method, path, **kw)
        except self.httpx.TimeoutException:
            raise ClientError(f"the service at {self.url} did not answer in time", EXIT_UNREACHABLE)
        except self.httpx.TransportError as exc:
            raise ClientError(f"cannot reach the service at {self.url}: {exc}", EXIT_UNREACHABLE)
        if r.status_code < 400:
            return r.json() if r.content else None
        raise problem_error(r)


def problem_error(r) -> ClientError:
    """A ClientError with the service's own words (RFC 9457 problem details) and the right exit code."""
    try:
        body = r.json()
    except ValueError:
        body = {}
    detail = body.get("detail") or body.get("title") or r.reason_phrase
    errors = body.get("errors") or []
    if r.status_code in (401, 403):
        return ClientError(f"authentication failed: {detail} (check QAAS_API_KEY)", EXIT_AUTH)
    if r.status_code == 404:
        return ClientError("no such job (or it belongs to another tenant)", EXIT_USAGE)
    if r.status_code == 409:
        return ClientError(str(detail), EXIT_JOB_FAILED)
    if r.status_code in (400, 413, 422):
        lines = [f"the service refused the request: {body.get('title') or 'invalid request'}"]
        lines += [f"  {e.get('field')}: {e.get('message')}" for e in errors] or [f"  {detail}"]
        return ClientError("\n".join(lines), EXIT_USAGE)
    if r.status_code >= 500:
        return ClientError(f"the service answered {r.status_code}: {detail}", EXIT_UNREACHABLE)
    return ClientError(f"unexpected answer {r.status_code}: {detail}", EXIT_USAGE)


def sse_events(api: Api, job_id: str, *, after: int = 0, max_reconnects: int = 20) -> Iterator[tuple[str, dict]]:
    """(kind, data) for each event of a job's stream until it ends; reconnects with Last-Event-ID."""
    last_id = after
    failures = 0
    while True:
        headers = {"Accept": "text/event-stream"}
        if last_id:
            headers["Last-Event-ID"] = str(last_id)
        try:
            with api.client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                   timeout=api.httpx.Timeout(30.0, read=60.0)) as r:
                if r.status_code >= 400:
                    r.read()
                    raise problem_error(r)
                kind, data_lines = "message", []
                for line in r.iter_lines():
                    if line == "":
                        if data_lines:
                            try:
                                data = json.loads("\n".join(data_lines))
                            except ValueError:
                                data = {}
                            if kind == "end":
                                yield "end", data
                                return
                            if isinstance(data.get("id"), int):
                                last_id = data["id"]
                            failures = 0
                            yield kind, data
                        kind, data_lines = "message", []
                    elif line.startswith(":"):
                        continue
                    elif line.startswith("event:"):
                        kind = line[6:].strip()
                    elif line.startswith("data:"):
                        data_lines.append(line[5:].lstrip())
                    elif line.startswith("id:") and line[3:].strip().isdigit():
                        last_id = int(line[3:].strip())
        except (api.httpx.TransportError, api.httpx.TimeoutException) as exc:
            failures += 1
            if failures > max_reconnects:
                raise ClientError(f"lost the event stream from {api.url}: {exc}", EXIT_UNREACHABLE)
            time.sleep(min(5.0, 0.5 * failures))
            continue
        # The server closed the stream without `end` (a restart): resume after the last event seen.
        failures += 1
        if failures > max_reconnects:
            raise ClientError("the event stream keeps closing; giving up", EXIT_UNREACHABLE)
        time.sleep(min(5.0, 0.5 * failures))


# --- progress display -----------------------------------------------------------------------------


class Progress:
    """A job's event stream drawn as StageBars: a bar per stage on a terminal, plain lines on a pipe or file."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.bars = StageBars(stream)

    def on_event(self, kind: str, e: dict) -> None:
        stage, message, data = e.get("stage"), e.get("message") or "", e.get("data") or {}
        if kind == "stage":
            self.bars.start(stage or "", message=message)
        elif kind == "progress":
            self.bars.update(data.get("done"), data.get("total"), message, _error_summary(data.get("metrics")))
        elif kind == "status":
            status = data.get("status") or message
            if status in TERMINAL:
                self.bars.end(failed=status != "succeeded")
            self.bars.note(f"status: {message}")
        elif kind == "log":
            level = data.get("level", "info")
            if level in ("warning", "error"):
                self.bars.note(f"  {level}: {message}")

    def close(self) -> None:
        self.bars.end()


def _error_summary(metrics: Any) -> str:
    """' max rel err 0.0123' from a progress event's per-layer metrics (both methods' shapes); for a training
    step ' loss 2.3456 lr 2.0e-04 1234 tok/s'."""
    if not isinstance(metrics, dict):
        return ""
    if isinstance(metrics.get("loss"), (int, float)):
        text = f" loss {metrics['loss']:.4f}"
        if isinstance(metrics.get("lr"), (int, float)):
            text += f" lr {metrics['lr']:.1e}"
        if isinstance(metrics.get("tokens_per_s"), (int, float)):
            text += f" {metrics['tokens_per_s']:.0f} tok/s"
        if isinstance(metrics.get("eval_loss"), (int, float)):
            text += f" eval {metrics['eval_loss']:.4f}"
        return text
    if isinstance(metrics.get("eval_loss"), (int, float)):
        return f" eval loss {metrics['eval_loss']:.4f}"
    if isinstance(metrics.get("max_rel_error"), (int, float)):
        return f" max rel err {metrics['max_rel_error']:.4f}"
    layers = metrics.get("layers")
    errs = [m.get("rel_error") for m in layers.values() if isinstance(m, dict)] if isinstance(layers, dict) else []
    errs = [x for x in errs if isinstance(x, (int, float))]
    return f" max rel err {max(errs):.4f}" if errs else ""


# --- output ---------------------------------------------------------------------------------------


def _size(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def describe(job: dict, out: TextIO) -> None:
    print(f"job       {job['id']}", file=out)
    print(f"status    {job['status']}" + (" (cancellation requested)" if job.get("cancel_requested")
                                           and job["status"] not in TERMINAL else ""), file=out)
    print(f"model     {job['model']}", file=out)
    print(f"method    {job['method']}" + (f" {job['bits']}-bit" if job.get("bits") else "")
          + (" (fine-tuning: a LoRA adapter on a 4-bit base)" if job.get("kind") == "finetune" else ""), file=out)
    if job["status"] == "running":
        print(f"stage     {job.get('stage') or '-'} {round((job.get('progress') or 0) * 100)}% "
              f"{job.get('progress_message') or ''}".rstrip(), file=out)
    if job.get("worker"):
        print(f"worker    {job['worker']} (attempt {job['attempt']} of {job['max_attempts']})", file=out)
    print(f"created   {job['created_at']}", file=out)
    if job.get("timings"):
        print("timings   " + ", ".join(f"{k} {v:.1f}s" for k, v in job["timings"].items()), file=out)
    err = job.get("error")
    if err:
        print(f"error     {err.get('code')} in stage {err.get('stage') or '-'}: {err.get('message')}", file=out)
    result = job.get("result") or {}
    if job["status"] != "succeeded" or not result:
        return
    if result.get("kind") == "finetune":
        loss, lora = result.get("loss") or {}, result.get("lora") or {}
        if isinstance(loss.get("first"), (int, float)) and isinstance(loss.get("last"), (int, float)):
            print(f"loss      {loss['first']:.4f} -> {loss['last']:.4f} over "
                  f"{(result.get('training') or {}).get('total_steps')} steps", file=out)
        if lora.get("trainable_parameters"):
            print(f"adapter   r={lora.get('r')} {lora['trainable_parameters']} trainable parameters", file=out)
    else:
        ratio = result.get("compression_ratio")
        print(f"size      {_size(result.get('size_before_bytes'))} -> {_size(result.get('size_after_bytes'))}"
              + (f" ({ratio:.2f}x smaller)" if isinstance(ratio, (int, float)) else ""), file=out)
    ev = result.get("evaluation") or {}
    if ev.get("perplexity_before") is not None and ev.get("perplexity_after") is not None:
        print(f"perplexity {ev['perplexity_before']:.3f} -> {ev['perplexity_after']:.3f}", file=out)
    elif ev.get("skipped"):
        print(f"perplexity not measured: {ev['skipped']}", file=out)
    per_type = ev.get("per_type") or {}
    for o in (result.get("gguf") or {}).get("outputs") or []:  # a GGUF job: a line per type
        ppl = (per_type.get(o["type"]) or {}).get("perplexity")
        print(f"gguf      {o['type']:<8} {_size(o['size']):>10}  {o['bits_per_weight']:.2f} bpw"
              + (f"  perplexity {ppl:.3f}" if isinstance(ppl, (int, float)) else ""), file=out)
    hub = result.get("hub") or {}
    if hub:
        print(f"hub       {hub.get('url') or hub.get('repo_id')}"
              + (f" @ {hub.get('commit_sha') or hub.get('commit')}" if hub.get("commit_sha") or hub.get("commit") else ""), file=out)
    for f in job.get("files") or []:
        print(f"file      {f['name']:<32} {_size(f['size']):>10}  {f['url']}", file=out)


def exit_for(job: dict) -> int:
    """1 for a job that failed or was cancelled; 0 for one that succeeded or has not finished yet."""
    return EXIT_JOB_FAILED if job["status"] in ("failed", "cancelled") else EXIT_OK


def follow(api: Api, job_id: str, *, quiet: bool = False) -> dict:
    progress = Progress(sys.stderr)
    try:
        for kind, data in sse_events(api, job_id):
            if kind == "end":
                break
            if not quiet:
                progress.on_event(kind, data)
    finally:
        progress.close()
    return api.request("GET", f"/v1/jobs/{job_id}")


def finish_message(job: dict) -> None:
    if job["status"] == "succeeded":
        print(f"job {job['id']} succeeded", file=sys.stderr)
    elif job["status"] == "failed":
        err = job.get("error") or {}
        print(f"error: job {job['id']} failed in stage {err.get('stage') or '-'} "
              f"({err.get('code') or 'unknown'}): {err.get('message') or 'no reason given'}", file=sys.stderr)
    else:
        print(f"job {job['id']} was {job['status']}", file=sys.stderr)


# --- commands -------------------------------------------------------------------------------------


def _read_config_file(path: str) -> dict:
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ClientError(f"--config: cannot read {p}: {exc.strerror or exc}", EXIT_USAGE)
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise ClientError(f"--config: {p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {exc}", EXIT_USAGE)
    if not isinstance(data, dict):
        raise ClientError(f"--config: {p} must hold an object", EXIT_USAGE)
    return data


def build_submission(args: argparse.Namespace) -> dict:
    """The job request from MODEL and the config file (a quantization_config, or a request without `model`: a
    quantization request, or a fine-tuning one with `"kind": "finetune"`). MODEL `job:<id>` is a job's output."""
    config = _read_config_file(args.config)
    whole = "quantization_config" in config or config.get("kind") == "finetune"
    body: dict[str, Any] = dict(config) if whole else {"quantization_config": config}
    local = Path(args.model).expanduser()
    if args.model.startswith("job:"):  # a fine-tuning job's base: the output of one of your jobs
        body["model"] = {"job": args.model[len("job:"):]}
    elif args.model.startswith(("/", "./", "../", "~")) or local.exists():
        body["model"] = {"path": str(local.resolve())}
    else:
        body["model"] = {"id": args.model, **({"revision": args.revision} if args.revision else {})}
    if args.push_to_hub:
        body["push_to_hub"] = {**(body.get("push_to_hub") or {}), "repo_id": args.push_to_hub}
        if args.public:
            body["push_to_hub"]["private"] = False
        token = os.environ.get("HF_TOKEN")
        if token and "hf_token" not in body:
            body["hf_token"] = token
    return body


def cmd_submit(args: argparse.Namespace, api: Api) -> int:
    body = build_submission(args)
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    job = api.request("POST", "/v1/jobs", json=body, headers=headers)
    if not args.follow:
        print(job["id"])
        return EXIT_OK
    print(f"submitted job {job['id']} ({job['model']}, {job['method']})", file=sys.stderr)
    try:
        job = follow(api, job["id"])
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on. Follow it again with: qaas status {job['id']} --follow",
              file=sys.stderr)
        return 130
    describe(job, sys.stdout)
    finish_message(job)
    return exit_for(job)


def cmd_jobs(args: argparse.Namespace, api: Api) -> int:
    params: dict[str, Any] = {"limit": args.limit}
    if args.status:
        params["status"] = args.status
    page = api.request("GET", "/v1/jobs", params=params)
    if args.json:
        print(json.dumps(page, indent=2))
        return EXIT_OK
    items = page["items"]
    if not items:
        print("no jobs" + (f" with status {args.status}" if args.status else ""), file=sys.stderr)
        return EXIT_OK
    print(f"{'ID':<36}  {'STATUS':<10} {'STAGE':<14} {'METHOD':<16} {'CREATED':<20} MODEL")
    for j in items:
        stage = j.get("stage") or "-"
        if j["status"] == "running":
            stage = f"{stage} {round((j.get('progress') or 0) * 100)}%"
        method = j["method"] + (f" {j['bits']}b" if j.get("bits") else "")
        print(f"{j['id']:<36}  {j['status']:<10} {stage:<14} {method:<16} {j['created_at'][:19]:<20} {j['model']}")
    if page.get("next_cursor"):
        print(f"(more: {len(items)} shown; use --limit to see more)", file=sys.stderr)
    return EXIT_OK


def cmd_status(args: argparse.Namespace, api: Api) -> int:
    job = api.request("GET", f"/v1/jobs/{args.job_id}")
    if args.follow and job["status"] not in TERMINAL:
        try:
            job = follow(api, args.job_id)
        except KeyboardInterrupt:
            print("\nstopped following; the job goes on", file=sys.stderr)
            return 130
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        describe(job, sys.stdout)
    if args.follow or job["status"] in TERMINAL:
        finish_message(job)
    return exit_for(job)


def cmd_cancel(args: argparse.Namespace, api: Api) -> int:
    job = api.request("POST", f"/v1/jobs/{args.job_id}/cancel")
    if job["status"] == "cancelled":
        print(f"job {job['id']} cancelled", file=sys.stderr)
    else:
        print(f"cancellation of job {job['id']} requested; its worker stops it shortly "
              f"(follow with: qaas status {job['id']} --follow)", file=sys.stderr)
    return EXIT_OK


def _run(handler):
    def run(args: argparse.Namespace) -> int:
        import logging

        logging.getLogger("httpx").setLevel(logging.WARNING)  # no per-request log lines in a terminal tool
        api = None
        try:
            url, key = load_config(getattr(args, "url", None))
            api = Api(url, key)
            return handler(args, api)
        except ClientError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return exc.code
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        finally:
            if api is not None:
                api.close()
    return run


EPILOG = ("exit codes: 0 success (the job succeeded or has not finished); 1 the job failed or was cancelled; "
          "2 usage or validation error; 3 authentication error; 4 service unreachable. Service URL and key: "
          "QAAS_URL and QAAS_API_KEY, or url/api_key in ~/.config/qaas/client.toml (or client.json).")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the client commands to the `qaas` command (called by qaas.cli)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="service URL (default: QAAS_URL or the client config file)")

    s = sub.add_parser("submit", parents=[common], help="submit a quantization job to a running service",
                       description="Submit a job. MODEL is a Hub model id or a local directory on the workers.",
                       epilog=EPILOG)
    s.add_argument("model", metavar="MODEL", help="Hub model id (owner/name), a local model directory, or job:<id> "
                                                  "(a fine-tuning job's base: one of your jobs' output)")
    s.add_argument("--config", required=True, metavar="FILE",
                   help="JSON or TOML file: a quantization_config (GPTQConfig/AwqConfig/BitsAndBytesConfig fields), "
                        "a job request with quantization_config, options, webhook, ..., or a fine-tuning request "
                        '("kind": "finetune", lora, training, dataset, ...)')
    s.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    s.add_argument("--push-to-hub", metavar="REPO", help="publish the result to this Hub repo (token from HF_TOKEN)")
    s.add_argument("--public", action="store_true", help="with --push-to-hub: make the repo public")
    s.add_argument("--idempotency-key", help="send the request at most once under this key")
    s.add_argument("--follow", "-f", action="store_true", help="show live progress until the job ends")
    s.set_defaults(func=_run(cmd_submit))

    j = sub.add_parser("jobs", parents=[common], help="list your jobs on a running service", epilog=EPILOG)
    j.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    j.add_argument("--limit", type=int, default=20)
    j.add_argument("--json", action="store_true", help="print the API's JSON")
    j.set_defaults(func=_run(cmd_jobs))

    st = sub.add_parser("status", parents=[common], help="show a job; --follow shows live progress", epilog=EPILOG)
    st.add_argument("job_id", metavar="ID")
    st.add_argument("--follow", "-f", action="store_true", help="follow until the job ends; exit 0 only if it succeeded")
    st.add_argument("--json", action="store_true", help="print the API's JSON")
    st.set_defaults(func=_run(cmd_status))

    c = sub.add_parser("cancel", parents=[common], help="cancel a queued or running job", epilog=EPILOG)
    c.add_argument("job_id", metavar="ID")
    c.set_defaults(func=_run(cmd_cancel))
