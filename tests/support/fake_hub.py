"""A Hugging Face Hub-compatible server for tests (loopback only, in memory).

It implements exactly the routes that `huggingface_hub` 1.x calls for `create_repo`, `upload_folder`,
`create_commit` (plain LFS, so run the client with `HF_HUB_DISABLE_XET=1`), `create_branch`,
`list_repo_refs`, `list_repo_commits`, `list_repo_tree`, `repo_info`, `whoami`, `hf_hub_download` and
`snapshot_download` (see `../shared/design/FORMATS.md` §5). Repositories keep real git objects: blob ids are
git blob shas (LFS files are stored behind a real LFS pointer blob), trees and commits are hashed the way git
hashes them, so commit shas look and behave like the Hub's.

Auth: `Authorization: Bearer <token>`; tokens are configured with a user, a role (`read` / `write`) and the
organisations they may write to. An unknown token is a 401, writing without write access a 403, an unknown
or invisible (private) repo a 404 with `X-Error-Code: RepoNotFound`, as on the Hub.

Fault injection (`FakeHub.fail`, `FakeHub.drop`): the next N requests matching a route answer a status code,
or have their connection cut after reading part of the request body, so that tests exercise retries.

Use through the `fake_hub` fixture in `tests/support/hub_fixtures.py`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# File names the Hub's default .gitattributes sends to LFS (a subset; anything binary or big goes too).
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npy", ".npz",
    ".pkl", ".zip", ".tar", ".gz", ".model", ".arrow", ".parquet", ".tflite", ".ot",
)
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}


# --------------------------------------------------------------------------------------------- git objects
def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int  # size of the content (of the real file for LFS)
    blob_id: str  # git blob sha (of the pointer for LFS files)
    content: bytes | None = None  # regular files
    lfs_oid: str | None = None  # sha256 of LFS files

    @property
    def is_lfs(self) -> bool:
        return self.lfs_oid is not None


def _tree_sha(files: dict[str, FileEntry]) -> str:
    """Hash a flat path → entry map into git tree objects, returning the root tree sha."""
    root: dict[str, Any] = {}
    for path, entry in files.items():
        node = root
        *dirs, name = path.split("/")
        for d in dirs:
            node = node.setdefault(d, {})
        node[name] = entry

    def hash_tree(node: dict[str, Any]) -> str:
        items = []
        for name, child in node.items():
            if isinstance(child, dict):
                items.append((name + "/", b"40000 " + name.encode() + b"\0" + bytes.fromhex(hash_tree(child))))
            else:
                items.append((name, b"100644 " + name.encode() + b"\0" + bytes.fromhex(child.blob_id)))
        body = b"".join(raw for _, raw in sorted(items, key=lambda t: t[0].encode()))
        return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()

    return hash_tree(root)


@dataclass
class Commit:
    sha: str
    parents: list[str]
    files: dict[str, FileEntry]
    title: str
    message: str
    author: str
    date: datetime

    @classmethod
    def create(cls, parents: list[str], files: dict[str, FileEntry], title: str, message: str, author: str) -> Commit:
        date = datetime.now(timezone.utc)
        ts = int(date.timestamp())
        tree = _tree_sha(files)
        text = f"tree {tree}\n" + "".join(f"parent {p}\n" for p in parents)
        text += f"author {author} <{author}@users.noreply.fake-hub> {ts} +0000\n"
        text += f"committer {author} <{author}@users.noreply.fake-hub> {ts} +0000\n\n{title}\n"
        if message:
            text += f"\n{message}\n"
        raw = text.encode()
        sha = hashlib.sha1(b"commit %d\0" % len(raw) + raw).hexdigest()
        return cls(sha, parents, dict(files), title, message, author, date)


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: datetime
    refs: dict[str, str] = field(default_factory=dict)  # "main", "my-branch", "refs/pr/1" → commit sha
    commits: dict[str, Commit] = field(default_factory=dict)
    pr_count: int = 0

    def resolve(self, revision: str) -> Commit | None:
        if revision.startswith("refs/heads/"):
            revision = revision[len("refs/heads/"):]
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        return self.commits.get(revision)


@dataclass
class TokenInfo:
    user: str
    role: str = "write"  # "read" or "write"
    orgs: tuple[str, ...] = ()

    def can_write(self, namespace: str) -> bool:
        return self.role == "write" and namespace in (self.user, *self.orgs)

    def can_read_private(self, namespace: str) -> bool:
        return namespace in (self.user, *self.orgs)


@dataclass
class _Fault:
    pattern: re.Pattern[str]
    method: str | None
    remaining: int
    status: int | None = None  # answer this status...
    drop_after_bytes: int | None = None  # ...or read this much of the body, then cut the connection
    drop_response: bool = False  # ...or handle the request fully, then cut the connection instead of answering
    hits: int = 0


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


ROUTE_ALIASES = {
    "create_repo": r"^/api/repos/create$",
    "validate_yaml": r"^/api/validate-yaml$",
    "preupload": r"^/api/models/.+/preupload/",
    "commit": r"^/api/models/.+/commit/",
    "lfs_batch": r"\.git/info/lfs/objects/batch$",
    "lfs_verify": r"\.git/info/lfs/objects/verify$",
    "lfs_upload": r"^/lfs-storage/",
    "repo_info": r"^/api/models/[^/]+/[^/]+(/revision/.*)?$",
    "tree": r"^/api/models/.+/tree/",
    "resolve": r"^/[^/]+/[^/]+/resolve/",
    "whoami": r"^/api/whoami-v2$",
}


class FakeHub:
    """State and ASGI app of the fake Hub. `url` is set once the server is started."""

    def __init__(
        self,
        tokens: dict[str, TokenInfo] | None = None,
        *,
        lfs_threshold: int = 10 * 1024 * 1024,
        multipart_threshold: int = 20 * 1024 * 1024,
        multipart_chunk_size: int = 8 * 1024 * 1024,
    ):
        self.tokens: dict[str, TokenInfo] = dict(tokens or {})
        self.lfs_threshold = lfs_threshold
        self.multipart_threshold = multipart_threshold
        self.multipart_chunk_size = multipart_chunk_size
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.multipart_parts: dict[str, dict[int, bytes]] = {}
        self.faults: list[_Fault] = []
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request answered
        self.url: str = ""
        self._lock = threading.Lock()
        self._signing_key = secrets.token_bytes(32)
        self.app = self._build_app()

    # ------------------------------------------------------------------ test-facing helpers
    def add_token(self, token: str, user: str, role: str = "write", orgs: tuple[str, ...] = ()) -> None:
        self.tokens[token] = TokenInfo(user, role, tuple(orgs))

    def fail(self, route: str, *, status: int = 503, times: int = 1, method: str | None = None) -> None:
        """The next `times` requests matching `route` (an alias of ROUTE_ALIASES or a regex on the path) get `status`."""
        pattern = re.compile(ROUTE_ALIASES.get(route, route))
        with self._lock:
            self.faults.append(_Fault(pattern, method, times, status=status))

    def drop(self, route: str, *, times: int = 1, after_bytes: int = 0, method: str | None = None,
             after_handling: bool = False) -> None:
        """The next `times` requests matching `route` have their connection cut after `after_bytes` of body,
        or, with `after_handling`, after the request took effect but before the response (a lost response)."""
        pattern = re.compile(ROUTE_ALIASES.get(route, route))
        with self._lock:
            if after_handling:
                self.faults.append(_Fault(pattern, method, times, drop_response=True))
            else:
                self.faults.append(_Fault(pattern, method, times, drop_after_bytes=after_bytes))

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def count(self, method: str, route: str) -> int:
        """How many requests matching `route` (alias or regex) with `method` were answered (faults included)."""
        pattern = re.compile(ROUTE_ALIASES.get(route, route))
        return sum(1 for m, p, _ in self.requests if m == method and pattern.search(p))

    def create_repo(self, repo_id: str, *, private: bool = False, files: dict[str, bytes] | None = None) -> Repo:
        """Seed a repo directly (e.g. a source model for a download test)."""
        with self._lock:
            repo = self._new_repo(repo_id, private, author=repo_id.split("/")[0])
            if files:
                entries = dict(repo.resolve("main").files)
                for path, data in files.items():
                    entries[path] = self._store_file(path, data)
                self._commit(repo, "main", entries, "Add files", "", repo_id.split("/")[0])
            return repo

    def head(self, repo_id: str, revision: str = "main") -> Commit:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"no revision {revision} in {repo_id}"
        return commit

    def read_file(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        entry = self.head(repo_id, revision).files[path]
        return entry.content if entry.content is not None else self.lfs_objects[entry.lfs_oid]  # type: ignore[index]

    # ------------------------------------------------------------------ storage
    def _store_file(self, path: str, data: bytes) -> FileEntry:
        if self._is_lfs(path, len(data), data[:512]):
            oid = hashlib.sha256(data).hexdigest()
            self.lfs_objects[oid] = data
            return FileEntry(path, len(data), git_blob_sha(lfs_pointer(oid, len(data))), lfs_oid=oid)
        return FileEntry(path, len(data), git_blob_sha(data), content=data)

    def _is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        if size == 0:
            return False
        return path.endswith(LFS_SUFFIXES) or size >= self.lfs_threshold or b"\0" in sample

    def _new_repo(self, repo_id: str, private: bool, author: str) -> Repo:
        repo = Repo(repo_id, private, datetime.now(timezone.utc))
        self.repos[repo_id] = repo
        self._commit(repo, "main", {".gitattributes": self._store_file(".gitattributes", GITATTRIBUTES)},
                     "initial commit", "", author)
        return repo

    @staticmethod
    def _commit(repo: Repo, ref: str, files: dict[str, FileEntry], title: str, message: str, author: str,
                parent: str | None = None) -> Commit:
        parent = parent if parent is not None else repo.refs.get(ref)
        commit = Commit.create([parent] if parent else [], files, title, message, author)
        repo.commits[commit.sha] = commit
        repo.refs[ref] = commit.sha
        return commit

    def _sign(self, value: str) -> str:
        return hmac.new(self._signing_key, value.encode(), hashlib.sha256).hexdigest()[:32]

    # ------------------------------------------------------------------ auth helpers
    def _token(self, request: Request) -> TokenInfo | None:
        header = request.headers.get("authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        info = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if info is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return info

    def _repo_for_read(self, request: Request, repo_id: str) -> Repo:
        token = self._token(request)
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not (token and token.can_read_private(repo_id.split("/")[0]))):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _repo_for_write(self, request: Request, repo_id: str) -> tuple[Repo, TokenInfo]:
        repo = self._repo_for_read(request, repo_id)
        token = self._token(request)
        if token is None:
            raise HubError(401, "You must be authenticated to write to this repository")
        if not token.can_write(repo_id.split("/")[0]):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo, token

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------ app
    def _build_app(self) -> Any:
        routes = [
            ("GET", r"/api/whoami-v2", self.whoami),
            ("POST", r"/api/repos/create", self.repos_create),
            ("DELETE", r"/api/repos/delete", self.repos_delete),
            ("POST", r"/api/validate-yaml", self.validate_yaml),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)", self.repo_info),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)", self.repo_info),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self.tree),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)", self.paths_info),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/refs", self.refs),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/commits/(?P<rev>[^/]+)", self.commits),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>[^/]+)", self.branch_create),
            ("DELETE", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>[^/]+)", self.branch_delete),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self.preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self.commit),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/verify", self.lfs_verify),
            ("PUT", r"/lfs-storage/(?P<oid>[0-9a-f]{64})", self.lfs_put),
            ("PUT", r"/lfs-storage/(?P<oid>[0-9a-f]{64})/part/(?P<part>\d+)", self.lfs_put_part),
            ("POST", r"/lfs-storage/(?P<oid>[0-9a-f]{64})/complete", self.lfs_complete),
            ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
            ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
        ]
        compiled = [(m, re.compile(f"^{p}$"), h) for m, p, h in routes]

        async def dispatch(request: Request) -> Response:
            # Match on the raw (still percent-encoded) path: revisions like refs%2Fpr%2F1 are one segment.
            raw = request.scope.get("raw_path", b"").decode("latin-1").split("?", 1)[0]
            method_matched = False
            for method, pattern, handler in compiled:
                m = pattern.match(raw)
                if m is None:
                    continue
                method_matched = True
                if method != request.method:
                    continue
                params = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                try:
                    return await handler(request, **params)
                except HubError as e:
                    return self._error(e)
            return self._error(HubError(405 if method_matched else 404, f"No route for {request.method} {raw}"))

        app = Starlette(routes=[Route("/{path:path}", dispatch, methods=["GET", "HEAD", "POST", "PUT", "DELETE"])])
        return _FaultMiddleware(app, self)

    @staticmethod
    def _error(e: HubError) -> Response:
        headers = {"X-Error-Message": e.message, **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        return JSONResponse({"error": e.message}, status_code=e.status, headers=headers)

    # ------------------------------------------------------------------ routes: account & repos
    async def whoami(self, request: Request) -> Response:
        token = self._token(request)
        if token is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return JSONResponse({
            "type": "user", "id": hashlib.md5(token.user.encode()).hexdigest()[:24], "name": token.user,
            "fullname": token.user, "isPro": False, "canPay": False,
            "orgs": [{"type": "org", "name": o, "roleInOrg": "write"} for o in token.orgs],
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": token.role}},
        })

    async def repos_create(self, request: Request) -> Response:
        body = await request.json()
        name, org = body.get("name"), body.get("organization")
        if body.get("type", "model") not in (None, "model"):
            raise HubError(400, "This fake Hub only hosts model repos")
        token = self._token(request)
        if token is None:
            raise HubError(401, "You must be authenticated to create a repo")
        namespace = org or token.user
        if not name or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
            raise HubError(400, f"Invalid repo name: {name!r}")
        if not token.can_write(namespace):
            raise HubError(403, f"You don't have the rights to create a model under the namespace \"{namespace}\"")
        repo_id = f"{namespace}/{name}"
        url = f"{self.url}/{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                return JSONResponse({"error": "You already created this model repo", "url": url}, status_code=409)
            private = body.get("visibility", "public") != "public" or bool(body.get("private"))
            self._new_repo(repo_id, private, author=token.user)
        return JSONResponse({"url": url, "name": repo_id, "id": repo_id})

    async def repos_delete(self, request: Request) -> Response:
        body = await request.json()
        token = self._token(request)
        repo_id = f"{body.get('organization') or (token.user if token else '')}/{body.get('name')}"
        self._repo_for_write(request, repo_id)
        with self._lock:
            del self.repos[repo_id]
        return Response(status_code=200)

    async def validate_yaml(self, request: Request) -> Response:
        body = await request.json()
        content = body.get("content", "")
        errors = _validate_card_metadata(content)
        if errors:
            return JSONResponse({"errors": [{"message": e} for e in errors]}, status_code=400)
        return JSONResponse({"warnings": []})

    async def repo_info(self, request: Request, repo: str, rev: str = "main") -> Response:
        r = self._repo_for_read(request, repo)
        commit = self._resolve(r, rev)
        siblings = []
        for entry in sorted(commit.files.values(), key=lambda e: e.path):
            s: dict[str, Any] = {"rfilename": entry.path}
            if request.query_params.get("blobs"):
                s.update(size=entry.size, blobId=entry.blob_id)
                if entry.is_lfs:
                    s["lfs"] = {"size": entry.size, "sha256": entry.lfs_oid, "pointerSize": len(lfs_pointer(entry.lfs_oid, entry.size))}
            siblings.append(s)
        return JSONResponse({
            "_id": hashlib.md5(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
            "author": repo.split("/")[0], "sha": commit.sha, "lastModified": _iso(commit.date),
            "createdAt": _iso(r.created_at), "private": r.private, "gated": False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": [], "library_name": None, "siblings": siblings,
        })

    async def tree(self, request: Request, repo: str, rev: str, path: str = "") -> Response:
        r = self._repo_for_read(request, repo)
        commit = self._resolve(r, rev)
        recursive = request.query_params.get("recursive", "").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        out: dict[str, dict[str, Any]] = {}
        for entry in commit.files.values():
            if not entry.path.startswith(prefix):
                continue
            rest = entry.path[len(prefix):]
            parts = rest.split("/")
            # folders on the way
            for depth in range(1, len(parts)):
                if not recursive and depth > 1:
                    break
                folder = prefix + "/".join(parts[:depth])
                out.setdefault(folder, {"type": "directory", "path": folder, "oid": _folder_oid(commit, folder), "size": 0})
            if recursive or len(parts) == 1:
                out[entry.path] = _tree_file(entry)
        if prefix and not out and prefix.rstrip("/") not in {e.path for e in commit.files.values()}:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        return JSONResponse(sorted(out.values(), key=lambda d: d["path"]))

    async def paths_info(self, request: Request, repo: str, rev: str) -> Response:
        r = self._repo_for_read(request, repo)
        commit = self._resolve(r, rev)
        form = await request.form()
        paths = form.getlist("paths") if form else []
        out = [_tree_file(commit.files[p]) for p in paths if p in commit.files]
        return JSONResponse(out)

    async def refs(self, request: Request, repo: str) -> Response:
        r = self._repo_for_read(request, repo)
        branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in r.refs.items() if not n.startswith("refs/")]
        prs = [{"name": n, "ref": n, "targetCommit": s} for n, s in r.refs.items() if n.startswith("refs/pr/")]
        body: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if request.query_params.get("include_prs"):
            body["pullRequests"] = prs
        return JSONResponse(body)

    async def commits(self, request: Request, repo: str, rev: str) -> Response:
        r = self._repo_for_read(request, repo)
        commit: Commit | None = self._resolve(r, rev)
        out = []
        while commit is not None:
            out.append({"id": commit.sha, "title": commit.title, "message": commit.message,
                        "authors": [{"user": commit.author}], "date": _iso(commit.date)})
            commit = r.commits.get(commit.parents[0]) if commit.parents else None
        return JSONResponse(out)

    async def branch_create(self, request: Request, repo: str, branch: str) -> Response:
        r, token = self._repo_for_write(request, repo)
        body = await _json_or_empty(request)
        start = self._resolve(r, body.get("startingPoint") or "main")
        with self._lock:
            if branch in r.refs:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            r.refs[branch] = start.sha
        return JSONResponse({})

    async def branch_delete(self, request: Request, repo: str, branch: str) -> Response:
        r, _ = self._repo_for_write(request, repo)
        with self._lock:
            if branch not in r.refs or branch == "main":
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            del r.refs[branch]
        return JSONResponse({})

    # ------------------------------------------------------------------ routes: upload
    async def preupload(self, request: Request, repo: str, rev: str) -> Response:
        r, _ = self._repo_for_write(request, repo)
        commit = self._resolve(r, rev)
        body = await request.json()
        files = []
        for f in body.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = self._is_lfs(f["path"], int(f["size"]), sample)
            existing = commit.files.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.lfs_oid if existing.is_lfs else existing.blob_id
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return JSONResponse({"files": files, "commitOid": commit.sha})

    async def lfs_batch(self, request: Request, repo: str) -> Response:
        r, _ = self._repo_for_write(request, repo)
        body = json.loads(await request.body())
        if body.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.lfs_objects:
                sig = self._sign(f"{oid}:{size}")
                base = f"{self.url}/lfs-storage/{oid}"
                q = f"size={size}&sig={sig}"
                verify = {"href": f"{self.url}/{repo}.git/info/lfs/objects/verify", "header": {}}
                if size > self.multipart_threshold:
                    n = -(-size // self.multipart_chunk_size)
                    header = {"chunk_size": str(self.multipart_chunk_size)}
                    header.update({str(i): f"{base}/part/{i}?{q}" for i in range(1, n + 1)})
                    item["actions"] = {"upload": {"href": f"{base}/complete?{q}", "header": header}, "verify": verify}
                else:
                    item["actions"] = {"upload": {"href": f"{base}?{q}", "header": {}}, "verify": verify}
            objects.append(item)
        return JSONResponse({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                            media_type="application/vnd.git-lfs+json")

    def _check_sig(self, request: Request, oid: str) -> int:
        size = request.query_params.get("size", "")
        if not size.isdigit() or not hmac.compare_digest(request.query_params.get("sig", ""), self._sign(f"{oid}:{size}")):
            raise HubError(403, "Bad upload signature")
        return int(size)

    async def lfs_put(self, request: Request, oid: str) -> Response:
        size = self._check_sig(request, oid)
        data = await request.body()
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match its oid and size")
        with self._lock:
            self.lfs_objects[oid] = data
        return Response(status_code=200)

    async def lfs_put_part(self, request: Request, oid: str, part: str) -> Response:
        self._check_sig(request, oid)
        data = await request.body()
        with self._lock:
            self.multipart_parts.setdefault(oid, {})[int(part)] = data
        return Response(status_code=200, headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    async def lfs_complete(self, request: Request, oid: str) -> Response:
        size = self._check_sig(request, oid)
        body = json.loads(await request.body())
        parts = self.multipart_parts.get(oid, {})
        try:
            data = b"".join(parts[p["partNumber"]] for p in sorted(body["parts"], key=lambda p: p["partNumber"]))
        except KeyError as e:
            raise HubError(400, f"Missing part {e}")
        for p in body["parts"]:
            if p["etag"].strip('"') != hashlib.md5(parts[p["partNumber"]]).hexdigest():
                raise HubError(400, f"ETag mismatch for part {p['partNumber']}")
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "Assembled content does not match its oid and size")
        with self._lock:
            self.lfs_objects[oid] = data
            self.multipart_parts.pop(oid, None)
        return JSONResponse({})

    async def lfs_verify(self, request: Request, repo: str) -> Response:
        self._repo_for_write(request, repo)
        body = json.loads(await request.body())
        data = self.lfs_objects.get(body.get("oid"))
        if data is None or len(data) != body.get("size"):
            raise HubError(404, "Object not found or size mismatch")
        return JSONResponse({})

    async def commit(self, request: Request, repo: str, rev: str) -> Response:
        r, token = self._repo_for_write(request, repo)
        create_pr = request.query_params.get("create_pr") in ("1", "true", "True")
        lines = [json.loads(line) for line in (await request.body()).splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line must be the commit header")
        header = lines[0]["value"]
        summary = (header.get("summary") or "").strip()
        if not summary:
            raise HubError(400, "Commit summary is required")
        with self._lock:
            base = self._resolve(r, rev)
            parent_commit = header.get("parentCommit")
            if parent_commit and parent_commit != base.sha:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(base.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, "Only base64 encoding is supported")
                    data = base64.b64decode(value["content"])
                    files[path] = FileEntry(path, len(data), git_blob_sha(data), content=data)
                elif key == "lfsFile":
                    oid = value.get("oid")
                    data = self.lfs_objects.get(oid)
                    if data is None:
                        raise HubError(422, f"LFS object {oid} for {path} was not uploaded")
                    files[path] = FileEntry(path, len(data), git_blob_sha(lfs_pointer(oid, len(data))), lfs_oid=oid)
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for p in [p for p in files if p.startswith(prefix)]:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            if create_pr:
                r.pr_count += 1
                ref = f"refs/pr/{r.pr_count}"
                new = self._commit(r, ref, files, summary, header.get("description", ""), token.user, parent=base.sha)
                pr_url = f"{self.url}/{repo}/discussions/{r.pr_count}"
            else:
                ref = rev[len("refs/heads/"):] if rev.startswith("refs/heads/") else rev
                if ref not in r.refs:
                    raise HubError(400, f"Cannot commit to {rev}: not a branch")
                new = self._commit(r, ref, files, summary, header.get("description", ""), token.user)
                pr_url = None
        body = {"success": True, "commitOid": new.sha, "commitUrl": f"{self.url}/{repo}/commit/{new.sha}", "hookOutput": ""}
        if pr_url:
            body["pullRequestUrl"] = pr_url
        return JSONResponse(body)

    # ------------------------------------------------------------------ routes: download
    async def resolve(self, request: Request, repo: str, rev: str, path: str) -> Response:
        r = self._repo_for_read(request, repo)
        commit = self._resolve(r, rev)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        data = entry.content if entry.content is not None else self.lfs_objects[entry.lfs_oid]  # type: ignore[index]
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if entry.is_lfs:
            headers.update({"ETag": f'"{entry.lfs_oid}"', "X-Linked-Etag": f'"{entry.lfs_oid}"', "X-Linked-Size": str(entry.size)})
        else:
            headers["ETag"] = f'"{entry.blob_id}"'
        status = 200
        rng = request.headers.get("range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (not m.group(1) and not m.group(2)):
                return Response(status_code=416, headers={"Content-Range": f"bytes */{len(data)}"})
            if m.group(1):
                start = int(m.group(1))
                end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
            else:  # suffix range
                start, end = max(len(data) - int(m.group(2)), 0), len(data) - 1
            if start >= len(data) or start > end:
                return Response(status_code=416, headers={"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        headers["Content-Length"] = str(len(data))
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        return Response(content=data, status_code=status, headers=headers)


def _iso(d: datetime) -> str:
    return d.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _tree_file(entry: FileEntry) -> dict[str, Any]:
    d: dict[str, Any] = {"type": "file", "path": entry.path, "oid": entry.blob_id, "size": entry.size}
    if entry.is_lfs:
        d["lfs"] = {"oid": entry.lfs_oid, "size": entry.size, "pointerSize": len(lfs_pointer(entry.lfs_oid, entry.size))}  # type: ignore[arg-type]
    return d


def _folder_oid(commit: Commit, folder: str) -> str:
    prefix = folder + "/"
    return _tree_sha({p[len(prefix):]: e for p, e in commit.files.items() if p.startswith(prefix)})


async def _json_or_empty(request: Request) -> dict[str, Any]:
    body = await request.body()
    return json.loads(body) if body.strip() else {}


def _validate_card_metadata(content: str) -> list[str]:
    """What the Hub's validate-yaml checks of a model card, for the keys the project writes."""
    if not content.startswith("---"):
        return []
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
    if m is None:
        return ["The YAML metadata block is not closed by a '---' line"]
    try:
        meta = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        return [f"Invalid YAML: {e}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["The metadata must be a YAML mapping"]
    errors = []
    for key in ("library_name", "license", "pipeline_tag", "base_model_relation"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    if "tags" in meta and not (isinstance(meta["tags"], list) and all(isinstance(t, str) for t in meta["tags"])):
        errors.append('"tags" must be an array of strings')
    bm = meta.get("base_model")
    if bm is not None and not (isinstance(bm, str) or (isinstance(bm, list) and all(isinstance(b, str) for b in bm))):
        errors.append('"base_model" must be a string or an array of strings')
    if "base_model_relation" in meta and meta["base_model_relation"] not in BASE_MODEL_RELATIONS:
        errors.append(f'"base_model_relation" must be one of {sorted(BASE_MODEL_RELATIONS)}')
    if "base_model_relation" in meta and bm is None:
        errors.append('"base_model_relation" requires "base_model"')
    return errors


class _FaultMiddleware:
    """Outermost ASGI layer: records requests and injects faults before the app sees them."""

    def __init__(self, app: Any, hub: FakeHub):
        self.app, self.hub = app, hub

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope.get("raw_path", b"").decode("latin-1").split("?", 1)[0]
        fault = None
        with self.hub._lock:
            for f in self.hub.faults:
                if f.remaining > 0 and (f.method in (None, method)) and f.pattern.search(path):
                    f.remaining -= 1
                    f.hits += 1
                    fault = f
                    break
        status_box = {"status": 0}

        async def recording_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        try:
            if fault is not None and fault.status is not None:
                await _drain(receive)
                body = json.dumps({"error": f"Injected fault {fault.status}"}).encode()
                await recording_send({"type": "http.response.start", "status": fault.status,
                                      "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            if fault is not None and fault.drop_after_bytes is not None:
                await _drain(receive, limit=fault.drop_after_bytes)
                status_box["status"] = -1
                await _abort(send)
                return
            if fault is not None and fault.drop_response:
                async def dropping_send(message: dict[str, Any]) -> None:
                    if message["type"] == "http.response.start":
                        status_box["status"] = -1
                        await _abort(send)

                await self.app(scope, receive, dropping_send)
                return
            await self.app(scope, receive, recording_send)
        finally:
            self.hub.requests.append((method, unquote(path), status_box["status"]))


async def _abort(send: Any) -> None:
    """Cut the TCP connection under this request (uvicorn's h11 cycle holds the transport)."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:  # not uvicorn's h11 cycle: the best we can do is an error
        raise RuntimeError("injected connection drop")
    if not transport.is_closing():
        transport.abort()
    for _ in range(5):  # let connection_lost mark the cycle disconnected
        await asyncio.sleep(0)


async def _drain(receive: Any, limit: int | None = None) -> None:
    got = 0
    while True:
        if limit is not None and got >= limit:
            return
        message = await receive()
        if message["type"] != "http.request":
            return
        got += len(message.get("body", b""))
        if not message.get("more_body"):
            return


# --------------------------------------------------------------------------------------------- running it
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeHubServer:
    """Runs a FakeHub under uvicorn (h11) in a daemon thread on 127.0.0.1."""

    def __init__(self, hub: FakeHub, port: int | None = None):
        self.hub = hub
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        hub.url = self.url
        config = uvicorn.Config(hub.app, host="127.0.0.1", port=self.port, http="h11", lifespan="off",
                                log_level="warning", proxy_headers=False, access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"fake-hub-{self.port}", daemon=True)

    def start(self) -> FakeHubServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake Hub did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> FakeHubServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


__all__ = ["FakeHub", "FakeHubServer", "TokenInfo", "FileEntry", "Commit", "Repo", "git_blob_sha", "lfs_pointer"]


def main(argv: list[str] | None = None) -> None:
    """Run a fake Hub in the foreground (for end-to-end runs where the worker is another process):

    python tests/support/fake_hub.py --port 8999 --token hf_x:alice:write --token hf_r:alice:read
    then HF_ENDPOINT=http://127.0.0.1:8999 HF_HUB_DISABLE_XET=1 for the processes that talk to it.
    """
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", action="append", default=[], help="TOKEN:USER[:read|write[:org1,org2]]")
    args = parser.parse_args(argv)
    hub = FakeHub()
    for spec in args.token:
        token, user, *rest = spec.split(":")
        role = rest[0] if rest else "write"
        orgs = tuple(o for o in (rest[1].split(",") if len(rest) > 1 else []) if o)
        hub.add_token(token, user, role, orgs)
    server = FakeHubServer(hub, port=args.port or None).start()
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
