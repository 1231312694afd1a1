"""The Wire stage through the shipped bundle: what the upstream may dispatch on is what was checked."""

from __future__ import annotations

import base64
import json

import pytest

from mcp_bastion.core import errors
from mcp_bastion.core.pipeline import Pass, Replace
from mcp_bastion.core.vocab import Meta, StageName

from bundled import (
    META,
    V2026,
    bundle_with_stages,
    bundled,
    bundled_addons,
    call,
    error_of,
    forwarded,
    result,
    stage_name,
)

pytestmark = pytest.mark.anyio

DENY_DROP = """\
version: 1
default: allow
rules:
  - id: no-drop
    match: {tools: [drop_table]}
    action: deny
"""


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def ruleset(tmp_path):
    p = tmp_path / "rules.yaml"
    p.write_text(DENY_DROP)
    return str(p)


def tool_call(name, **arguments):
    return call("tools/call", 1, name=name, arguments=arguments, _meta=META)


def refused_as_mismatch(f) -> None:
    assert not forwarded(f)
    assert f.response.status_code == 400
    err = error_of(f)
    assert err["code"] == errors.HEADER_MISMATCH == -32020 and err["data"]["reason"] == "header_mismatch"
    assert json.loads(f.response.content)["id"] == 1


@pytest.mark.parametrize("headers", [
    {"mcp-name": "drop_table"}, {"mcp-name": "=?base64?" + base64.b64encode(b"drop_table").decode() + "?="},
    {"mcp-method": "resources/read"}, {"Mcp-Name": "drop_table"}, {"MCP-METHOD": "tools/list"},
], ids=["name", "base64-name", "method", "name-case", "method-case"])
async def test_a_header_naming_something_else_than_the_body_is_refused(ruleset, headers):
    """The body calls an allowed tool; a header points an upstream that dispatches on it elsewhere."""
    with bundled(ruleset=ruleset) as b:
        f = b.flow("POST", tool_call("read_file", path="/x"), headers={**V2026, **headers})
        await b.request(f)
    refused_as_mismatch(f)
    assert StageName.POLICY not in f.metadata.get(Meta.STAGES, [])  # refused before any rule


async def test_agreeing_headers_are_forwarded_unchanged(ruleset):
    headers = {**V2026, "mcp-method": "tools/call", "mcp-name": "read_file"}
    with bundled(ruleset=ruleset) as b:
        f = b.flow("POST", tool_call("read_file", path="/x"), headers=headers)
        await b.request(f)
    assert forwarded(f)
    assert f.request.headers["mcp-name"] == "read_file" and f.request.headers["mcp-method"] == "tools/call"


async def test_a_version_header_that_contradicts_meta_is_refused(ruleset):
    with bundled(ruleset=ruleset) as b:
        f = b.flow("POST", tool_call("read_file"), headers={"mcp-protocol-version": "2025-11-25"})
        await b.request(f)
    refused_as_mismatch(f)


async def test_2025_requests_without_these_headers_are_unaffected(ruleset):
    with bundled(ruleset=ruleset) as b:
        f = b.flow("POST", call("tools/call", 1, name="read_file"), headers={"mcp-protocol-version": "2025-06-18"})
        await b.request(f)
    assert forwarded(f)


SCHEMA = {"type": "object", "properties": {"env": {"type": "string", "x-mcp-header": "Env"}}}


async def list_tools(b):
    f = b.flow("POST", call("tools/list", 9, _meta=META), headers=V2026)
    await b.request(f)
    await b.response(f, result(9, {"tools": [{"name": "deploy", "inputSchema": SCHEMA}]}))


async def test_param_headers_are_checked_against_the_schema_the_upstream_announced(ruleset):
    with bundled(ruleset=ruleset) as b:
        unknown = b.flow("POST", tool_call("deploy", env="staging"), headers={**V2026, "mcp-param-env": "staging"})
        await b.request(unknown)
        await list_tools(b)
        same = b.flow("POST", tool_call("deploy", env="staging"), headers={**V2026, "mcp-param-env": "staging"})
        await b.request(same)
        other = b.flow("POST", tool_call("deploy", env="staging"), headers={**V2026, "mcp-param-env": "prod"})
        await b.request(other)
        undeclared = b.flow("POST", tool_call("deploy", env="staging"), headers={**V2026, "mcp-param-x": "1"})
        await b.request(undeclared)
    refused_as_mismatch(unknown)  # the client lists the tools again and retries, as the spec says
    assert "list the tools again" in error_of(unknown)["message"]
    assert forwarded(same)
    refused_as_mismatch(other)
    refused_as_mismatch(undeclared)


@pytest.mark.parametrize(("method", "value"), [
    ("tools/list", {"tools": [{"name": "read_file"}, {"name": "drop_table"}]}),
    ("tools/list", {"tools": [{"name": "read_file"}]}),
    ("resources/read", {"contents": [{"uri": "file:///a", "text": "a"}]}),
    ("server/discover", {"supportedVersions": ["2026-07-28"], "capabilities": {}}),
], ids=["filtered-list", "unfiltered-list", "read", "discover"])
@pytest.mark.parametrize("ctype", ["application/json", "text/event-stream"])
async def test_results_that_passed_the_policy_are_cached_for_this_caller_only(ruleset, method, value, ctype):
    """A shared client-side cache must not serve one caller's (filtered, allowed) answer to another."""
    with bundled(ruleset=ruleset) as b:
        params = {"uri": "file:///a"} if method == "resources/read" else {}
        f = b.flow("POST", call(method, 1, _meta=META, **params), headers=V2026)
        await b.request(f)
        assert forwarded(f)
        answer = result(1, {**value, "cacheScope": "public", "ttlMs": 60000, "resultType": "complete"})
        payload = answer if ctype == "application/json" else f"event: message\ndata: {json.dumps(answer)}\n\n"
        out = await b.response(f, payload, ctype=ctype)
    got = json.loads(out if ctype == "application/json" else out.decode().split("data: ", 1)[1])
    assert got["result"]["cacheScope"] == "private" and got["result"]["ttlMs"] == 60000
    assert "drop_table" not in json.dumps(got)


async def test_a_private_result_passes_byte_for_byte(ruleset):
    with bundled(ruleset=ruleset) as b:
        f = b.flow("POST", call("resources/read", 1, uri="file:///a", _meta=META), headers=V2026)
        await b.request(f)
        raw = json.dumps(result(1, {"contents": [], "cacheScope": "private"})).encode()
        assert await b.response(f, raw) == raw


@pytest.mark.parametrize("method", ["initialize", "ping", "logging/setLevel", "resources/subscribe",
                                    "resources/unsubscribe", "tasks/result", "tasks/list"])
async def test_a_method_2026_removed_is_answered_as_a_2026_server_would(ruleset, method):
    """Not as a malformed target or a policy denial: 404 and -32601, whatever the rules say of the 2025 method."""
    with bundled(ruleset=ruleset) as b:
        modern = b.flow("POST", call(method, 1, _meta=META), headers={**V2026, "mcp-method": method})
        await b.request(modern)
        legacy = b.flow("POST", call(method, 1), headers={"mcp-protocol-version": "2025-11-25"})
        await b.request(legacy)
    assert not forwarded(modern) and modern.response.status_code == 404
    assert error_of(modern)["code"] == -32601 and json.loads(modern.response.content)["id"] == 1
    if method in ("initialize", "ping", "logging/setLevel", "tasks/list"):
        assert forwarded(legacy)  # the 2025 era keeps them


class MaskEnv:
    """A stage after the Policy that rewrites the `env` argument (as outbound masking would)."""

    def __init__(self, value):
        self.value = value
        self.name = stage_name("dlp")

    def check(self, m, cx):
        if m.method == "tools/call" and m.direction is not None and m.direction.value == "client_to_server":
            args = {**(m.arguments or {}), "env": self.value}
            return Replace(m.replace({**m.raw, "params": {**m.params, "arguments": args}}))
        return Pass()


@pytest.mark.parametrize(("value", "header"), [
    ("[MASKED]", "[MASKED]"), ("sécret", "=?base64?c8OpY3JldA==?="), (" padded ", "=?base64?IHBhZGRlZCA=?="),
], ids=["ascii", "non-ascii", "padded"])
async def test_a_stage_that_rewrites_an_argument_rewrites_its_header(ruleset, value, header):
    with bundled_addons(bundle_with_stages(MaskEnv(value)), ruleset=ruleset) as b:
        await list_tools(b)
        f = b.flow("POST", tool_call("deploy", env="staging"),
                   headers={**V2026, "mcp-name": "deploy", "mcp-param-env": "staging"})
        await b.request(f)
    assert forwarded(f)
    assert json.loads(f.request.content)["params"]["arguments"]["env"] == value
    assert f.request.headers["mcp-param-env"] == header and f.request.headers["mcp-name"] == "deploy"
