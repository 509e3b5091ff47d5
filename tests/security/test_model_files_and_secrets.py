"""Model files as an attack surface, and secrets that must never surface -- through the real API + worker.

Each hostile model directory is submitted over HTTP and run by a real worker with the real engine;
each job must end `failed` with a clear code and message (never `succeeded`, never stuck, never an
`internal_error` traceback), and the worker must keep serving. The same run greps every process log,
every response and every event for the API key and the Hub token.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct

import httpx
import pytest
from conftest import ARTIFACTS, STORIES, auth, make_settings, new_key, settings_env
from support.hub_fixtures import WRITE_TOKEN
from support.processes import Stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}


class Boom:
    def __reduce__(self):  # would run a command if anything unpickled it
        return (shutil.rmtree, ("/tmp/qaas-pickle-canary",))


def _copy_base(dst):
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "generation_config.json"):
        shutil.copy(STORIES / name, dst / name)
    return dst


def _st_header(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def build_models(root):
    models = {}
    d = _copy_base(root / "pickle-bin")
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    models["pickle-bin"] = d

    d = _copy_base(root / "remote-code")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_evil.py").write_text("import os\nos.system('touch /tmp/qaas-remote-code-ran')\n")
    shutil.copy(STORIES / "model.safetensors", d / "model.safetensors")
    models["remote-code"] = d

    d = _copy_base(root / "lying-header-length")
    real = (STORIES / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + real[8:])  # header "is" a terabyte
    models["lying-header-length"] = d

    d = _copy_base(root / "absurd-sizes")
    hdr = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 4 * 10**18]}}
    (d / "model.safetensors").write_bytes(_st_header(hdr) + b"\0" * 64)
    models["absurd-sizes"] = d

    d = _copy_base(root / "offsets-past-end")
    real = (STORIES / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", real[:8])[0]
    hdr = json.loads(real[8:8 + n])
    name = next(k for k in hdr if k != "__metadata__")
    hdr[name]["data_offsets"] = [0, len(real) * 10]
    (d / "model.safetensors").write_bytes(_st_header(hdr) + real[8 + n:])
    models["offsets-past-end"] = d

    d = _copy_base(root / "fake-tokenizer")
    shutil.copy(STORIES / "model.safetensors", d / "model.safetensors")
    (d / "tokenizer.json").write_bytes(pickle.dumps(Boom()))  # says JSON, is a pickle
    (d / "tokenizer.model").write_bytes(b"\x00\x01not a sentencepiece model")
    models["fake-tokenizer"] = d
    return models


def test_hostile_model_files_are_refused_or_contained_and_no_secret_leaks(tmp_path, clean_db, redis_db, fake_hub):
    canary = "/tmp/qaas-pickle-canary"
    import os

    os.makedirs(canary, exist_ok=True)
    models = build_models(tmp_path)
    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, hub_endpoint=fake_hub.url)
    stack = Stack(tmp_path, {**settings_env(settings), "QAAS_LOG_FORMAT": "json"})
    key = new_key(settings, "alice")
    try:
        _, url = stack.start_api()
        worker = stack.start_worker()
        seen_text = []
        with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
            ids = {}
            for name, path in models.items():
                # evaluation on for the tokenizer case: that is when the engine reads the tokenizer
                r = c.post("/v1/jobs", json={"model": {"path": str(path)}, "quantization_config": NF4,
                                             "options": {"evaluate": name == "fake-tokenizer", "eval_max_windows": 1},
                                             "hf_token": WRITE_TOKEN})
                assert r.status_code == 202, r.text
                ids[name] = r.json()["id"]
                seen_text.append(r.text)
            # a Hub source that does not exist, with the token: the failure must not carry the token
            r = c.post("/v1/jobs", json={"model": {"id": "alice/does-not-exist"}, "quantization_config": NF4,
                                         "options": {"evaluate": False}, "hf_token": WRITE_TOKEN})
            ids["hub-missing"] = r.json()["id"]
            # With evaluation off nothing loads the tokenizer; the files are still checked before they are carried.
            r = c.post("/v1/jobs", json={"model": {"path": str(models["fake-tokenizer"])}, "quantization_config": NF4,
                                         "options": {"evaluate": False}})
            carried = r.json()["id"]
            c.get("/v1/jobs", headers={"Authorization": f"Bearer {WRITE_TOKEN}"})  # a token sent as an API key
            jobs = {}
            import time

            deadline = time.monotonic() + 300
            while len(jobs) < len(ids):
                assert time.monotonic() < deadline, {n: c.get(f"/v1/jobs/{j}").json()["status"] for n, j in ids.items()}
                for name, jid in ids.items():
                    j = c.get(f"/v1/jobs/{jid}").json()
                    if j["status"] in ("succeeded", "failed", "cancelled"):
                        jobs[name] = j
                time.sleep(0.5)
            from support.processes import wait_job

            contained = wait_job(c, carried, {"succeeded", "failed"}, timeout=120)
            assert contained["status"] == "failed" and contained["error"]["code"] == "source_rejected", contained
            for name, jid in ids.items():
                seen_text.append(json.dumps(jobs[name]))
                seen_text.append(c.get(f"/v1/jobs/{jid}/events").text)
            seen_text.append(c.get("/v1/jobs", params={"limit": 200}).text)
        report = {n: (j["status"], (j["error"] or {}).get("code"), (j["error"] or {}).get("message")) for n, j in jobs.items()}
        (ARTIFACTS / "model-file-attacks.json").parent.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "model-file-attacks.json").write_text(json.dumps(report, indent=2))
        for name, (status, code, message) in report.items():
            assert status == "failed", (name, report)
            if name == "fake-tokenizer":
                assert code == "source_rejected" and "tokenizer" in message, report
            assert code and code != "internal_error", (name, report)  # a clear, classified refusal
            assert message and "Traceback" not in message, (name, report)
        assert report["pickle-bin"][1] == "source_rejected" and "pickle" in report["pickle-bin"][2]
        assert report["remote-code"][1] == "source_rejected" and "auto_map" in report["remote-code"][2]
        assert contained["error"]["message"].startswith("tokenizer")  # refused before anything was carried
        assert os.path.isdir(canary), "a pickle was unpickled"
        assert not os.path.exists("/tmp/qaas-remote-code-ran"), "remote code ran"
        assert worker.popen.poll() is None  # still serving
    finally:
        stack.stop_all()
        stack.save_logs(ARTIFACTS, tmp_path.name)
        shutil.rmtree(canary, ignore_errors=True)

    everything = "\n".join(seen_text) + "\n".join(p.log() for p in stack.procs)
    for job_dir in (settings.work_dir).glob("*/attempt-*"):
        everything += "\n".join(f.read_text(errors="replace") for f in job_dir.rglob("*.log"))
    assert key not in everything and key[5:20] not in everything
    assert WRITE_TOKEN not in everything and WRITE_TOKEN[3:20] not in everything
