"""A job's output files over the API, in-process on the real PostgreSQL: the listing that `links.files` points
at (names, sizes, sha256), and the whole output as one streamed tar archive that extracts to the same bytes."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
import uuid

from conftest import STORIES, auth

from qaas import job_store
from qaas.api.jobs import files
from qaas.db.models import JobStatus
from qaas.db.session import session_scope
from qaas.kit.file_digest import CHUNK_BYTES

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}

# Bigger than one read chunk, and not a multiple of the tar block size: the archive must stitch the chunks
# and pad the member.
BIG = os.urandom(2 * CHUNK_BYTES + 12345)
OUTPUT = {"model.safetensors": BIG, "config.json": b'{"quantization_config": {}}', "tokenizer.json": b"{}" * 300}


def _submit(client, key) -> str:
    r = client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4}, headers=auth(key))
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _succeed(settings, jid: str, output: dict[str, bytes], *, record_sha256: bool) -> None:
    root = settings.artifacts_dir / jid
    root.mkdir(parents=True)
    entries = []
    for name, data in output.items():
        (root / name).write_bytes(data)
        entries.append({"name": name, "size": len(data)}
                       | ({"sha256": hashlib.sha256(data).hexdigest()} if record_sha256 else {}))
    with session_scope(settings.resolved_database_url) as s:
        job = job_store.claim(s, uuid.UUID(jid), worker="w", lease_s=5)
        assert job_store.finish(s, job.id, job.attempt, JobStatus.succeeded, result={"files": entries})


def test_links_files_lists_names_sizes_and_sha256(client, settings, api_key, other_key):
    jid = _submit(client, api_key)
    # before the job succeeded there is nothing to list: a conflict, not a missing route
    r = client.get(f"/v1/jobs/{jid}/files", headers=auth(api_key))
    assert r.status_code == 409 and r.headers["content-type"].startswith("application/problem+json"), r.text
    _succeed(settings, jid, OUTPUT, record_sha256=False)  # digests computed when the result has none
    job = client.get(f"/v1/jobs/{jid}", headers=auth(api_key)).json()
    r = client.get(job["links"]["files"], headers=auth(api_key))
    assert r.status_code == 200, r.text
    listing = r.json()
    assert {f["name"]: (f["size"], f["sha256"]) for f in listing["items"]} == {
        n: (len(d), hashlib.sha256(d).hexdigest()) for n, d in OUTPUT.items()}
    for f in listing["items"]:  # each URL serves the listed bytes
        assert hashlib.sha256(client.get(f["url"], headers=auth(api_key)).content).hexdigest() == f["sha256"]
    assert listing["archive"]["url"] == f"/v1/jobs/{jid}/files.tar"
    assert listing["archive"]["name"] == f"stories260K-{jid[:8]}.tar"
    # another tenant, and no key: as for every other route of the job
    for path in (f"/v1/jobs/{jid}/files", f"/v1/jobs/{jid}/files.tar"):
        r = client.get(path, headers=auth(other_key))
        assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
        assert client.get(path).status_code == 401


def test_recorded_sha256_is_served_as_recorded(client, settings, api_key):
    jid = _submit(client, api_key)
    _succeed(settings, jid, {"config.json": b"{}"}, record_sha256=True)
    with session_scope(settings.resolved_database_url) as s:  # what the worker wrote is what is served
        job = job_store.get_job(s, uuid.UUID(jid), "alice")
        job.result = {"files": [{"name": "config.json", "size": 2, "sha256": "ab" * 32}]}
    items = client.get(f"/v1/jobs/{jid}/files", headers=auth(api_key)).json()["items"]
    assert items == [{"name": "config.json", "size": 2, "sha256": "ab" * 32, "url": f"/v1/jobs/{jid}/files/config.json"}]


def test_archive_streams_a_tar_that_extracts_to_the_same_bytes(client, settings, api_key, tmp_path):
    jid = _submit(client, api_key)
    _succeed(settings, jid, OUTPUT, record_sha256=True)
    listing = client.get(f"/v1/jobs/{jid}/files", headers=auth(api_key)).json()
    with client.stream("GET", f"/v1/jobs/{jid}/files.tar", headers=auth(api_key)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/x-tar"
        assert r.headers["content-disposition"] == f'attachment; filename="stories260K-{jid[:8]}.tar"'
        body = b"".join(r.iter_bytes())
    assert int(r.headers["content-length"]) == len(body) == listing["archive"]["size"]
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert members == {f"stories260K-{jid[:8]}/{n}": d for n, d in OUTPUT.items()}
    # the system's tar reads it too
    (tmp_path / "out.tar").write_bytes(body)
    subprocess.run(["tar", "-xf", "out.tar"], cwd=tmp_path, check=True)
    for name, data in OUTPUT.items():
        assert (tmp_path / f"stories260K-{jid[:8]}" / name).read_bytes() == data


def test_archive_is_written_a_chunk_at_a_time(settings, tmp_path):
    """The archive is never held whole: no piece is larger than a read chunk, the big file comes in several."""
    for name, data in OUTPUT.items():
        (tmp_path / name).write_bytes(data)
    out = [files.OutputFile(n, len(d), tmp_path / n, None) for n, d in OUTPUT.items()]
    pieces = list(files.archive_chunks("m", out))
    assert max(len(p) for p in pieces) <= CHUNK_BYTES
    assert sum(len(p) == CHUNK_BYTES for p in pieces) >= 2
    assert sum(map(len, pieces)) == files.archive_size("m", out)


def test_a_file_that_vanished_is_404_not_a_broken_archive(client, settings, api_key):
    jid = _submit(client, api_key)
    _succeed(settings, jid, OUTPUT, record_sha256=True)
    (settings.artifacts_dir / jid / "tokenizer.json").unlink()
    for path in (f"/v1/jobs/{jid}/files.tar", f"/v1/jobs/{jid}/files/tokenizer.json", f"/v1/jobs/{jid}/files"):
        r = client.get(path, headers=auth(api_key))
        assert r.status_code == 404 and "no longer available" in r.json()["detail"], (path, r.text)
    # the files still there are still served one by one
    assert client.get(f"/v1/jobs/{jid}/files/config.json", headers=auth(api_key)).content == OUTPUT["config.json"]
