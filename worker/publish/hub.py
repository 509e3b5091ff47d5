"""Publishing a finished model folder to a Hugging Face Hub repository.

One publish = `create_repo(exist_ok=True)` (+ the branch when one is named), then every LFS blob is uploaded
(`preupload_lfs_files`: the server dedupes blobs it already has, so a retried publish resumes where the last
one stopped instead of uploading again) and the whole folder lands in ONE commit, so a repo is never left
half-published by us. Folders of more than `max_files_per_commit` files are split into several commits.

Idempotent: before committing, the target branch's tree is compared with the folder (sha256 of LFS files,
git blob sha of small files); when they already match, the existing head commit is returned and nothing is
committed. With `create_pr`, an open pull-request ref with identical content is returned instead of a new PR.

Errors become `PublishError` subclasses with `retryable` set (5xx/429/connection drop: retry later; 401, 403,
404, 409, 4xx: final) and messages that never contain the token. The Hub server is `endpoint` (default:
`HF_ENDPOINT`, which huggingface_hub reads). Uses plain LFS when `HF_HUB_DISABLE_XET=1`, Xet otherwise.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import httpx
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoFile

from qaas.kit.redaction import redact

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]

# Remote files that a new publish replaces when the folder no longer has them (a re-quantization with a
# different shard count must not leave stale shards behind next to a new index).
STALE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "quantize_config.json")


# ----------------------------------------------------------------------------------------------- errors
class PublishError(Exception):
    """A publish that did not happen. `retryable`: the same call may succeed later (it is idempotent)."""

    retryable = False

    def __init__(self, message: str, *, status_code: int | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class HubAuthError(PublishError):
    """401: the token is invalid or expired."""


class HubPermissionError(PublishError):
    """403: the token cannot write to this namespace or repo (read-only token, someone else's namespace)."""


class HubNotFoundError(PublishError):
    """404: the repo or revision does not exist (or is private and invisible to this token)."""


class HubConflictError(PublishError):
    """409/412: the repo or branch changed under us or cannot be created."""


class HubRequestError(PublishError):
    """Any other refusal (400, 413, 422, an invalid model card): final."""


class HubUnavailableError(PublishError):
    """5xx, 429, 408 from the Hub: transient."""

    retryable = True


class HubConnectionError(PublishError):
    """The connection failed, timed out or dropped mid-transfer: transient."""

    retryable = True


def _server_message(err: HfHubHTTPError) -> str:
    msg = getattr(err, "server_message", None) or ""
    if not msg:
        try:
            msg = str(err.response.json().get("error") or "")
        except Exception:
            msg = ""
    return msg.strip().splitlines()[0][:300] if msg.strip() else ""


def translate_error(exc: BaseException, *, repo_id: str, token: str | None) -> PublishError:
    """Map anything huggingface_hub/httpx raised during a publish to a PublishError (token-free message)."""
    seen: set[int] = set()
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__

    for e in chain:
        if isinstance(e, PublishError):
            return e
        if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
            status = e.response.status_code
            detail = _server_message(e)
            suffix = f": {detail}" if detail else ""
            if status == 401 and not isinstance(e, RepositoryNotFoundError):
                cls, text = HubAuthError, f"the Hub rejected the token (401) while publishing {repo_id}; check that it is valid and not expired"
            elif status == 403:
                cls, text = HubPermissionError, f"the token has no write access to {repo_id} (403){suffix}"
            elif isinstance(e, RevisionNotFoundError):
                cls, text = HubNotFoundError, f"revision not found in {repo_id} (404){suffix}"
            elif status in (401, 404):
                cls, text = HubNotFoundError, f"repository {repo_id} not found or not visible to this token ({status}){suffix}"
            elif status in (409, 412):
                cls, text = HubConflictError, f"conflict while publishing {repo_id} ({status}){suffix}"
                if status == 412:  # the branch moved under us: a new attempt re-reads it
                    err = cls(redact(text, token), status_code=status)
                    err.retryable = True
                    return err
            elif status in (408, 429) or status >= 500:
                cls, text = HubUnavailableError, f"the Hub is unavailable ({status}) while publishing {repo_id}{suffix}"
            else:
                cls, text = HubRequestError, f"the Hub refused the publish of {repo_id} ({status}){suffix}"
            return cls(redact(text, token), status_code=status)
        if isinstance(e, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError, ConnectionError)):
            return HubConnectionError(redact(f"connection to the Hub failed while publishing {repo_id}: {type(e).__name__}: {e}", token))
        if isinstance(e, ValueError) and "Invalid metadata in README.md" in str(e):
            return HubRequestError(redact(f"the Hub refused the model card of {repo_id}: {e}", token), status_code=400)
    return PublishError(redact(f"publishing {repo_id} failed: {type(exc).__name__}: {exc}", token))


# ----------------------------------------------------------------------------------------------- repo ids
def default_repo_id(
    source_id: str,
    owner: str,
    method: str,
    bits: int,
    group_size: int | None = None,
    *,
    quant_type: str | None = None,
) -> str:
    """`<owner>/<name>-GPTQ-4bit-g128`, `<owner>/<name>-bnb-nf4`, `<owner>/<name>-bnb-8bit`.

    `name` is the last path component of the source (a Hub id or a local folder). Characters the Hub refuses
    in repo names become `-`, and the name is cut to the Hub's 96 characters keeping the suffix.
    """
    name = source_id.rstrip("/").split("/")[-1] or "model"
    method = method.lower()
    if method == "gptq":
        suffix = f"-GPTQ-{bits}bit" + (f"-g{group_size}" if group_size and group_size > 0 else "")
    elif method == "gguf":
        suffix = "-GGUF"  # one repo holds every type's file, as GGUF repos on the Hub do
    elif method in ("bitsandbytes", "bnb"):
        suffix = f"-bnb-{(quant_type or 'nf4').lower()}" if bits == 4 else f"-bnb-{bits}bit"
    else:
        suffix = f"-{method}-{bits}bit"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
    name = name[: 96 - len(suffix)].rstrip("-.")
    return f"{owner}/{name}{suffix}"


# ----------------------------------------------------------------------------------------------- progress
class _Progress:
    """Thread-safe bytes-done counter over the folder; LFS uploads run on several threads."""

    def __init__(self, total: int, callback: ProgressCallback | None, min_interval: float = 0.25):
        self.total, self.callback, self.min_interval = total, callback, min_interval
        self._per_file: dict[str, int] = {}
        self._lock = threading.Lock()
        self._last_emit = 0.0
        self._last_done = -1

    def set(self, path: str, done: int, *, force: bool = False) -> None:
        with self._lock:
            if done <= self._per_file.get(path, 0) and not force:
                return
            self._per_file[path] = max(done, self._per_file.get(path, 0))
            self._emit(force)

    def _emit(self, force: bool) -> None:
        if self.callback is None:
            return
        done = min(sum(self._per_file.values()), self.total)
        now = time.monotonic()
        if done == self._last_done or (not force and done < self.total and now - self._last_emit < self.min_interval):
            return
        self._last_emit, self._last_done = now, done
        try:
            self.callback(done, self.total)
        except Exception:  # a progress sink must never break an upload
            logger.warning("publish progress callback failed", exc_info=True)

    def finish(self) -> None:
        with self._lock:
            self._per_file = {"*": self.total}
            self._emit(True)


@dataclass
class _TrackedAdd(CommitOperationAdd):
    """A CommitOperationAdd that reports the bytes read by the LFS upload (the reads with `with_tqdm=True`)."""

    _progress: _Progress | None = field(default=None, repr=False, compare=False)
    _size: int = field(default=0, repr=False, compare=False)

    @contextmanager
    def as_file(self, with_tqdm: bool = False) -> Iterator[BinaryIO]:
        if not with_tqdm or self._progress is None or not isinstance(self.path_or_fileobj, (str, Path)):
            with super().as_file(with_tqdm=False) as f:
                yield f
            return
        progress, path = self._progress, self.path_in_repo
        with open(self.path_or_fileobj, "rb") as f:
            raw_read = f.read

            def read(size: int | None = -1) -> bytes:
                data = raw_read(size)
                progress.set(path, f.tell())  # position, not a sum: retries and multipart re-reads don't double count
                return data

            f.read = read  # type: ignore[method-assign]
            yield f


# ----------------------------------------------------------------------------------------------- local files
@dataclass
class _LocalFile:
    path_in_repo: str
    abs_path: Path
    size: int
    _sha256: bytes | None = None

    @property
    def sha256(self) -> bytes:
        if self._sha256 is None:
            h = hashlib.sha256()
            with open(self.abs_path, "rb") as f:
                for chunk in iter(lambda: f.read(8 * 1024 * 1024), b""):
                    h.update(chunk)
            self._sha256 = h.digest()
        return self._sha256

    def git_blob_sha(self) -> str:
        h = hashlib.sha1(b"blob %d\0" % self.size)
        with open(self.abs_path, "rb") as f:
            for chunk in iter(lambda: f.read(8 * 1024 * 1024), b""):
                h.update(chunk)
        return h.hexdigest()


def _scan(folder: Path) -> list[_LocalFile]:
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        # .cache/huggingface (upload metadata), .git and other dot-folders are never published
        if not p.is_file() or any(part.startswith(".") for part in rel.parts[:-1]) or rel.name in (".DS_Store",):
            continue
        files.append(_LocalFile(rel.as_posix(), p, p.stat().st_size))
    if not files:
        raise PublishError(f"nothing to publish: {folder} holds no files")
    return files


def _same_content(local: _LocalFile, remote: RepoFile) -> bool:
    if remote.lfs is not None:
        return remote.lfs.size == local.size and remote.lfs.sha256 == local.sha256.hex()
    return remote.size == local.size and remote.blob_id == local.git_blob_sha()


def _stale(remote: dict[str, RepoFile], local: list[_LocalFile]) -> list[str]:
    names = {f.path_in_repo for f in local}
    return sorted(p for p in remote if p not in names and any(fnmatch.fnmatch(p, pat) for pat in STALE_PATTERNS))


def _matches(remote: dict[str, RepoFile], local: list[_LocalFile]) -> bool:
    return all(f.path_in_repo in remote and _same_content(f, remote[f.path_in_repo]) for f in local) and not _stale(remote, local)


# ----------------------------------------------------------------------------------------------- publish
def publish_folder(
    folder: str | Path,
    *,
    repo_id: str,
    token: str | None,
    endpoint: str | None = None,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    commit_description: str | None = None,
    progress: ProgressCallback | None = None,
    attempts: int = 3,
    retry_delay: float = 2.0,
    max_files_per_commit: int = 500,
) -> dict[str, Any]:
    """Publish `folder` to `repo_id` and return `{"repo_id", "commit_sha", "commit_url", "revision", "created"}`
    plus `"pr_url"` when a pull request holds the commit.

    `revision` is the branch to commit to (created from main when missing; default main). With `create_pr`,
    the commit is opened as a pull request against `revision`; `"revision"` in the result is then `refs/pr/N`.
    `created` is False when the content was already there and nothing was committed.
    `progress(bytes_done, bytes_total)` is called while blobs upload (throttled) and once at 100%.
    Retryable failures are retried `attempts` times in all (backoff `retry_delay` * 2^i) before raising.
    Raises a `PublishError` subclass; its message never contains `token`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"nothing to publish: {folder} is not a directory")
    last: PublishError | None = None
    for attempt in range(max(1, attempts)):
        try:
            return _publish_once(
                folder, repo_id=repo_id, token=token, endpoint=endpoint, private=private,
                branch=revision or constants.DEFAULT_REVISION, create_pr=create_pr,
                commit_message=commit_message or "Upload quantized model (qaas)",
                commit_description=commit_description, progress=progress,
                max_files_per_commit=max_files_per_commit,
            )
        except Exception as exc:  # noqa: BLE001 - everything is translated, the original (with headers) dropped
            err = translate_error(exc, repo_id=repo_id, token=token)
        last = err
        if not err.retryable or attempt + 1 >= attempts:
            break
        delay = retry_delay * (2**attempt)
        logger.warning("publish of %s failed (%s), retrying in %.1fs [%d/%d]", repo_id, err, delay, attempt + 1, attempts)
        time.sleep(delay)
    assert last is not None
    raise last


def _publish_once(
    folder: Path, *, repo_id: str, token: str | None, endpoint: str | None, private: bool, branch: str,
    create_pr: bool, commit_message: str, commit_description: str | None, progress: ProgressCallback | None,
    max_files_per_commit: int,
) -> dict[str, Any]:
    api = HfApi(endpoint=endpoint, token=token, library_name="qaas")
    base_url = api.endpoint.rstrip("/")
    local = _scan(folder)
    tracker = _Progress(sum(f.size for f in local), progress)

    def result(sha: str, revision: str, created: bool, pr_url: str | None = None) -> dict[str, Any]:
        out = {"repo_id": repo_id, "commit_sha": sha, "commit_url": f"{base_url}/{repo_id}/commit/{sha}",
               "revision": revision, "created": created}
        if pr_url:
            out["pr_url"] = pr_url
        return out

    api.create_repo(repo_id, private=private, exist_ok=True)
    if branch != constants.DEFAULT_REVISION:
        api.create_branch(repo_id, branch=branch, exist_ok=True)

    head = api.repo_info(repo_id, revision=branch).sha
    remote = _remote_files(api, repo_id, head)
    if _matches(remote, local):
        logger.info("publish of %s: %s already holds this content at %s", repo_id, branch, head)
        tracker.finish()
        return result(head, branch, created=False)
    if create_pr:
        refs = api.list_repo_refs(repo_id, include_pull_requests=True)
        for pr in sorted(refs.pull_requests or [], key=lambda r: -int(r.name.rsplit("/", 1)[-1])):
            if _matches(_remote_files(api, repo_id, pr.target_commit), local):
                logger.info("publish of %s: pull request %s already holds this content", repo_id, pr.name)
                tracker.finish()
                return result(pr.target_commit, pr.name, False, f"{base_url}/{repo_id}/discussions/{pr.name.rsplit('/', 1)[-1]}")

    additions = []
    for f in local:
        op = _TrackedAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.abs_path))
        op._progress, op._size = tracker, f.size
        if f._sha256 is not None:
            op.upload_info.sha256 = f._sha256  # already hashed for the comparison
        additions.append(op)
    deletions = [CommitOperationDelete(path_in_repo=p) for p in _stale(remote, local)]

    # Upload every blob first (deduped server-side, hence resumable), then commit the tree in one go.
    api.preupload_lfs_files(repo_id, additions=additions, revision=branch, create_pr=create_pr, free_memory=False)
    for op in additions:  # blobs the server already had were never read: count them as done
        if op._upload_mode == "lfs":
            tracker.set(op.path_in_repo, op._size)

    operations: list[Any] = [*deletions, *additions]
    chunks = [operations[i:i + max_files_per_commit] for i in range(0, len(operations), max_files_per_commit)]
    target, pr_url, parent, info = branch, None, head, None
    for i, chunk in enumerate(chunks):
        message = commit_message if len(chunks) == 1 else f"{commit_message} (part {i + 1}/{len(chunks)})"
        info = api.create_commit(
            repo_id, chunk, commit_message=message, commit_description=commit_description,
            revision=target, create_pr=create_pr and i == 0, parent_commit=parent,
        )
        if create_pr and i == 0:
            pr_url, target = info.pr_url, info.pr_revision or target
        parent = info.oid
    assert info is not None
    tracker.finish()
    logger.info("published %s at %s (%s)", repo_id, info.oid, target)
    return result(info.oid, target, True, pr_url)


def _remote_files(api: HfApi, repo_id: str, revision: str) -> dict[str, RepoFile]:
    return {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, revision=revision) if isinstance(f, RepoFile)}
