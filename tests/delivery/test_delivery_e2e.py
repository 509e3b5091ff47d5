"""Hub publishing and webhooks through the real API, Celery worker, Redis and PostgreSQL.

The Hub is the project's Hub-compatible server on loopback (HF_ENDPOINT points at it, plain LFS);
webhooks go to a real HTTP receiver on loopback and are verified with the independent
`standardwebhooks` implementation.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from conftest import STORIES, auth, new_key, running_service
from support.hub_fixtures import READ_TOKEN, WRITE_TOKEN
from support.processes import wait_job
from support.receiver import Receiver

pytestmark = pytest.mark.slow

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}


def _verify(secret: str, received) -> dict:
    from standardwebhooks import Webhook

    return Webhook(secret).verify(received.body, received.headers)


@pytest.fixture
def delivery_stack(tmp_path, clean_db, redis_db, fake_hub):
    with running_service(tmp_path, tmp_path.name, database_url=clean_db, broker_url=redis_db,
                         webhook_allowlist="127.0.0.1", hub_endpoint=fake_hub.url) as (settings, stack, url):
        yield settings, stack, url, fake_hub


def test_hub_round_trip_with_card_and_one_verified_webhook(delivery_stack, tmp_path):
    settings, stack, url, hub = delivery_stack
    # a source model served by the Hub: downloaded with the caller's token, quantized, pushed back
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    api.create_repo("alice/stories260K", private=True)
    api.upload_folder(folder_path=str(STORIES), repo_id="alice/stories260K")
    receiver = Receiver().start()
    key = new_key(settings, "alice")
    try:
        with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
            r = c.post("/v1/jobs", json={
                "model": {"id": "alice/stories260K"}, "quantization_config": NF4, "hf_token": WRITE_TOKEN,
                "push_to_hub": {"repo_id": "alice/stories260K-nf4", "private": True},
                "webhook": {"url": receiver.url}})
            assert r.status_code == 202, r.text
            secret = r.json()["webhook_secret"]
            jid = r.json()["id"]
            job = wait_job(c, jid, {"succeeded", "failed"}, timeout=300)
            assert job["status"] == "succeeded", (job, stack.procs[-1].log()[-3000:])
            hubinfo = job["result"]["hub"]
            assert hubinfo["repo_id"] == "alice/stories260K-nf4" and len(hubinfo["commit_sha"]) == 40
            assert job["source_revision"] and len(job["source_revision"]) == 40  # resolved commit of the source
            assert "publish" in job["timings"]
            events = c.get(f"/v1/jobs/{jid}/events").json()["items"]
            assert any(e["stage"] == "publish" and (e["data"] or {}).get("bytes_total") for e in events)
            got = receiver.wait_for(1)
            time.sleep(2)
            assert len(receiver.received) == 1  # exactly one logical event
            payload = _verify(secret, got[0])
            assert payload["type"] == "job.succeeded" and payload["data"]["id"] == jid
            assert payload["data"]["result"]["hub"]["commit_sha"] == hubinfo["commit_sha"]
            deliveries = c.get(f"/v1/jobs/{jid}/deliveries").json()
            assert [d["status"] for d in deliveries] == ["delivered"] and deliveries[0]["attempt_log"][0]["status_code"] == 200
            # the job's token is gone once the job ended, and appears in no log
            for proc in stack.procs:
                assert WRITE_TOKEN not in proc.log()
    finally:
        receiver.stop()

    from huggingface_hub import snapshot_download

    local = snapshot_download("alice/stories260K-nf4", endpoint=hub.url, token=READ_TOKEN, cache_dir=str(tmp_path / "dl"))
    card = open(f"{local}/README.md").read()
    from qaas.worker.publish.model_card import parse_front_matter

    meta = parse_front_matter(card)
    assert meta["base_model"] == "alice/stories260K" and meta["base_model_relation"] == "quantized"
    assert "qaas" in meta["tags"] and "from_pretrained" in card
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(local)
    assert model.config.quantization_config.load_in_4bit


def test_flaky_receiver_gets_one_logical_event_and_a_down_receiver_gets_it_later(delivery_stack):
    settings, stack, url, hub = delivery_stack
    flaky = Receiver(responses=[500, 503]).start()
    down_port = Receiver().start()
    down_port.stop()  # nothing listens here until later
    key = new_key(settings, "alice")
    try:
        with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
            hook = c.post("/v1/webhooks", json={"url": flaky.url}).json()
            r = c.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4,
                                         "options": {"evaluate": False},
                                         "webhook": {"url": f"http://127.0.0.1:{down_port.port}/hook"}})
            jid, own_secret = r.json()["id"], r.json()["webhook_secret"]
            assert wait_job(c, jid, {"succeeded", "failed"})["status"] == "succeeded"
            got = flaky.wait_for(3, timeout=90)  # 500, 503, then 200 (retries after ~5 s each)
            ids = {g.headers["webhook-id"] for g in got}
            assert len(ids) == 1  # the same logical event every time
            assert all(_verify(hook["secret"], g)["type"] == "job.succeeded" for g in got)
            # the receiver has the third request before the sender has recorded its answer: wait for that
            deadline = time.monotonic() + 30
            while True:
                deliveries = {d["url"]: d for d in c.get(f"/v1/jobs/{jid}/deliveries").json()}
                if deliveries[flaky.url]["status"] != "pending" or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert deliveries[flaky.url]["status"] == "delivered" and deliveries[flaky.url]["attempts"] == 3
            own = deliveries[f"http://127.0.0.1:{down_port.port}/hook"]
            assert own["status"] == "pending" and own["last_error"]
            # the receiver comes up: the next retry delivers
            later = Receiver(port=down_port.port).start()
            try:
                arrived = later.wait_for(1, timeout=60)
                assert _verify(own_secret, arrived[0])["data"]["id"] == jid
                assert arrived[0].headers["webhook-id"] == own["webhook_id"]
            finally:
                later.stop()
    finally:
        flaky.stop()


def test_webhook_to_a_name_resolving_to_loopback_is_refused_at_delivery(tmp_path, clean_db, redis_db):
    host = socket.gethostname()
    addr = socket.gethostbyname(host)
    import ipaddress

    assert ipaddress.ip_address(addr).is_loopback or ipaddress.ip_address(addr).is_private, addr
    receiver = Receiver().start()
    try:
        with running_service(tmp_path, tmp_path.name, database_url=clean_db, broker_url=redis_db,
                             webhook_allowlist="") as (settings, _stack, url):
            key = new_key(settings, "alice")
            with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
                r = c.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4,
                                             "options": {"evaluate": False},
                                             "webhook": {"url": f"http://{host}:{receiver.port}/hook"}})
                assert r.status_code == 202, r.text  # a name: checked when it is resolved, at delivery
                jid = r.json()["id"]
                assert wait_job(c, jid, {"succeeded", "failed"})["status"] == "succeeded"
                deadline = time.monotonic() + 60
                while (d := c.get(f"/v1/jobs/{jid}/deliveries").json()[0])["status"] == "pending":
                    assert time.monotonic() < deadline
                    time.sleep(0.3)
        assert d["status"] == "failed" and "unsafe destination" in d["last_error"] and "loopback" in d["last_error"]
        assert receiver.received == []
    finally:
        receiver.stop()


def test_hub_errors_fail_the_job_clearly_never_half_published(delivery_stack):
    settings, stack, url, hub = delivery_stack
    key = new_key(settings, "alice")
    with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
        # a read-only token cannot push: a final 403, reported as such
        r = c.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4, "options": {"evaluate": False},
                                     "hf_token": READ_TOKEN, "push_to_hub": {"repo_id": "alice/ro-nf4"}})
        job = wait_job(c, r.json()["id"], {"succeeded", "failed"})
        assert job["status"] == "failed" and job["error"]["stage"] == "publish", job
        assert job["error"]["code"] in ("hub_forbidden", "hub_auth") and READ_TOKEN not in json.dumps(job)
        # a bad token: 401
        r = c.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4, "options": {"evaluate": False},
                                     "hf_token": "hf_not_a_real_token_123", "push_to_hub": {"repo_id": "alice/bad-nf4"}})
        job = wait_job(c, r.json()["id"], {"succeeded", "failed"})
        assert job["status"] == "failed" and job["error"]["code"] == "hub_auth", job
        # the Hub answers 503 to commits a few times: the publish is retried and succeeds once
        hub.hub.fail("commit", status=503, times=3)
        assert c.put("/v1/hub-token", json={"token": WRITE_TOKEN}).status_code == 204  # the saved credential
        r = c.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4, "options": {"evaluate": False},
                                     "push_to_hub": {"repo_id": "alice/retry-nf4"}})
        job = wait_job(c, r.json()["id"], {"succeeded", "failed"}, timeout=300)
        assert job["status"] == "succeeded", job
        assert hub.hub.count("POST", "commit") >= 4
        from huggingface_hub import HfApi

        commits = HfApi(endpoint=hub.url, token=WRITE_TOKEN).list_repo_commits("alice/retry-nf4")
        assert len([c for c in commits if "qaas" in (c.title or "").lower() or c.title]) >= 1
        assert job["result"]["hub"]["commit_sha"] == commits[0].commit_id


def test_a_gguf_job_goes_up_in_one_commit_with_its_card_and_loads_in_llama_cpp(delivery_stack, tmp_path):
    """A GGUF job on stories260K from the Hub: four types, one of them in two parts (F32 over split_max_size
    1M), the importance matrix beside them; every file in ONE commit with byte progress in the job's events,
    the card naming each file with its type, size, bits per weight, perplexity and delta (the job's own
    figures) and the llama-cli -hf / Ollama line of each type; the downloaded files load in llama.cpp (the
    split type from its first part)."""
    import hashlib

    from conftest import SHAKESPEARE
    from huggingface_hub import HfApi, snapshot_download
    from support.consumers import require

    settings, stack, url, hub = delivery_stack
    api = HfApi(endpoint=hub.url, token=WRITE_TOKEN)
    api.create_repo("alice/stories260K", private=True)
    api.upload_folder(folder_path=str(STORIES), repo_id="alice/stories260K")
    commits_before = hub.hub.count("POST", "commit")
    types = ["Q4_K_M", "Q8_0", "Q6_K", "F32"]
    qc = {"quant_method": "gguf", "types": types, "output_type_default": "F32", "split_max_size": "1M",
          "imatrix": True, "dataset": [SHAKESPEARE.read_text()[:20000]], "nsamples": 4, "model_seqlen": 64}
    key = new_key(settings, "alice")
    with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
        r = c.post("/v1/jobs", json={"model": {"id": "alice/stories260K"}, "quantization_config": qc,
                                     "options": {"eval_max_windows": 2}, "hf_token": WRITE_TOKEN,
                                     "push_to_hub": {"repo_id": "alice/stories260K-GGUF", "private": True}})
        assert r.status_code == 202, r.text
        jid = r.json()["id"]
        job = wait_job(c, jid, {"succeeded", "failed"}, timeout=600)
        assert job["status"] == "succeeded", (json.dumps(job["error"]), stack.procs[-1].log()[-3000:])
        events = c.get(f"/v1/jobs/{jid}/events").json()["items"]
    result = job["result"]
    outputs = {o["type"]: o for o in result["gguf"]["outputs"]}
    assert list(outputs) == types and len(outputs["F32"]["files"]) == 2
    assert all(len(outputs[t]["files"]) == 1 for t in types[:-1])
    gguf_names = [f["name"] for t in types for f in outputs[t]["files"]]
    # one commit holds them all, with the card and the importance matrix
    assert hub.hub.count("POST", "commit") == commits_before + 1
    head = hub.hub.head("alice/stories260K-GGUF")
    assert result["hub"]["commit_sha"] == head.sha
    assert set(head.files) == {".gitattributes", "README.md", "imatrix.gguf", *gguf_names}
    local = tmp_path / "dl"
    snapshot_download("alice/stories260K-GGUF", endpoint=hub.url, token=READ_TOKEN, local_dir=str(local))
    for o in outputs.values():
        for f in o["files"]:
            data = (local / f["name"]).read_bytes()
            assert len(data) == f["size"] and hashlib.sha256(data).hexdigest() == f["sha256"], f["name"]
    published = sum(p.stat().st_size for p in local.iterdir() if p.is_file() and p.name != ".gitattributes")
    progress = [e["data"] for e in events if e["stage"] == "publish" and (e["data"] or {}).get("bytes_total")]
    assert progress and progress[-1] == {"bytes_done": published, "bytes_total": published}
    # the card: this job's figures, one row per type, and a run line per type
    card = (local / "README.md").read_text()
    ev = result["evaluation"]
    before = ev["perplexity_before"]
    rows = [line for line in card.splitlines() if line.startswith("| `model-")]
    assert len(rows) == len(types)
    for t, row in zip(types, rows):
        o, ppl = outputs[t], ev["per_type"][t]["perplexity"]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == ", ".join(f"`{f['name']}`" for f in o["files"]) and cells[1] == t
        size = f"{o['size'] / 1000:.2f} KB" if o["size"] < 1e6 else f"{o['size'] / 1e6:.2f} MB"
        assert cells[2] == size, (t, row)
        assert cells[3] == f"{o['bits_per_weight']:.2f}" and cells[4] == f"{ppl:.4f}"
        assert cells[5] == f"{ppl - before:+.4f} ({100 * (ppl - before) / before:+.2f}%)"
        host = hub.url.split("://", 1)[-1]
        assert f"llama-cli -hf alice/stories260K-GGUF:{t} " in card and f"ollama run {host}/alice/stories260K-GGUF:{t}\n" in card
    assert "llama-quantize --imatrix imatrix.gguf" in card
    assert abs(ev["per_type"]["F32"]["perplexity"] - before) < 1e-3 * before  # the F32 file is the source model
    llama_cpp = require("llama_cpp")
    for t in types:
        llm = llama_cpp.Llama(model_path=str(local / outputs[t]["files"][0]["name"]), n_ctx=64, verbose=False)
        try:
            assert llm("Once upon a time", max_tokens=8, temperature=0.0)["choices"][0]["text"].strip(), t
        finally:
            llm.close()
