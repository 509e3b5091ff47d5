"""The stored secret list of an endpoint (`qaas.webhooks.secret_list`): creation, rotation, expiry."""

from __future__ import annotations

import datetime as dt

import pytest

from qaas.webhooks import secret_list

KEY = "test-secret-key-0123456789abcdef0123456789abcdef"
T0 = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


def test_a_new_list_holds_one_secret_that_never_expires_and_is_encrypted():
    secret, blob = secret_list.new_list(KEY)
    assert secret.startswith("whsec_") and secret.encode() not in blob
    assert secret_list.valid_secrets(blob, KEY, now=T0 + dt.timedelta(days=3650)) == [secret]
    with pytest.raises(ValueError, match="QAAS_SECRET_KEY"):
        secret_list.valid_secrets(blob, "another-server-secret-0123456789abcdef")


def test_rotation_signs_with_both_for_the_grace_period_then_with_the_new_one_only():
    first, blob = secret_list.new_list(KEY)
    r1 = secret_list.rotate(blob, KEY, now=T0)
    assert r1.previous_expire_at == T0 + secret_list.ROTATION_GRACE
    assert secret_list.valid_secrets(r1.blob, KEY, now=T0 + dt.timedelta(hours=23)) == [r1.secret, first]
    assert secret_list.valid_secrets(r1.blob, KEY, now=T0 + dt.timedelta(hours=25)) == [r1.secret]
    # a second rotation inside the grace period keeps the first secret's earlier expiry, not a new 24 h
    r2 = secret_list.rotate(r1.blob, KEY, now=T0 + dt.timedelta(hours=12))
    at = T0 + dt.timedelta(hours=30)
    assert secret_list.valid_secrets(r2.blob, KEY, now=at) == [r2.secret, r1.secret]
    assert secret_list.valid_secrets(r2.blob, KEY, now=T0 + dt.timedelta(hours=37)) == [r2.secret]
    # secrets that already expired are dropped at the next rotation
    r3 = secret_list.rotate(r2.blob, KEY, now=T0 + dt.timedelta(days=5))
    assert secret_list.valid_secrets(r3.blob, KEY, now=T0 + dt.timedelta(days=5)) == [r3.secret, r2.secret]
