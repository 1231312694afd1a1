"""The 2026-07-28 wire through the gateway, against the Python SDK's own server and client (both eras)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from mcp import Client
from mitmproxy import io

from harness import gateway, sdk_server

pytestmark = pytest.mark.e2e

TIMEOUT = 30
DENY_ADD = """\
version: 1
default: allow
rules:
  - id: no-add
    match: {tools: [add]}
    action: deny
    reason: not today
"""


def flows(path) -> list:
    with open(path, "rb") as f:
        return list(io.FlowReader(f).stream())


async def session(url: str, mode: str) -> tuple[list[str], str, str]:
    async with Client(url, mode=mode) as c:
        tools = [t.name for t in (await c.list_tools()).tools]
        counted = (await c.call_tool("count", {"steps": 2})).content[0].text
        readme = (await c.read_resource("notes://readme")).contents[0].text
        return tools, counted, readme


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_both_eras_through_one_endpoint(tmp_path, mode):
    saved = tmp_path / "flows.mitm"
    with sdk_server("streamable-http") as srv, gateway(srv.url, {"save_stream_file": str(saved)}) as gw:
        tools, counted, readme = asyncio.run(asyncio.wait_for(session(f"{gw.url}/mcp", mode), TIMEOUT))
    assert "add" in tools and counted == "counted to 2" and "readme" in readme
    recorded = flows(saved)
    eras = {f.metadata["bastion.mcp"].get("era") for f in recorded if f.request.method == "POST"}
    assert eras == ({"2026"} if mode == "auto" else {"2025"})
    if mode == "auto":
        methods = [f.request.headers.get("mcp-method") for f in recorded]
        assert "server/discover" in methods and "initialize" not in methods


def post(url: str, body: dict, headers: dict) -> httpx.Response:
    base = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2026-07-28"}
    return httpx.post(url, json=body, headers={**base, **headers}, timeout=TIMEOUT)


def call(tool: str, **arguments) -> dict:
    return {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": tool, "arguments": arguments,
        "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                  "io.modelcontextprotocol/clientCapabilities": {}}}}


def test_a_header_naming_a_denied_tool_never_reaches_the_upstream(tmp_path):
    """The body calls an allowed tool, Mcp-Name names the denied one: refused with -32020, not forwarded."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(DENY_ADD)
    saved = tmp_path / "flows.mitm"
    with sdk_server("streamable-http") as srv, \
            gateway(srv.url, {"ruleset": str(rules), "save_stream_file": str(saved)}) as gw:
        mismatch = post(f"{gw.url}/mcp", call("count", steps=1),
                        {"mcp-method": "tools/call", "mcp-name": "add"})
        agree = post(f"{gw.url}/mcp", call("count", steps=1), {"mcp-method": "tools/call", "mcp-name": "count"})
        denied = post(f"{gw.url}/mcp", call("add", a=1, b=2), {"mcp-method": "tools/call", "mcp-name": "add"})
    assert mismatch.status_code == 400
    err = mismatch.json()["error"]
    assert err["code"] == -32020 and err["data"]["reason"] == "header_mismatch"
    assert agree.status_code == 200 and "counted to 1" in agree.text
    assert denied.json()["error"]["data"]["rule"] == "no-add"
    first = flows(saved)[0]
    assert first.response.status_code == 400 and json.loads(first.response.content)["error"]["code"] == -32020


# --- multi-round-trip requests with the SDK's own client and server --------------------------------

NO_ELICITATION = """\
version: 1
default: allow
rules:
  - id: no-elicitation
    match: {direction: server_to_client, methods: [elicitation/create]}
    action: deny
    reason: nobody answers forms here
"""


async def confirm(url: str, asked: list[str]) -> str:
    import mcp_types as types

    async def on_elicit(ctx, params):
        asked.append(params.message)
        content = {"name": "Ada"} if "Who" in params.message else {"yes": True}
        return types.ElicitResult(action="accept", content=content)

    async with Client(url, mode="auto", elicitation_callback=on_elicit) as c:
        return (await c.call_tool("confirm_deploy", {"env": "staging"})).content[0].text


def test_three_rounds_of_a_multi_round_trip_call_go_through(tmp_path):
    asked: list[str] = []
    saved = tmp_path / "flows.mitm"
    with sdk_server("streamable-http") as srv, gateway(srv.url, {"save_stream_file": str(saved)}) as gw:
        text = asyncio.run(asyncio.wait_for(confirm(f"{gw.url}/mcp", asked), TIMEOUT))
    assert text == "deployed to staging" and asked == ["Who deploys to staging?", "Sure?"]
    calls = [f for f in flows(saved) if f.request.headers.get("mcp-method") == "tools/call"]
    assert len(calls) == 3  # the call, then two retries carrying inputResponses and requestState
    inner = [d for f in calls for d in f.metadata["bastion.decisions"] if d.get("method") == "elicitation/create"]
    assert len(inner) == 2 and all(d["direction"] == "server_to_client" for d in inner)


def test_a_denied_input_request_ends_the_call_before_the_client_is_asked(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(NO_ELICITATION)
    asked: list[str] = []
    with sdk_server("streamable-http") as srv, gateway(srv.url, {"ruleset": str(rules)}) as gw:
        with pytest.raises(Exception) as e:
            asyncio.run(asyncio.wait_for(confirm(f"{gw.url}/mcp", asked), TIMEOUT))
    assert asked == []  # the client was never asked
    assert "no-elicitation" in repr(e.value)


async def prompt_and_listen(url: str) -> tuple[str, object]:
    async with Client(url, mode="auto") as c:
        prompt = await c.get_prompt("greet", {"who": "Ada"})
        async with c.listen(tools_list_changed=True) as sub:
            honored = sub.honored
        return prompt.messages[0].content.text, honored


def test_prompts_and_a_listen_subscription_on_the_2026_wire(tmp_path):
    """The listen stream's acknowledgement reaches the client through the gateway."""
    with sdk_server("streamable-http") as srv, gateway(srv.url) as gw:
        text, honored = asyncio.run(asyncio.wait_for(prompt_and_listen(f"{gw.url}/mcp"), TIMEOUT))
    assert "Ada" in text and honored.tools_list_changed is True


NO_SECRET_NOTES = """\
version: 1
default: allow
rules:
  - id: no-secret-notes
    match: {resources: ["notes://secret*"]}
    action: deny
"""


async def listen_to(url: str, uris: list[str]) -> None:
    async with Client(url, mode="auto") as c:
        async with c.listen(resource_subscriptions=uris):
            pass


def test_a_listen_subscription_to_a_denied_resource_is_refused(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(NO_SECRET_NOTES)
    with sdk_server("streamable-http") as srv, gateway(srv.url, {"ruleset": str(rules)}) as gw:
        with pytest.raises(Exception) as e:
            asyncio.run(asyncio.wait_for(listen_to(f"{gw.url}/mcp", ["notes://secret-plans"]), TIMEOUT))
    assert "no-secret-notes" in repr(e.value)
