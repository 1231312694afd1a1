"""
DNS-rebinding protection through the real mitmdump, in front of an SDK server
that has its own Host/Origin check. In reverse mode the upstream only ever
sees its own Host (the gateway rewrites it), so the gateway must check the
client's Host and Origin itself, against its allow-list.
"""

from __future__ import annotations

import subprocess

import httpx
import pytest

from harness import free_port, gateway, mitmdump_args, sdk_server

pytestmark = pytest.mark.e2e

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
ACCEPT = {"accept": "application/json, text/event-stream"}


def initialize(url: str, **headers) -> httpx.Response:
    return httpx.post(url, json=INIT, headers={**ACCEPT, **headers}, timeout=30)


@pytest.fixture(scope="module")
def upstream():
    with sdk_server("streamable-http") as srv:
        yield srv


def test_the_upstream_checks_host_itself(upstream):
    """The baseline the gateway must not weaken: the SDK server refuses a foreign Host."""
    assert initialize(upstream.endpoint, host="evil.example.com").status_code == 421
    assert initialize(upstream.endpoint).status_code == 200


def test_default_allow_list_accepts_local_names_and_refuses_others(upstream):
    with gateway(upstream.url) as gw:
        url = f"{gw.url}/mcp"
        assert initialize(url).status_code == 200  # Host: 127.0.0.1:<gateway port>
        assert initialize(url, host=f"localhost:{gw.port}", origin=f"http://localhost:{gw.port}").status_code == 200

        refused = initialize(url, host="evil.example.com")
        assert refused.status_code == 403
        assert refused.headers["content-type"] == "application/json"
        assert refused.json()["error"]["code"] == -31005
        assert refused.json()["error"]["data"]["reason"] == "host"
        assert refused.json()["id"] is None  # refused before the body was read

        for origin in ("http://evil.example.com", "null", f"https://localhost:{gw.port}"):
            refused = initialize(url, origin=origin)
            assert refused.status_code == 403, origin
            assert refused.json()["error"]["data"]["reason"] == "origin"


def test_a_configured_public_name_reaches_an_upstream_that_only_knows_itself(upstream):
    """allowed_hosts lists the name clients use; the upstream still sees (and accepts) its own Host."""
    with gateway(upstream.url, {"allowed_hosts": ["mcp.example.com", "mcp.example.com:*"]}) as gw:
        url = f"{gw.url}/mcp"
        assert initialize(url, host="mcp.example.com").status_code == 200
        assert initialize(url, host=f"mcp.example.com:{gw.port}").status_code == 200
        assert initialize(url, host=f"localhost:{gw.port}").status_code == 403  # no longer listed
        assert initialize(url, host="mcp.example.com.evil.example").status_code == 403


def test_a_bad_allow_list_stops_the_gateway_at_start():
    port = free_port()
    args = mitmdump_args("http://127.0.0.1:1", port, {"allowed_hosts": ["http://mcp.example.com"]})
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "allowed_hosts" in done.stdout + done.stderr or "host pattern" in done.stdout + done.stderr
