"""publish_folder against the fake Hub: round trip, idempotency, branches/PRs, errors and retries."""

import logging
import os

import pytest
from huggingface_hub import HfApi, snapshot_download

from qaas.worker.publish import hub as hubmod
from qaas.worker.publish.hub import (
    HubAuthError,
    HubConnectionError,
    HubNotFoundError,
    HubPermissionError,
    HubUnavailableError,
    PublishError,
    default_repo_id,
    publish_folder,
)
from support.hub_fixtures import OTHER_TOKEN, READ_TOKEN, WRITE_TOKEN


def make_model(root, shard=200_000, n_shards=2):
    root.mkdir(parents=True)
    (root / "config.json").write_text('{"model_type": "llama", "quantization_config": {"quant_method": "gptq", "bits": 4}}')
    (root / "README.md").write_text("---\nbase_model: org/src\nbase_model_relation: quantized\nlibrary_name: transformers\n---\n# card\n")
    for i in range(n_shards):
        (root / f"model-0000{i + 1}-of-0000{n_shards}.safetensors").write_bytes(os.urandom(shard))
    (root / ".cache").mkdir()
    (root / ".cache" / "junk").write_text("never published")
    return root


def files_of(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def test_publish_round_trip_progress_and_idempotency(fake_hub, tmp_path):
    src = make_model(tmp_path / "out")
    seen = []
    res = publish_folder(src, repo_id="alice/q1", token=WRITE_TOKEN, endpoint=fake_hub.url, private=True,
                         progress=lambda done, total: seen.append((done, total)))
    assert res["created"] is True and res["revision"] == "main" and "pr_url" not in res
    assert res["commit_url"] == f"{fake_hub.url}/alice/q1/commit/{res['commit_sha']}"
    total = sum(len(b) for b in files_of(src).values())
    assert seen[-1] == (total, total) and all(t == total for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert fake_hub.hub.repos["alice/q1"].private

    dl = snapshot_download("alice/q1", token=WRITE_TOKEN, local_dir=tmp_path / "dl")
    got = files_of(tmp_path / "dl")
    got.pop(".gitattributes", None)
    assert got == files_of(src)
    assert dl

    commits_before = len(HfApi(endpoint=fake_hub.url, token=WRITE_TOKEN).list_repo_commits("alice/q1"))
    puts_before = fake_hub.hub.count("PUT", "lfs_upload")
    again = publish_folder(src, repo_id="alice/q1", token=WRITE_TOKEN, endpoint=fake_hub.url)
    assert again["created"] is False and again["commit_sha"] == res["commit_sha"]
    assert len(HfApi(endpoint=fake_hub.url, token=WRITE_TOKEN).list_repo_commits("alice/q1")) == commits_before
    assert fake_hub.hub.count("PUT", "lfs_upload") == puts_before
    assert fake_hub.hub.count("POST", "commit") == 1


def test_a_fine_tuning_output_is_published_with_its_merged_folder_beside_the_adapter(fake_hub, tmp_path):
    src = tmp_path / "adapter"
    src.mkdir()
    (src / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (src / "adapter_model.safetensors").write_bytes(os.urandom(50_000))
    make_model(src / "merged", shard=100_000, n_shards=1)  # the merge's re-quantized model
    publish_folder(src, repo_id="alice/ft1", token=WRITE_TOKEN, endpoint=fake_hub.url)
    snapshot_download("alice/ft1", token=WRITE_TOKEN, local_dir=tmp_path / "dl")
    got = files_of(tmp_path / "dl")
    got.pop(".gitattributes", None)
    assert got == files_of(src) and "merged/config.json" in got and "merged/model-00001-of-00001.safetensors" in got


def test_republish_with_fewer_shards_removes_stale_ones(fake_hub, tmp_path):
    publish_folder(make_model(tmp_path / "a", n_shards=3), repo_id="alice/q2", token=WRITE_TOKEN, endpoint=fake_hub.url)
    src = make_model(tmp_path / "b", n_shards=1)
    res = publish_folder(src, repo_id="alice/q2", token=WRITE_TOKEN, endpoint=fake_hub.url)
    files = set(fake_hub.hub.head("alice/q2").files)
    assert files == {".gitattributes", "config.json", "README.md", "model-00001-of-00001.safetensors"}
    assert res["created"]


def test_branch_and_pull_request(fake_hub, tmp_path):
    src = make_model(tmp_path / "out")
    res = publish_folder(src, repo_id="qaas-org/q3", token=WRITE_TOKEN, endpoint=fake_hub.url, revision="gptq-4bit")
    assert res["revision"] == "gptq-4bit"
    assert fake_hub.hub.head("qaas-org/q3", "gptq-4bit").sha == res["commit_sha"]
    assert set(fake_hub.hub.head("qaas-org/q3", "main").files) == {".gitattributes"}

    other = make_model(tmp_path / "other", n_shards=1)
    pr = publish_folder(other, repo_id="qaas-org/q3", token=WRITE_TOKEN, endpoint=fake_hub.url, create_pr=True,
                        commit_message="Add 4-bit weights")
    assert pr["revision"] == "refs/pr/1" and pr["pr_url"].endswith("/qaas-org/q3/discussions/1")
    assert fake_hub.hub.head("qaas-org/q3", "refs/pr/1").sha == pr["commit_sha"]
    assert fake_hub.hub.head("qaas-org/q3", "refs/pr/1").title == "Add 4-bit weights"
    # A retried PR publish finds its PR instead of opening a second one.
    pr2 = publish_folder(other, repo_id="qaas-org/q3", token=WRITE_TOKEN, endpoint=fake_hub.url, create_pr=True)
    assert pr2 == {**pr, "created": False}
    assert fake_hub.hub.repos["qaas-org/q3"].pr_count == 1


def test_multi_commit_split(fake_hub, tmp_path):
    src = make_model(tmp_path / "out", n_shards=3)
    res = publish_folder(src, repo_id="alice/q4", token=WRITE_TOKEN, endpoint=fake_hub.url, max_files_per_commit=2)
    assert fake_hub.hub.count("POST", "commit") == 3
    assert set(fake_hub.hub.head("alice/q4").files) >= set(files_of(src))
    assert res["commit_sha"] == fake_hub.hub.head("alice/q4").sha


@pytest.mark.parametrize(
    ("token", "repo_id", "exc", "status"),
    [
        ("hf_wrongtoken0123456789", "alice/e1", HubAuthError, 401),
        (READ_TOKEN, "alice/e2", HubPermissionError, 403),
        (OTHER_TOKEN, "alice/e3", HubPermissionError, 403),  # someone else's namespace
    ],
)
def test_final_errors(fake_hub, tmp_path, caplog, token, repo_id, exc, status):
    caplog.set_level(logging.DEBUG)
    src = make_model(tmp_path / "out", n_shards=1)
    with pytest.raises(exc) as e:
        publish_folder(src, repo_id=repo_id, token=token, endpoint=fake_hub.url, retry_delay=0)
    assert e.value.retryable is False and e.value.status_code == status
    assert token not in str(e.value) and token not in repr(e.value)
    assert e.value.__cause__ is None and e.value.__context__ is None  # no request (with its headers) attached
    assert token not in caplog.text
    assert fake_hub.hub.count("POST", "create_repo") == 1  # final errors are not retried


def test_not_found_on_existing_private_repo_of_someone_else(fake_hub, tmp_path):
    fake_hub.hub.create_repo("bob/secret", private=True)
    src = make_model(tmp_path / "out", n_shards=1)
    with pytest.raises((HubPermissionError, HubNotFoundError)) as e:
        publish_folder(src, repo_id="bob/secret", token=WRITE_TOKEN, endpoint=fake_hub.url, retry_delay=0)
    assert not e.value.retryable


def test_404_when_reading_unknown_repo_translates():
    import httpx
    from huggingface_hub.errors import RepositoryNotFoundError

    resp = httpx.Response(404, request=httpx.Request("GET", "http://h/api/models/a/b"), headers={"X-Error-Code": "RepoNotFound"})
    err = hubmod.translate_error(RepositoryNotFoundError("nope", response=resp), repo_id="a/b", token="hf_secret0123456789")
    assert isinstance(err, HubNotFoundError) and not err.retryable and err.status_code == 404


def test_5xx_then_success_is_retried(fake_hub, tmp_path):
    src = make_model(tmp_path / "out", n_shards=1)
    fake_hub.hub.fail("commit", status=502, times=1)  # the commit POST is not retried by huggingface_hub itself
    res = publish_folder(src, repo_id="alice/r1", token=WRITE_TOKEN, endpoint=fake_hub.url, retry_delay=0.01)
    assert res["created"] and fake_hub.hub.count("POST", "commit") == 2
    assert fake_hub.hub.head("alice/r1").sha == res["commit_sha"]


def test_5xx_forever_is_a_retryable_error(fake_hub, tmp_path, caplog):
    src = make_model(tmp_path / "out", n_shards=1)
    fake_hub.hub.fail("create_repo", status=503, times=10)
    with pytest.raises(HubUnavailableError) as e:
        publish_folder(src, repo_id="alice/r2", token=WRITE_TOKEN, endpoint=fake_hub.url, attempts=2, retry_delay=0.01)
    assert e.value.retryable and e.value.status_code == 503
    assert fake_hub.hub.count("POST", "create_repo") == 2
    assert WRITE_TOKEN not in caplog.text and WRITE_TOKEN not in str(e.value)


def test_dropped_connection_mid_upload_then_success(fake_hub, tmp_path):
    src = make_model(tmp_path / "out", n_shards=1)
    fake_hub.hub.drop("commit", after_bytes=10)  # cut mid-body; nothing committed
    res = publish_folder(src, repo_id="alice/r3", token=WRITE_TOKEN, endpoint=fake_hub.url, retry_delay=0.01)
    assert res["created"]
    assert [c.title for c in HfApi(endpoint=fake_hub.url, token=WRITE_TOKEN).list_repo_commits("alice/r3")] == [
        "Upload quantized model (qaas)", "initial commit"]


def test_dropped_connection_every_time_is_retryable(fake_hub, tmp_path):
    src = make_model(tmp_path / "out", n_shards=1)
    fake_hub.hub.drop("commit", after_bytes=10, times=5)
    with pytest.raises(HubConnectionError) as e:
        publish_folder(src, repo_id="alice/r4", token=WRITE_TOKEN, endpoint=fake_hub.url, attempts=2, retry_delay=0.01)
    assert e.value.retryable
    assert set(fake_hub.hub.head("alice/r4").files) == {".gitattributes"}  # never half-published


def test_lfs_put_dropped_is_retried_by_client(fake_hub, tmp_path):
    src = make_model(tmp_path / "out", n_shards=1)
    fake_hub.hub.drop("lfs_upload", after_bytes=1000)
    res = publish_folder(src, repo_id="alice/r5", token=WRITE_TOKEN, endpoint=fake_hub.url, retry_delay=0.01)
    assert res["created"] and fake_hub.hub.count("PUT", "lfs_upload") == 2


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("meta-llama/Llama-3.2-1B", "alice", "gptq", 4, 128), {}, "alice/Llama-3.2-1B-GPTQ-4bit-g128"),
        (("Qwen/Qwen2.5-0.5B", "alice", "gptq", 3, -1), {}, "alice/Qwen2.5-0.5B-GPTQ-3bit"),
        (("Qwen/Qwen2.5-0.5B", "org", "bitsandbytes", 4, None), {}, "org/Qwen2.5-0.5B-bnb-nf4"),
        (("Qwen/Qwen2.5-0.5B", "org", "bitsandbytes", 4, None), {"quant_type": "fp4"}, "org/Qwen2.5-0.5B-bnb-fp4"),
        (("gpt2", "org", "bnb", 8, None), {}, "org/gpt2-bnb-8bit"),
        (("/data/models/my model!", "org", "gptq", 8, 32), {}, "org/my-model-GPTQ-8bit-g32"),
    ],
)
def test_default_repo_id(args, kwargs, expected):
    assert default_repo_id(*args, **kwargs) == expected


def test_default_repo_id_fits_hub_limit():
    rid = default_repo_id("x/" + "a" * 200, "o", "gptq", 4, 128)
    assert len(rid.split("/")[1]) <= 96 and rid.endswith("-GPTQ-4bit-g128")


def test_not_a_directory(tmp_path):
    with pytest.raises(PublishError):
        publish_folder(tmp_path / "missing", repo_id="a/b", token=None, endpoint="http://127.0.0.1:9")


def test_lost_commit_response_does_not_commit_twice(fake_hub, tmp_path):
    """The commit lands but its response is lost: the retry finds the content and makes no second commit."""
    src = make_model(tmp_path / "out", n_shards=1)
    fake_hub.hub.drop("commit", after_handling=True)
    res = publish_folder(src, repo_id="alice/r6", token=WRITE_TOKEN, endpoint=fake_hub.url, retry_delay=0.01)
    assert fake_hub.hub.count("POST", "commit") == 1
    assert res["commit_sha"] == fake_hub.hub.head("alice/r6").sha and res["created"] is False
    commits = HfApi(endpoint=fake_hub.url, token=WRITE_TOKEN).list_repo_commits("alice/r6")
    assert [c.title for c in commits] == ["Upload quantized model (qaas)", "initial commit"]


def test_concurrent_writer_412_is_retryable():
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    resp = httpx.Response(412, request=httpx.Request("POST", "http://h/api/models/a/b/commit/main"))
    err = hubmod.translate_error(HfHubHTTPError("412", response=resp), repo_id="a/b", token=None)
    assert err.retryable and err.status_code == 412


def test_successful_publish_never_logs_the_token(fake_hub, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    fake_hub.hub.fail("lfs_upload", status=500)  # exercise huggingface_hub's retry logging too
    publish_folder(make_model(tmp_path / "out", n_shards=1), repo_id="alice/r7", token=WRITE_TOKEN,
                   endpoint=fake_hub.url, retry_delay=0.01)
    assert caplog.records and WRITE_TOKEN not in caplog.text


def test_http_404_is_final_not_found(fake_hub, tmp_path):
    fake_hub.hub.fail("create_repo", status=404, times=5)
    with pytest.raises(HubNotFoundError) as e:
        publish_folder(make_model(tmp_path / "out", n_shards=1), repo_id="alice/nf", token=WRITE_TOKEN,
                       endpoint=fake_hub.url, retry_delay=0.01)
    assert e.value.status_code == 404 and not e.value.retryable
    assert fake_hub.hub.count("POST", "create_repo") == 1


def test_failed_publish_resumes_without_reuploading_blobs(fake_hub, tmp_path):
    src = make_model(tmp_path / "out", n_shards=2)
    fake_hub.hub.drop("commit", after_bytes=10, times=2)
    with pytest.raises(HubConnectionError):
        publish_folder(src, repo_id="alice/resume", token=WRITE_TOKEN, endpoint=fake_hub.url, attempts=2, retry_delay=0.01)
    puts = fake_hub.hub.count("PUT", "lfs_upload")
    assert puts == 2  # both shards uploaded once, then the commit failed twice
    res = publish_folder(src, repo_id="alice/resume", token=WRITE_TOKEN, endpoint=fake_hub.url)
    assert res["created"] and fake_hub.hub.count("PUT", "lfs_upload") == puts  # the blobs were not sent again
