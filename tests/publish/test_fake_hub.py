"""The fake Hub speaks the protocol huggingface_hub 1.x expects (upload, download, branches, PRs, auth)."""

import hashlib
import os

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

from support.hub_fixtures import OTHER_TOKEN, READ_TOKEN, WRITE_TOKEN


def _make_folder(root, big=300_000):
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- test\n---\n# hello\n")
    (root / "model.safetensors").write_bytes(os.urandom(big))
    (root / "sub" / "tokenizer.json").write_text('{"v": 1}')
    return root


def _tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file() and ".cache" not in p.parts}


def test_upload_folder_then_snapshot_download_round_trip(fake_hub, tmp_path):
    api = HfApi(endpoint=fake_hub.url, token=WRITE_TOKEN)
    src = _make_folder(tmp_path / "src")
    url = api.create_repo("alice/m1")
    assert url.repo_id == "alice/m1"
    info = api.upload_folder(folder_path=src, repo_id="alice/m1", commit_message="upload")
    assert len(info.oid) == 40 and info.commit_url.endswith(info.oid)
    assert api.repo_info("alice/m1").sha == info.oid
    files = {f.path: f for f in api.list_repo_tree("alice/m1", recursive=True) if hasattr(f, "blob_id")}
    assert files["model.safetensors"].lfs.sha256 == hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    assert files["config.json"].lfs is None

    out = snapshot_download("alice/m1", token=WRITE_TOKEN, local_dir=tmp_path / "dl")
    got = _tree(tmp_path / "dl")
    got.pop(".gitattributes")
    assert got == _tree(src)
    p = hf_hub_download("alice/m1", "sub/tokenizer.json", token=WRITE_TOKEN, cache_dir=tmp_path / "cache")
    assert open(p, "rb").read() == b'{"v": 1}'
    assert out


def test_multipart_upload_and_range_download(fake_hub, tmp_path):
    fake_hub.hub.multipart_threshold = 100_000
    fake_hub.hub.multipart_chunk_size = 64 * 1024
    api = HfApi(endpoint=fake_hub.url, token=WRITE_TOKEN)
    api.create_repo("alice/big")
    data = os.urandom(250_000)
    api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id="alice/big")
    assert fake_hub.hub.count("PUT", r"/part/") == 4
    assert fake_hub.hub.read_file("alice/big", "w.safetensors") == data
    import httpx

    r = httpx.get(f"{fake_hub.url}/alice/big/resolve/main/w.safetensors", headers={"Range": "bytes=10-19", "Authorization": f"Bearer {WRITE_TOKEN}"})
    assert r.status_code == 206 and r.content == data[10:20] and r.headers["Content-Range"] == "bytes 10-19/250000"
    assert r.headers["X-Repo-Commit"] == api.repo_info("alice/big").sha


def test_branches_prs_refs_and_commits(fake_hub, tmp_path):
    api = HfApi(endpoint=fake_hub.url, token=WRITE_TOKEN)
    api.create_repo("qaas-org/m2", private=True)
    api.create_branch("qaas-org/m2", branch="v1")
    c1 = api.create_commit("qaas-org/m2", [CommitOperationAdd("a.txt", b"A")], commit_message="a", revision="v1")
    pr = api.create_commit("qaas-org/m2", [CommitOperationAdd("b.txt", b"B")], commit_message="b", create_pr=True)
    assert pr.pr_url.endswith("/discussions/1") and pr.pr_revision == "refs/pr/1"
    c3 = api.create_commit("qaas-org/m2", [CommitOperationAdd("c.txt", b"C")], commit_message="c", revision="refs/pr/1")
    refs = api.list_repo_refs("qaas-org/m2", include_pull_requests=True)
    assert {b.name: b.target_commit for b in refs.branches}["v1"] == c1.oid
    assert refs.pull_requests[0].target_commit == c3.oid
    assert [c.title for c in api.list_repo_commits("qaas-org/m2", revision="refs/pr/1")] == ["c", "b", "initial commit"]
    assert sorted(api.list_repo_files("qaas-org/m2", revision="refs/pr/1")) == [".gitattributes", "b.txt", "c.txt"]
    assert api.whoami()["name"] == "alice"
    # private: invisible to others
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=fake_hub.url, token=OTHER_TOKEN).repo_info("qaas-org/m2")
    with pytest.raises(RevisionNotFoundError):
        api.repo_info("qaas-org/m2", revision="nope")


def test_auth_errors(fake_hub):
    api = HfApi(endpoint=fake_hub.url, token=WRITE_TOKEN)
    api.create_repo("alice/m3")
    api.create_repo("alice/m3", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo("alice/m3")
    assert e.value.response.status_code == 409
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=fake_hub.url, token="hf_bogus").whoami()
    assert e.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=fake_hub.url, token=READ_TOKEN).create_commit(
            "alice/m3", [CommitOperationAdd("x", b"x")], commit_message="x")
    assert e.value.response.status_code == 403


def test_invalid_card_yaml_refused(fake_hub):
    api = HfApi(endpoint=fake_hub.url, token=WRITE_TOKEN)
    api.create_repo("alice/m4")
    with pytest.raises(ValueError, match="base_model_relation"):
        api.upload_file(path_or_fileobj=b"---\nbase_model: a/b\nbase_model_relation: shrunk\n---\n", path_in_repo="README.md", repo_id="alice/m4")


def test_injected_503_is_retried_by_client(fake_hub, tmp_path):
    api = HfApi(endpoint=fake_hub.url, token=WRITE_TOKEN)
    api.create_repo("alice/m5")
    fake_hub.hub.fail("lfs_upload", status=503, times=1)
    fake_hub.hub.drop("preupload", times=1)
    api.upload_file(path_or_fileobj=os.urandom(1000), path_in_repo="x.safetensors", repo_id="alice/m5")
    assert fake_hub.hub.count("PUT", "lfs_upload") == 2
    assert fake_hub.hub.count("POST", "preupload") == 2
