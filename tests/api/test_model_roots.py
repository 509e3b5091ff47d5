"""The allowed roots of local model paths: resolved once per process, yet always the roots of the settings
at hand (a copy with other roots, a relative root after a change of directory)."""

from __future__ import annotations

from pathlib import Path

from qaas.settings import Settings


def _settings(roots: str) -> Settings:
    return Settings(env="test", local_model_roots=roots)


def test_roots_are_resolved_with_symlinks_followed(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert _settings(f"{tmp_path / 'link'}, ,{tmp_path}/real/../real").model_roots == [real, real]


def test_roots_are_resolved_once_per_value(tmp_path, monkeypatch):
    calls = []
    resolve = Path.resolve

    def counting(self, *a, **kw):
        calls.append(self)
        return resolve(self, *a, **kw)

    monkeypatch.setattr(Path, "resolve", counting)
    s = _settings(f"{tmp_path}/once-a,{tmp_path}/once-b")
    first = s.model_roots  # the settings' own validation may already have resolved them
    calls.clear()
    for _ in range(5):
        assert s.model_roots == first
    assert calls == []
    # a caller changing its list does not change the next caller's
    first.append(Path("/"))
    assert Path("/") not in s.model_roots


def test_a_copy_with_other_roots_gets_its_own(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    s = _settings(str(a))
    assert s.model_roots == [a]
    assert s.model_copy(update={"local_model_roots": str(b)}).model_roots == [b]
    assert s.model_roots == [a]


def test_a_relative_root_follows_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    s = _settings("models")
    monkeypatch.chdir(tmp_path / "one")
    assert s.model_roots == [tmp_path / "one" / "models"]
    monkeypatch.chdir(tmp_path / "two")
    assert s.model_roots == [tmp_path / "two" / "models"]
