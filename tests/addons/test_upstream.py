"""
UpstreamCheck: a JSON error instead of mitmproxy's HTML page when the upstream
cannot be reached. Its option handling on its own; its probes through the
shipped bundle (tests/bundled.py), with local sockets as upstreams.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.connection import Server
from mitmproxy.test import taddons

from mcp_bastion.addons.upstream import UpstreamCheck
from mcp_bastion.core import errors
from mcp_bastion.core.vocab import Meta, StageName
from mcp_bastion.glue import flowstate as fs

from bundled import Bundled, bundled, call, forwarded
from harness import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_upstream_check_forces_lazy_connections():
    check = UpstreamCheck()
    with taddons.context(Proxyserver(), check) as tctx:
        check.running()
        assert tctx.options.connection_strategy == "lazy"
        tctx.configure(check, connection_strategy="eager")
        assert tctx.options.connection_strategy == "lazy"


def reverse_to(b: Bundled, port: int, msg_id: int):
    url = f"http://127.0.0.1:{port}"
    return b.flow(body=call("ping", msg_id), mode=f"reverse:{url}", url=url)


async def test_upstream_check_answers_json_when_the_upstream_is_down():
    with bundled() as b:
        f = reverse_to(b, free_port(), 4)
        await b.request(f)
        assert f.response.status_code == 502
        body = json.loads(f.response.content)
        assert body["id"] == 4 and body["error"]["code"] == errors.UPSTREAM_ERROR
        assert body["error"]["data"]["reason"] == "upstream_unreachable"
        assert f.metadata[Meta.REFUSED]
        assert [(d["stage"], d["action"]) for d in f.metadata[Meta.DECISIONS]][-1] == (StageName.UPSTREAM, "error")
        assert "authorization" not in f.request.headers


async def test_upstream_check_connects_once_per_client_connection(monkeypatch):
    probes = []
    real_open = asyncio.open_connection

    async def counting_open(host, port):
        probes.append((host, port))
        return await real_open(host, port)

    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(asyncio, "open_connection", counting_open)
    try:
        with bundled() as b:
            check = b.addon(UpstreamCheck)
            first, second, third = reverse_to(b, port, 1), reverse_to(b, port, 2), reverse_to(b, port, 3)
            second.client_conn = third.client_conn = first.client_conn
            await b.request(first)
            await b.request(second)
            assert forwarded(first) and forwarded(second)
            assert probes == [("127.0.0.1", port)]
            check.error(second)  # a failed flow: the next request on that connection checks again
            await b.request(third)
            assert forwarded(third) and len(probes) == 2
            other = reverse_to(b, port, 4)  # another client connection
            await b.request(other)
            assert len(probes) == 3
            check.client_disconnected(first.client_conn)
            assert check._reachable == {other.client_conn.id: {("127.0.0.1", port)}}  # only its own forgotten
            gone = reverse_to(b, port, 5)  # a client that leaves while its upstream is being probed
            gone.client_conn.state = type(gone.client_conn.state)(0)  # closed
            await b.request(gone)
            assert gone.client_conn.id not in check._reachable
    finally:
        server.close()
        await server.wait_closed()


async def test_a_failed_flow_makes_the_next_request_check_again_through_the_bundle(monkeypatch):
    """The error hook, as mitmproxy runs it, forgets the connection's upstream."""
    from mitmproxy import flow

    probes = []
    real_open = asyncio.open_connection

    async def counting_open(host, port):
        probes.append((host, port))
        return await real_open(host, port)

    monkeypatch.setattr(asyncio, "open_connection", counting_open)
    with bundled() as b:
        first = b.flow(body=call("ping", 1))
        await b.request(first)
        first.error = flow.Error("connection reset")
        await b.error(first)
        second = b.flow(body=call("ping", 2))
        second.client_conn = first.client_conn
        await b.request(second)
        assert forwarded(second) and len(probes) == 2


async def test_upstream_check_leaves_refused_and_unclaimed_flows_alone(monkeypatch):
    probes = []

    async def no_probe(host, port):
        probes.append((host, port))
        raise OSError("probed")

    monkeypatch.setattr(asyncio, "open_connection", no_probe)
    with bundled() as b:
        f = reverse_to(b, free_port(), 1)
        f.request.headers["origin"] = "http://evil.example"
        await b.request(f)
        assert f.response.status_code == 403  # the gateway's answer, not a probe's
        # in regular mode with passthrough, a flow to another host is not MCP: not probed either
        b.tctx.options.update(mcp_hosts=["mcp.example.com"], mcp_passthrough_other=True)
        g = b.flow(body=call("ping", 2), mode="regular", url=f"http://127.0.0.1:{free_port()}")
        await b.request(g)
        assert forwarded(g) and not fs.is_mcp(g)
        assert probes == []


async def test_upstream_check_leaves_flows_through_an_upstream_proxy_alone(monkeypatch):
    """Not a direct connection to the upstream: nothing the probe could predict."""
    probes = []

    async def no_probe(host, port):
        probes.append((host, port))
        raise OSError("probed")

    monkeypatch.setattr(asyncio, "open_connection", no_probe)
    with bundled() as b:
        f = reverse_to(b, free_port(), 1)
        f.server_conn = Server(address=None, via=("http", ("127.0.0.1", free_port())))
        await b.request(f)
        assert forwarded(f) and probes == []
