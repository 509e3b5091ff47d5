"""API keys (stored only as a keyed hash) and encryption of Hub tokens at rest.

API keys are 256-bit random strings, so a fast keyed hash (HMAC-SHA256 under the server secret)
is enough: there is nothing to brute-force, and lookups stay one indexed equality per request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from cryptography.fernet import Fernet, InvalidToken

KEY_PREFIX = "qaas_"


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str, secret_key: str) -> str:
    return hmac.new(secret_key.encode(), key.encode(), hashlib.sha256).hexdigest()


def key_display_prefix(key: str) -> str:
    return key[: len(KEY_PREFIX) + 6]


def _fernet(secret_key: str) -> Fernet:
    # Derive a separate key for encryption so the hashing key and the encryption key differ.
    derived = hmac.new(secret_key.encode(), b"qaas-token-encryption-v1", hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(derived))


def encrypt_secret(value: str, secret_key: str) -> bytes:
    return _fernet(secret_key).encrypt(value.encode())


def decrypt_secret(token: bytes, secret_key: str) -> str:
    try:
        return _fernet(secret_key).decrypt(token).decode()
    except InvalidToken as exc:  # the server secret changed since it was stored
        raise ValueError("stored secret cannot be decrypted with the current QAAS_SECRET_KEY") from exc
