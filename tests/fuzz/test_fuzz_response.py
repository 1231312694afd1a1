"""
Fuzzing the upstream's answer through the whole shipped bundle (tests/bundled.py) with hypothesis.

A request is forwarded (a call, a list, a batch, a notification, a GET stream, the old
HTTP+SSE stream); the upstream answers anything: JSON-RPC answers, lists to filter,
server requests and notifications the ruleset denies, batches, near misses, garbage,
event streams (any line ends, comments, ids, retry, endpoint events, split at any byte),
under any status, Content-Type, charset and Content-Encoding. The hooks run as mitmproxy
runs them (`responseheaders`, the body through `response.stream` chunk by chunk when
streamed, `response`), and what the client receives must be either

- a parsed-and-checked answer: strict JSON-RPC (a JSON body, or the data of every event
  a WHATWG client dispatches), each message one of the upstream's as it was or as the
  stages changed it (a filtered list, a private cacheScope), nothing the ruleset denies,
  and nothing a `str.splitlines()` client reads differently; or
- withheld or replaced: the gateway's own JSON-RPC error, or the status without the body.

Never upstream bytes nobody parsed; never the gateway's internal error (-31010) but for
an event stream that fails closed on input made to be refused.

Inputs that hit a known finding are kept out of the strategies (each says where); the
findings are the `test_finding_*` tests at the end (each failed until its fix), with a minimal reproduction.

BASTION_FUZZ_EXAMPLES=N raises the number of examples (and explores new inputs) for a
longer local run; without it every run tries the same inputs (`derandomize`).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.net import encoding
from mitmproxy.proxy.layers.http import HttpResponseHeadersHook, HttpResponseHook

from fuzz.test_fuzz_sse import LOOSE, cut, whatwg
from mcp_bastion.addons.pipeline import Pipeline
from mcp_bastion.core import errors
from mcp_bastion.core.jsonrpc import ParseError, parse_body
from mcp_bastion.core.media import charset_problem, media_type
from mcp_bastion.core.vocab import Meta

from bundled import Bundled, bundled, forwarded

pytestmark = pytest.mark.anyio

EXTRA = int(os.environ.get("BASTION_FUZZ_EXAMPLES") or 0)
DERANDOMIZE = not EXTRA
SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture]


def examples(n: int) -> int:
    """`n` in CI; BASTION_FUZZ_EXAMPLES raises it for a longer local run."""
    return max(n, EXTRA)


def outcome(what: str) -> None:
    """How an input ended, for `--hypothesis-show-statistics` (outside a hypothesis test: nothing)."""
    if currently_in_test_context():
        event(what)


@pytest.fixture
def anyio_backend():
    return "asyncio"


RULES = """\
version: 1
default: allow
rules:
  - id: no-drop
    match: {tools: ["drop_*"]}
    action: deny
  - id: no-sampling
    match: {direction: server_to_client, methods: [sampling/createMessage]}
    action: deny
  - id: quiet
    match: {direction: server_to_client, methods: [notifications/message]}
    action: deny
"""
DENIED_SERVER_METHODS = {"sampling/createMessage", "notifications/message"}
GATEWAY_CODES = {errors.DENIED, errors.APPROVAL_REQUIRED, errors.REFUSED_INPUT, errors.FORBIDDEN,
                 errors.GATEWAY_ERROR, errors.UPSTREAM_ERROR}
CLIENT = "http://localhost:8080"  # where the client addressed the gateway (reverse mode)


@pytest.fixture(scope="module")
def rules(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("fuzz") / "rules.yaml"
    p.write_text(RULES)
    return str(p)


@contextlib.asynccontextmanager
async def gateway(**options) -> AsyncIterator[Bundled]:
    """`bundled()`, whose answers to the upstream's requests are kept instead of posted, shut down as mitmproxy
    shuts down (each hypothesis example runs in an event loop of its own)."""
    with bundled(**options) as b:
        b.answered = []  # type: ignore[attr-defined]
        b.addon(Pipeline).answers.send = lambda flow, answers, verify=True: b.answered.extend(answers)
        try:
            yield b
        finally:
            await b.tctx.master.done()


# --- what the client asked ---------------------------------------------------------------------------------------

META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}
ASKS = {
    "call": ("POST", "/mcp", {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "read_file"}}),
    "list": ("POST", "/mcp", {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}),
    "batch": ("POST", "/mcp", [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                               {"jsonrpc": "2.0", "id": "b", "method": "tools/call", "params": {"name": "read_file"}}]),
    "2026": ("POST", "/mcp", {"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                              "params": {"name": "read_file", "_meta": META}}),
    "note": ("POST", "/mcp", {"jsonrpc": "2.0", "method": "notifications/initialized"}),
    "stream": ("GET", "/mcp", None),
    "legacy": ("GET", "/sse", None),
    "delete": ("DELETE", "/mcp", None),
}
ASKED_IDS = [5, 7, 1, "b", 9]

# --- what the upstream may answer --------------------------------------------------------------------------------

TOOL_NAMES = ["read_file", "deploy", "drop_table", "drop_users", "ｄｒｏｐ＿ｘ"]  # drop_*: hidden from this caller
words = st.text(st.sampled_from("abc xyz-_/.é\u2028\t"), max_size=8)  # (never a denied name)


@st.composite
def results(draw) -> object:
    shape = draw(st.sampled_from(["tools", "tools", "empty", "content", "task", "input", "prompts", "scalar"]))
    if shape == "tools":
        out: dict = {"tools": [{"name": n} for n in draw(st.lists(st.sampled_from(TOOL_NAMES), max_size=4))]}
        if draw(st.booleans()):
            out["tools"].append(draw(st.sampled_from([{}, {"name": 1}, "x", {"title": "drop_table"}])))
        if draw(st.booleans()):
            out["cacheScope"] = draw(st.sampled_from(["public", "private", "shared"]))
        if draw(st.booleans()):
            out["nextCursor"] = draw(words)
        return out
    if shape == "empty":
        return {}
    if shape == "content":
        return {"content": [{"type": "text", "text": draw(words)}], "isError": draw(st.booleans())}
    if shape == "task":
        return {"task": {"taskId": draw(st.sampled_from(["t1", "t2"])), "status": "working"}}
    if shape == "input":
        method = draw(st.sampled_from(["sampling/createMessage", "elicitation/create", "roots/list"]))
        return {"resultType": "input_required", "inputRequests": {"r1": {"method": method, "params": {}}}}
    if shape == "prompts":
        return {"prompts": [{"name": n} for n in draw(st.lists(st.sampled_from(TOOL_NAMES), max_size=3))]}
    return draw(st.sampled_from([None, 1, "x", [], True]))


@st.composite
def server_messages(draw, valid: bool = True) -> object:
    """One message of the upstream's: an answer (to an asked id or not), an error, a server request or a
    notification (some of which the ruleset denies), or (unless `valid`) a near miss of JSON-RPC."""
    kinds = ["answer"] * 5 + ["error", "request", "notification", "notification"]
    kind = draw(st.sampled_from(kinds if valid else [*kinds, "invalid", "invalid"]))
    msg_id = draw(st.one_of(st.sampled_from(ASKED_IDS), st.sampled_from([99, "5", "x", 0])))
    if kind == "answer":
        return {"jsonrpc": "2.0", "id": msg_id, "result": draw(results())}
    if kind == "error":
        return {"jsonrpc": "2.0", "id": draw(st.one_of(st.just(msg_id), st.none())),
                "error": {"code": draw(st.sampled_from([-32601, -32000, errors.DENIED])), "message": draw(words)}}
    if kind == "request":
        method = draw(st.sampled_from(["sampling/createMessage", "elicitation/create", "roots/list", "ping"]))
        return {"jsonrpc": "2.0", "id": draw(st.sampled_from(["s1", 100])), "method": method, "params": {}}
    if kind == "notification":
        method = draw(st.sampled_from(["notifications/progress", "notifications/message",
                                       "notifications/tools/list_changed"]))
        return {"jsonrpc": "2.0", "method": method, "params": {"progress": 1}}
    return draw(st.sampled_from([{"jsonrpc": "2.0"}, {"id": 5, "result": {}}, {"jsonrpc": "1.0", "id": 5, "result": 1},
                                 {"jsonrpc": "2.0", "id": 5, "result": {}, "error": {}}, [], "x", 5, None]))


@st.composite
def json_bodies(draw, twisted: bool = False) -> bytes:
    value = draw(server_messages(not twisted)) if draw(st.integers(0, 3)) else draw(
        st.lists(server_messages(not twisted), min_size=1, max_size=3))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    twist = draw(st.sampled_from(["none", "none", "truncated", "duplicate", "bom", "nan", "trailing", "latin1"])
                 ) if twisted else "none"
    if twist == "truncated":
        text = text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    elif twist == "duplicate" and text.startswith("{") and len(text) > 2:
        text = '{"jsonrpc": "2.0", ' + text[1:]
    elif twist == "nan" and text.endswith("}"):
        text = text[:-1] + (", " if len(text) > 2 else "") + '"x": NaN}'
    elif twist == "trailing":
        text += " x"
    elif twist == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    elif twist == "latin1":
        return text.encode("latin-1", "replace")
    return text.encode("utf-8", "surrogatepass")


# Endpoint announcements (old HTTP+SSE transport): relative, absolute on the upstream's own origin, elsewhere,
# and made of pieces a URL parser may read one way or another.
ENDPOINTS = ["/messages?session_id=abc", "/messages/", "messages?x=1", "{origin}/messages?session_id=s2",
             "{origin}/m", "http://evil.example/messages", "//evil.example/x", "https://127.0.0.1/x", " /messages ",
             "", "?session_id=q"]
ENDPOINT_PIECES = ["/", "//", "evil.example", "messages", "?session_id=a", "#x", "%2f", "@", ":1", ":99999", "[",
                   "\t", " ", "\u2028", "\x0b", "\x85", "\\", "http:", "https:", "{origin}", "."]


def known_endpoint_finding(endpoint: str) -> bool:
    """An endpoint of one of the findings at the end of this file (a backslash, a character another line splitter
    cuts at, a URL Python cannot split): kept out of the property, covered by those tests."""
    if "\\" in endpoint or any(c in LOOSE for c in endpoint):
        return True
    base = "http://127.0.0.1:1"
    try:
        urlsplit(urljoin(base + "/sse", endpoint.replace("{origin}", base).strip())).port  # noqa: B018 (it raises)
    except ValueError:
        return True
    return False


endpoints = st.one_of(st.sampled_from(ENDPOINTS), st.lists(st.sampled_from(ENDPOINT_PIECES), min_size=1, max_size=5)
                      .map("".join)).filter(lambda e: not known_endpoint_finding(e))


@st.composite
def sse_bodies(draw, twisted: bool = False) -> bytes:
    """An event stream: JSON-RPC events (one message or a batch, in one data line or one per line of pretty JSON),
    comments, ids, retry, endpoint events, and now and then an event no client reads the same."""
    nl = draw(st.sampled_from(["\n", "\n", "\r\n", "\r"]))
    parts: list[str] = []
    if draw(st.integers(0, 7)) == 0:
        parts.append("\ufeff")
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["message"] * 6 + ["comment", "id", "retry", "endpoint"] + ["odd"] * twisted))
        lines: list[str] = []
        if kind == "message":
            value = draw(server_messages(not twisted)) if draw(st.integers(0, 3)) else draw(
                st.lists(server_messages(not twisted), min_size=1, max_size=2))
            if draw(st.booleans()):
                lines.append(draw(st.sampled_from(["event: message", "event:message", "event:"])))
            if draw(st.integers(0, 4)) == 0:
                lines += ["data: " + line for line in json.dumps(value, indent=1).split("\n")]
            else:
                lines.append("data: " + json.dumps(value, ensure_ascii=draw(st.booleans())))
            if draw(st.integers(0, 3)) == 0:
                lines.append(f"id: {draw(st.integers(0, 99))}")
        elif kind == "comment":
            lines.append(":" + draw(words))
        elif kind == "id":
            lines.append("id: " + draw(st.sampled_from(["1", "", "a\x00b", "7"])))
        elif kind == "retry":
            lines.append("retry: " + draw(st.sampled_from(["100", "x", ""])))
        elif kind == "endpoint":
            lines += ["event: endpoint", "data: " + draw(endpoints)]
        else:
            lines += draw(st.sampled_from([["event: ping", "data: hello"], ["event: MESSAGE", 'data: {"x":1}'],
                                           ["data: {not json"], ["data:"], ["data: []"], ["foo: bar"],
                                           ["data: " + json.dumps({"jsonrpc": "2.0", "id": 5, "result": {"a": 1}}) +
                                            "\u2028data: x"]]))
        parts.append(nl.join(lines) + nl + nl)
    if twisted and draw(st.booleans()):
        parts.append("data: {\"jsonrpc\":\"2.0\",\"id\":5")  # cut short by the end of the stream
    return "".join(parts).encode("utf-8")


GARBAGE = [b"<html><body>Internal error: AWS_SECRET=abc</body></html>", b"Accepted", b"\x00\xff\xfe", b"null",
           b"event: message\ndata: {}\n\n", b"OK"]
CTYPES = {
    "json": ["application/json", "application/json; charset=utf-8", "Application/JSON",
             "application/json; charset=latin1", "application/json; charset", "application/problem+json",
             "application/json-rpc", "text/json"],
    "sse": ["text/event-stream", "text/event-stream; charset=utf-8", "TEXT/EVENT-STREAM",
            "text/event-stream; charset=utf-16", "text/event-stream;charset=UTF-8"],
    "other": ["text/html", "text/plain; charset=utf-8", "application/octet-stream", ""],
}


@dataclass
class Answer:
    """The upstream's answer as the gateway receives it (shown as is in a falsifying example)."""

    ask: str
    status: int
    headers: dict[str, str]
    body: bytes
    cuts: list[bytes] = field(default_factory=list)  # how the network delivers the body


TWISTS = ["body", "body", "status", "ctype", "coding", "mismatch", "length", "session"]


@st.composite
def answers(draw) -> Answer:
    """A well-formed answer of the kind the Content-Type says, with none, one or a few twists."""
    ask = draw(st.sampled_from(list(ASKS)))
    n = draw(st.sampled_from([0, 0, 0, 1, 1, 2]))
    twists = set(draw(st.lists(st.sampled_from(TWISTS), min_size=n, max_size=n)))
    shape = draw(st.sampled_from(["json", "json", "sse", "sse", "sse", "other"]))
    twisted = "body" in twists
    body = draw({"json": json_bodies(twisted), "sse": sse_bodies(twisted), "other": st.sampled_from(GARBAGE)}[shape])
    if "mismatch" in twists:  # a body the Content-Type does not describe
        body = draw(st.one_of(json_bodies(), sse_bodies(), st.sampled_from(GARBAGE)))
    status = draw(st.sampled_from([200, 201, 202, 204, 301, 400, 401, 404, 500, 503])) if "status" in twists else 200
    headers: dict[str, str] = {}
    ctype = draw(st.sampled_from([c for group in CTYPES.values() for c in group])) if "ctype" in twists else (
        CTYPES[shape][0] if shape != "other" else draw(st.sampled_from(CTYPES["other"])))
    if ctype:
        headers["content-type"] = ctype
    if "coding" in twists:
        coding = draw(st.sampled_from(["gzip", "lying-gzip", "br", "identity", "deflate", "x-unknown"]))
        if status >= 300 and coding in ("gzip", "lying-gzip", "br", "deflate"):
            coding = "identity"  # an error page in a coding mitmproxy writes: a finding (end of this file)
        if media_type(ctype) == "text/event-stream":
            coding = "identity"  # a compressed event stream: a finding (end of this file)
        if coding == "gzip":
            body, headers["content-encoding"] = gzip.compress(body), "gzip"
        elif coding == "lying-gzip":
            headers["content-encoding"] = "gzip"
        else:
            headers["content-encoding"] = coding
    if "length" in twists:
        headers["content-length"] = draw(st.sampled_from(["99999999", "abc", "0"]))
    if "session" in twists:
        headers["mcp-session-id"] = "s-1"
    return Answer(ask, status, headers, body, draw(cut(body)))


# --- mitmproxy's response side, and what the client got ------------------------------------------------------------


@dataclass
class Received:
    status: int
    headers: http.Headers
    body: bytes
    streamed: bool


async def ask(b: Bundled, name: str) -> http.HTTPFlow:
    verb, path, doc = ASKS[name]
    f = b.flow(verb, doc, path=path, headers={"mcp-protocol-version": "2026-07-28"} if name == "2026" else None)
    await b.request(f)
    assert forwarded(f), f.response and f.response.content
    return f


async def answer(b: Bundled, f: http.HTTPFlow, a: Answer) -> Received:
    """The upstream's answer through the hooks, as mitmproxy's HTTP layer drives them."""
    origin = b.upstream
    body = a.body.replace(b"{origin}", origin.encode())
    cuts = [c.replace(b"{origin}", origin.encode()) for c in a.cuts]
    f.response = http.Response.make(a.status, body, {})
    f.response.headers.update(a.headers)
    f.response.data.content = None  # not read yet
    await b.tctx.master.addons.trigger_event(HttpResponseHeadersHook(f))
    assert f.error is None
    resp = f.response
    if resp.stream and body:
        status, headers, out = resp.status_code, resp.headers.copy(), []
        for chunk in [*(c for c in cuts if c), b""]:  # (mitmproxy sends b"" only at the end: the end)
            if not callable(resp.stream):
                out.append(chunk)  # streamed unread: what the check below must never see
                continue
            sent = resp.stream(chunk)
            out.extend([sent] if isinstance(sent, bytes) else sent)
        await b.tctx.master.addons.trigger_event(HttpResponseHook(f))
        return Received(status, headers, b"".join(out), True)
    resp.data.content = body
    await b.tctx.master.addons.trigger_event(HttpResponseHook(f))
    assert f.error is None
    return Received(f.response.status_code, f.response.headers, f.response.raw_content or b"", False)


def messages_of(data: str) -> list:
    """The JSON-RPC messages of one body or event, read strictly (as the gateway reads them)."""
    body = parse_body(data)
    assert all(m.kind != "invalid" for m in body.messages), data
    return [m.raw for m in body.messages]


def upstream_messages(a: Answer) -> list:
    """Every JSON-RPC message the upstream sent, read leniently (anything that could be a message)."""
    data = a.body
    if a.headers.get("content-encoding") == "gzip":
        with contextlib.suppress(OSError, EOFError):
            data = gzip.decompress(data)
    found: list = []
    texts = [d for _, d, _ in whatwg(data)] + [data.decode("utf-8", "replace").removeprefix("\ufeff")]
    for text in texts:
        with contextlib.suppress(ValueError):
            value = json.loads(text)
            found.extend(value if isinstance(value, list) else [value])
    return found


def filtered(original: object, got: object) -> bool:
    """`got` is `original` as the stages may change it: list items hidden, `cacheScope` made private."""
    if got == original:
        return True
    if not (isinstance(original, dict) and isinstance(got, dict) and isinstance(original.get("result"), dict)
            and isinstance(got.get("result"), dict) and {k: v for k, v in got.items() if k != "result"}
            == {k: v for k, v in original.items() if k != "result"}):
        return False
    before, after = original["result"], got["result"]
    if after.keys() != before.keys():
        return False
    for key, value in after.items():
        old = before[key]
        if key == "cacheScope":
            if value != old and value != "private":
                return False
        elif isinstance(old, list) and isinstance(value, list):
            if [x for x in old if x in value] != value:
                return False
        elif value != old:
            return False
    return True


def assert_allowed(m: object) -> None:
    """Nothing the ruleset keeps from this caller: a denied server request or notification, a hidden tool."""
    assert not (isinstance(m, dict) and m.get("method") in DENIED_SERVER_METHODS), m
    result = m.get("result") if isinstance(m, dict) else None
    items = result.get("tools") if isinstance(result, dict) else None
    for item in items if isinstance(items, list) else []:
        name = item.get("name") if isinstance(item, dict) else None
        assert isinstance(name, str), f"an unnamed item was listed: {item!r}"
        assert not name.startswith("drop_") and not name.startswith("ｄｒｏｐ"), f"hidden tool listed: {m}"


def assert_checked_or_gateways(messages: list, a: Answer, gateway_errors_ok: bool) -> None:
    sent = upstream_messages(a)
    for m in messages:
        err = m.get("error") if isinstance(m, dict) else None
        if any(filtered(u, m) for u in sent):
            assert_allowed(m)
            continue
        assert isinstance(err, dict) and err.get("code") in GATEWAY_CODES, f"not the upstream's, not the gateway's: {m}"
        assert err["code"] != errors.GATEWAY_ERROR or gateway_errors_ok, f"internal error: {m}"


# Why an event stream may fail closed: input made to be refused (anything else is a finding).
DESIGNED = ("unreadable JSON-RPC in SSE event", "SSE event is not a valid JSON-RPC message", "upstream sent an event "
            "of type", "upstream announced a message endpoint on another origin", "compressed event stream",
            "event stream declaring", "SSE event larger than", "message endpoint that is not a plain URL")


def client_origin(endpoint: str) -> str:
    """The origin a WHATWG URL parser (browsers, Node, the TypeScript SDK) resolves an announced endpoint to,
    against the URL the client opened: tabs and newlines removed, C0 and space trimmed, `\\` read as `/`."""
    ref = re.sub("[\t\n\r]", "", endpoint).strip("".join(map(chr, range(0x21)))).replace("\\", "/")
    parts = urlsplit(urljoin(CLIENT + "/sse", ref))
    return f"{parts.scheme}://{parts.netloc}"


def decodes_to_nothing(got: Received) -> bool:
    """A body that is only the framing of its Content-Encoding (the gateway emptied a body in that coding)."""
    coding = got.headers.get("content-encoding")
    if not coding:
        return False
    try:
        return encoding.decode(got.body, coding) == b""
    except ValueError:
        return False


def assert_received(f: http.HTTPFlow, a: Answer, got: Received) -> None:
    error = f.metadata.get(Meta.ERROR)
    if got.streamed:
        outcome("streamed" + (" (failed closed)" if error else ""))
        if got.body:  # what the gateway sends is plain text: a Content-Encoding would make the client decode it
            assert got.headers.get("content-encoding", "identity").strip().lower() in ("", "identity"), (
                f"events sent as {got.headers['content-encoding']}: {got.body[:80]!r}")
        text = got.body.decode("utf-8", "replace")  # as a client decodes it (the gateway reads it the same)
        assert text.splitlines() == re.split("\r\n|\r|\n", text)[: len(text.splitlines())], "reads differently"
        assert not text.startswith("\ufeff")
        assert error is None or error.startswith("sse: ") and any(reason in error for reason in DESIGNED), (
            f"the stream failed on an internal error: {error}")
        events = whatwg(got.body)
        for i, (kind, data, _) in enumerate(events):
            if kind == "endpoint":
                assert client_origin(data) == CLIENT, f"the client is sent elsewhere: {data!r}"
                continue
            assert kind == "message", f"an event no check read: {kind!r}"
            if not data:
                continue  # an empty event: nothing to act on
            msgs = messages_of(data)
            assert_checked_or_gateways(msgs, a, gateway_errors_ok=error is not None)
            if any(isinstance(m.get("error"), dict) and m["error"].get("code") == errors.GATEWAY_ERROR for m in msgs):
                # the stream stopped there: only its other error events follow
                assert all(messages_of(d)[0]["error"]["code"] == errors.GATEWAY_ERROR for _, d, _ in events[i:] if d)
        return
    outcome(f"buffered {got.status}" + (" (gateway's answer)" if f.metadata.get(Meta.REFUSED) else ""))
    assert error is None, f"internal error: {error}"
    if not got.body or decodes_to_nothing(got):
        return
    assert media_type(got.headers.get("content-type")) == "application/json", "an unread body"
    assert charset_problem(got.headers.get("content-type")) is None
    assert got.headers.get("content-encoding", "identity").strip().lower() in ("", "identity")
    try:
        msgs = messages_of(got.body.decode("utf-8"))
    except (ParseError, UnicodeDecodeError) as e:
        raise AssertionError(f"the client got a body that does not read as JSON-RPC: {got.body[:200]!r}") from e
    assert_checked_or_gateways(msgs, a, gateway_errors_ok=False)


@settings(max_examples=examples(300), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(answers())
async def test_every_answer_reaches_the_client_checked_or_not_at_all(rules, a):
    async with gateway(ruleset=rules) as b:
        f = await ask(b, a.ask)
        got = await answer(b, f, a)
    assert_received(f, a, got)
    # the upstream's requests the ruleset denies are answered (with an error) on the client's behalf, only those
    assert all(set(m) == {"jsonrpc", "id", "error"} and m["id"] in ("s1", 100) for m in b.answered)


# --- findings --------------------------------------------------------------------------------------------------------


async def streamed(b: Bundled, ask_name: str, wire: bytes) -> tuple[http.HTTPFlow, Received]:
    f = await ask(b, ask_name)
    got = await answer(b, f, Answer(ask_name, 200, {"content-type": "text/event-stream"}, wire, [wire]))
    return f, got


@pytest.mark.parametrize("endpoint", ["{origin}:1/x", "http://127.0.0.1:99999/x"])
async def test_finding_an_endpoint_with_an_invalid_port_crashes_the_stream(rules, endpoint):
    async with gateway(ruleset=rules) as b:
        wire = f"event: endpoint\ndata: {endpoint}\n\n".replace("{origin}", b.upstream).encode()
        f, got = await streamed(b, "legacy", wire)
    assert f.metadata[Meta.ERROR].startswith("sse: upstream announced a message endpoint")


@pytest.mark.parametrize("endpoint", ["/\\evil.example/x", "\\\\evil.example\\x", "http:\\\\evil.example/x"])
async def test_finding_a_backslash_endpoint_sends_a_whatwg_client_elsewhere(rules, endpoint):
    async with gateway(ruleset=rules) as b:
        f, got = await streamed(b, "legacy", f"event: endpoint\ndata: {endpoint}\n\n".encode())
    for kind, data, _ in whatwg(got.body):
        assert kind != "endpoint" or client_origin(data) == CLIENT, data


async def test_finding_an_options_answer_is_forwarded_unread(rules):
    async with gateway(ruleset=rules) as b:
        f = b.flow("OPTIONS", None, path="/mcp")
        await b.request(f)
        assert forwarded(f)
        a = Answer("options", 200, {"content-type": "text/html"}, GARBAGE[0], [GARBAGE[0]])
        got = await answer(b, f, a)
    assert_received(f, a, got)


@pytest.mark.parametrize("endpoint", ["/\u2028/evil.example/x", "/\x0b/evil.example/x", "http:/\x85/evil.example/x"])
async def test_finding_an_endpoint_rewritten_after_its_check_sends_the_client_elsewhere(rules, endpoint):
    async with gateway(ruleset=rules) as b:
        f, got = await streamed(b, "legacy", f"event: endpoint\ndata: {endpoint}\n\n".encode())
    for kind, data, _ in whatwg(got.body):
        assert kind != "endpoint" or client_origin(data) == CLIENT, data


@pytest.mark.parametrize("coding", ["gzip", "br", "deflate"])
@pytest.mark.parametrize("status", [404, 500])
async def test_finding_a_compressed_error_page_is_replaced_by_an_unreadable_body(rules, coding, status):
    page = b"<html>Traceback ... AWS_SECRET=abc</html>"
    async with gateway(ruleset=rules) as b:
        f = await ask(b, "call")
        a = Answer("call", status, {"content-type": "text/html", "content-encoding": coding},
                   encoding.encode(page, coding), [])
        a.cuts = [a.body]
        got = await answer(b, f, a)
    assert b"AWS_SECRET" not in got.body
    assert_received(f, a, got)


@pytest.mark.parametrize("coding", ["gzip", "br", "x-unknown"])
async def test_finding_a_compressed_stream_answers_in_a_coding_it_does_not_use(rules, coding):
    wire = b'data: {"jsonrpc":"2.0","id":5,"result":{}}\n\n'
    async with gateway(ruleset=rules) as b:
        f = await ask(b, "call")
        body = encoding.encode(wire, coding) if coding != "x-unknown" else wire
        a = Answer("call", 200, {"content-type": "text/event-stream", "content-encoding": coding}, body, [body])
        got = await answer(b, f, a)
    assert b"-31010" in got.body  # the pending call is answered (fail closed, as designed) ...
    assert_received(f, a, got)  # ... in a form the client can read
