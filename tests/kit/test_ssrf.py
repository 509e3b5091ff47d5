"""SSRF guard: what is refused and why, what the allow-list admits, and that connections are pinned."""

import ssl

import httpx
import pytest

from qaas.kit import ssrf
from qaas.kit.ssrf import Allowlist, UnsafeDestination, check_url, safe_request


def no_dns(host, port):
    raise AssertionError(f"unexpected DNS lookup of {host}")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/hook", "loopback"),
        ("http://127.1.2.3:8080/", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://10.0.0.5/", "private"),
        ("http://172.16.3.4/", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata"),
        ("http://169.254.10.1/", "link-local"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://[::]/", "unspecified"),
        ("http://[::ffff:127.0.0.1]/", "loopback address 127.0.0.1, embedded"),
        ("http://[::ffff:a9fe:a9fe]/", "cloud metadata address 169.254.169.254, embedded"),
        ("http://[::127.0.0.1]/", "loopback address 127.0.0.1, embedded"),
        ("http://[2002:7f00:1::]/", "loopback address 127.0.0.1, embedded"),  # 6to4
        ("http://[64:ff9b::a9fe:a9fe]/", "cloud metadata address 169.254.169.254, embedded"),  # NAT64
        ("http://[fe80::1]/", "link-local"),
        ("http://[fc00::1]/", "private"),
        ("http://224.0.0.1/", "multicast"),
        ("http://[ff02::1]/", "multicast"),
        ("http://240.0.0.1/", "reserved"),
        ("http://100.64.0.1/", "non-public"),
        ("http://2130706433/", "loopback"),  # decimal 127.0.0.1
        ("http://0177.0.0.1/", "loopback"),  # octal
        ("http://0x7f.1/", "loopback"),  # hex, short form
    ],
)
def test_refused_addresses(url, reason):
    with pytest.raises(UnsafeDestination) as e:
        check_url(url)
    assert reason in e.value.reason


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "scheme 'file'"),
        ("gopher://example.com/", "scheme 'gopher'"),
        ("ftp://example.com/", "scheme 'ftp'"),
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("//example.com/x", "scheme '(none)'"),
        ("http:///nohost", "no host"),
        ("http://user:pw@example.com/", "credentials"),
    ],
)
def test_refused_urls(url, reason):
    with pytest.raises(UnsafeDestination) as e:
        check_url(url, resolver=no_dns)
    assert reason in e.value.reason


def test_hostname_resolving_to_loopback_is_refused(monkeypatch):
    monkeypatch.setattr(ssrf, "resolve_host", lambda host, port: ["127.0.0.1"])
    with pytest.raises(UnsafeDestination) as e:
        check_url("https://rebind.attacker.example/hook")
    assert e.value.reason == "loopback address 127.0.0.1 (rebind.attacker.example resolves to it) is not allowed"


def test_any_bad_address_among_several_refuses(monkeypatch):
    monkeypatch.setattr(ssrf, "resolve_host", lambda host, port: ["93.184.216.34", "10.1.2.3"])
    with pytest.raises(UnsafeDestination, match="private address 10.1.2.3"):
        check_url("http://mixed.example/")


def test_public_address_passes_and_is_pinned():
    d = check_url("https://hooks.example.com:8443/a?b=1", resolver=lambda h, p: ["93.184.216.34"])
    assert (str(d.ip), d.port, d.host, d.path) == ("93.184.216.34", 8443, "hooks.example.com", "/a?b=1")


def test_allowlist_admits_ip_cidr_and_host(monkeypatch):
    assert str(check_url("http://127.0.0.1:9/", "127.0.0.1").ip) == "127.0.0.1"
    assert check_url("http://10.2.3.4/", Allowlist.parse("10.0.0.0/8, 192.168.0.0/16"))
    monkeypatch.setattr(ssrf, "resolve_host", lambda host, port: ["10.9.9.9"])
    assert check_url("http://hooks.internal/", ["hooks.internal"])
    with pytest.raises(UnsafeDestination):
        check_url("http://other.internal/", ["hooks.internal"])
    with pytest.raises(UnsafeDestination):  # the allow-list is exact: 127.0.0.2 is not 127.0.0.1
        check_url("http://127.0.0.2/", "127.0.0.1")


def test_request_connects_to_checked_address_not_a_second_lookup(receiver, monkeypatch):
    calls = []

    def resolver(host, port):
        calls.append(host)
        return ["127.0.0.1"] if len(calls) == 1 else ["10.0.0.1"]  # a rebinding resolver

    port = receiver.url.rsplit(":", 1)[1]
    r = safe_request("POST", f"http://hooks.test:{port}/x?y=1", content=b"hi", allowlist="127.0.0.1", resolver=resolver)
    assert r.status_code == 200 and r.ip == "127.0.0.1" and calls == ["hooks.test"]
    got = receiver.received[0]
    assert got.headers["host"] == f"hooks.test:{port}" and got.path == "/x?y=1" and got.body == b"hi"


def test_redirect_not_followed(receiver):
    receiver.respond((302, {"Location": "http://169.254.169.254/"}, b""))
    r = safe_request("GET", receiver.url + "/r", allowlist="127.0.0.1")
    assert r.status_code == 302 and len(receiver.received) == 1


def test_response_read_is_capped(receiver):
    receiver.respond((200, {}, b"x" * 200_000))
    r = safe_request("GET", receiver.url, allowlist="127.0.0.1", max_response_bytes=1000)
    assert len(r.content) == 1000 and r.truncated


def test_tls_uses_hostname_for_sni_and_certificate(tls_receiver):
    ctx = ssl.create_default_context(cafile=tls_receiver.ca_file)
    resolver = lambda host, port: ["127.0.0.1"]  # noqa: E731
    url = f"https://{tls_receiver.hostname}:{tls_receiver.port}/hook"
    r = safe_request("POST", url, content=b"{}", allowlist="127.0.0.1", resolver=resolver, verify=ctx)
    assert r.status_code == 200 and tls_receiver.receiver.received[0].headers["host"] == f"hooks.example.test:{tls_receiver.port}"
    # The certificate is checked against the URL's host, not the pinned IP: another name fails.
    with pytest.raises(httpx.ConnectError, match="(?i)certificate|hostname"):
        safe_request("POST", f"https://wrong.example.test:{tls_receiver.port}/", allowlist="127.0.0.1",
                     resolver=resolver, verify=ctx)
