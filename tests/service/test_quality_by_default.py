"""The README's first command, as configured there (no QAAS_EVAL_TEXT): a curl NF4 job and a GPTQ job both report
perplexity before and after, on the packaged evaluation text, through the real API, worker, Redis and PostgreSQL."""

from __future__ import annotations

import httpx
import pytest
from conftest import ARTIFACTS, SHAKESPEARE, STORIES, auth, make_settings, new_key, settings_env

from support.processes import Stack, wait_job

pytestmark = pytest.mark.slow

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_use_double_quant": True}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 32, "dataset": str(SHAKESPEARE)}


@pytest.fixture
def readme_stack(tmp_path, clean_db, redis_db):
    # the README's environment: no evaluation text configured, the server's default window count
    settings = make_settings(tmp_path, database_url=clean_db, broker_url=redis_db, eval_text="",
                             eval_max_windows=16)
    s = Stack(tmp_path, settings_env(settings))
    yield settings, s
    s.stop_all()
    s.save_logs(ARTIFACTS, tmp_path.name)


def test_nf4_and_gptq_jobs_report_perplexity_with_zero_configuration(readme_stack):
    from qaas import eval_text

    settings, stack = readme_stack
    _, url = stack.start_api()
    worker = stack.start_worker()
    key = new_key(settings, "alice")
    with httpx.Client(base_url=url, headers=auth(key), timeout=30) as c:
        ids = {}
        for name, qc, options in (("nf4", NF4, {}), ("gptq", GPTQ, {})):
            r = c.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": qc,
                                         "options": options})
            assert r.status_code == 202, r.text
            ids[name] = r.json()["id"]
        for name, jid in ids.items():
            job = wait_job(c, jid, {"succeeded", "failed", "cancelled"}, timeout=600)
            assert job["status"] == "succeeded", (name, job.get("error"), worker.log()[-2000:])
            ev = job["result"]["evaluation"]
            assert "skipped" not in ev, ev
            assert ev["text_sha256"] == eval_text.packaged_sha256() and ev["text"]["source"] == eval_text.PACKAGED_LABEL
            assert ev["windows"] == 16 and ev["seqlen"] == 512
            assert 1 < ev["perplexity_before"] < ev["perplexity_after"] < 1.5 * ev["perplexity_before"], ev
            assert ev["seconds"]["total"] > 0
            if name == "gptq":  # the windows ride the quantization's block stream
                assert ev["mode"] == "streamed beside the quantization"
                assert "as the checkpoint stores them" in ev["measured"]["quantized"]
            else:
                assert ev["mode"] == "streamed block by block"
                assert "exported checkpoint as written" in ev["measured"]["quantized"]
        gptq = c.get(f"/v1/jobs/{ids['gptq']}").json()["result"]["evaluation"]
        # calibrated on the tinyshakespeare corpus, which holds the packaged slice (128 windows drawn from all of
        # it): the evaluation windows the draw touched were left out, and the timeline says so
        assert gptq["windows_left_out"] > 0
        events = c.get(f"/v1/jobs/{ids['gptq']}/events").json()["items"]
        assert any("left out" in (e.get("message") or "") for e in events)
