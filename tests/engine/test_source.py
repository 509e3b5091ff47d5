"""Source resolution: allowed roots and symlink escapes, pickle and remote-code refusal, lying headers."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from qaas.worker.engine.errors import SourceRejected, SourceUnavailable
from qaas.worker.engine.options import EngineOptions
from qaas.worker.engine.source import read_safetensors_header, resolve_source


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


@pytest.fixture
def roots(tmp_path):
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    return allowed, outside


def _opts(root, **kw):
    return EngineOptions(allowed_roots=(str(root),), **kw)


def test_local_inside_root(roots, stories_dir):
    allowed, _ = roots
    model = _copy_model(stories_dir, allowed / "m")
    r = resolve_source({"path": str(model)}, _opts(allowed))
    assert r.path == model.resolve() and r.describe() == {"path": str(model.resolve()), "revision": None}


def test_local_outside_root(roots, stories_dir):
    allowed, outside = roots
    model = _copy_model(stories_dir, outside / "m")
    with pytest.raises(SourceRejected, match="outside the allowed roots") as exc:
        resolve_source({"path": str(model)}, _opts(allowed))
    assert exc.value.field == "source.path"
    with pytest.raises(SourceRejected, match="outside"):
        resolve_source({"path": str(allowed / ".." / "outside" / "m")}, _opts(allowed))


def test_no_roots_means_no_local_paths(stories_dir):
    with pytest.raises(SourceRejected, match="not allowed"):
        resolve_source({"path": str(stories_dir)}, EngineOptions())


def test_symlinked_dir_escape(roots, stories_dir):
    allowed, outside = roots
    model = _copy_model(stories_dir, outside / "m")
    (allowed / "link").symlink_to(model, target_is_directory=True)
    with pytest.raises(SourceRejected, match="outside"):
        resolve_source({"path": str(allowed / "link")}, _opts(allowed))


def test_symlinked_file_escape(roots, stories_dir):
    allowed, outside = roots
    model = _copy_model(stories_dir, allowed / "m")
    secret = outside / "model.safetensors"
    shutil.copyfile(model / "model.safetensors", secret)
    (model / "model.safetensors").unlink()
    (model / "model.safetensors").symlink_to(secret)
    with pytest.raises(SourceRejected, match="outside the allowed roots"):
        resolve_source({"path": str(model)}, _opts(allowed))


def test_missing_path(roots):
    allowed, _ = roots
    with pytest.raises(SourceRejected, match="does not exist"):
        resolve_source({"path": str(allowed / "nope")}, _opts(allowed))


def test_pickle_only_refused_unless_allowed(roots, stories_dir):
    allowed, _ = roots
    model = _copy_model(stories_dir, allowed / "m")
    from safetensors.torch import load_file

    sd = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    torch.save(sd, model / "pytorch_model.bin")
    with pytest.raises(SourceRejected, match="pickle"):
        resolve_source({"path": str(model)}, _opts(allowed))
    resolve_source({"path": str(model)}, _opts(allowed, allow_pickle=True))
    from qaas.worker.engine.checkpoint import CheckpointReader

    reader = CheckpointReader(model, allow_pickle=True)
    assert "model.embed_tokens.weight" in reader
    torch.testing.assert_close(reader.load("model.norm.weight"), sd["model.norm.weight"])


def test_remote_code_refused(roots, stories_dir):
    allowed, _ = roots
    model = _copy_model(stories_dir, allowed / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceRejected, match="custom code"):
        resolve_source({"path": str(model)}, _opts(allowed))
    cfg.pop("auto_map")
    cfg["model_type"] = "evil_arch"
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceRejected, match="custom code"):
        resolve_source({"path": str(model)}, _opts(allowed))


def _write_raw(path: Path, header: dict | bytes, data: bytes, declared_len: int | None = None) -> Path:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", declared_len if declared_len is not None else len(hb)) + hb + data)
    return path


@pytest.mark.parametrize(
    "header, data, declared, match",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**12, "impossible"),
        (b"{not json", b"", None, "not valid JSON"),
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, None, "outside the file"),
        ({"a": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
        ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "invalid shape"),
        ({"a": "nonsense"}, b"", None, "malformed"),
    ],
)
def test_bad_safetensors_header(tmp_path, header, data, declared, match):
    f = _write_raw(tmp_path / "model.safetensors", header, data, declared)
    with pytest.raises(SourceRejected, match=match):
        read_safetensors_header(f)


def test_bad_header_in_model_dir_is_rejected_not_crash(roots, stories_dir):
    allowed, _ = roots
    model = _copy_model(stories_dir, allowed / "m")
    raw = bytearray((model / "model.safetensors").read_bytes())
    raw[0:8] = struct.pack("<Q", 2**40)
    (model / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(SourceRejected, match="header size"):
        resolve_source({"path": str(model)}, _opts(allowed))


def test_truncated_file(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\1\2")
    with pytest.raises(SourceRejected, match="too short"):
        read_safetensors_header(tmp_path / "x.safetensors")


# -- Hub ------------------------------------------------------------------------------------------------


class _Sibling:
    def __init__(self, name):
        self.rfilename = name


class _Info:
    def __init__(self, sha, files):
        self.sha = sha
        self.siblings = [_Sibling(f) for f in files]


def test_hub_download_uses_commit_and_patterns(monkeypatch, tmp_path, stories_dir):
    import huggingface_hub

    sha = "a" * 40
    snap = tmp_path / "snapshots" / sha
    shutil.copytree(stories_dir, snap)
    calls = {}

    def model_info(self, repo_id, revision=None, **kw):
        calls["info"] = (repo_id, revision, self.endpoint)
        return _Info(sha, ["config.json", "model.safetensors", "tokenizer.json", "pytorch_model.bin"])

    def snapshot_download(repo_id, **kw):
        calls["download"] = (repo_id, kw)
        return str(snap)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    opts = EngineOptions(hub_endpoint="http://127.0.0.1:9", hub_token="hf_x", cache_dir=str(tmp_path))
    r = resolve_source({"id": "karpathy/stories260K", "revision": "main"}, opts)
    assert r.revision == sha and r.describe() == {"id": "karpathy/stories260K", "revision": sha}
    repo, kw = calls["download"]
    assert kw["revision"] == sha and kw["token"] == "hf_x" and kw["endpoint"] == "http://127.0.0.1:9"
    assert "*.safetensors" in kw["allow_patterns"] and "*.bin" not in kw["allow_patterns"]
    assert "hf_x" not in repr(opts)


def test_hub_pickle_only_refused_before_download(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, repo_id, revision=None, **kw: _Info("b" * 40, ["config.json", "pytorch_model.bin"]))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(SourceRejected, match="pickle"):
        resolve_source({"id": "org/model"}, EngineOptions())


def test_hub_unreachable(monkeypatch):
    import huggingface_hub

    def boom(self, *a, **k):
        raise ConnectionError("no route")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", boom)
    with pytest.raises(SourceUnavailable):
        resolve_source({"id": "org/model"}, EngineOptions())


def test_bad_repo_id():
    with pytest.raises(SourceRejected):
        resolve_source({"id": "../../etc"}, EngineOptions())


def test_side_files_must_be_what_they_claim(tmp_path, stories_dir):
    """Tokenizer and generation files are checked before they are carried into the output."""
    import pickle

    from qaas.worker.engine.source import check_side_files

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "tokenizer_config.json").write_text('{"ok": true}')
    check_side_files(d)
    (d / "tokenizer.json").write_bytes(pickle.dumps({"not": "json"}))
    with pytest.raises(SourceRejected, match="tokenizer.json is not valid JSON"):
        check_side_files(d)
    (d / "tokenizer.json").write_text("{}")
    (d / "tokenizer.model").write_bytes(pickle.dumps("x"))
    with pytest.raises(SourceRejected, match="not a sentencepiece model"):
        check_side_files(d)
    shutil.copy(stories_dir / "tokenizer.model", d / "tokenizer.model")  # a real sentencepiece model passes
    check_side_files(d)
