"""Where the model comes from: a local directory under an allowed root, or a Hub repository at a revision.

Everything here runs before a byte of weights is loaded, and refuses what the engine must not touch:
paths outside the allowed roots (after resolving symlinks), pickle-only checkpoints (unless allowed),
configs that need custom code (unless allowed), and safetensors files whose headers do not describe
the file they sit in.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

from qaas.quantization_rules.hub_ids import repo_id_problem

from .errors import SourceRejected, SourceUnavailable
from .options import EngineOptions

#: Files fetched from the Hub: weights (safetensors), configs, tokenizer and sentencepiece files.
HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "tokenizer*",
    "*.model",
    "*.txt",
    "*.tiktoken",
]
PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]

#: safetensors dtype -> bytes per element.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "F4": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


@dataclass(frozen=True)
class ResolvedSource:
    """A source ready to read: `path` is a local directory holding config.json and the weights."""

    path: Path
    repo_id: str | None = None
    #: The commit sha for a Hub source (never a branch name); None for a local directory.
    revision: str | None = None

    def describe(self) -> dict[str, Any]:
        """The `source` entry of the job result."""
        if self.repo_id is not None:
            return {"id": self.repo_id, "revision": self.revision}
        return {"path": str(self.path), "revision": None}


def resolve_source(source: dict[str, Any], options: EngineOptions) -> ResolvedSource:
    """Resolve `{"path": ...}` or `{"id": ..., "revision": ...}` to a validated local directory."""
    if not isinstance(source, dict):
        raise SourceRejected("source must be an object with 'path' or 'id'", field="source")
    if source.get("path") and source.get("id"):
        raise SourceRejected("give either source.path or source.id, not both", field="source")
    if source.get("path"):
        path = resolve_local_path(source["path"], options.allowed_roots)
        resolved = ResolvedSource(path=path)
    elif source.get("id"):
        resolved = download_hub_source(str(source["id"]), source.get("revision") or "main", options)
    else:
        raise SourceRejected("source must have 'path' or 'id'", field="source")
    validate_checkpoint_dir(
        resolved.path,
        allow_pickle=options.allow_pickle,
        allow_remote_code=options.allow_remote_code,
        allowed_roots=options.allowed_roots if resolved.repo_id is None else None,
    )
    return resolved


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def resolve_local_path(path: str | os.PathLike, allowed_roots: tuple[str, ...] | list[str]) -> Path:
    """Resolve symlinks and require the directory to lie inside one of `allowed_roots`."""
    if not allowed_roots:
        raise SourceRejected("local model paths are not allowed here (no allowed roots configured)", field="source.path")
    roots = [Path(r).expanduser().resolve() for r in allowed_roots]
    try:
        resolved = Path(path).expanduser().resolve(strict=True)
    except (FileNotFoundError, RuntimeError, OSError):
        raise SourceRejected(f"model path does not exist: {path}", field="source.path") from None
    if not _inside(resolved, roots):
        raise SourceRejected(
            f"model path {path} resolves to {resolved}, outside the allowed roots", field="source.path"
        )
    if not resolved.is_dir():
        raise SourceRejected(f"model path is not a directory: {path}", field="source.path")
    return resolved


def download_hub_source(repo_id: str, revision: str, options: EngineOptions) -> ResolvedSource:
    """Fetch safetensors, configs and tokenizer files of `repo_id` at `revision`; return the commit sha.

    The file list is checked before any download so that a pickle-only repository is refused at once.
    """
    problem = repo_id_problem(repo_id) if isinstance(repo_id, str) else "must be a string"
    if problem:
        raise SourceRejected(f"not a valid Hub repository id: {repo_id!r} {problem}", field="source.id")
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub import errors as hf_errors

    api = HfApi(endpoint=options.hub_endpoint, token=options.hub_token or False)
    try:
        info = api.model_info(repo_id, revision=revision)
        sha = info.sha
        names = [s.rfilename for s in (info.siblings or [])]
        has_st = any(n.endswith(".safetensors") for n in names)
        has_pickle = any(n.endswith((".bin", ".pt", ".pth")) for n in names)
        if not has_st:
            if not has_pickle:
                raise SourceRejected(f"{repo_id}@{revision} has no model weights (no *.safetensors)", field="source.id")
            if not options.allow_pickle:
                raise SourceRejected(
                    f"{repo_id}@{revision} has only pickle weights (*.bin/*.pt); pickle files can run code when "
                    "loaded and are refused unless allow_pickle is set",
                    field="source.id",
                )
        patterns = list(HUB_ALLOW_PATTERNS) + (PICKLE_PATTERNS if not has_st else [])
        local = snapshot_download(
            repo_id,
            revision=sha or revision,
            endpoint=options.hub_endpoint,
            token=options.hub_token or False,
            cache_dir=options.cache_dir,
            allow_patterns=patterns,
        )
    except SourceRejected:
        raise
    except hf_errors.RevisionNotFoundError:
        raise SourceRejected(f"revision {revision!r} not found in {repo_id}", field="source.revision") from None
    except hf_errors.GatedRepoError:
        raise SourceUnavailable(
            f"{repo_id} is gated: accept its terms on the Hub and provide a token with access", field="source.id"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise SourceRejected(
            f"repository {repo_id} not found (or private: provide a token with access)", field="source.id"
        ) from None
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise SourceUnavailable(f"Hub request for {repo_id} failed (HTTP {status})", field="source.id") from None
    except (OSError, ConnectionError, TimeoutError) as exc:  # includes requests/httpx connection errors
        raise SourceUnavailable(f"could not reach the Hub for {repo_id}: {type(exc).__name__}", field="source.id") from None
    except Exception as exc:
        # httpx errors do not all derive from OSError; anything network-shaped is worth a retry.
        if type(exc).__module__.startswith(("httpx", "requests", "urllib3")):
            raise SourceUnavailable(f"could not reach the Hub for {repo_id}: {type(exc).__name__}", field="source.id") from None
        raise
    path = Path(local)
    if not sha:
        sha = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else revision
    return ResolvedSource(path=path, repo_id=repo_id, revision=sha)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceRejected(f"{what} is not valid JSON: {exc}", field="source") from None
    if not isinstance(data, dict):
        raise SourceRejected(f"{what} must be a JSON object", field="source")
    return data


def validate_checkpoint_dir(
    path: Path,
    *,
    allow_pickle: bool = False,
    allow_remote_code: bool = False,
    allowed_roots: tuple[str, ...] | list[str] | None = None,
) -> None:
    """Check config.json and the weight files of a checkpoint directory without loading weights.

    With `allowed_roots`, every file of the directory must also resolve inside those roots (a symlinked
    weight file pointing elsewhere is refused like a symlinked directory).
    """
    if allowed_roots:
        roots = [Path(r).expanduser().resolve() for r in allowed_roots]
        for entry in path.iterdir():
            if not _inside(entry.resolve(), roots):
                raise SourceRejected(
                    f"{entry.name} in the model directory resolves outside the allowed roots", field="source.path"
                )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SourceRejected("the model has no config.json", field="source")
    config = _read_json(config_path, "config.json")
    check_remote_code(config, allow_remote_code=allow_remote_code)
    check_side_files(path)

    st_files = sorted(p for p in path.glob("*.safetensors"))
    pickles = sorted(p for pat in PICKLE_PATTERNS for p in path.glob(pat))
    if not st_files:
        if not pickles:
            raise SourceRejected("the model has no weights (no *.safetensors files)", field="source")
        if not allow_pickle:
            raise SourceRejected(
                "the model has only pickle weights (*.bin/*.pt); pickle files can run code when loaded "
                "and are refused unless allow_pickle is set",
                field="source",
            )
        return
    index = path / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index, "model.safetensors.index.json")
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise SourceRejected("model.safetensors.index.json has no weight_map", field="source")
        for fname in set(weight_map.values()):
            if not isinstance(fname, str) or "/" in fname or "\\" in fname or fname.startswith("."):
                raise SourceRejected(f"index names an invalid shard file {fname!r}", field="source")
            if not (path / fname).is_file():
                raise SourceRejected(f"index names a missing shard {fname}", field="source")
    for f in st_files:
        read_safetensors_header(f)


#: Tokenizer and config files larger than this are refused rather than parsed.
MAX_SIDE_FILE_BYTES = 512 * 1024 * 1024


def check_side_files(path: Path) -> None:
    """The files carried into the output (tokenizer, generation config) must be what they claim to be.

    Every *.json must parse as JSON, and a sentencepiece `tokenizer.model` must look like the protobuf it
    is (a pickle or arbitrary bytes under that name is refused): the output must not ship a file that a
    loader would choke on or that was never a tokenizer.
    """
    for f in sorted(path.glob("*.json")):
        if f.name == "config.json":
            continue
        if f.stat().st_size > MAX_SIDE_FILE_BYTES:
            raise SourceRejected(f"{f.name} is larger than {MAX_SIDE_FILE_BYTES // 2**20} MiB", field="source")
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceRejected(f"{f.name} is not valid JSON ({type(exc).__name__})", field="source") from None
    sp = path / "tokenizer.model"
    if sp.is_file():
        with open(sp, "rb") as fh:
            head = fh.read(2)
        # A serialized sentencepiece ModelProto starts with field 1 (pieces), length-delimited: tag 0x0a.
        if head[:1] != b"\x0a":
            raise SourceRejected("tokenizer.model is not a sentencepiece model", field="source")


def check_remote_code(config: dict[str, Any], *, allow_remote_code: bool) -> None:
    """Refuse configs that only load with trust_remote_code=True, unless explicitly allowed."""
    if allow_remote_code:
        return
    if config.get("auto_map"):
        raise SourceRejected(
            "the model needs custom code (config.json has auto_map); refused unless allow_remote_code is set",
            field="source",
        )
    model_type = config.get("model_type")
    if not model_type:
        raise SourceRejected("config.json has no model_type", field="source")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise SourceRejected(
            f"model_type {model_type!r} is not supported by the installed transformers "
            "(it would need custom code)",
            field="source",
        )


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Read and validate a safetensors header: {name: {"dtype", "shape", "data_offsets"}} (no metadata).

    Rejects (SourceRejected) a header longer than the file or than 100 MiB, unknown dtypes, offsets that
    fall outside the data section, overlap, or disagree with shape x dtype size.
    """
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise SourceRejected(f"{name}: not a safetensors file (too short)", field="source")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise SourceRejected(f"{name}: safetensors header size {n} is impossible for a {size}-byte file", field="source")
            header_bytes = fh.read(n)
    except OSError as exc:
        raise SourceRejected(f"{name}: cannot read ({exc.strerror})", field="source") from None
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SourceRejected(f"{name}: safetensors header is not valid JSON", field="source") from None
    if not isinstance(header, dict):
        raise SourceRejected(f"{name}: safetensors header is not an object", field="source")
    data_size = size - 8 - n
    tensors: dict[str, dict[str, Any]] = {}
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            if entry is not None and not (
                isinstance(entry, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in entry.items())
            ):
                raise SourceRejected(f"{name}: safetensors metadata must map strings to strings", field="source")
            continue
        try:
            dtype = entry["dtype"]
            shape = entry["shape"]
            begin, end = entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise SourceRejected(f"{name}: malformed header entry for {key!r}", field="source") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise SourceRejected(f"{name}: tensor {key!r} has unknown dtype {dtype!r}", field="source")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise SourceRejected(f"{name}: tensor {key!r} has an invalid shape", field="source")
        if not all(isinstance(o, int) and not isinstance(o, bool) for o in (begin, end)) or not 0 <= begin <= end <= data_size:
            raise SourceRejected(f"{name}: tensor {key!r} lies outside the file", field="source")
        numel = prod(shape)
        nbytes = (numel + 1) // 2 if dtype == "F4" else numel * SAFETENSORS_DTYPES[dtype]
        if end - begin != nbytes:
            raise SourceRejected(
                f"{name}: tensor {key!r} claims {end - begin} bytes but shape {shape} x {dtype} needs {nbytes}",
                field="source",
            )
        spans.append((begin, end, key))
        tensors[key] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    spans.sort()
    for (b0, e0, k0), (b1, e1, k1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise SourceRejected(f"{name}: tensors {k0!r} and {k1!r} overlap", field="source")
    return tensors
