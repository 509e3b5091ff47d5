"""SSRF-safe outbound HTTP for user-supplied URLs (webhooks).

The URL's host is resolved at request time and EVERY address it resolves to is checked; then the connection
is made to the checked address itself (no second resolution: a DNS-rebinding answer cannot slip in between
the check and the connect), with the original `Host` header, and for https the original hostname as TLS SNI
and as the name the certificate is verified against. No redirects, no proxies from the environment, a
timeout, and a cap on how much of the response is read.

Refused unless the operator allow-list names them (hosts, IPs or CIDRs, e.g. `QAAS_WEBHOOK_ALLOWLIST`):
non-http(s) schemes; unspecified, loopback, private, shared (CGNAT), link-local (169.254.169.254 = cloud
metadata), multicast, reserved, documentation and other non-global addresses; and IPv6 forms that embed
such an IPv4 address (IPv4-mapped, IPv4-compatible, 6to4, Teredo, NAT64). Numeric host tricks
(`http://2130706433/`, `0177.0.0.1`, `0x7f.1`) are caught because the check is on resolved addresses.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024


class UnsafeDestination(Exception):
    """The URL may not be requested. `reason` says why (safe to show to the user who gave the URL)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ResolutionError(Exception):
    """The host did not resolve (may be transient)."""


@dataclass(frozen=True)
class Allowlist:
    hosts: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, value: str | Iterable[str] | Allowlist | None) -> Allowlist:
        """From `"127.0.0.1, 10.0.0.0/8, hooks.internal"` or a list of such entries."""
        if isinstance(value, Allowlist):
            return value
        if value is None:
            return cls()
        items = value.split(",") if isinstance(value, str) else list(value)
        hosts, nets = set(), []
        for raw in items:
            item = raw.strip()
            if not item:
                continue
            try:
                nets.append(ipaddress.ip_network(item.strip("[]"), strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(nets))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_ip(self, ip: IPAddress) -> bool:
        return any(ip.version == n.version and ip in n for n in self.networks)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    out = []
    if ip.ipv4_mapped is not None:
        out.append(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        out.append(ip.sixtofour)
    if ip.teredo is not None:
        out.extend(ip.teredo)
    if any(ip in n for n in _NAT64):
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.packed[:12] == bytes(12) and int(ip) > 1:  # deprecated IPv4-compatible ::a.b.c.d
        out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def unsafe_reason(ip: IPAddress) -> str | None:
    """Why connecting to `ip` is refused, or None when it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return f"scoped IPv6 address {ip}"
        for v4 in _embedded_ipv4(ip):
            inner = unsafe_reason(v4)
            if inner is not None:
                return f"{inner}, embedded in IPv6 address {ip}"
    if ip.is_unspecified:
        return f"unspecified address {ip}"
    if ip.is_loopback:
        return f"loopback address {ip}"
    if ip in _METADATA:
        return f"cloud metadata address {ip}"
    if ip.is_link_local:
        return f"link-local address {ip}"
    if ip.is_multicast:
        return f"multicast address {ip}"
    if ip.is_reserved:
        return f"reserved address {ip}"
    if ip.is_private:
        return f"private address {ip}"
    if not ip.is_global:
        return f"non-public address {ip}"
    return None


def resolve_host(host: str, port: int) -> list[str]:
    """All addresses of `host` (the system resolver). Tests monkeypatch this."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise ResolutionError(f"cannot resolve {host}: {e}") from None
    return list(dict.fromkeys(info[4][0] for info in infos))


@dataclass(frozen=True)
class Destination:
    scheme: str
    host: str  # as written in the URL (lowercased), for Host and SNI
    port: int
    ip: IPAddress  # the checked address to connect to
    path: str  # path + query
    host_is_ip: bool


def check_url(
    url: str,
    allowlist: str | Iterable[str] | Allowlist | None = None,
    *,
    resolver: Resolver | None = None,
) -> Destination:
    """Resolve and check `url`; return where to connect, or raise UnsafeDestination / ResolutionError."""
    allow = Allowlist.parse(allowlist)
    try:
        parts = urlsplit(url.strip())
        port_in_url = parts.port
    except ValueError as e:
        raise UnsafeDestination(f"invalid URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeDestination(f"scheme {scheme or '(none)'!r} is not allowed: only http and https")
    if parts.username is not None or parts.password is not None:
        raise UnsafeDestination("URLs with credentials are not accepted")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise UnsafeDestination("URL has no host")
    port = port_in_url or (443 if scheme == "https" else 80)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host.split("%", 1)[0] if "%" in host else host)
    except ValueError:
        literal = None
    if literal is not None and "%" in host:
        raise UnsafeDestination(f"scoped IPv6 address {host}")

    addresses = [literal] if literal is not None else [
        ipaddress.ip_address(a.split("%", 1)[0]) if "%" not in a else _scoped(a)
        for a in (resolver or resolve_host)(host, port)
    ]
    if not addresses:
        raise ResolutionError(f"cannot resolve {host}: no addresses")
    host_allowed = allow.allows_host(host)
    for ip in addresses:
        reason = unsafe_reason(ip)
        if reason is not None and not host_allowed and not allow.allows_ip(ip):
            via = "" if literal is not None else f" ({host} resolves to it)"
            raise UnsafeDestination(f"{reason}{via} is not allowed")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Destination(scheme, host, port, addresses[0], path, literal is not None)


def _scoped(addr: str) -> IPAddress:
    return ipaddress.IPv6Address(addr)  # keeps the scope id, which unsafe_reason refuses


@dataclass
class SafeResponse:
    status_code: int
    headers: httpx.Headers
    content: bytes  # at most max_response_bytes
    truncated: bool
    ip: str
    elapsed_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def safe_request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
    allowlist: str | Iterable[str] | Allowlist | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    resolver: Resolver | None = None,
    verify: Any = True,
    transport: httpx.BaseTransport | None = None,
) -> SafeResponse:
    """One request to a checked, pinned address. Redirects are returned as they are, never followed.

    Raises UnsafeDestination, ResolutionError, or httpx.TimeoutException / httpx.TransportError.
    `timeout` bounds connect, each read, and the whole body read.
    """
    dest = check_url(url, allowlist, resolver=resolver)
    ip_text = f"[{dest.ip}]" if dest.ip.version == 6 else str(dest.ip)
    pinned = f"{dest.scheme}://{ip_text}:{dest.port}{dest.path}"
    default_port = 443 if dest.scheme == "https" else 80
    host_header = f"[{dest.host}]" if dest.host_is_ip and dest.ip.version == 6 else dest.host
    if dest.port != default_port:
        host_header += f":{dest.port}"
    req_headers = {k: v for k, v in (headers or {}).items() if k.lower() != "host"}
    req_headers["Host"] = host_header
    req_headers.setdefault("Accept-Encoding", "identity")  # the excerpt we keep should be readable text
    extensions = {"sni_hostname": dest.host} if dest.scheme == "https" and not dest.host_is_ip else {}

    start = time.monotonic()
    with httpx.Client(trust_env=False, follow_redirects=False, verify=verify, timeout=timeout, transport=transport) as client:
        with client.stream(method, pinned, headers=req_headers, content=content, extensions=extensions) as resp:
            body, truncated = bytearray(), False
            for chunk in resp.iter_raw():
                body += chunk
                if len(body) >= max_response_bytes:
                    truncated = True  # stop reading: the rest is not ours to buffer
                    del body[max_response_bytes:]
                    break
                if time.monotonic() - start > timeout:
                    raise httpx.ReadTimeout("response body exceeded the time limit")
            return SafeResponse(resp.status_code, resp.headers, bytes(body), truncated, str(dest.ip), time.monotonic() - start)
