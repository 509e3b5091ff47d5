"""Who may do what: no key, bad key, revoked key, another tenant's ids, and rate limiting per key."""

from __future__ import annotations

import re
import time
import uuid

import pytest
from conftest import STORIES, auth, make_settings, new_key
from fastapi.testclient import TestClient

from qaas.db.models import WebhookDelivery
from qaas.db.session import session_scope

NF4 = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
JOB = {"model": {"path": str(STORIES)}, "quantization_config": NF4}
ZERO = "00000000-0000-0000-0000-000000000000"

ROUTES = [
    ("get", "/v1/jobs"), ("post", "/v1/jobs"), ("get", f"/v1/jobs/{ZERO}"), ("post", f"/v1/jobs/{ZERO}/cancel"),
    ("get", f"/v1/jobs/{ZERO}/events"), ("get", f"/v1/jobs/{ZERO}/events?stream=true"),
    ("get", f"/v1/jobs/{ZERO}/files/config.json"), ("get", f"/v1/jobs/{ZERO}/deliveries"),
    ("post", f"/v1/jobs/{ZERO}/deliveries/{ZERO}/redeliver"), ("get", "/v1/webhooks"), ("post", "/v1/webhooks"),
    ("delete", f"/v1/webhooks/{ZERO}"), ("post", f"/v1/webhooks/{ZERO}/rotate-secret"),
    ("get", "/v1/hub-token"), ("put", "/v1/hub-token"), ("delete", "/v1/hub-token"),
]


def _call(client, method, path, headers):
    kw = {"json": JOB} if method in ("post", "put") else {}
    return client.request(method.upper(), path, headers=headers, **kw)


def _is_401(r, secret: str | None = None):
    assert r.status_code == 401, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
    if secret:
        assert secret not in r.text and secret[5:15] not in r.text


@pytest.mark.parametrize("method, path", ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_every_route_needs_a_valid_unrevoked_key(client, settings, method, path):
    from qaas.keys import revoke_keys
    from qaas.security import generate_api_key, key_display_prefix

    _is_401(_call(client, method, path, {}))
    _is_401(_call(client, method, path, {"Authorization": "Bearer"}))
    _is_401(_call(client, method, path, {"Authorization": "Token abc"}))
    forged = generate_api_key()  # well-formed, never issued
    _is_401(_call(client, method, path, auth(forged)), forged)
    _is_401(_call(client, method, path, auth("qaas_" + "A" * 5000)))  # absurdly long
    _is_401(_call(client, method, path, {"Authorization": b"Bearer qaas_\xc3\xa9\xc3\xa9"}))  # non-ASCII
    revoked = new_key(settings, "rita", name=f"r-{uuid.uuid4().hex[:6]}")
    with session_scope(settings.resolved_database_url) as s:
        revoke_keys(s, key_display_prefix(revoked))
    _is_401(_call(client, method, path, auth(revoked)), revoked)


def test_another_tenants_ids_are_404_everywhere(client, settings, api_key, other_key):
    mine = client.post("/v1/jobs", json={**JOB, "webhook": {"url": "https://example.com/hook"}}, headers=auth(api_key))
    assert mine.status_code == 202, mine.text
    jid = mine.json()["id"]
    with session_scope(settings.resolved_database_url) as s:
        delivery = WebhookDelivery(id=uuid.uuid4(), job_id=uuid.UUID(jid), owner="alice", url="https://example.com/hook",
                                   msg_id="msg_" + uuid.uuid4().hex, event_type="job.succeeded", payload={},
                                   status="failed", attempts=1)
        s.add(delivery)
        did = str(delivery.id)
    hook = client.post("/v1/webhooks", json={"url": "https://example.com/account"}, headers=auth(api_key)).json()["id"]
    theirs = auth(other_key)
    for method, path in [
        ("get", f"/v1/jobs/{jid}"), ("post", f"/v1/jobs/{jid}/cancel"), ("get", f"/v1/jobs/{jid}/events"),
        ("get", f"/v1/jobs/{jid}/events?stream=true"), ("get", f"/v1/jobs/{jid}/files/config.json"),
        ("get", f"/v1/jobs/{jid}/deliveries"), ("post", f"/v1/jobs/{jid}/deliveries/{did}/redeliver"),
        ("delete", f"/v1/webhooks/{hook}"), ("post", f"/v1/webhooks/{hook}/rotate-secret"),
    ]:
        r = client.request(method.upper(), path, headers=theirs)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")
    assert jid not in client.get("/v1/jobs", headers=theirs).text
    assert hook not in client.get("/v1/webhooks", headers=theirs).text
    # the owner still sees everything untouched
    assert client.get(f"/v1/jobs/{jid}", headers=auth(api_key)).json()["status"] == "queued"
    assert [h["id"] for h in client.get("/v1/webhooks", headers=auth(api_key)).json()] == [hook]

    # the dashboard, signed in as the other tenant
    page = client.get("/dashboard/login")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    origin = {"Origin": "http://testserver"}
    r = client.post("/dashboard/login", data={"api_key": other_key, "csrf_token": csrf, "next": "/dashboard/jobs"},
                    headers=origin, follow_redirects=False)
    assert r.status_code == 303
    listing = client.get("/dashboard/jobs")
    assert jid not in listing.text
    for path in (f"/dashboard/jobs/{jid}", f"/dashboard/jobs/{jid}/live", f"/dashboard/jobs/{jid}/events",
                 f"/dashboard/jobs/{jid}/files/config.json"):
        assert client.get(path).status_code == 404, path
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', listing.text).group(1)
    for action in ("cancel", "retry"):
        r = client.post(f"/dashboard/jobs/{jid}/{action}", data={"csrf_token": csrf}, headers=origin,
                        follow_redirects=False)
        assert r.status_code == 404, (action, r.status_code)
    assert client.get(f"/v1/jobs/{jid}", headers=auth(api_key)).json()["status"] == "queued"


def _limited_client(tmp_path, database_url, broker_url, per_minute=60, burst=3):
    from qaas.api.app import create_app

    s = make_settings(tmp_path, database_url=database_url, broker_url=broker_url, rate_limit_per_minute=per_minute,
                      rate_limit_burst=burst)
    return s, TestClient(create_app(s), raise_server_exceptions=False)


def _check_429(r, per_minute=60):
    assert r.status_code == 429, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    assert int(r.headers["retry-after"]) >= 1
    p = r.json()
    assert p["status"] == 429 and str(per_minute) in p["detail"]


def test_rate_limit_per_key_in_redis_is_shared_by_api_processes(tmp_path, clean_db, redis_db):
    s, one = _limited_client(tmp_path, clean_db, redis_db)
    _, two = _limited_client(tmp_path, clean_db, redis_db)  # another API process, same Redis
    a, b = new_key(s, "alice"), new_key(s, "bob")
    with one, two:
        assert [one.get("/v1/jobs", headers=auth(a)).status_code for _ in range(2)] == [200, 200]
        assert two.get("/v1/jobs", headers=auth(a)).status_code == 200  # the third token, from the shared bucket
        _check_429(two.get("/v1/jobs", headers=auth(a)))
        _check_429(one.post("/v1/jobs", json=JOB, headers=auth(a)))
        assert one.get("/v1/jobs", headers=auth(b)).status_code == 200  # other keys are unaffected
        assert one.get("/healthz").status_code == 200 and one.get("/metrics").status_code == 200  # not limited
        # unknown keys are limited too, before they cost a database lookup
        forged = "qaas_" + "x" * 43
        assert [one.get("/v1/jobs", headers=auth(forged)).status_code for _ in range(3)] == [401, 401, 401]
        _check_429(one.get("/v1/jobs", headers=auth(forged)))
        time.sleep(1.1)  # 1 token per second refills
        assert one.get("/v1/jobs", headers=auth(a)).status_code == 200


def test_rate_limit_in_process_without_redis_and_when_redis_is_down(tmp_path, clean_db):
    s, c = _limited_client(tmp_path, clean_db, "")  # embedded broker: buckets live in the process
    key = new_key(s, "alice")
    with c:
        assert [c.get("/v1/jobs", headers=auth(key)).status_code for _ in range(3)] == [200, 200, 200]
        _check_429(c.get("/v1/jobs", headers=auth(key)))
    s, c = _limited_client(tmp_path, clean_db, "redis://127.0.0.1:1/0")  # Redis unreachable: fall back, stay up
    with c:
        codes = [c.get("/v1/jobs", headers=auth(key)).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
