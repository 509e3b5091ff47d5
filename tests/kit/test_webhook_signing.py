"""Our signer against the independent `standardwebhooks` implementation, both ways."""

import time
from datetime import datetime, timezone

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from qaas.kit.webhook_signing import InvalidSignature, generate_secret, sign, signature_headers, verify

BODY = b'{"type":"job.succeeded","data":{"id":"job_1"}}'


def test_generated_secret_shape():
    s = generate_secret()
    assert s.startswith("whsec_") and len(s) > 40 and generate_secret() != s
    Webhook(s)  # accepted by the reference implementation


def test_reference_verifies_our_signature():
    secret = generate_secret()
    headers = signature_headers(secret, "msg_2Kx", BODY)
    assert headers["webhook-signature"].startswith("v1,")
    Webhook(secret).verify(BODY, headers)


def test_same_bytes_as_reference_signer():
    secret = generate_secret()
    ts = 1_700_000_000
    ref = Webhook(secret).sign("msg_1", datetime.fromtimestamp(ts, tz=timezone.utc), BODY.decode())
    assert sign(secret, "msg_1", ts, BODY) == ref


def test_rotation_two_signatures_each_secret_verifies():
    old, new = generate_secret(), generate_secret()
    headers = signature_headers([old, new], "msg_rot", BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(BODY, headers)
    Webhook(new).verify(BODY, headers)
    verify(new, headers, BODY)


def test_tampering_and_wrong_secret_rejected():
    secret = generate_secret()
    headers = signature_headers(secret, "msg_x", BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY + b" ", headers)
    with pytest.raises(InvalidSignature):
        verify(generate_secret(), headers, BODY)
    with pytest.raises(InvalidSignature):
        verify(secret, {**headers, "webhook-id": "other"}, BODY)


def test_we_verify_reference_signatures_and_check_time():
    secret = generate_secret()
    ts = int(time.time())
    sig = Webhook(secret).sign("msg_ref", datetime.fromtimestamp(ts, tz=timezone.utc), BODY.decode())
    headers = {"Webhook-Id": "msg_ref", "Webhook-Timestamp": str(ts), "Webhook-Signature": f"v1a,xxx {sig}"}
    verify(secret, headers, BODY)
    with pytest.raises(InvalidSignature, match="tolerance"):
        verify(secret, headers, BODY, now=ts + 3600)
    with pytest.raises(InvalidSignature, match="missing"):
        verify(secret, {}, BODY)
