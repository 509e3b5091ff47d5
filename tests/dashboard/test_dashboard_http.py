"""The dashboard over HTTP, in-process (FastAPI TestClient) on the real PostgreSQL and Redis:
sign-in and its cookie, CSRF, tenant isolation, the submit form's validation, no key in any page."""

from __future__ import annotations

import json
import re
import uuid

import pytest
import redis
from conftest import SHAKESPEARE, STORIES, auth
from sqlalchemy import select

from qaas import job_store
from qaas.api.dashboard import auth as dash_auth
from qaas.db.models import JobStatus, WebhookDelivery
from qaas.db.session import session_scope
from qaas.queue import DELIVER_TASK

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_compute_dtype": "float32"}
ORIGIN = {"Origin": "http://testserver"}


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert m, html[:2000]
    return m.group(1)


def sign_in(client, key: str):
    page = client.get("/dashboard/login")
    assert page.status_code == 200
    r = client.post("/dashboard/login", data={"api_key": key, "csrf_token": _csrf(page.text), "next": "/dashboard/jobs"},
                    headers=ORIGIN, follow_redirects=False)
    assert r.status_code == 303, r.text
    return r


def _submit_body(html: str, **fields) -> dict:
    body = {"csrf_token": _csrf(html), "model": str(STORIES), "method": "nf4", "compute_dtype": "float32",
            "evaluate": "on", "priority": "0", "bits": "4", "group_size": "128"}
    body.update(fields)
    return body


def test_pages_redirect_to_sign_in_and_streams_answer_401(client):
    r = client.get("/dashboard/jobs", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/login?next=")
    assert client.get("/dashboard/jobs/stream").status_code == 401
    assert client.get("/dashboard/jobs.json").status_code == 401


def test_sign_in_sets_a_strict_http_only_cookie_without_the_key(client, api_key):
    r = sign_in(client, api_key)
    set_cookie = [v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith(dash_auth.SESSION_COOKIE)][0]
    assert "HttpOnly" in set_cookie and "SameSite=strict" in set_cookie.replace("Strict", "strict")
    assert "Path=/dashboard" in set_cookie
    value = client.cookies.get(dash_auth.SESSION_COOKIE)
    assert value and api_key not in value and api_key[5:20] not in value
    page = client.get("/dashboard/jobs")
    assert page.status_code == 200 and "Signed in as" in page.text and "alice" in page.text
    assert api_key not in page.text
    assert "Content-Security-Policy" in page.headers and page.headers["Cache-Control"] == "no-store"


def test_bad_key_is_refused_without_echoing_it(client):
    page = client.get("/dashboard/login")
    bad = "qaas_" + "x" * 43
    r = client.post("/dashboard/login", data={"api_key": bad, "csrf_token": _csrf(page.text)}, headers=ORIGIN)
    assert r.status_code == 401 and "not valid" in r.text and bad not in r.text
    assert client.cookies.get(dash_auth.SESSION_COOKIE) is None


def test_login_and_forms_need_csrf(client, api_key):
    client.get("/dashboard/login")
    r = client.post("/dashboard/login", data={"api_key": api_key, "csrf_token": "forged"}, headers=ORIGIN)
    assert r.status_code == 403
    sign_in(client, api_key)
    html = client.get("/dashboard/jobs/new").text
    r = client.post("/dashboard/jobs", data=_submit_body(html, csrf_token="forged"), headers=ORIGIN)
    assert r.status_code == 403
    # a form posted from another site is refused even with a token
    r = client.post("/dashboard/jobs", data=_submit_body(html), headers={"Origin": "https://evil.example"})
    assert r.status_code == 403


def test_revoking_the_key_ends_the_session(client, settings, api_key):
    sign_in(client, api_key)
    assert client.get("/dashboard/jobs", follow_redirects=False).status_code == 200
    from qaas.db.session import session_scope
    from qaas.keys import revoke_keys
    from qaas.security import key_display_prefix

    with session_scope(settings.resolved_database_url) as s:
        revoke_keys(s, key_display_prefix(api_key))
    assert client.get("/dashboard/jobs", follow_redirects=False).status_code == 303


def test_tampered_or_expired_cookie_is_refused(settings):
    value = dash_auth.make_session_cookie(settings, "alice", str(uuid.uuid4()))
    assert dash_auth.read_session_cookie(settings, value) is not None
    body, sig = value.split(".")
    forged = dash_auth._b64(dash_auth._unb64(body).replace(b'"alice"', b'"mallo"')) + "." + sig
    assert dash_auth.read_session_cookie(settings, forged) is None
    import time

    assert dash_auth.read_session_cookie(settings, value, now=time.time() + dash_auth.SESSION_TTL_S + 5) is None


def test_submit_form_shows_the_apis_validation_messages(client, api_key):
    sign_in(client, api_key)
    html = client.get("/dashboard/jobs/new").text
    # GPTQ without a dataset: the API's own message
    r = client.post("/dashboard/jobs", data=_submit_body(html, method="gptq", bits="4"), headers=ORIGIN)
    assert r.status_code == 422
    api = client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": {"quant_method": "gptq", "bits": 4}},
                      headers=auth(api_key)).json()
    for e in api["errors"]:
        assert e["field"] in r.text and e["message"].replace("'", "&#39;") in r.text
    assert 'aria-invalid="true"' in r.text
    # group_size 0 and a path outside the allowed roots
    r = client.post("/dashboard/jobs", data=_submit_body(html, method="gptq", group_size="0", dataset="c4"), headers=ORIGIN)
    assert r.status_code == 422 and "quantization_config.group_size" in r.text
    r = client.post("/dashboard/jobs", data=_submit_body(html, model="/etc"), headers=ORIGIN)
    assert r.status_code == 422 and "model.path" in r.text and "outside the allowed model roots" in r.text
    r = client.post("/dashboard/jobs", data=_submit_body(html, advanced="{not json"), headers=ORIGIN)
    assert r.status_code == 422 and "not valid JSON" in r.text
    assert client.get("/v1/jobs", headers=auth(api_key)).json()["items"] == []


def test_the_submit_form_sends_an_awq_job_and_the_list_labels_it(client, api_key):
    sign_in(client, api_key)
    html = client.get("/dashboard/jobs/new").text
    assert '<option value="awq"' in html and 'data-for-method="gptq awq"' in html
    # the GPTQ-only bits menu is sent by the form but is no part of an AWQ request
    r = client.post("/dashboard/jobs", data=_submit_body(html, method="awq", bits="8", group_size="64",
                                                         dataset=str(SHAKESPEARE)), headers=ORIGIN,
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    jid = r.headers["location"].split("/")[-1].split("?")[0]
    qc = client.get(f"/v1/jobs/{jid}", headers=auth(api_key)).json()["request"]["quantization_config"]
    assert qc["quant_method"] == "awq" and qc["bits"] == 4 and qc["group_size"] == 64 and qc["version"] == "gemm"
    assert "AWQ 4-bit g64" in client.get("/dashboard/jobs").text
    # the rules' refusals come back beside their input
    r = client.post("/dashboard/jobs", data=_submit_body(html, method="awq", group_size="96", dataset=str(SHAKESPEARE)),
                    headers=ORIGIN)
    assert r.status_code == 422 and "quantization_config.group_size" in r.text


def test_submit_cancel_and_retry_through_forms(client, api_key):
    sign_in(client, api_key)
    html = client.get("/dashboard/jobs/new").text
    r = client.post("/dashboard/jobs", data=_submit_body(html, advanced='{"options": {"eval_max_windows": 3}}'),
                    headers=ORIGIN, follow_redirects=False)
    assert r.status_code == 303, r.text
    jid = r.headers["location"].split("/")[-1].split("?")[0]
    job = client.get(f"/v1/jobs/{jid}", headers=auth(api_key)).json()
    assert job["request"]["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert job["request"]["options"]["eval_max_windows"] == 3
    page = client.get(f"/dashboard/jobs/{jid}")
    assert page.status_code == 200 and "Cancel job" in page.text and "quant_method" in page.text
    r = client.post(f"/dashboard/jobs/{jid}/cancel", data={"csrf_token": _csrf(page.text)}, headers=ORIGIN,
                    follow_redirects=False)
    assert r.status_code == 303 and "notice=cancel-requested" in r.headers["location"]
    assert client.get(f"/v1/jobs/{jid}", headers=auth(api_key)).json()["status"] == "cancelled"  # queued: at once
    page = client.get(f"/dashboard/jobs/{jid}")
    assert "Retry as a new job" in page.text
    r = client.post(f"/dashboard/jobs/{jid}/retry", data={"csrf_token": _csrf(page.text)}, headers=ORIGIN,
                    follow_redirects=False)
    assert r.status_code == 303 and "notice=retried" in r.headers["location"]
    new_id = r.headers["location"].split("/")[-1].split("?")[0]
    assert new_id != jid
    again = client.get(f"/v1/jobs/{new_id}", headers=auth(api_key)).json()
    assert again["request"] == job["request"] and again["status"] == "queued"


@pytest.mark.parametrize("via", ["api", "dashboard"])
def test_cancel_hands_the_webhook_deliveries_over_at_once_from_the_api_and_the_dashboard(client, settings, api_key, via):
    """One cancel path: cancelling a queued job commits its `job.cancelled` deliveries and sends them to the
    I/O queue right away, whichever door the cancel came through (no worker or sweeper runs here)."""
    client.post("/v1/webhooks", json={"url": "https://hooks.example.com/a", "event_types": ["job.cancelled"]},
                headers=auth(api_key))
    jid = client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4,
                                        "webhook": {"url": "https://hooks.example.com/own"}},
                      headers=auth(api_key)).json()["id"]
    if via == "api":
        assert client.post(f"/v1/jobs/{jid}/cancel", headers=auth(api_key)).status_code == 202
    else:
        sign_in(client, api_key)
        page = client.get(f"/dashboard/jobs/{jid}")
        r = client.post(f"/dashboard/jobs/{jid}/cancel", data={"csrf_token": _csrf(page.text)}, headers=ORIGIN,
                        follow_redirects=False)
        assert r.status_code == 303 and "notice=cancel-requested" in r.headers["location"]
    with session_scope(settings.resolved_database_url) as s:
        deliveries = s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == uuid.UUID(jid))).all()
        ids = sorted(str(d.id) for d in deliveries)
        assert sorted(d.url for d in deliveries) == ["https://hooks.example.com/a", "https://hooks.example.com/own"]
        assert all(d.event_type == "job.cancelled" and d.dispatched_at is not None for d in deliveries)
    queued = [json.loads(m) for m in redis.Redis.from_url(settings.broker_url).lrange(settings.io_queue, 0, -1)]
    assert sorted(m["headers"]["argsrepr"].strip("[]'") for m in queued
                  if m["headers"]["task"] == DELIVER_TASK) == ids


def test_other_tenants_jobs_are_not_found(client, settings, api_key, other_key):
    jid = client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4},
                      headers=auth(api_key)).json()["id"]
    sign_in(client, other_key)
    assert jid not in client.get("/dashboard/jobs").text
    assert client.get(f"/dashboard/jobs/{jid}").status_code == 404
    assert client.get(f"/dashboard/jobs/{jid}/live").status_code == 404
    assert client.get(f"/dashboard/jobs/{jid}/events").status_code == 404
    assert jid not in client.get("/dashboard/jobs.json?since=2000-01-01T00:00:00Z").text
    page = client.get("/dashboard/jobs")
    r = client.post(f"/dashboard/jobs/{jid}/cancel", data={"csrf_token": _csrf(page.text)}, headers=ORIGIN)
    assert r.status_code == 404
    assert client.get(f"/v1/jobs/{jid}", headers=auth(api_key)).json()["status"] == "queued"


def test_list_filters_and_paginates(client, api_key):
    for _ in range(27):
        client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4}, headers=auth(api_key))
    sign_in(client, api_key)
    first = client.get("/dashboard/jobs").text
    assert first.count('class="job-row') == 25
    m = re.search(r'rel="next" href="([^"]+)"', first)
    assert m
    second = client.get(m.group(1).replace("&amp;", "&")).text
    assert second.count('class="job-row') == 2
    assert client.get("/dashboard/jobs?status=succeeded").text.count('class="job-row') == 0
    data = client.get("/dashboard/jobs.json?since=2000-01-01T00:00:00Z").json()
    assert len(data["rows"]) == 27 and all("html" in r for r in data["rows"])


def test_job_page_event_stream_is_server_sent_events(client, api_key):
    """The job page's live stream (EventSource on /dashboard/jobs/{id}/events) answers SSE, ending with `end`."""
    jid = client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4},
                      headers=auth(api_key)).json()["id"]
    assert client.post(f"/v1/jobs/{jid}/cancel", headers=auth(api_key)).json()["status"] == "cancelled"
    sign_in(client, api_key)
    r = client.get(f"/dashboard/jobs/{jid}/events", headers={"Accept": "text/event-stream"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    frames = [dict(line.split(": ", 1) for line in f.split("\n") if ": " in line and not line.startswith(":"))
              for f in r.text.split("\n\n") if "event:" in f]
    assert [f["event"] for f in frames] == ["status", "status", "end"], r.text
    assert [json.loads(f["data"])["data"]["status"] for f in frames[:2]] == ["queued", "cancelled"]
    # resumed after the first event (as the browser does with Last-Event-ID), only what followed comes
    r = client.get(f"/dashboard/jobs/{jid}/events", headers={"Accept": "text/event-stream", "Last-Event-ID": frames[0]["id"]})
    assert [line for line in r.text.split("\n") if line.startswith("event:")] == ["event: status", "event: end"]


def test_local_paths_are_stored_resolved_and_shown_by_the_part_that_differs(client, api_key):
    messy = f"{STORIES}/../{STORIES.name}/"
    r = client.post("/v1/jobs", json={"model": {"path": messy}, "quantization_config": NF4}, headers=auth(api_key))
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["model"] == str(STORIES.resolve()) == job["request"]["model"]["path"]
    sign_in(client, api_key)
    listing = client.get("/dashboard/jobs").text
    page = client.get(f"/dashboard/jobs/{job['id']}").text
    label = f"{STORIES.parent.name}/{STORIES.name}"  # under the allowed root ../shared/assets
    assert f'title="{STORIES}">{label}</a>' in listing
    assert f"<h1>{label}</h1>" in page and "/../" not in listing + page and "…/" not in listing


def _finish(settings, jid: str, status: JobStatus, **kw) -> None:
    with session_scope(settings.resolved_database_url) as s:
        job = job_store.claim(s, uuid.UUID(jid), worker="w", lease_s=600)
        assert job_store.finish(s, job.id, job.attempt, status, **kw)


def _row_cells(html: str, jid: str) -> dict[str, str]:
    """{column label: text} of the numeric cells of a job's row in the list."""
    row = html.split(f'id="job-{jid}"')[1].split("</tr>")[0]
    return dict(re.findall(r'<td class="num" data-label="([^"]+)"[^>]*>([^<]*)<', row))


def test_the_list_shows_each_jobs_result_and_an_eta_for_the_whole_job(client, settings, api_key):
    def submit() -> str:
        return client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4},
                           headers=auth(api_key)).json()["id"]

    done = submit()
    _finish(settings, done, JobStatus.succeeded,
            timings={"resolve": 1.0, "load": 1.0, "quantize": 100.0, "evaluate": 40.0, "export": 20.0},
            result={"files": [], "size_before_bytes": 7 * 2**20, "size_after_bytes": 2 * 2**20, "compression_ratio": 3.5,
                    "evaluation": {"perplexity_before": 10.0, "perplexity_after": 10.2}})
    running = submit()
    with session_scope(settings.resolved_database_url) as s:
        job = job_store.claim(s, uuid.UUID(running), worker="w", lease_s=600)
        job_store.record_stage(s, job.id, job.attempt, "quantize", message="quantize", timings={"resolve": 1.0, "load": 1.0})
        job_store.record_progress(s, job.id, job.attempt, stage="quantize", fraction=0.5, message="block 1/2",
                                  data={"done": 1, "total": 2})
    sign_in(client, api_key)
    html = client.get("/dashboard/jobs").text
    shown = _row_cells(html, done)
    assert (shown["Size after"], shown["Compression"], shown["Perplexity Δ"]) == ("2.0 MiB", "3.50×", "+2.00 %")
    assert shown["ETA"] == "–"  # finished
    # quantize half done a moment after it started: the rest of it at that rate (a moment), then evaluate and
    # export as long as they took on the same model last time: a minute for the whole job
    assert re.fullmatch(r"~1 min 0\d s", _row_cells(html, running)["ETA"]), _row_cells(html, running)
    assert re.search(rf'id="job-{running}"[^>]*data-eta-rest="60.0"', html.replace("\n", " "))


def test_a_mistyped_dashboard_url_is_an_html_page_and_the_api_keeps_problem_json(client, api_key):
    for signed_in in (False, True):
        if signed_in:
            sign_in(client, api_key)
        r = client.get("/dashboard/no/such/page", headers={"Accept": "text/html"})
        assert r.status_code == 404 and r.headers["content-type"].startswith("text/html"), r.text
        assert "There is no page at" in r.text and "/dashboard/no/such/page" in r.text
        assert ("Sign out" in r.text) is signed_in  # the menu when signed in
    r = client.post("/dashboard/jobs/new", headers={"Accept": "text/html"})  # a wrong method: a missing page too
    assert r.status_code == 404 and r.headers["content-type"].startswith("text/html")
    jid = client.post("/v1/jobs", json={"model": {"path": str(STORIES)}, "quantization_config": NF4},
                      headers=auth(api_key)).json()["id"]
    r = client.get(f"/dashboard/jobs/{jid}/files/config.json", headers={"Accept": "text/html"})
    assert r.status_code == 409 and r.headers["content-type"].startswith("text/html") and "Not available" in r.text
    r = client.get("/v1/no-such-route", headers={"Accept": "text/html"})
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
    # the page script's JSON and stream requests keep machine-readable answers
    r = client.get(f"/dashboard/jobs/{uuid.uuid4()}/events", headers={"Accept": "application/json"})
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json")
