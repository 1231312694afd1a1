"""
Masking end to end: real tokens from the dev issuer, a real gateway (mitmdump with
the bundle, audit log and recording on), the Python SDK's server (JSON answers or
event streams) and the Python SDK client of both eras (2025-11-25 and 2026-07-28).

The upstream (tests/peers/sdk_server.py) puts made-up secrets (a test card number,
an e-mail address, a phone number, an AWS key id) in plain text content,
structuredContent, an embedded resource, a failed call (`isError` result and a
JSON-RPC error with data), log messages (on the call's stream, and on the 2025
session's GET stream) and a progress notification sent during the call, a big
answer, a resource and a prompt. carol (`contractors`) is under `mask` rules with
the built-in `pii` profile; alice (`engineering`) under a plain `allow`:

- carol never receives a value: neither in what the SDK client hands back nor in
  the raw bytes of any HTTP response; alice receives every one unchanged;
- what carol sends (a card number in a note) reaches the upstream masked;
- the audit log names the mask decisions (detector and JSON path), never a value;
- carol's recordings hold only the masked bytes (alice's hold the values: the
  recording is what each client got), also for a call in flight when the gateway
  is stopped (SIGTERM) or killed (SIGKILL, recovered from the in-flight journal).

One gateway per server mode; each runs the four sessions (two callers, two eras),
is stopped, and then the tests read what the clients got, the audit log and the
recordings. Last, a scripted upstream sends event-stream shapes the SDK never
writes (data over several lines, byte-by-byte chunks, comments, ids, retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mitmproxy import io

from bastion_dev.issuer import DevIssuer

from harness import free_port, mitmdump_args, running, sdk_server

pytestmark = pytest.mark.e2e

AUDIT_KEY = "masking-e2e-audit-key-0123456789"

# What tests/peers/sdk_server.py hands out (kept in step with it).
CARD = "4111 1111 1111 1111"
EMAIL = "jane.doe@example.com"
PHONE = "+1 415 555 0132"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
# What each caller sends in a note to the upstream (`customer`): carol's must reach it masked.
NOTE = {"carol": "my card is 5555 5555 5555 4444", "alice": "my card is 3782 822463 10005"}
# Every form in which a value could leak: as sent, without separators, its distinctive parts.
VALUES = (CARD, CARD.replace(" ", ""), "1111 1111 1111", EMAIL, "jane.doe@", "example.com", PHONE, "415 555 0132",
          AWS_KEY, "IOSFODNN7", "5555 5555 5555 4444", "5555555555554444", "3782 822463 10005")
BULK = 1000  # customers in one big answer
LINGER = 4.0  # seconds a call stays in flight (the gateway is stopped about a second into it)

RULES = """\
version: 1
default: deny
rules:
  - id: contractors-customers
    match: {groups: [contractors], tools: [customer, customers, failing_lookup, noisy]}
    action: mask
    profile: pii
  - id: contractors-customer-records
    match: {groups: [contractors], resources: ["customers://*"]}
    action: mask
    profile: pii
  - id: contractors-briefs
    match: {groups: [contractors], prompts: [customer_brief]}
    action: mask
    profile: pii
  - id: contractors-stream
    match: {groups: [contractors], methods: ["http:GET"]}
    action: mask
    profile: pii
  - id: contractors-rest
    match: {groups: [contractors]}
    action: allow
  - id: engineering
    match: {groups: [engineering]}
    action: allow
  - id: server-to-client
    match: {direction: server_to_client}
    action: allow
"""

ERAS = {"2026-07-28": "auto", "2025-11-25": "legacy"}
USERS = ("carol", "alice")
TIMEOUT = 30


# --- the client side: what the SDK client got, and the raw bytes under it --------------------


class _TeeStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, sink: bytearray):
        self.inner = inner
        self.sink = sink

    async def __aiter__(self):
        async for chunk in self.inner:
            self.sink += chunk
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


class Tee(httpx2.AsyncBaseTransport):
    """An HTTP transport that keeps a copy of every response (content type, bytes) the client reads."""

    def __init__(self) -> None:
        self.inner = httpx2.AsyncHTTPTransport()
        self.exchanges: list[tuple[bytes, str, bytearray]] = []  # (request body, response content type, body)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        sent = request.read()
        response = await self.inner.handle_async_request(request)
        body = bytearray()
        self.exchanges.append((sent, response.headers.get("content-type", ""), body))
        response.stream = _TeeStream(response.stream, body)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def messages_in(ctype: str, body: bytes) -> list[Any]:
    """The JSON-RPC messages of one response body (JSON, or the `data` of each SSE event)."""
    if not body.strip():
        return []
    if not ctype.startswith("text/event-stream"):
        return [json.loads(body)]
    out = []
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
        if data.strip():
            out.append(json.loads(data))
    return out


def _dump(model: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


@dataclass
class Got:
    """One session: each operation's outcome (a dumped result, or the error), and the raw bytes."""

    ops: dict[str, Any] = field(default_factory=dict)
    logs: list[Any] = field(default_factory=list)
    progress: list[str | None] = field(default_factory=list)
    exchanges: list[tuple[bytes, str, bytes]] = field(default_factory=list)  # as Tee keeps them

    @property
    def raw(self) -> bytes:
        """Every response byte the client read."""
        return b"".join(body for _, _, body in self.exchanges)

    def messages(self) -> list[Any]:
        """Every JSON-RPC message the client received (each must be valid JSON)."""
        return [m for _, ctype, body in self.exchanges for m in messages_in(ctype, body)]

    def answer(self, method: str, **params: Any) -> tuple[str, dict]:
        """The content type and raw JSON-RPC answer to the POSTed request `method` whose params include `params`."""
        for sent, ctype, body in self.exchanges:
            request = json.loads(sent) if sent.strip() else None
            if (isinstance(request, dict) and request.get("method") == method
                    and params.items() <= (request.get("params") or {}).items()):
                answers = [m for m in messages_in(ctype, body) if m.get("id") == request["id"] and "method" not in m]
                assert len(answers) == 1, (method, params, body)
                return ctype, answers[0]
        raise AssertionError(f"no {method} {params} was sent")


async def _op(got: Got, name: str, call) -> None:
    try:
        got.ops[name] = _dump(await call)
    except MCPError as e:
        got.ops[name] = {"error": _dump(e.error)}
    except Exception as e:  # a broken message must show up as a finding, not stop the session
        got.ops[name] = {"exception": f"{type(e).__name__}: {e}"}


async def _eventually(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def broadcasts(got: Got) -> list[Any]:
    """The log messages `noisy` sends tied to no request (2025: on the session's GET stream)."""
    return [m for m in got.logs if isinstance(m, dict) and "broadcast" in m]


async def session(endpoint: str, token: str, mode: str, note: str) -> Got:
    got = Got()
    tee = Tee()

    async def on_log(params) -> None:
        got.logs.append(_dump(params).get("data"))

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        got.progress.append(message)

    async with httpx2.AsyncClient(transport=tee, headers={"Authorization": f"Bearer {token}"},
                                  timeout=httpx2.Timeout(TIMEOUT, read=TIMEOUT)) as http:
        async with Client(streamable_http_client(endpoint, http_client=http), mode=mode,
                          logging_callback=on_log, log_level="info") as c:
            await _op(got, "tools", c.list_tools())
            await _op(got, "add", c.call_tool("add", {"a": 2, "b": 3}))
            await _op(got, "customer", c.call_tool("customer", {"id": 42, "note": note}))
            await _op(got, "failing", c.call_tool("failing_lookup", {"id": 42}))
            await _op(got, "protocol_error", c.call_tool("failing_lookup", {"id": 42, "protocol_error": True}))
            await _op(got, "noisy", c.call_tool("noisy", {"id": 42}, progress_callback=on_progress))
            await _op(got, "customers", c.call_tool("customers", {"count": BULK}))
            await _op(got, "resource", c.read_resource("customers://42"))
            await _op(got, "prompt", c.get_prompt("customer_brief", {"id": "42"}))
            if mode == "legacy":  # the GET stream's log message may come after the call's answer
                await _eventually(lambda: broadcasts(got))
    got.exchanges = [(sent, ctype, bytes(body)) for sent, ctype, body in tee.exchanges]
    return got


# --- the stack ------------------------------------------------------------------------------


@dataclass
class Run:
    mode: str  # "json" or "sse": how the upstream answers
    got: dict[tuple[str, str], Got]  # (user, era) -> what the client got
    audit: str  # the audit log, whole
    records: list[dict]
    recordings: dict[Path, bytes]  # the session files
    flows: list  # every recorded flow
    live: dict[Path, bytes]  # every file of the record directory while carol's last call was in flight
    output: str  # the gateway's own log
    upstream: str  # the upstream's output (where `customer` and `noisy` print the notes they received)


def _until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _flows(path: Path) -> list:
    with open(path, "rb") as f:
        return list(io.FlowReader(f).stream())


def _files(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


class Stack:
    """The dev issuer, the SDK server (JSON answers or event streams) and, on demand, a gateway in front of
    it with identity, the ruleset, an audit log and a recording (all under `tmp`), on one fixed port."""

    def __init__(self, tmp: Path, mode: str, exit_stack: contextlib.ExitStack):
        self.tmp, self.mode = tmp, mode
        (tmp / "rules.yaml").write_text(RULES)
        self.audit_log, self.record_dir = tmp / "audit.jsonl", tmp / "sessions"
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}/mcp"
        self.issuer = exit_stack.enter_context(DevIssuer(audience=self.endpoint))
        self.srv = exit_stack.enter_context(
            sdk_server("streamable-http", ["--json-response"] if mode == "json" else []))

    @contextlib.contextmanager
    def gateway(self):
        args = mitmdump_args(self.srv.url, self.port, {
            "ruleset": str(self.tmp / "rules.yaml"), "oidc_issuer": self.issuer.url, "oidc_resource": self.endpoint,
            "audit_log": str(self.audit_log), "record_dir": str(self.record_dir)})
        with running(args, self.port, env={"BASTION_AUDIT_KEY": AUDIT_KEY}) as gw:
            assert _until(lambda: f"issuer {self.issuer.url}:" in gw.output()), gw.output()
            yield gw

    def token(self, user: str) -> str:
        return self.issuer.mint(user)


async def lingering_call(st: Stack, mode: str, stop) -> None:
    """carol's `noisy` call (with her note) still in flight when `stop` (blocking) stops the gateway."""
    async def call() -> None:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {st.token('carol')}"},
                                      timeout=httpx2.Timeout(TIMEOUT, read=TIMEOUT)) as http:
            async with Client(streamable_http_client(st.endpoint, http_client=http), mode=mode) as c:
                await c.call_tool("noisy", {"id": 7, "note": NOTE["carol"], "linger": LINGER})

    task = asyncio.create_task(call())
    await _eventually(lambda: "noisy 7: note" in st.srv.output() or task.done(), TIMEOUT)
    assert not task.done(), task
    await asyncio.sleep(0.5)  # the call's masked events reach the client (and the recorder)
    await asyncio.to_thread(stop)
    task.cancel()
    with contextlib.suppress(Exception, asyncio.CancelledError):  # the call ends with the gateway: expected
        await asyncio.wait_for(task, 10)


@pytest.fixture(scope="module", params=["json", "sse"])
def run(request, tmp_path_factory) -> Run:
    mode = request.param
    got: dict[tuple[str, str], Got] = {}
    live: dict[Path, bytes] = {}
    with contextlib.ExitStack() as exit_stack:
        st = Stack(tmp_path_factory.mktemp(f"masking-{mode}"), mode, exit_stack)
        with st.gateway() as gw:

            async def all_sessions() -> None:
                for era, client_mode in ERAS.items():
                    for user in USERS:
                        got[user, era] = await asyncio.wait_for(
                            session(st.endpoint, st.token(user), client_mode, NOTE[user]), TIMEOUT)

                def stop() -> None:  # SIGTERM: every flow, the one in flight too, is written out
                    live.update(_files(st.record_dir))  # with the in-flight journal
                    gw.stop()

                await lingering_call(st, "legacy", stop)

            asyncio.run(all_sessions())
            output = gw.log_path.read_text(errors="replace")
        upstream = st.srv.output()
    recordings = {p: p.read_bytes() for p in sorted(st.record_dir.glob("*.mitm"))}
    text = st.audit_log.read_text()
    return Run(mode, got, text, [json.loads(line) for line in text.splitlines() if line.strip()],
               recordings, [f for p in recordings for f in _flows(p)], live, output, upstream)


# --- helpers for the assertions ---------------------------------------------------------------


def leaks(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return [v for v in VALUES if v in text]


MASKED_RECORD = {"id": 42, "name": "Jane Doe", "card": "[MASKED:card]", "email": "[MASKED:email]",
                 "phone": "[MASKED:phone]", "note": "deploy key [MASKED:aws_access_key]"}
PLAIN_RECORD = {"id": 42, "name": "Jane Doe", "card": CARD, "email": EMAIL, "phone": PHONE,
                "note": f"deploy key {AWS_KEY}"}


def _subject(flow) -> str | None:
    ident = flow.metadata.get("bastion.identity")
    return ident.get("sub") if isinstance(ident, dict) else None


def _bodies(flow) -> bytes:
    out = flow.request.raw_content or b""
    if flow.response is not None:
        out += flow.response.raw_content or b""
    return out


# --- what the clients got ----------------------------------------------------------------------


@pytest.mark.parametrize("era", ERAS)
def test_carol_gets_every_value_masked_and_valid_answers(run, era):
    got = run.got["carol", era]
    assert not [k for k, v in got.ops.items() if "exception" in v], got.ops  # every answer parsed
    tools = {t["name"] for t in got.ops["tools"]["tools"]}
    assert {"customer", "failing_lookup", "noisy", "add"} <= tools
    assert got.ops["add"]["content"][0]["text"] == "5"  # not masked, not broken

    customer = got.ops["customer"]
    assert customer["content"][0]["text"] == (
        "Customer 42: Jane Doe, card [MASKED:card], mail [MASKED:email], phone [MASKED:phone], "
        "key [MASKED:aws_access_key]")
    assert customer["structuredContent"] == {"customer": MASKED_RECORD}
    embedded = customer["content"][1]
    assert embedded["type"] == "resource" and embedded["resource"]["uri"] == "customers://42"
    assert json.loads(embedded["resource"]["text"]) == MASKED_RECORD  # still JSON inside the string

    failing = got.ops["failing"]
    assert failing["isError"] is True
    assert failing["content"][0]["text"] == (
        "Error executing tool failing_lookup: no customer 42 for [MASKED:email], card [MASKED:card]")
    assert got.ops["protocol_error"] == {"error": {
        "code": -32001, "message": "customer 42 locked: [MASKED:email] / [MASKED:card]",
        "data": {"email": "[MASKED:email]", "card": "[MASKED:card]", "hint": "call [MASKED:phone]"}}}

    assert got.ops["noisy"]["structuredContent"] == {"customer": MASKED_RECORD}
    if run.mode == "sse":  # in JSON mode the SDK server drops a call's notifications
        assert {"msg": "looking up [MASKED:email]", "card": "[MASKED:card]",
                "key": "[MASKED:aws_access_key]"} in got.logs
        assert got.progress == ["charging card [MASKED:card] for [MASKED:email]"]
        assert "looking up customer 42" in got.logs  # log messages without a value arrive as they were

    if run.mode == "sse" or era == "2025-11-25":  # 2025: on the GET stream, masked by `contractors-stream`
        assert broadcasts(got) == [{"broadcast": "[MASKED:email] was looked up, call [MASKED:phone]"}]

    bulk = got.ops["customers"]
    assert bulk["structuredContent"]["customers"] == [{**MASKED_RECORD, "id": i} for i in range(BULK)]
    assert bulk["content"][0]["text"].splitlines() == [
        f"{i}: Jane Doe [MASKED:card] [MASKED:email] [MASKED:phone] [MASKED:aws_access_key]" for i in range(BULK)]

    (contents,) = got.ops["resource"]["contents"]
    assert contents["uri"] == "customers://42" and json.loads(contents["text"]) == MASKED_RECORD
    (message,) = got.ops["prompt"]["messages"]
    assert message["content"]["text"] == (
        "Write to customer 42 ([MASKED:email], [MASKED:phone]) about card [MASKED:card].")


@pytest.mark.parametrize("era", ERAS)
def test_carol_never_receives_a_value_not_even_in_the_raw_bytes(run, era):
    got = run.got["carol", era]
    assert b"[MASKED:card]" in got.raw
    assert leaks(got.raw) == []
    assert leaks(json.dumps([got.ops, got.logs, got.progress])) == []
    messages = got.messages()  # every message on the wire is still valid JSON-RPC
    assert messages and all(m.get("jsonrpc") == "2.0" for m in messages)
    _, answer = got.answer("tools/call", name="failing_lookup", arguments={"id": 42, "protocol_error": True})
    assert answer["error"]["code"] == -32001  # ids and codes never change
    if era == "2026-07-28":  # the upstream marks resources public; masked for this caller, never shared
        _, answer = got.answer("resources/read", uri="customers://42")
        assert answer["result"]["cacheScope"] == "private"


@pytest.mark.parametrize("era", ERAS)
def test_alice_receives_every_value_unchanged(run, era):
    got = run.got["alice", era]
    assert "[MASKED:" not in json.dumps([got.ops, got.logs, got.progress]) and b"[MASKED:" not in got.raw
    customer = got.ops["customer"]
    assert customer["structuredContent"] == {"customer": PLAIN_RECORD}
    assert json.loads(customer["content"][1]["resource"]["text"]) == PLAIN_RECORD
    assert CARD in customer["content"][0]["text"] and AWS_KEY in customer["content"][0]["text"]
    assert EMAIL in got.ops["failing"]["content"][0]["text"]
    assert got.ops["protocol_error"]["error"]["data"] == {"email": EMAIL, "card": CARD, "hint": f"call {PHONE}"}
    assert json.loads(got.ops["resource"]["contents"][0]["text"]) == PLAIN_RECORD
    assert PHONE in got.ops["prompt"]["messages"][0]["content"]["text"]
    if run.mode == "sse":
        assert {"msg": f"looking up {EMAIL}", "card": CARD, "key": AWS_KEY} in got.logs
        assert got.progress == [f"charging card {CARD} for {EMAIL}"]
    if run.mode == "sse" or era == "2025-11-25":
        assert broadcasts(got) == [{"broadcast": f"{EMAIL} was looked up, call {PHONE}"}]
    assert got.ops["customers"]["structuredContent"]["customers"] == [{**PLAIN_RECORD, "id": i} for i in range(BULK)]
    assert set(leaks(got.raw)) >= {CARD, EMAIL, PHONE, AWS_KEY}


def test_what_carol_sends_reaches_the_upstream_masked(run):
    """The request's own params are masked too: the upstream gets carol's note without her card number."""
    assert run.upstream.count(f"customer 42: note '{NOTE['alice']}'") == 2  # alice's, as sent (two eras)
    assert run.upstream.count("customer 42: note 'my card is [MASKED:card]'") == 2  # carol's
    assert "5555 5555 5555 4444" not in run.upstream and "5555555555554444" not in run.upstream


def test_the_answers_came_in_the_mode_under_test(run):
    """JSON mode: JSON bodies. SSE mode: event streams for the calls that send notifications first (both
    eras), and for every answer of the 2025 era (a 2026-07-28 answer with nothing before it is JSON)."""
    for (user, era), got in run.got.items():
        for tool in ("customer", "failing_lookup", "noisy"):
            ctype, _ = got.answer("tools/call", name=tool)
            streamed = ctype.startswith("text/event-stream")
            if run.mode == "json":
                assert ctype.startswith("application/json"), (user, era, tool, ctype)
            elif tool != "customer" or era == "2025-11-25":
                assert streamed, (user, era, tool, ctype)
        for method, params in (("resources/read", {"uri": "customers://42"}),
                               ("prompts/get", {"name": "customer_brief"})):
            ctype, _ = got.answer(method, **params)
            assert ctype.startswith("application/json" if run.mode == "json" or era == "2026-07-28"
                                    else "text/event-stream"), (user, era, method, ctype)


# --- the audit log -------------------------------------------------------------------------------


def _masked_in_audit(records: list[dict], subject: str) -> dict[tuple[str, str], set[tuple[str, str]]]:
    """(era, target) -> {(detector, path)} of every mask decision on `subject`'s flows."""
    targets: dict[str, str] = {}
    for r in records:
        target = r.get("tool") or r.get("prompt") or r.get("resource") or r.get("uri") or (
            f"http:{r.get('method')}" if r.get("kind") == "http" else None)
        if r.get("subject") == subject and r.get("flow") and target:
            targets[r["flow"]] = target
    found: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for r in records:
        if r.get("subject") != subject:
            continue
        era = "2026-07-28" if str(r.get("session")).startswith("day-") else "2025-11-25"
        for d in r.get("decisions") or ():
            if d.get("action") == "mask" and d.get("masked"):
                assert d["profiles"] == ["pii"], d
                for m in d["masked"]:
                    found.setdefault((era, targets.get(r.get("flow"), "?")), set()).add((m["detector"], m["path"]))
    return found


AUDITED = {
    "customer": {("card", "$.params.arguments.note"),  # carol's own note, on its way to the upstream
                 ("card", "$.result.content[0].text"), ("email", "$.result.content[0].text"),
                 ("phone", "$.result.content[0].text"), ("aws_access_key", "$.result.content[0].text"),
                 ("card", "$.result.content[1].resource.text"), ("email", "$.result.content[1].resource.text"),
                 ("card", "$.result.structuredContent.customer.card"),
                 ("email", "$.result.structuredContent.customer.email"),
                 ("phone", "$.result.structuredContent.customer.phone"),
                 ("aws_access_key", "$.result.structuredContent.customer.note")},
    "failing_lookup": {("email", "$.result.content[0].text"), ("card", "$.result.content[0].text"),
                       ("email", "$.error.message"), ("card", "$.error.message"), ("email", "$.error.data.email"),
                       ("card", "$.error.data.card"), ("phone", "$.error.data.hint")},
    "noisy": {("card", "$.result.structuredContent.customer.card")},
    "customers://42": {("card", "$.result.contents[0].text"), ("email", "$.result.contents[0].text"),
                       ("phone", "$.result.contents[0].text"), ("aws_access_key", "$.result.contents[0].text")},
    "customer_brief": {("email", "$.result.messages[0].content.text"), ("phone", "$.result.messages[0].content.text"),
                       ("card", "$.result.messages[0].content.text")},
}
EVENTS = {("email", "$.params.data.msg"), ("card", "$.params.data.card"), ("aws_access_key", "$.params.data.key"),
          ("card", "$.params.message"), ("email", "$.params.message")}  # `noisy`'s log message and progress
BROADCAST = {("email", "$.params.data.broadcast"), ("phone", "$.params.data.broadcast")}  # and the one for no request


def audited(mode: str, era: str) -> dict[str, set[tuple[str, str]]]:
    """What the audit log must show as masked for carol's calls (mode: how the upstream answered)."""
    expected = dict(AUDITED)
    if mode == "sse":  # the notifications ride the calls' event streams (JSON mode: the SDK drops them)
        expected["noisy"] = AUDITED["noisy"] | EVENTS | (BROADCAST if era == "2026-07-28" else set())
    if era == "2025-11-25":  # the log message for no request, on the session's GET stream
        expected["http:GET"] = BROADCAST
    return expected


def test_the_audit_log_names_detectors_and_paths_never_a_value(run):
    assert run.records and leaks(run.audit) == []  # the whole log, every caller
    found = _masked_in_audit(run.records, "carol")
    for era in ERAS:
        for target, pairs in audited(run.mode, era).items():
            assert pairs <= found.get((era, target), set()), (era, target, sorted(found.get((era, target), ())))
    assert _masked_in_audit(run.records, "alice") == {}  # alice's messages were not masked
    for era in ERAS:  # the big answer: a bounded list of findings, a full count
        listed = found[era, "customers"]
        assert listed and all(path.startswith("$.result.") for _, path in listed), listed
    bulk = [d for r in run.records if r.get("subject") == "carol" and r.get("tool") == "customers"
            for d in r.get("decisions") or () if d.get("stage") == "resp:mask"]
    assert len(bulk) == 2 and all(d["reason"] == f"{8 * BULK} value(s) masked (aws_access_key, card, email, phone)"
                                  and len(d["masked"]) <= 20 for d in bulk), bulk
    carol_calls = [r for r in run.records if r.get("subject") == "carol" and r.get("tool") == "customer"
                   and r.get("kind") == "request"]
    assert len(carol_calls) == 2 and all(r["action"] == "mask" and r["rule"] == "contractors-customers"
                                         and r["masking"]["profile"] == "pii" for r in carol_calls)


# --- the recordings --------------------------------------------------------------------------------


def test_carols_recordings_hold_only_masked_bytes(run):
    carol = [f for f in run.flows if _subject(f) == "carol"]
    alice = [f for f in run.flows if _subject(f) == "alice"]
    assert carol and alice
    for f in carol:
        assert leaks(_bodies(f)) == [], (f.request.method, f.request.path, f.metadata.get("bastion.mcp"))
    assert sum(b"[MASKED:card]" in _bodies(f) for f in carol) >= 6  # customer, noisy, both failures, resource, prompt
    assert any(CARD.encode() in _bodies(f) for f in alice)  # a recording is what each client got
    files = {p: data for p, data in run.recordings.items() if "_carol_" in p.name}
    assert files and len(files) < len(run.recordings)
    for p, data in files.items():  # every byte of the file: bodies, headers, metadata
        assert leaks(data) == [], p.name
        assert b"[MASKED:" in data


def test_the_gateways_own_log_holds_no_value(run):
    assert leaks(run.output) == []


def test_a_call_in_flight_at_stop_is_recorded_masked_and_so_is_the_journal(run):
    """carol's last call was still running when the gateway got SIGTERM: its journal entry (while running)
    and its recording (marked incomplete) hold her note masked, and the stream so far masked."""
    journals = {p: data for p, data in run.live.items() if ".inflight" in p.parts}
    assert any(b"my card is [MASKED:card]" in data for data in journals.values()), sorted(journals)
    for p, data in run.live.items():  # carol's note, everywhere in the record directory, while running
        assert b"5555 5555 5555 4444" not in data and b"5555555555554444" not in data, p
    (flow,) = [f for f in run.flows if _subject(f) == "carol" and b'"linger"' in (f.request.raw_content or b"")]
    assert "incomplete" in flow.metadata["bastion.record"]
    assert b"my card is [MASKED:card]" in flow.request.raw_content
    assert leaks(_bodies(flow)) == []
    if run.mode == "sse":
        assert b'"card":"[MASKED:card]"' in flow.response.raw_content  # the log message, as carol got it


def test_a_gateway_killed_mid_call_leaves_only_masked_bytes(tmp_path):
    """SIGKILL while carol's call is in flight: the next gateway recovers the call from the journal into her
    recording, masked; nothing in the record directory or the audit log holds a value."""
    with contextlib.ExitStack() as exit_stack:
        st = Stack(tmp_path, "sse", exit_stack)
        with st.gateway() as gw:
            asyncio.run(asyncio.wait_for(lingering_call(st, "auto", lambda: gw.stop(signal.SIGKILL)), 2 * TIMEOUT))
        assert gw.proc.returncode == -signal.SIGKILL
        assert any(".inflight" in p.parts for p in _files(st.record_dir))  # the journal the kill left behind
        with st.gateway() as gw:
            assert _until(lambda: "recovered" in gw.output(), 10), gw.output()
    files = _files(st.record_dir)
    assert not any(".inflight" in p.parts for p in files)  # recovered, then removed
    flows = [f for p in files if p.suffix == ".mitm" for f in _flows(p)]
    assert {_subject(f) for f in flows} == {"carol"}
    (flow,) = [f for f in flows if b'"linger"' in (f.request.raw_content or b"")]
    assert "incomplete" in flow.metadata["bastion.record"]
    assert b"my card is [MASKED:card]" in flow.request.raw_content
    for p, data in {**files, st.audit_log: st.audit_log.read_bytes()}.items():
        assert leaks(data) == [], p


# --- event-stream shapes the SDK server never sends (a scripted upstream) ----------------------------

NOTIFY = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": f"card {CARD}"}}


def _answer(rid: int) -> dict:
    return {"jsonrpc": "2.0", "id": rid, "result": {"content": [{"type": "text", "text": f"mail {EMAIL}"}]}}


def _data(obj: Any, eol: str = "\n") -> bytes:
    return f"data: {json.dumps(obj)}{eol}{eol}".encode()


def _lines(obj: dict) -> bytes:  # one JSON message over several `data:` lines
    return ("data: " + json.dumps(obj, indent=1).replace("\n", "\ndata: ") + "\n\n").encode()


def _bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


STREAMS = {  # name -> the chunks of the upstream's event stream answering request `rid`
    "data over several lines": lambda rid: [_lines(NOTIFY), _lines(_answer(rid))],
    "byte by byte": lambda rid: _bytewise(_data(NOTIFY) + _data(_answer(rid))),
    "CR line ends": lambda rid: [_data(NOTIFY, "\r"), _data(_answer(rid), "\r")],
    "a batch in one event": lambda rid: [_data([NOTIFY, _answer(rid)])],
    "a comment carrying a value": lambda rid: [f": card {CARD}\n\n".encode(), _data(NOTIFY), _data(_answer(rid))],
    "an event id carrying a value": lambda rid: [f"id: {EMAIL}\n".encode() + _data(NOTIFY), _data(_answer(rid))],
    "a retry field carrying a value": lambda rid: [f"retry: {CARD.replace(' ', '')}\n".encode() + _data(NOTIFY),
                                                   _data(_answer(rid))],
}
CASES = list(STREAMS)


class _Scripted(BaseHTTPRequestHandler):
    """Answers `tools/call customer` with the event stream of case number `id`."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        rid = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))["id"]
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for chunk in STREAMS[CASES[rid]](rid):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> tuple[dict[str, bytes], list, str]:
    """Each case once, for carol, through a gateway with identity, audit log and recording: what carol's
    HTTP client read (by case), the recorded flows, and the audit log."""
    tmp = tmp_path_factory.mktemp("masking-scripted")
    (tmp / "rules.yaml").write_text(RULES)
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/mcp"
    got: dict[str, bytes] = {}
    try:
        with DevIssuer(audience=endpoint) as issuer:
            args = mitmdump_args(f"http://127.0.0.1:{upstream.server_address[1]}", port, {
                "ruleset": str(tmp / "rules.yaml"), "oidc_issuer": issuer.url, "oidc_resource": endpoint,
                "audit_log": str(tmp / "audit.jsonl"), "record_dir": str(tmp / "sessions")})
            with running(args, port, env={"BASTION_AUDIT_KEY": AUDIT_KEY}) as gw:
                assert _until(lambda: f"issuer {issuer.url}:" in gw.output()), gw.output()
                headers = {"authorization": f"Bearer {issuer.mint('carol')}", "mcp-protocol-version": "2026-07-28",
                           "accept": "application/json, text/event-stream", "mcp-method": "tools/call",
                           "mcp-name": "customer"}
                with httpx.Client(timeout=TIMEOUT) as http:
                    for rid, case in enumerate(CASES):
                        body = {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": {
                            "name": "customer", "arguments": {"id": rid}, "_meta": {
                                "io.modelcontextprotocol/protocolVersion": "2026-07-28",
                                "io.modelcontextprotocol/clientCapabilities": {}}}}
                        with http.stream("POST", endpoint, json=body, headers=headers) as r:
                            got[case] = b"".join(r.iter_raw())
    finally:
        upstream.shutdown()
        upstream.server_close()
    flows = [f for p in sorted((tmp / "sessions").glob("*.mitm")) for f in _flows(p)]
    return got, flows, (tmp / "audit.jsonl").read_text()


# CASES[4:7] (a comment, `id:` and `retry:` holding values) were findings: they went through verbatim.
@pytest.mark.parametrize("case", [
    *CASES,
])
def test_every_event_stream_shape_reaches_carol_masked(scripted, case):
    got, flows, audit_log = scripted
    rid = CASES.index(case)
    raw = got[case]
    assert leaks(audit_log) == []
    (flow,) = [f for f in flows if json.loads(f.request.raw_content or b"{}").get("id") == rid]
    assert b"[MASKED:card]" in raw and b"[MASKED:email]" in raw, raw  # the notification and the answer, masked
    assert leaks(raw) == [], raw
    assert leaks(_bodies(flow)) == [], _bodies(flow)
