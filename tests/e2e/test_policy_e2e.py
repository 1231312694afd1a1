"""
Policy end to end: real mitmdump with Gateway, Auth, Policy and Gate
(tests/bundles/policy_bundle.py), real tokens from the dev issuer, the Python
`mcp` SDK client and the SDK test server (tests/peers/sdk_server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mitmproxy import io

from bastion_dev.issuer import DevIssuer
from mcp_bastion.core import errors

from harness import ROOT, free_port, mitmdump_args, running, sdk_server

pytestmark = pytest.mark.e2e

TIMEOUT = httpx2.Timeout(30.0, read=60.0)
ACCEPT = "application/json, text/event-stream"
PROTOCOL = "2025-11-25"

GROUPS = """\
version: 1
rules:
  - id: plumbing
    match:
      authenticated: true
      direction: client_to_server
      methods: [initialize, notifications/initialized, ping, tools/list, prompts/list, resources/list,
                resources/templates/list, "http:GET", "http:DELETE"]
    action: allow
  - id: answers
    match: {authenticated: true, direction: client_to_server, kinds: [response]}
    action: allow
  - id: server-plumbing
    match: {authenticated: true, direction: server_to_client, methods: [notifications/progress, notifications/message]}
    action: allow
  - id: no-sampling-for-contractors
    match: {groups: [contractors], direction: server_to_client, methods: [sampling/createMessage]}
    action: deny
    reason: contractors' clients are not asked for model completions
  - id: engineers-server-requests
    match: {groups: [engineering], direction: server_to_client, methods: [sampling/createMessage, elicitation/create]}
    action: allow
  - id: no-big-sums
    match:
      tools: [add]
      arguments: [{path: a, gt: 1000}]
    action: deny
    reason: sums are capped at 1000
  - id: engineers-tools
    match: {groups: [engineering], tools: [add, count, summarize, ask_name]}
    action: allow
  - id: engineers-readme
    match: {groups: [engineering], resources: ["notes://*"]}
    action: allow
  - id: contractors-tools
    match: {groups: [contractors], tools: [add]}
    action: mask
    profile: pii
  - id: contractors-summarize
    match: {groups: [contractors], tools: [summarize]}
    action: allow
  - id: ci-count
    match: {groups: [ci], tools: [count]}
    action: allow
"""


# --- peers -----------------------------------------------------------------------


@dataclass
class Gateway:
    url: str
    proc: object
    issuer: DevIssuer | None
    ruleset: Path
    flows: Path

    @property
    def endpoint(self) -> str:
        return f"{self.url}/mcp"

    def token(self, user: str) -> str:
        assert self.issuer is not None
        return self.issuer.mint(user)

    def output(self) -> str:
        return self.proc.output()


@contextlib.contextmanager
def policy_gateway(tmp_path: Path, rules: str | None, identity: bool = True,
                   options: dict | None = None) -> Iterator[Gateway]:
    """sdk_server + (dev issuer) + mitmdump with the policy bundle and `rules` written to a file."""
    ruleset = tmp_path / "ruleset.yaml"
    flows = tmp_path / "flows.mitm"
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/mcp"
    opts = {"save_stream_file": str(flows), **(options or {})}
    if rules is not None:
        ruleset.write_text(rules)
        opts["ruleset"] = str(ruleset)
    else:
        opts["ruleset"] = ""  # none at all (the harness would default to allow-all)
    with contextlib.ExitStack() as stack:
        issuer = None
        if identity:
            issuer = stack.enter_context(DevIssuer(audience=endpoint))
            opts.update(oidc_issuer=issuer.url, oidc_resource=endpoint)
        srv = stack.enter_context(sdk_server("streamable-http"))
        args = mitmdump_args(srv.url, port, opts)
        proc = stack.enter_context(running(args, port))
        if issuer is not None:  # the gateway fetches the issuer's keys at start; let it finish
            assert until(lambda: f"issuer {issuer.url}:" in proc.output()), proc.output()
        yield Gateway(f"http://127.0.0.1:{port}", proc, issuer, ruleset, flows)


@pytest.fixture(scope="module")
def groups_gateway(tmp_path_factory) -> Iterator[Gateway]:
    with policy_gateway(tmp_path_factory.mktemp("groups"), GROUPS) as gw:
        yield gw


# --- an SDK session per user ------------------------------------------------------


@dataclass
class Seen:
    tools: list[str] = field(default_factory=list)
    calls: dict[str, str] = field(default_factory=dict)  # label -> "ok: text" | "error CODE: message"
    samplings: list[str] = field(default_factory=list)
    elicitations: list[str] = field(default_factory=list)


def _text(result) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def session(gw: Gateway, user: str, calls: list[tuple[str, str, dict]]) -> Seen:
    """As `user`: list tools, then run each (label, tool, arguments); refusals are recorded, not raised."""
    seen = Seen()

    async def on_sampling(ctx, params):
        seen.samplings.append(params.messages[0].content.text)
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="short"),
                                         model="t")

    async def on_elicitation(ctx, params):
        seen.elicitations.append(params.message)
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    headers = {"Authorization": f"Bearer {gw.token(user)}"}
    async with httpx2.AsyncClient(headers=headers, timeout=TIMEOUT) as http_client:
        transport = streamable_http_client(gw.endpoint, http_client=http_client)
        async with Client(transport, mode="legacy", sampling_callback=on_sampling,
                          elicitation_callback=on_elicitation) as c:
            seen.tools = sorted(t.name for t in (await c.list_tools()).tools)
            for label, tool, args in calls:
                try:
                    if tool == "read_resource":
                        seen.calls[label] = "ok: " + (await c.read_resource(args["uri"])).contents[0].text
                    else:
                        result = await c.call_tool(tool, args)
                        seen.calls[label] = ("tool error: " if result.is_error else "ok: ") + _text(result)
                except MCPError as e:
                    seen.calls[label] = f"error {e.error.code}: {e.error.message}"
    return seen


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


def saved_flows(gw: Gateway) -> list:
    with open(gw.flows, "rb") as f:
        return list(io.FlowReader(f).stream())


# --- per group, with real tokens ------------------------------------------------------


def test_engineer_sees_and_calls_what_the_rules_allow(groups_gateway):
    seen = run(session(groups_gateway, "alice", [
        ("add", "add", {"a": 2, "b": 3}),
        ("big", "add", {"a": 5000, "b": 1}),
        ("summarize", "summarize", {"text": "a long text"}),
        ("ask", "ask_name", {}),
        ("readme", "read_resource", {"uri": "notes://readme"}),
    ]))
    assert seen.tools == ["add", "ask_name", "count", "summarize"]
    assert seen.calls["add"] == "ok: 5"
    assert seen.calls["big"] == (f"error {errors.DENIED}: tools/call add denied by rule 'no-big-sums': "
                                 "sums are capped at 1000")
    assert seen.calls["summarize"] == "ok: summary: short" and seen.samplings == ["a long text"]
    assert seen.calls["ask"] == "ok: hello Ada" and seen.elicitations == ["What is your name?"]
    assert seen.calls["readme"] == "ok: mcp-bastion test server: the readme resource"


def test_contractor_gets_a_filtered_list_masking_and_no_sampling(groups_gateway):
    seen = run(session(groups_gateway, "carol", [
        ("add", "add", {"a": 1, "b": 1}),
        ("count", "count", {"steps": 2}),
        ("summarize", "summarize", {"text": "secret plans"}),
    ]))
    assert seen.tools == ["add", "summarize"]  # `add` is allowed through the 'pii' masking profile

    assert seen.calls["add"] == "ok: 2"  # masked: nothing in "2" is sensitive, so nothing changed
    assert seen.calls["count"] == (f"error {errors.DENIED}: tools/call count denied by rule 'bastion:default': "
                                   "no rule allows this message")
    # The server's sampling request was answered by the gateway with an error; the client never saw it.
    assert seen.samplings == []
    assert "sampling/createMessage denied by rule 'no-sampling-for-contractors'" in seen.calls["summarize"]

    carol = [f for f in saved_flows(groups_gateway) if (f.metadata.get("bastion.identity") or {}).get("sub") == "carol"]
    adds = [d for f in carol for d in f.metadata.get("bastion.decisions", []) if d.get("target") == "add"]
    assert adds and adds[0]["action"] == "mask" and adds[0]["profile"] == "pii"
    denied = [d for f in carol for d in f.metadata.get("bastion.decisions", [])
              if d.get("method") == "sampling/createMessage"]
    assert denied and denied[0]["action"] == "deny" and denied[0]["answered"] == "error sent to upstream"


def test_service_account_sees_only_its_tool(groups_gateway):
    seen = run(session(groups_gateway, "ci-bot", [("count", "count", {"steps": 2}), ("add", "add", {"a": 1, "b": 1})]))
    assert seen.tools == ["count"]
    assert seen.calls["count"] == "ok: counted to 2"
    assert seen.calls["add"].startswith(f"error {errors.DENIED}: tools/call add denied by rule 'bastion:default'")


# --- raw JSON-RPC: batches, escapes, normalisation -------------------------------------


def raw_session(gw: Gateway, user: str | None) -> dict[str, str]:
    """initialize + initialized over plain HTTP; the headers for further requests of the session."""
    headers = {"accept": ACCEPT, "mcp-protocol-version": PROTOCOL}
    if user:
        headers["authorization"] = f"Bearer {gw.token(user)}"
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
    r = httpx.post(gw.endpoint, json=init, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    headers["mcp-session-id"] = r.headers["mcp-session-id"]
    r = httpx.post(gw.endpoint, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers,
                   timeout=30)
    assert r.status_code == 202, r.text
    return headers


def post(gw: Gateway, headers: dict, body: bytes | str) -> httpx.Response:
    return httpx.post(gw.endpoint, content=body, headers={**headers, "content-type": "application/json"}, timeout=30)


def sse_results(r: httpx.Response) -> list[dict]:
    if r.headers["content-type"].startswith("application/json"):
        data = r.json()
        return data if isinstance(data, list) else [data]
    return [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]


@pytest.mark.parametrize("name", ["add", "\\u0061dd", "\\uff41\\uff44\\uff44", "ADD", "a\\u200bdd"])
def test_a_denied_call_stays_denied_however_its_name_is_spelled(groups_gateway, name):
    headers = raw_session(groups_gateway, "alice")
    body = ('{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"' + name
            + '","arguments":{"a":5000,"b":1}}}')
    r = post(groups_gateway, headers, body)
    assert r.status_code == 200
    assert r.json() == {"jsonrpc": "2.0", "id": 7, "error": {
        "code": errors.DENIED,
        "message": f"tools/call {json.loads(chr(34) + name + chr(34))} denied by rule 'no-big-sums': "
                   "sums are capped at 1000",
        "data": {"rule": "no-big-sums", "reason": "sums are capped at 1000"}}}


def test_a_batch_with_a_denied_member_is_answered_by_the_gateway_and_not_forwarded(groups_gateway):
    headers = raw_session(groups_gateway, "alice")
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
         "params": {"name": "add", "arguments": {"a": 1, "b": 2}}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
         "params": {"name": "add", "arguments": {"a": "1e4", "b": 2}}},
    ]
    r = post(groups_gateway, headers, json.dumps(batch))
    assert r.status_code == 200
    answers = r.json()
    assert [(a["id"], a["error"]["code"], a["error"]["data"]["reason"]) for a in answers] == [
        (1, errors.DENIED, "batch"), (2, errors.DENIED, "sums are capped at 1000")]
    # the allowed member alone goes through, in the same session
    (result,) = sse_results(post(groups_gateway, headers, json.dumps(batch[0])))
    assert result["result"]["content"][0]["text"] == "3"


def test_get_stream_and_delete_follow_the_pseudo_method_rules(groups_gateway):
    headers = raw_session(groups_gateway, "alice")
    with httpx.stream("GET", groups_gateway.endpoint, headers={**headers, "accept": "text/event-stream"},
                      timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    r = httpx.delete(groups_gateway.endpoint, headers=headers, timeout=30)
    assert r.status_code == 200


def test_unauthenticated_callers_never_reach_the_policy(groups_gateway):
    r = httpx.post(groups_gateway.endpoint, json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                   headers={"accept": ACCEPT}, timeout=30)
    assert r.status_code == 401


def test_what_if_on_the_recorded_session(groups_gateway, tmp_path):
    run(session(groups_gateway, "alice", [("add", "add", {"a": 2, "b": 3})]))
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(GROUPS.replace("tools: [add, count, summarize, ask_name]",
                                       "tools: [count, summarize, ask_name]"))
    proc = subprocess.run([str(ROOT / "scripts" / "policy"), "what-if", str(stricter), str(groups_gateway.flows)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    changes = proc.stdout.splitlines()[:-1]
    assert changes and all("alice -> tools/call add" in c for c in changes)
    assert all(c.endswith("=>  deny by rule 'bastion:default': no rule allows this message") for c in changes)
    assert "allow by rule 'engineers-tools'" in changes[0]


# --- hot reload mid-session ---------------------------------------------------------


class StreamWatch(threading.Thread):
    """Holds a GET event stream open and notes when it ends."""

    def __init__(self, url: str, headers: dict):
        super().__init__(daemon=True)
        self.url, self.headers = url, headers
        self.opened = threading.Event()
        self.ended = threading.Event()
        self.status: int | None = None
        self.client = httpx.Client(timeout=httpx.Timeout(30, read=None))

    def run(self):
        try:
            with self.client.stream("GET", self.url, headers={**self.headers, "accept": "text/event-stream"}) as r:
                self.status = r.status_code
                self.opened.set()
                for _ in r.iter_raw():
                    pass
        except Exception:
            pass
        finally:
            self.opened.set()
            self.ended.set()

    def close(self):
        self.client.close()
        self.join(10)


def until(predicate, timeout: float = 20.0):
    """Poll `predicate` until it returns a truthy value (the gateway checks its ruleset about once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_reload_mid_session_keeps_open_streams_and_refuses_invalid_edits(tmp_path):
    with policy_gateway(tmp_path, GROUPS) as gw:
        headers = raw_session(gw, "alice")
        stream = StreamWatch(gw.endpoint, headers)
        stream.start()
        assert stream.opened.wait(20) and stream.status == 200

        def add() -> dict:
            body = {"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                    "params": {"name": "add", "arguments": {"a": 1, "b": 1}}}
            return sse_results(post(gw, headers, json.dumps(body)))[0]

        assert add()["result"]["content"][0]["text"] == "2"
        gw.ruleset.write_text(GROUPS.replace("tools: [add, count, summarize, ask_name]", "tools: [count]"))
        denied = until(lambda: "error" in (r := add()) and r)
        assert denied and denied["error"]["data"]["rule"] == "bastion:default"
        assert "ruleset" in gw.output() and "reloaded" in gw.output()

        gw.ruleset.write_text(GROUPS + "  - id: broken\n    action: perhaps\n")
        assert until(lambda: "edit refused" in gw.output())
        assert "ruleset.yaml:" in gw.output() and "rule 'broken': action must be one of" in gw.output()
        assert add()["error"]["data"]["rule"] == "bastion:default"  # the previous (edited) ruleset is in force

        assert not stream.ended.is_set()  # the event stream opened before both edits is still open
        stream.close()


# --- no ruleset, bad ruleset ---------------------------------------------------------


def test_without_a_ruleset_every_message_is_denied(tmp_path):
    with policy_gateway(tmp_path, None, identity=False) as gw:
        r = httpx.post(gw.endpoint, json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}},
                       headers={"accept": ACCEPT}, timeout=30)
        assert r.status_code == 200
        err = r.json()["error"]
        assert err["code"] == errors.DENIED and err["data"]["rule"] == "bastion:no-ruleset"
        assert "no ruleset configured" in gw.output()


def test_an_invalid_ruleset_stops_the_gateway_at_start(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - id: typo\n    match: {tool: add}\n    action: deny\n")
    args = mitmdump_args("http://127.0.0.1:9", free_port(), {"ruleset": str(bad)})
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"{bad}:4: rule 'typo': match: unknown key 'tool' (did you mean 'tools'?)" in proc.stdout + proc.stderr


# --- ambiguous input is refused before any rule ------------------------------------------


@pytest.fixture(scope="module")
def open_gateway(tmp_path_factory) -> Iterator[Gateway]:
    rules = (ROOT / "rulesets" / "allow-all.yaml").read_text()
    with policy_gateway(tmp_path_factory.mktemp("open"), rules, identity=False,
                        options={"max_body_size": "64k", "max_json_depth": 16}) as gw:
        yield gw


def nested(depth: int) -> bytes:
    return b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":' + b"[" * depth + b"]" * depth + b"}}"


AMBIGUOUS = [
    ("duplicate key", b'{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call"}', {}, 400,
     errors.REFUSED_INPUT, "duplicate_key"),
    ("invalid utf-8", b'{"jsonrpc":"2.0","id":1,"method":"p\xffing"}', {}, 400, errors.PARSE_ERROR, "invalid_utf8"),
    ("unknown encoding", b"\x1b\x00", {"content-encoding": "br"}, 415, errors.REFUSED_INPUT, "bad_encoding"),
    ("broken gzip", b"\x1f\x8b not gzip", {"content-encoding": "gzip"}, 415, errors.REFUSED_INPUT, "bad_encoding"),
    ("too deep", nested(40), {}, 400, errors.REFUSED_INPUT, "too_deep"),
    ("too large", b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"' + b"a" * 70000 + b'"}}',
     {}, 413, errors.REFUSED_INPUT, "too_large"),
    ("gzip bomb", gzip.compress(b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{"x":"' + b"a" * 500000 + b'"}}'),
     {"content-encoding": "gzip"}, 413, errors.REFUSED_INPUT, "too_large"),
    ("not json", b"ping", {"content-type": "text/plain"}, 415, errors.REFUSED_INPUT, "content_type"),
]


@pytest.mark.parametrize("body,extra,status,code,reason", [a[1:] for a in AMBIGUOUS], ids=[a[0] for a in AMBIGUOUS])
def test_ambiguous_input_is_refused_with_a_clear_error(open_gateway, body, extra, status, code, reason):
    headers = {"accept": ACCEPT, "content-type": "application/json", **extra}
    r = httpx.post(open_gateway.endpoint, content=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["data"]["reason"] == reason
    assert err["message"].startswith("request refused: ")


def test_well_formed_gzip_is_decoded_and_evaluated(open_gateway):
    headers = raw_session(open_gateway, None)
    body = gzip.compress(json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                                     "params": {"name": "add", "arguments": {"a": 20, "b": 22}}}).encode())
    r = httpx.post(open_gateway.endpoint, content=body, timeout=30,
                   headers={**headers, "content-type": "application/json", "content-encoding": "gzip"})
    assert sse_results(r)[0]["result"]["content"][0]["text"] == "42"
