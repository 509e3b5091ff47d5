"""One delivery attempt against a real loopback receiver, and the retry schedule."""

import json
import socket
import time
from datetime import datetime, timezone
from email.utils import format_datetime

import pytest
from standardwebhooks import Webhook

from qaas.kit import ssrf
from qaas.webhooks.delivery import (
    EXHAUSTED,
    FAILED,
    GONE,
    MAX_ATTEMPTS,
    RETRY,
    RETRY_SCHEDULE_S,
    SUCCESS,
    build_body,
    deliver_once,
    next_retry_delay,
    parse_retry_after,
    retry_delay,
    total_schedule_s,
)
from qaas.webhooks.signing import generate_secret

EVENT_TIME = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)
PAYLOAD = {"job_id": "job_1", "status": "succeeded", "result": {"repo_id": "alice/m", "commit_sha": "abc"}}


def send(url, secrets, attempt=1, **kw):
    return deliver_once(url, secrets, "msg_01", "job.succeeded", PAYLOAD, allowlist="127.0.0.1", attempt=attempt,
                        event_time=EVENT_TIME, rng=lambda: 0.5, **kw)


def test_signed_delivery_verifies_with_reference_implementation(receiver):
    secret = generate_secret()
    r = send(receiver.url + "/hook", secret)
    assert r.outcome == SUCCESS and r.status_code == 200 and r.response_excerpt == "ok" and r.next_retry_s is None
    got = receiver.received[0]
    assert got.headers["content-type"] == "application/json" and got.headers["webhook-id"] == "msg_01"
    Webhook(secret).verify(got.body, got.headers)
    body = json.loads(got.body)
    assert body == {"type": "job.succeeded", "timestamp": "2026-11-22T12:00:00Z", "data": PAYLOAD}


def test_rotation_signs_with_both_secrets(receiver):
    old, new = generate_secret(), generate_secret()
    send(receiver.url, [old, new])
    got = receiver.received[0]
    Webhook(old).verify(got.body, got.headers)
    Webhook(new).verify(got.body, got.headers)


def test_500_then_200_same_event(receiver):
    receiver.respond((500, {}, b"boom"), (200, {}, b"thanks"))
    secret = generate_secret()
    first = send(receiver.url, secret, attempt=1)
    assert first.outcome == RETRY and first.status_code == 500 and first.response_excerpt == "boom"
    assert first.next_retry_s == RETRY_SCHEDULE_S[0]  # rng 0.5 = no jitter
    second = send(receiver.url, secret, attempt=2)
    assert second.outcome == SUCCESS
    a, b = receiver.received
    assert a.headers["webhook-id"] == b.headers["webhook-id"] == "msg_01" and a.body == b.body
    Webhook(secret).verify(b.body, b.headers)


def test_410_disables(receiver):
    receiver.respond(410)
    r = send(receiver.url, generate_secret())
    assert r.outcome == GONE and r.done


def test_429_honours_retry_after(receiver):
    receiver.respond((429, {"Retry-After": "3600"}, b"slow down"))
    r = send(receiver.url, generate_secret())
    assert r.outcome == RETRY and r.next_retry_s == 3600


def test_429_retry_after_http_date(receiver):
    when = format_datetime(datetime.fromtimestamp(time.time() + 7200, tz=timezone.utc), usegmt=True)
    receiver.respond((503, {"Retry-After": when}, b""))
    r = send(receiver.url, generate_secret(), attempt=2)
    assert r.outcome == RETRY and 7100 < r.next_retry_s <= 7200


def test_redirect_is_a_final_failure_and_not_followed(receiver):
    receiver.respond((301, {"Location": "http://169.254.169.254/latest"}, b""))
    r = send(receiver.url, generate_secret())
    assert r.outcome == FAILED and "not followed" in r.error and len(receiver.received) == 1


def test_other_4xx_is_final(receiver):
    receiver.respond((400, {}, b"bad"))
    r = send(receiver.url, generate_secret())
    assert r.outcome == FAILED and r.status_code == 400 and r.error == "HTTP 400"


def test_unsafe_destination_is_final_with_reason(monkeypatch):
    monkeypatch.setattr(ssrf, "resolve_host", lambda host, port: ["10.0.0.7"])
    r = deliver_once("https://internal.example/hook", generate_secret(), "m", "job.failed", {}, allowlist="127.0.0.1")
    assert r.outcome == FAILED and r.status_code is None
    assert r.error == "unsafe destination: private address 10.0.0.7 (internal.example resolves to it) is not allowed"


def test_receiver_down_is_retried():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    r = send(f"http://127.0.0.1:{port}/", generate_secret(), attempt=3)
    assert r.outcome == RETRY and r.status_code is None and "connection error" in r.error
    assert r.next_retry_s == RETRY_SCHEDULE_S[2]


def test_timeout_is_retried():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)  # accepts the TCP connection, never answers
        r = send(f"http://127.0.0.1:{srv.getsockname()[1]}/", generate_secret(), timeout=0.3)
    assert r.outcome == RETRY and r.error.startswith("timeout")


def test_last_attempt_exhausts(receiver):
    receiver.respond(503)
    r = send(receiver.url, generate_secret(), attempt=MAX_ATTEMPTS)
    assert r.outcome == EXHAUSTED and r.next_retry_s is None and r.done


def test_schedule_is_exponential_ish_and_about_three_days():
    assert list(RETRY_SCHEDULE_S[:8]) == [5, 300, 1800, 7200, 18000, 36000, 50400, 72000]
    assert 2.5 * 86400 < total_schedule_s() <= 3 * 86400
    assert retry_delay(1, rng=lambda: 0.0) == pytest.approx(4.0) and retry_delay(1, rng=lambda: 1.0) == pytest.approx(6.0)
    assert retry_delay(0) is None and retry_delay(MAX_ATTEMPTS) is None
    assert next_retry_delay(1, retry_after=10**9, rng=lambda: 0.5) == 86400  # capped
    assert next_retry_delay(4, retry_after=1, rng=lambda: 0.5) == 7200  # never earlier than the schedule


def test_parse_retry_after():
    assert parse_retry_after("120") == 120
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Sun, 22 Nov 2026 12:00:10 GMT", now=EVENT_TIME.timestamp()) == 10


def test_body_is_stable_for_the_same_event():
    assert build_body("job.succeeded", PAYLOAD, EVENT_TIME) == build_body("job.succeeded", PAYLOAD, EVENT_TIME)
