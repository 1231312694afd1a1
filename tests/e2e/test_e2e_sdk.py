"""
The Python `mcp` SDK client through the gateway (real mitmdump, allow-all
bundle) against a server written with the same SDK, over both HTTP
transports; the bundle in mitmweb; a dead upstream.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import httpx
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from harness import free_port, gateway, mitmweb, sdk_server

pytestmark = pytest.mark.e2e

TIMEOUT = httpx2.Timeout(30.0, read=60.0)
SESSION_TIMEOUT = 60.0  # a broken data path tends to hang a client: bound every session


@dataclass
class Session:
    """What the client saw during one scripted session."""

    server_name: str = ""
    tools: list[str] = field(default_factory=list)
    progress: list[tuple[float, float | None, str | None]] = field(default_factory=list)
    counted: str = ""
    elicitations: list[str] = field(default_factory=list)
    elicited: str = ""
    samplings: list[str] = field(default_factory=list)
    sampled: str = ""
    resource: str = ""
    prompt: str = ""
    http: list[tuple[str, str, int]] = field(default_factory=list)  # (method, url, status)
    session_id: str | None = None


def _text(content: list) -> str:
    return " ".join(c.text for c in content if isinstance(c, types.TextContent))


async def scripted_session(server, seen: Session) -> None:
    async def on_progress(progress, total, message):
        seen.progress.append((progress, total, message))

    async def on_sampling(ctx, params):
        seen.samplings.append(params.messages[0].content.text)
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="short"),
                                         model="test")

    async def on_elicitation(ctx, params):
        seen.elicitations.append(params.message)
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async with Client(server, mode="legacy", sampling_callback=on_sampling, elicitation_callback=on_elicitation) as c:
        seen.server_name = c.server_info.name
        seen.tools = sorted(t.name for t in (await c.list_tools()).tools)
        seen.counted = _text((await c.call_tool("count", {"steps": 3}, progress_callback=on_progress)).content)
        seen.elicited = _text((await c.call_tool("ask_name", {})).content)
        seen.sampled = _text((await c.call_tool("summarize", {"text": "a long text"})).content)
        seen.resource = (await c.read_resource("notes://readme")).contents[0].text
        seen.prompt = (await c.get_prompt("greet", {"who": "Bob"})).messages[0].content.text


def _recording_client(seen: Session, **kw) -> httpx2.AsyncClient:
    async def on_response(response: httpx2.Response) -> None:
        seen.http.append((response.request.method, str(response.request.url), response.status_code))
        seen.session_id = response.headers.get("mcp-session-id") or seen.session_id

    return httpx2.AsyncClient(timeout=TIMEOUT, event_hooks={"response": [on_response]}, **kw)


async def streamable_session(url: str) -> Session:
    seen = Session()
    async with _recording_client(seen) as http_client:
        await asyncio.wait_for(scripted_session(streamable_http_client(url, http_client=http_client), seen),
                               SESSION_TIMEOUT)
    return seen


async def sse_session(url: str) -> Session:
    seen = Session()

    def factory(headers=None, timeout=None, auth=None) -> httpx2.AsyncClient:
        return _recording_client(seen, headers=headers, auth=auth)

    await asyncio.wait_for(scripted_session(sse_client(url, httpx_client_factory=factory), seen), SESSION_TIMEOUT)
    return seen


MASKING_TOOLS = {"customer", "customers", "failing_lookup", "noisy"}
PINNING_TOOLS = {"weather", "rug_pull"}  # tests/e2e/test_pinning_e2e.py


def assert_full_session(seen: Session) -> None:
    assert seen.server_name == "bastion-sdk-test-server"
    # The server's tools, apart from those it offers the masking tests (tests/e2e/test_masking_e2e.py).
    shown = [t for t in seen.tools if t not in MASKING_TOOLS | PINNING_TOOLS]
    assert shown == ["add", "ask_name", "confirm_deploy", "count", "summarize"]
    assert set(seen.tools) >= MASKING_TOOLS
    assert seen.progress == [(1, 3, "step 1"), (2, 3, "step 2"), (3, 3, "step 3")]
    assert seen.counted == "counted to 3"
    assert seen.elicitations == ["What is your name?"] and seen.elicited == "hello Ada"
    assert seen.samplings == ["a long text"] and seen.sampled == "summary: short"
    assert seen.resource == "mcp-bastion test server: the readme resource"
    assert seen.prompt == "Please greet Bob warmly."


def only_through(seen: Session, gw_port: int) -> None:
    """Every HTTP exchange of the client went to the gateway (none around it)."""
    assert seen.http
    assert {httpx.URL(u).port for _, u, _ in seen.http} == {gw_port}


def test_streamable_http_session_through_gateway():
    with sdk_server("streamable-http") as srv, gateway(srv.url) as gw:
        seen = asyncio.run(streamable_session(f"{gw.url}/mcp"))
        assert_full_session(seen)
        only_through(seen, gw.port)
        assert seen.session_id
        # the session ended with a DELETE the upstream accepted ...
        assert ("DELETE", f"{gw.url}/mcp", 200) in seen.http
        # ... so the upstream no longer knows it
        gone = httpx.post(
            f"{gw.url}/mcp",
            json={"jsonrpc": "2.0", "id": 9, "method": "tools/list"},
            headers={"mcp-session-id": seen.session_id, "accept": "application/json, text/event-stream",
                     "mcp-protocol-version": "2025-11-25"},
        )
        assert gone.status_code == 404


def test_old_sse_transport_session_through_gateway():
    with sdk_server("sse") as srv, gateway(srv.url) as gw:
        seen = asyncio.run(sse_session(f"{gw.url}/sse"))
        assert_full_session(seen)
        only_through(seen, gw.port)
        posts = [(u, s) for m, u, s in seen.http if m == "POST"]
        assert posts and all(s == 202 and "/messages/?session_id=" in u for u, s in posts)


def test_old_sse_transport_absolute_endpoint_is_rewritten_to_the_gateway():
    """The upstream announces http://127.0.0.1:<upstream>/messages/...; the client must still POST to the gateway."""
    with sdk_server("sse", ["--absolute-endpoint"]) as srv, gateway(srv.url) as gw:
        with httpx.stream("GET", f"{srv.url}/sse", timeout=10) as direct:  # what the upstream really announces
            announced = next(line for line in direct.iter_lines() if line.startswith("data:"))
        assert announced.startswith(f"data: {srv.url}/messages/")
        seen = asyncio.run(sse_session(f"{gw.url}/sse"))
        assert_full_session(seen)
        only_through(seen, gw.port)


def test_dead_upstream_gets_a_json_rpc_error():
    dead = f"http://127.0.0.1:{free_port()}"
    with gateway(dead) as gw, httpx.Client(timeout=30) as client:
        for msg_id in (1, 2):  # the second request on the same client connection, too
            r = client.post(f"{gw.url}/mcp", json={"jsonrpc": "2.0", "id": msg_id, "method": "ping"})
            assert r.status_code == 502
            assert r.headers["content-type"] == "application/json"
            body = r.json()
            assert body["id"] == msg_id
            assert body["error"]["code"] == -31011
            assert body["error"]["data"]["reason"] == "upstream_unreachable"


def test_bundle_loads_in_mitmweb_and_annotates_flows():
    web_port = free_port()
    password = "bastion-test"
    with sdk_server("streamable-http") as srv, mitmweb(srv.url, web_port, {"web_password": password}) as gw:
        page = httpx.get(f"http://127.0.0.1:{web_port}/", headers={"authorization": f"Bearer {password}"})
        assert page.status_code == 200 and "<html" in page.text.lower()

        async def call_add() -> str:
            async with Client(f"{gw.url}/mcp", mode="legacy") as c:
                return _text((await c.call_tool("add", {"a": 2, "b": 3})).content)

        assert asyncio.run(asyncio.wait_for(call_add(), SESSION_TIMEOUT)) == "5"
        flows = httpx.get(f"http://127.0.0.1:{web_port}/flows", headers={"authorization": f"Bearer {password}"})
        assert flows.status_code == 200
        comments = [f.get("comment", "") for f in json.loads(flows.text)]
        # who (anonymous here), what, the decision and the rule: the row a reviewer reads
        assert "tools/call add -> allow [allow-all]" in comments, comments
        assert any(c.startswith("initialize -> allow [allow-all]") for c in comments), comments
        # the bundle turns mitmweb's comment column on, keeping the default columns
        options = httpx.get(f"http://127.0.0.1:{web_port}/options",
                            headers={"authorization": f"Bearer {password}"}).json()
        columns = options["web_columns"]["value"]
        assert "comment" in columns and {"method", "status"} <= set(columns), columns
