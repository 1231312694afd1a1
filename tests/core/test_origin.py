"""Host and Origin allow-lists (DNS-rebinding protection), pure logic."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_bastion.core.origin import (
    DEFAULT_HOSTS,
    DEFAULT_ORIGINS,
    host_allowed,
    origin_allowed,
    validate_patterns,
)


@pytest.mark.parametrize(
    "host",
    ["localhost:8080", "LOCALHOST:1", "127.0.0.1:443", "[::1]:3000", "[::1]", "localhost", "127.0.0.1"],
)
def test_default_hosts_accept_loopback_names_with_any_port(host):
    assert host_allowed(host, DEFAULT_HOSTS)


@pytest.mark.parametrize(
    "host",
    [
        None,
        "",
        "evil.example.com",
        "evil.example.com:8080",
        "localhost.evil.example.com:8080",
        "127.0.0.1.nip.io:8080",
        "localhost.:8080",  # the same name to DNS, but not what a local client sends
        "[::2]:8080",
        "[::1:8080",
        "user@localhost:8080",
    ],
)
def test_default_hosts_refuse_everything_else(host):
    assert not host_allowed(host, DEFAULT_HOSTS)


def test_port_rules():
    assert host_allowed("mcp.example.com:8443", ["mcp.example.com:8443"])
    assert not host_allowed("mcp.example.com:8444", ["mcp.example.com:8443"])
    assert host_allowed("mcp.example.com", ["mcp.example.com"])
    # a pattern without port means "no port in the Host header"
    assert not host_allowed("mcp.example.com:8443", ["mcp.example.com"])
    assert not host_allowed("mcp.example.com", ["mcp.example.com:443"])


def test_wildcards():
    assert host_allowed("anything.example:1", ["*:*"])
    assert host_allowed("anything.example", ["*"])
    assert not host_allowed("anything.example:1", ["*"])


def test_no_patterns_allow_nothing():
    assert not host_allowed("localhost:1", [])
    assert not origin_allowed("http://localhost:1", [])


@pytest.mark.parametrize(
    "origin", ["http://localhost:6274", "http://127.0.0.1:1", "http://[::1]:8080", "HTTP://LocalHost:1", "http://localhost:1/"]
)
def test_default_origins_accept_local_pages(origin):
    assert origin_allowed(origin, DEFAULT_ORIGINS)


@pytest.mark.parametrize(
    "origin",
    [
        "null",
        "",
        "https://localhost:6274",  # scheme is part of the origin
        "http://evil.example.com",
        "http://localhost.evil.example.com:1",
        "http://localhost:1/path",
        "http://localhost:1?x=1",
        "http://localhost:1#frag",
        "http://user@localhost:1",
        "localhost:1",
        "file://",
    ],
)
def test_default_origins_refuse_everything_else(origin):
    assert not origin_allowed(origin, DEFAULT_ORIGINS)


def test_absent_origin_is_a_non_browser_client():
    assert origin_allowed(None, [])


@pytest.mark.parametrize(
    "patterns,origins",
    [
        (["localhost:*", "mcp.example.com", "[::1]:8080", "*:*", "10.0.0.1:443"], False),
        (["http://localhost:*", "https://app.example.com", "https://app.example.com:8443/"], True),
    ],
)
def test_valid_patterns(patterns, origins):
    validate_patterns(patterns, origins=origins)


@pytest.mark.parametrize(
    "pattern",
    ["", "http://localhost", "localhost:abc", "localhost:0", "localhost:70000", "::1", "::1:8080", "[::1",
     "a/b", "user@host", "host name"],
)
def test_host_patterns_that_could_never_match_are_refused(pattern):
    with pytest.raises(ValueError):
        validate_patterns([pattern], origins=False)


@pytest.mark.parametrize(
    "pattern",
    ["localhost:8080", "ftp://localhost", "http://", "http://localhost/app", "http://localhost:x",
     "http://localhost?q", "http://u@localhost"],
)
def test_origin_patterns_that_could_never_match_are_refused(pattern):
    with pytest.raises(ValueError):
        validate_patterns([pattern], origins=True)


hostnames = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,3}",
                          fullmatch=True)
ports = st.integers(1, 65535)


@given(hostnames, ports)
def test_a_host_always_matches_its_own_exact_and_wildcard_pattern(host, port):
    validate_patterns([f"{host}:{port}", f"{host}:*"], origins=False)
    assert host_allowed(f"{host}:{port}", [f"{host}:{port}"])
    assert host_allowed(f"{host.upper()}:{port}", [f"{host}:*"])


@given(hostnames, ports, hostnames)
def test_a_pattern_never_matches_a_longer_name_ending_or_starting_with_it(host, port, other):
    assert not host_allowed(f"{host}.{other}:{port}", [f"{host}:*"])
    assert not host_allowed(f"{other}.{host}:{port}", [f"{host}:*"])
    assert not origin_allowed(f"http://{host}.{other}:{port}", [f"http://{host}:*"])
