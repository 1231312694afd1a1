"""The shipped least-privilege ruleset plus one grant, with real tokens, for real clients: the SDK client of
both eras, a FastMCP client and the MCP Inspector CLI.

`rulesets/default.yaml` must let each era's handshake and plumbing through
(2025: initialize, GET/DELETE; 2026-07-28: server/discover) and nothing else:
a grant makes exactly the granted tools listable and callable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import tempfile
import time

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from bastion_dev.issuer import DevIssuer

from harness import NODE22, PEERS, ROOT, free_port, mitmdump_args, running, sdk_server

pytestmark = pytest.mark.e2e

GRANT = """
  - id: grant-engineering-arithmetic
    match: {groups: [engineering], tools: [add]}
    action: allow
"""


def _until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@contextlib.contextmanager
def default_gateway(tmp_path):
    ruleset = tmp_path / "default-plus-grant.yaml"
    ruleset.write_text((ROOT / "rulesets" / "default.yaml").read_text() + GRANT)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/mcp"
    with DevIssuer(audience=endpoint) as issuer, sdk_server("streamable-http") as srv:
        args = mitmdump_args(srv.url, port, {"ruleset": str(ruleset), "oidc_issuer": issuer.url,
                                             "oidc_resource": endpoint})
        with running(args, port) as proc:
            assert _until(lambda: f"issuer {issuer.url}:" in proc.output()), proc.output()
            yield endpoint, issuer


async def session(endpoint: str, token: str, mode: str) -> tuple[list[str], str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0, read=60.0)) as http:
        async with Client(streamable_http_client(endpoint, http_client=http), mode=mode) as c:
            tools = sorted(t.name for t in (await c.list_tools()).tools)
            added = (await c.call_tool("add", {"a": 2, "b": 3})).content[0].text
            try:
                await c.call_tool("count", {"steps": 1})
                refused = "not refused"
            except MCPError as e:
                refused = str(e)
            return tools, added, refused


@pytest.mark.parametrize("mode", ["auto", "legacy"], ids=["2026-07-28", "2025"])
def test_default_plus_a_grant_works_for_the_sdk_client_of_each_era(tmp_path, mode):
    with default_gateway(tmp_path) as (endpoint, issuer):
        tools, added, refused = asyncio.run(asyncio.wait_for(session(endpoint, issuer.mint("alice"), mode), 60))
    assert tools == ["add"]  # the listing shows exactly what was granted
    assert added == "5"
    assert "bastion:default" in refused or "denied" in refused


async def fastmcp_session(endpoint: str, token: str) -> tuple[list[str], str]:
    from fastmcp import Client as FastMCPClient
    from fastmcp.client.transports import StreamableHttpTransport

    transport = StreamableHttpTransport(endpoint, headers={"Authorization": f"Bearer {token}"})
    async with FastMCPClient(transport) as c:
        tools = sorted(t.name for t in await c.list_tools())
        return tools, (await c.call_tool("add", {"a": 2, "b": 3})).content[0].text


def test_default_plus_a_grant_works_for_a_fastmcp_client(tmp_path):
    with default_gateway(tmp_path) as (endpoint, issuer):
        tools, added = asyncio.run(asyncio.wait_for(fastmcp_session(endpoint, issuer.mint("alice")), 60))
    assert tools == ["add"] and added == "5"


INSPECTOR = str(PEERS / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js")


def inspector(endpoint: str, token: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI keeps state under ~/.mcp-inspector: HOME goes to a throw-away folder, and --stored-auth-only
    keeps it from starting an interactive OAuth login should the gateway ever answer 401."""
    with tempfile.TemporaryDirectory(prefix="bastion-inspector-") as home:
        env = {**os.environ, "HOME": home, "MCP_CATALOG_PATH": os.path.join(home, "mcp.json"),
               "MCP_CLIENT_CONFIG_PATH": os.path.join(home, "clients.json")}
        return subprocess.run([NODE22, INSPECTOR, "--cli", endpoint, "--transport", "http",
                               "--header", f"Authorization: Bearer {token}", "--stored-auth-only", *args],
                              capture_output=True, text=True, timeout=120, env=env)


def test_default_plus_a_grant_works_for_the_mcp_inspector_cli(tmp_path):
    with default_gateway(tmp_path) as (endpoint, issuer):
        token = issuer.mint("alice")
        listed = inspector(endpoint, token, "--method", "tools/list")
        added = inspector(endpoint, token, "--method", "tools/call", "--tool-name", "add", "--tool-arg", "a=2", "b=3")
        refused = inspector(endpoint, token, "--method", "prompts/get", "--prompt-name", "greet",
                            "--prompt-args", "who=Ada")
    assert listed.returncode == 0, listed.stderr
    assert [t["name"] for t in json.loads(listed.stdout)["tools"]] == ["add"]
    assert added.returncode == 0 and json.loads(added.stdout)["content"][0]["text"] == "5", added.stderr
    assert refused.returncode != 0  # not granted: the least-privilege default holds


# --- sessions belong to their creator ------------------------------------------------------------


def test_another_identity_cannot_use_a_2025_session_and_a_forged_id_gets_nowhere(tmp_path):
    accept = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "t", "version": "1"}}}
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "add", "arguments": {"a": 1, "b": 2}}}
    with default_gateway(tmp_path) as (endpoint, issuer):
        alice = {**accept, "authorization": f"Bearer {issuer.mint('alice')}"}
        carol = {**accept, "authorization": f"Bearer {issuer.mint('carol')}"}
        with httpx.Client(timeout=30) as http:
            started = http.post(endpoint, json=init, headers=alice)
            sid = started.headers["mcp-session-id"]
            http.post(endpoint, json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                      headers={**alice, "mcp-session-id": sid, "mcp-protocol-version": "2025-06-18"})
            own = http.post(endpoint, json=call, headers={**alice, "mcp-session-id": sid,
                                                          "mcp-protocol-version": "2025-06-18"})
            other = http.post(endpoint, json=call, headers={**carol, "mcp-session-id": sid,
                                                            "mcp-protocol-version": "2025-06-18"})
            forged = http.post(endpoint, json=call, headers={**alice, "mcp-session-id": "forged-0001",
                                                             "mcp-protocol-version": "2026-07-28"})
    assert started.status_code == 200 and own.status_code == 200 and "3" in own.text
    for refused in (other, forged):
        assert refused.status_code == 404 and refused.json()["error"]["data"] == {"reason": "session"}
