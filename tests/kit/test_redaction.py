"""The one redaction (`qaas.kit.redaction.redact`): known secrets, and anything shaped like one."""

from qaas.kit.redaction import redact
from qaas.security import generate_api_key


def test_known_secrets_are_replaced_wherever_they_appear():
    token = "my-own-token-without-a-known-shape"
    assert redact(f"401 for {token}; retry with {token}", token, None, "") == "401 for ***; retry with ***"


def test_api_keys_and_hub_tokens_nobody_named_are_cut_to_their_prefix():
    key = generate_api_key()
    text = f"Authorization: Bearer {key} and token=hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"
    assert redact(text) == "Authorization: Bearer qaas_*** and token=hf_***"


def test_ordinary_words_with_those_prefixes_are_left_alone():
    text = "hf_token, hf_token_encrypted and qaas_jobs_retried are names, not secrets"
    assert redact(text) == text
