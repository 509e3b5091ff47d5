"""Standard Webhooks signatures, checked with the `standardwebhooks` package's own verifier."""

import time
from datetime import datetime, timezone

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from qaas.webhooks.signing import generate_secret, sign, signature_headers

BODY = b'{"type":"job.succeeded","data":{"id":"job_1"}}'


def test_generated_secret_shape():
    s = generate_secret()
    assert s.startswith("whsec_") and len(s) > 40 and generate_secret() != s
    assert len(Webhook(s)._whsecret) == 32  # the reference decodes it to the 32 random bytes
    with pytest.raises(ValueError):
        generate_secret(16)


def test_reference_verifies_our_headers():
    secret = generate_secret()
    headers = signature_headers(secret, "msg_2Kx", BODY)
    assert headers["webhook-id"] == "msg_2Kx" and abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert headers["webhook-signature"].startswith("v1,")
    Webhook(secret).verify(BODY, headers)


def test_signature_is_the_hmac_of_id_timestamp_and_body():
    # An independent computation of the spec's signed content, so that a change of library cannot pass unseen.
    import base64
    import hashlib
    import hmac

    secret = generate_secret()
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(hmac.new(key, b"msg_1.1700000000." + BODY, hashlib.sha256).digest()).decode()
    assert sign(secret, "msg_1", 1_700_000_000, BODY) == "v1," + expected


def test_rotation_two_signatures_each_secret_verifies():
    old, new = generate_secret(), generate_secret()
    headers = signature_headers([new, old], "msg_rot", BODY)
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(BODY, headers)
    Webhook(new).verify(BODY, headers)
    with pytest.raises(ValueError):
        sign([], "msg_rot", 1, BODY)


def test_tampering_a_wrong_secret_and_an_old_timestamp_are_rejected():
    secret = generate_secret()
    headers = signature_headers(secret, "msg_x", BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY + b" ", headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(BODY, {**headers, "webhook-id": "other"})
    stale = signature_headers(secret, "msg_x", BODY, timestamp=int(time.time()) - 3600)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(BODY, stale)
    assert datetime.fromtimestamp(int(stale["webhook-timestamp"]), timezone.utc) < datetime.now(timezone.utc)
