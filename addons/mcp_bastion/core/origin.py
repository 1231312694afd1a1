"""
DNS-rebinding protection (MCP transport spec: servers MUST validate `Origin`).

In reverse mode the gateway rewrites `Host` to the upstream's, so the upstream
can no longer see what the browser asked for; the gateway checks instead.
Patterns are `host`, `host:port` or `host:*`; for origins, `scheme://host[:port]`
with the same `*` for the port. Matching is exact and case-insensitive.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

DEFAULT_HOSTS = ("localhost:*", "127.0.0.1:*", "[::1]:*")
DEFAULT_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*")


def _split_hostport(value: str) -> tuple[str, str | None]:
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"bad host {value!r}")
        host, rest = value[: end + 1], value[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad host {value!r}")
        return host, rest[1:] if rest else None
    host, sep, port = value.rpartition(":")
    if not sep:
        return value, None
    return host, port


def host_allowed(host_header: str | None, patterns: Iterable[str]) -> bool:
    if not host_header:
        return False
    try:
        host, port = _split_hostport(host_header)
    except ValueError:
        return False
    for pattern in patterns:
        p_host, p_port = _split_hostport(pattern)
        if p_host not in (host, "*"):
            continue
        if p_port == "*" or p_port == port:
            return True
    return False


def origin_allowed(origin: str | None, patterns: Iterable[str]) -> bool:
    """An absent Origin (non-browser client) is allowed; `null` and unknown origins are not."""
    if origin is None:
        return True
    origin = origin.strip().lower()
    if origin == "null":
        return False
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if not parts.scheme or not parts.netloc or parts.path not in ("", "/") or parts.query or parts.fragment:
        return False
    for pattern in patterns:
        pp = urlsplit(pattern.strip().lower())
        if pp.scheme != parts.scheme:
            continue
        if host_allowed(parts.netloc, [pp.netloc]):
            return True
    return False


def validate_patterns(patterns: Iterable[str], origins: bool) -> None:
    """Raise ValueError for a pattern that could never match (caught at configure time)."""
    for p in patterns:
        if origins:
            parts = urlsplit(p.strip().lower())
            if (
                parts.scheme not in ("http", "https")
                or not parts.netloc
                or parts.path not in ("", "/")
                or parts.query
                or parts.fragment
            ):
                raise ValueError(f"origin pattern {p!r} must look like scheme://host[:port]")
            _check_hostport(parts.netloc, p)
        else:
            _check_hostport(p, p)


def _check_hostport(value: str, pattern: str) -> None:
    if not value or any(c in value for c in "/@ \t?#"):
        raise ValueError(f"host pattern {pattern!r} must look like host[:port]")
    host, port = _split_hostport(value)
    if not host or (":" in host and not host.startswith("[")):
        raise ValueError(f"host pattern {pattern!r} must look like host[:port] ([v6 address] in brackets)")
    if not (port is None or port == "*" or (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"pattern {pattern!r}: port must be a number or *")
