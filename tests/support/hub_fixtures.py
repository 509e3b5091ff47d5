"""Pytest fixtures that run the fake Hub (`tests/support/fake_hub.py`) on loopback.

`fake_hub` starts a fresh, empty Hub on a free port for each test and points `huggingface_hub` at it:
`HF_ENDPOINT` (env and the already-imported `huggingface_hub.constants`), `HF_HUB_DISABLE_XET=1` (plain LFS
uploads), and a private `HF_HOME` / hub cache under the test's tmp_path so no real token or cache leaks in.
It yields a `FakeHubServer`: `.url`, and `.hub` (the `FakeHub`: tokens, repos, `fail()`, `drop()`,
`count()`, `create_repo()`, `read_file()`). `fake_hub_url` yields only the URL.

Tokens known to every fresh Hub (user `alice` may also write to org `qaas-org`):
WRITE_TOKEN (alice, write), READ_TOKEN (alice, read), OTHER_TOKEN (bob, write).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.fake_hub import FakeHub, FakeHubServer

WRITE_TOKEN = "hf_test_alice_write_0123456789abcdef"
READ_TOKEN = "hf_test_alice_read_0123456789abcdef"
OTHER_TOKEN = "hf_test_bob_write_0123456789abcdef"


def new_fake_hub(**kwargs) -> FakeHub:
    hub = FakeHub(**kwargs)
    hub.add_token(WRITE_TOKEN, "alice", "write", orgs=("qaas-org",))
    hub.add_token(READ_TOKEN, "alice", "read")
    hub.add_token(OTHER_TOKEN, "bob", "write")
    return hub


def point_huggingface_hub_at(url: str, monkeypatch: pytest.MonkeyPatch, home: str) -> None:
    """Make huggingface_hub (already imported or not) talk to `url` with plain LFS and a private cache."""
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HOME", home)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", f"{home}/hub")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", f"{home}/token")
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", f"{home}/stored_tokens")
    close_session()  # drop keep-alive connections to a previous test's server


@pytest.fixture
def fake_hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHubServer]:
    server = FakeHubServer(new_fake_hub()).start()
    point_huggingface_hub_at(server.url, monkeypatch, str(tmp_path_factory.mktemp("hf_home")))
    try:
        yield server
    finally:
        server.stop()
        from huggingface_hub.utils import close_session

        close_session()


@pytest.fixture
def fake_hub_url(fake_hub: FakeHubServer) -> str:
    return fake_hub.url
