"""
Fuzzing the request path through the whole shipped bundle (tests/bundled.py) with hypothesis.

Every input (valid and invalid JSON, JSON-RPC shaped objects with any method, params
and id, batches, duplicate keys, deep nesting, huge numbers, NaN, lone surrogates,
BOMs, other encodings and compressions; any Content-Type, Accept, Content-Encoding,
charset and Mcp-* headers; any HTTP method and path) ends in one of two ways:

- forwarded: no response, not killed, every stage the Gate requires marked, every
  message decided by the ruleset (a `policy` decision for each), and what goes
  upstream is exactly the strictly parsed, checked body (plain JSON, no
  Content-Encoding, no client credential, routing headers that say what it says);
- answered by the gateway with a clear refusal: a JSON-RPC error body that parses
  (or 202 and nothing), never the gateway's internal error (-31010, fail closed on
  an exception).

With a ruleset that denies some tools, methods and resources, a denied message is
never forwarded, whatever its spelling (case, full-width and zero-width characters,
JSON escapes, dot segments, inside a batch, with extra fields, any id type, as a
notification, named by the 2026 routing headers only).

Inputs that hit a known finding are kept out of the strategies (each says where); the
findings are the `test_finding_*` tests at the end (each failed until its fix), with a minimal reproduction.

BASTION_FUZZ_EXAMPLES=N raises the number of examples (and explores new inputs) for a
longer local run; without it every run tries the same inputs (`derandomize`).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.proxy.layers.http import HttpResponseHeadersHook, HttpResponseHook

from mcp_bastion.addons.gate import Gate
from mcp_bastion.core import errors
from mcp_bastion.core.jsonrpc import parse_body
from mcp_bastion.core.media import charset_problem, media_type
from mcp_bastion.core.vocab import Meta
from mcp_bastion.glue import flowstate as fs

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


# --- what a client may send ---------------------------------------------------------------------------------

# Integer literals stay below Python's 4300-digit conversion limit: beyond it is a finding (end of this file).
MAX_DIGITS = 4000

METHODS = ["tools/call", "tools/list", "prompts/get", "resources/read", "resources/subscribe", "initialize", "ping",
           "notifications/initialized", "notifications/cancelled", "tasks/get", "tasks/list", "server/discover",
           "subscriptions/listen", "logging/setLevel", "completion/complete", "TOOLS/CALL", "tools/\uff43all", "",
           "rpc.discover", "x/y"]
NAMES = ["read_file", "deploy", "drop_table", "ｄｒｏｐ＿ｔａｂｌｅ", "", " ", "a\u200bb", "é"]
texts = st.one_of(st.sampled_from(NAMES + METHODS), st.text(max_size=6))  # (lone surrogates included)
numbers = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=10,
)
VERSION_META = "io.modelcontextprotocol/protocolVersion"


@st.composite
def params(draw, valid: bool = True) -> object:
    shape = "target" if valid else draw(st.sampled_from(["target", "list", "scalar", "any"]))
    if shape == "list":
        return draw(st.lists(json_values, max_size=2))
    if shape == "scalar":
        return draw(st.one_of(numbers, texts, st.none()))
    if shape == "any":
        return draw(st.dictionaries(texts, json_values, max_size=3))
    out: dict = {}
    if draw(st.booleans()):
        out["name"] = draw(st.sampled_from(NAMES)) if valid else draw(json_values)
    if draw(st.integers(0, 3)) == 0:
        out["uri"] = draw(st.sampled_from(["file:///srv/readme", "file:///etc/passwd", "x", ""]))
    if draw(st.booleans()):
        out["arguments"] = draw(st.dictionaries(texts, json_values, max_size=3))
    if draw(st.integers(0, 3)) == 0:
        out["_meta"] = {VERSION_META: draw(st.sampled_from(["2026-07-28", "2025-06-18", "x"]))}
    if draw(st.integers(0, 5)) == 0:
        out["cursor"] = draw(texts)
    return out


@st.composite
def rpc(draw, valid: bool = True) -> object:
    """A JSON-RPC message (a request mostly, a notification, the client's answer), or a near miss of one."""
    kind = draw(st.sampled_from(["request"] * 6 + ["notification", "notification", "result", "error"]))
    m: dict = {"jsonrpc": "2.0"}
    if kind != "notification":
        m["id"] = draw(st.one_of(st.integers(-5, 5), st.integers(-(2**64), 2**64), st.text(max_size=4)))
    if kind in ("request", "notification"):
        m["method"] = draw(st.one_of(st.sampled_from(METHODS), texts))
        if draw(st.integers(0, 5)):
            m["params"] = draw(params())
    elif kind == "result":
        m["result"] = draw(json_values)
    else:
        m["error"] = {"code": draw(st.integers(-32768, 0)), "message": draw(texts)}
    if draw(st.integers(0, 5)) == 0:
        m[draw(st.sampled_from(["extra", "ID", "Method", "jsonrpc2"]))] = draw(json_values)
    if valid:
        return m
    miss = draw(st.sampled_from(["jsonrpc", "id", "method", "params", "both", "null-id", "junk"]))
    if miss == "jsonrpc":
        m["jsonrpc"] = draw(st.sampled_from(["1.0", 2.0, None, "2.0 ", "2"]))
        if draw(st.booleans()):
            del m["jsonrpc"]
    elif miss == "id":
        m["id"] = draw(st.sampled_from([True, 1.5, [1], {}, float("-0")]))
    elif miss == "method":
        m["method"] = draw(st.one_of(st.integers(), st.none(), st.lists(texts, max_size=1)))
    elif miss == "params":
        m.setdefault("method", "tools/call")
        m["params"] = draw(params(valid=False))
    elif miss == "both":
        m["method"], m["result"] = "ping", {}
    elif miss == "null-id":
        m["id"], m["method"] = None, "ping"
    else:
        return draw(json_values)
    return m


@st.composite
def json_documents(draw, valid: bool = True) -> object:
    if not valid and draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from([[], {}, [[]], "x", 1, None, [None]]))
    if draw(st.integers(0, 3)):
        return draw(rpc(valid))
    members = draw(st.lists(rpc(), min_size=1, max_size=4))
    if not valid:
        members.insert(draw(st.integers(0, len(members))), draw(rpc(valid=False)))
    return members


# Raw JSON put in place of a value: the lexical corners two parsers may read differently.
ODD_VALUES = ["NaN", "-Infinity", "Infinity", "1e400", "-1e400", "1.0e-400", "-0", "0.1e1", "1E+2",
              '"\\ud800"', '"\\udc00\\ud800"', '"\\ud83d\\ude00"', '"\\u0000"', '"\\u0064rop_table"',
              "1" * MAX_DIGITS, "-" + "9" * 400, "1" * 400 + ".5", "[" * 63 + "]" * 63, "[" * 65 + "]" * 65,
              "[" * 3000 + "]" * 3000, '{"a":' * 70 + "1" + "}" * 70, "true", "null", '"' + "x" * 300 + '"']


def as_json(doc: object, ascii_only: bool, compact: bool) -> str:
    return json.dumps(doc, ensure_ascii=ascii_only, separators=(",", ":") if compact else None)


@st.composite
def body_texts(draw) -> bytes:
    """A body with one lexical twist: an odd value, a repeated key, white space, garbage, cut short, another
    charset, an invalid byte, a BOM, or no JSON at all."""
    doc = draw(json_documents())
    text = as_json(doc, draw(st.booleans()), draw(st.booleans()))
    twist = draw(st.sampled_from(["odd-value", "odd-value", "odd-value", "duplicate-key", "whitespace", "garbage",
                                  "truncated", "charset", "byte", "bom", "binary", "empty"]))
    if twist == "odd-value":
        odd = draw(st.sampled_from(ODD_VALUES))
        if isinstance(doc, dict):
            text = text[:-1] + (", " if len(text) > 2 else "") + f'"{draw(st.sampled_from(["params", "x"]))}": {odd}}}'
        else:
            text = text[:-1] + f", {odd}]"
    elif twist == "duplicate-key":
        text = text.replace("{", '{"jsonrpc": "2.0", ', 1) if "{" in text else text + "{"
    elif twist == "whitespace":
        text = draw(st.sampled_from([" ", "\n", "\t", "\r\n", "\u00a0", "\u2028", "\u3000"])) + text + "\n"
    elif twist == "garbage":
        text += draw(st.sampled_from(["x", "}", "]", "{}", "\x00", "//", " ,"]))
    elif twist == "truncated":
        text = text[: draw(st.integers(0, max(len(text) - 1, 0)))]
    elif twist == "binary":
        return draw(st.binary(max_size=40))
    elif twist == "empty":
        return b""
    if twist == "charset":
        charset = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252", "utf-8-sig"]))
        return text.encode(charset, errors="replace")
    data = text.encode("utf-8", errors="surrogatepass")
    if twist == "bom":
        return b"\xef\xbb\xbf" + data
    if twist == "byte" and data:
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\x00"])) + data[i:]
    return data


CODINGS = ["gzip", "deflate", "raw-deflate", "gzip, gzip", "GZIP ", "identity", "br", "lying-gzip", "x-gzip",
           "gzip, identity", "compress", "bomb"]


def encoded(data: bytes, coding: str) -> tuple[bytes, str]:
    """`data` as sent with Content-Encoding `coding` (or, for the lying ones, not encoded at all)."""
    if coding in ("gzip", "GZIP ", "x-gzip", "gzip, identity"):
        return gzip.compress(data), coding
    if coding == "gzip, gzip":
        return gzip.compress(gzip.compress(data)), coding
    if coding == "deflate":
        return zlib.compress(data), coding
    if coding == "raw-deflate":
        c = zlib.compressobj(wbits=-15)
        return c.compress(data) + c.flush(), "deflate"
    if coding == "lying-gzip":
        return data, "gzip"
    if coding == "bomb":  # small on the wire, beyond any body limit decoded
        return gzip.compress(b" " * (5 * 1024 * 1024) + data), "gzip"
    return data, coding


CONTENT_TYPES = [
    "application/json; charset=utf-8", "application/json;charset=UTF-8", 'application/json; charset="utf-8"',
    "Application/JSON", " application/json ", "application/json; charset=utf-16", "application/json; charset=latin1",
    "application/json; charset", "application/json; charset=utf-8; charset=utf-16", "application/json, text/plain",
    "application/jsonx", "application/problem+json", "text/json", "text/plain", "text/event-stream",
    "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", "", "*/*", 'application/json; x="a;b"',
]
ACCEPTS = ["application/json", "text/event-stream", "*/*", "", "text/html", "application/json;q=0"]
PATHS = ["/sse", "/messages", "/messages/", "/mcp?x=1", "/mcp/", "/MCP", "/%6dcp", "//mcp", "/mcp;x",
         "/mcp/../admin", "/mcp#f", "/mcp?access_token=t", "/mcp?session_id=1", "/", "/mcp?\u00e9", "/m\u00e9cp",
         "/.well-known/oauth-protected-resource", "*", "/mcp\\..\\x", "/mcp?a=1&access_token="]
BODYLESS = ("GET", "DELETE", "HEAD", "OPTIONS")  # the verbs MCP sends without a body
VERBS = [*BODYLESS, "GET", "DELETE", "PUT", "PATCH", "TRACE", "post", "CONNECT", "FOO"]
TWISTS = ["document", "document", "body", "body", "coding", "ctype", "accept", "verb", "path", "routing", "routing",
          "version", "session", "origin", "host", "auth", "upgrade", "length", "resume"]


def b64(value: str) -> str:
    return "=?base64?" + base64.b64encode(value.encode("utf-8", "surrogatepass")).decode() + "?="


@dataclass
class Req:
    """One client request as the gateway receives it (shown as is in a falsifying example)."""

    verb: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    drop: tuple[str, ...] = ()  # default headers of a POST the client did not send


@st.composite
def requests(draw) -> Req:
    """A POST of JSON-RPC to /mcp, with none, one or a few twists (each may be refused or may pass): the body
    (malformed JSON-RPC, odd JSON, other bytes), its coding, any header MCP or HTTP reads, the verb, the path."""
    n = draw(st.sampled_from([0, 0, 1, 1, 1, 2, 3]))
    twists = set(draw(st.lists(st.sampled_from(TWISTS), min_size=n, max_size=n)))
    verb, path, headers, drop = "POST", "/mcp", {}, []
    doc = draw(json_documents(valid="document" not in twists))
    body = draw(body_texts()) if "body" in twists else as_json(doc, draw(st.booleans()), True).encode(
        "utf-8", "surrogatepass")
    if "verb" in twists:
        verb = draw(st.sampled_from(VERBS))
        if verb in BODYLESS and draw(st.integers(0, 3)):
            body = b""
    if "coding" in twists:
        body, headers["content-encoding"] = encoded(body, draw(st.sampled_from(CODINGS)))
        if verb in BODYLESS and body:  # a finding of its own (end of this file): kept out of the way
            del headers["content-encoding"]
    if "ctype" in twists:
        ctype = draw(st.sampled_from(CONTENT_TYPES))
        if ctype:
            headers["content-type"] = ctype
        else:
            drop.append("content-type")
    if "accept" in twists:
        accept = draw(st.sampled_from(ACCEPTS))
        if accept:
            headers["accept"] = accept
        else:
            drop.append("accept")
    if "path" in twists:
        path = draw(st.sampled_from(PATHS))
    if "routing" in twists:  # the 2026 routing headers: what the body says, or not
        first = (doc[0] if doc else {}) if isinstance(doc, list) else doc
        method = first.get("method") if isinstance(first, dict) else None
        p = first.get("params") if isinstance(first, dict) else None
        name = p.get("name") if isinstance(p, dict) else None
        headers["mcp-protocol-version"] = "2026-07-28"
        if isinstance(method, str) and method.isprintable() and draw(st.integers(0, 2)):
            headers["mcp-method"] = method
        elif draw(st.booleans()):
            headers["mcp-method"] = draw(st.sampled_from(METHODS[:-3]))
        if isinstance(name, str) and draw(st.integers(0, 2)):
            headers["mcp-name"] = name if name.isascii() and name.isprintable() and name == name.strip() else b64(name)
        elif draw(st.booleans()):
            headers["mcp-name"] = draw(st.sampled_from([*NAMES[:3], b64("drop_table"), "=?base64?!!?=",
                                                         "=?base64?ZHJvcF90YWJsZQ?="]))
        if draw(st.integers(0, 3)) == 0:
            headers[draw(st.sampled_from(["mcp-param-env", "Mcp-Param-X"]))] = draw(st.sampled_from(["1", "a"]))
    if "version" in twists:
        headers["mcp-protocol-version"] = draw(st.sampled_from(["2026-07-28", "2025-06-18", "2025-11-25", "x", "",
                                                                " 2026-07-28", "2099-01-01"]))
    if "session" in twists:
        headers["mcp-session-id"] = draw(st.sampled_from(["abc", "", "1"]))
    if "origin" in twists:
        headers["origin"] = draw(st.sampled_from(["http://localhost:3000", "https://evil.example", "null", "file://",
                                                  "http://127.0.0.1", "HTTP://LOCALHOST:1", "http://localhost:1/x"]))
    if "host" in twists:
        headers["host"] = draw(st.sampled_from(["localhost:8080", "evil.example", "LOCALHOST:1", "[::1]:80", "[::1",
                                                "localhost:", "127.0.0.1:99999", "localhost.:8080", ""]))
    if "auth" in twists:
        headers["authorization"] = draw(st.sampled_from(["Bearer x", "Basic YTpi", "", "bearer"]))
    if "upgrade" in twists:
        headers["upgrade"] = "websocket"
    if "length" in twists:
        headers["content-length"] = draw(st.sampled_from(["99999999999", "-1", "abc", "0", "1"]))
    if "resume" in twists:
        headers["last-event-id"] = "7"
    return Req(verb, path, body, headers, tuple(drop))


# --- driving the bundle, and what must hold -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def gateway(**options) -> AsyncIterator[Bundled]:
    """`bundled()`, then shut down as mitmproxy shuts down (the `done` hook). Each hypothesis example runs in
    an event loop of its own: a master left running would keep its log handler, bound to a closed loop."""
    with bundled(**options) as b:
        try:
            yield b
        finally:
            await b.tctx.master.done()



def flow_of(b: Bundled, r: Req) -> http.HTTPFlow:
    f = b.flow(r.verb, r.body)  # a POST gets the default Content-Type and Accept, as a client would send
    f.request.path = r.path
    if r.verb != "POST" and r.body:
        f.request.headers["content-type"] = "application/json"
    for name in r.drop:
        f.request.headers.pop(name, None)
    f.request.headers.update(r.headers)  # after make(): a Content-Length the client lied about stays
    return f


async def send(b: Bundled, f: http.HTTPFlow) -> None:
    """The request hooks, then, for an answer the gateway set itself, the response hooks mitmproxy runs on it."""
    await b.request(f)
    if f.response is not None and f.error is None:
        await b.tctx.master.addons.trigger_event(HttpResponseHeadersHook(f))
        await b.tctx.master.addons.trigger_event(HttpResponseHook(f))


def request_ids(body: bytes) -> set:
    """Ids a client could recognise in the answer (from a lenient read of what it sent, compressed or not)."""
    for inflate in (lambda d: d, gzip.decompress, zlib.decompress, lambda d: zlib.decompress(d, -15),
                    lambda d: gzip.decompress(gzip.decompress(d))):
        try:
            value = json.loads(inflate(body))
        except (ValueError, RecursionError, OSError, EOFError, zlib.error):
            continue
        items = value if isinstance(value, list) else [value]
        return {json.dumps(m["id"]) for m in items if isinstance(m, dict) and "id" in m}
    return set()


def header_value(value: str) -> str:
    """A routing header as the upstream reads it: `=?base64?...?=` decoded."""
    if value.startswith("=?base64?") and value.endswith("?="):
        return base64.b64decode(value[len("=?base64?"):-2]).decode("utf-8")
    return value


def assert_forwarded_as_checked(b: Bundled, f: http.HTTPFlow) -> None:
    assert f.error is None
    assert Meta.ERROR not in f.metadata, f.metadata.get(Meta.ERROR)
    missing = [str(s) for s in b.addon(Gate).request_stages if not fs.passed(f, s)]
    assert not missing, f"forwarded without the stages {missing}"
    decided = {d.get("ref") for d in f.metadata.get(Meta.DECISIONS, []) if d.get("stage") == "policy"}
    assert "authorization" not in f.request.headers
    body = fs.request_body(f)
    if body is None:  # a body-less request: the pseudo-message http:VERB met the ruleset
        assert f.request.method in ("GET", "DELETE", "HEAD", "OPTIONS") and not f.request.raw_content
        assert "request/0" in decided
        return
    assert f.request.method == "POST"
    assert media_type(f.request.headers.get("content-type")) == "application/json"
    assert charset_problem(f.request.headers.get("content-type")) is None
    assert f.request.headers.get("content-encoding", "identity").strip().lower() in ("", "identity")
    sent = parse_body(f.request.raw_content or b"")  # what goes upstream reads unambiguously ...
    assert sent.batch == body.batch  # ... and is what was checked
    assert [m.raw for m in sent.messages] == [m.raw for m in body.messages]
    assert all(m.kind not in ("invalid",) for m in sent.messages)
    assert {m.ref for m in body.messages} <= decided, "a message went upstream without a policy decision"
    headers = f.request.headers
    for m in body.messages:  # an upstream dispatching on the routing headers runs what the body says
        if m.kind not in ("request", "notification"):
            continue
        if "mcp-method" in headers:
            assert headers["mcp-method"] == m.method
        if "mcp-name" in headers:
            named = [m.params.get(k) for k in ("name", "uri", "taskId")] if isinstance(m.params, dict) else []
            assert header_value(headers["mcp-name"]) in named


def assert_refused_clearly(f: http.HTTPFlow, body: bytes) -> None:
    assert f.error is None, f"killed: {f.error}"
    r = f.response
    assert r is not None and f.metadata.get(Meta.REFUSED), "answered, but not by the gateway"
    assert Meta.ERROR not in f.metadata, f"internal error: {f.metadata.get(Meta.ERROR)}"
    if r.status_code == 202:  # notifications the stages took: nothing to answer
        assert r.content == b""
        return
    assert r.headers.get("content-type") == "application/json"
    answer = json.loads(r.content)
    items = answer if isinstance(answer, list) else [answer]
    assert items
    for item in items:
        assert item.get("jsonrpc") == "2.0" and set(item) == {"jsonrpc", "id", "error"}, item
        err = item["error"]
        assert isinstance(err.get("code"), int) and isinstance(err.get("message"), str) and err["message"]
        assert err["code"] != errors.GATEWAY_ERROR, f"internal error answered: {err}"
        assert item["id"] is None or json.dumps(item["id"]) in request_ids(body)
    assert r.status_code == 200 or 400 <= r.status_code < 600  # 200: JSON-RPC errors for refused calls


def assert_outcome(b: Bundled, f: http.HTTPFlow, body: bytes) -> None:
    if forwarded(f):
        outcome("forwarded")  # (--hypothesis-show-statistics shows how the inputs ended)
        assert_forwarded_as_checked(b, f)
    else:
        assert_refused_clearly(f, body)
        outcome(f"refused {f.response.status_code}")


# Options the bundle runs with: the defaults, and small limits (cheap to reach).
OPTIONS = [{}, {}, {"max_body_size": "2k", "max_json_depth": 8}]


@settings(max_examples=examples(250), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(requests(), st.sampled_from(OPTIONS))
async def test_every_request_is_forwarded_as_checked_or_refused_clearly(req, options):
    async with gateway(**options) as b:
        f = flow_of(b, req)
        await send(b, f)
    assert_outcome(b, f, req.body)


# --- denied, in any spelling ------------------------------------------------------------------------------------

DENY_RULES = """\
version: 1
default: allow
rules:
  - id: no-drop
    match: {tools: ["drop_*"]}
    action: deny
  - id: no-secrets
    match: {methods: ["secrets/*"]}
    action: deny
  - id: no-etc
    match: {resources: ["file:///etc/*"]}
    action: deny
  - id: no-delete
    match: {methods: ["http:DELETE"]}
    action: deny
"""
DENY_IDS = {"no-drop", "no-secrets", "no-etc", "no-delete"}


@pytest.fixture(scope="module")
def deny_rules(tmp_path_factory) -> str:
    p = tmp_path_factory.mktemp("fuzz") / "deny.yaml"
    p.write_text(DENY_RULES)
    return str(p)


TOOL_SPELLINGS = ["drop_table", "DROP_TABLE", "Drop_Table", "ｄｒｏｐ＿ｔａｂｌｅ", "dr\u200bop_table",
                  "drop\u00ad_table", "\u202edrop_table", " drop_table", "drop_table\t", "drop_", "DROP_users",
                  "ｄrop_x", "drop_\u0301", "\ufeffdrop_table", "dro\u2060p_table"]
CALL_SPELLINGS = ["tools/call", "TOOLS/CALL", "Tools/Call", "tools/\uff43all", " tools/call", "tools/call\n",
                  "\u200btools/call", "ｔｏｏｌｓ／ｃａｌｌ"]
SECRET_METHODS = ["secrets/get", "SECRETS/get", "ｓｅｃｒｅｔｓ/get", "secrets/\u200bget", "Secrets/", " secrets/x"]
ETC_URIS = ["file:///etc/passwd", "FILE:///etc/passwd", "file://localhost/etc/passwd", "file:/etc/passwd",
            "file:///srv/app/../../etc/passwd", "file:///%65tc/passwd", "file:///etc//passwd", "file:////etc/passwd",
            "file:///etc/passwd#x", "file:///srv/%2e%2e/etc/shadow", "file:\\\\\\etc\\passwd", " file:///etc/passwd",
            "file:///e\ttc/passwd", "file:///etc/passwd?x", "ｆｉｌｅ:///etc/passwd", "file://LOCALHOST/etc/passwd",
            "file:///etc%2Fshadow"]
READ_METHODS = ["resources/read", "RESOURCES/READ", "resources/subscribe", "resources/unsubscribe"]


def escaped(text: str, mask: list[bool]) -> str:
    """A JSON string literal for `text` with the characters `mask` picks written as \\u escapes."""
    out = []
    for i, ch in enumerate(text):
        if (mask[i % len(mask)] if mask else False) or ch in '"\\' or ord(ch) < 0x20:
            out.extend(f"\\u{unit:04x}" for unit in _units(ch))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _units(ch: str) -> list[int]:
    data = ch.encode("utf-16-be", "surrogatepass")
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]


@dataclass
class Denied:
    """A request carrying a denied message (and the headers it came with)."""

    verb: str
    text: str
    headers: dict[str, str] = field(default_factory=dict)


@st.composite
def denied_members(draw) -> str:
    """One denied JSON-RPC message, as JSON text, in one of many spellings."""
    what = draw(st.sampled_from(["tool", "tool", "secret", "resource", "listen"]))
    mask = draw(st.lists(st.booleans(), max_size=6))
    extra = draw(st.dictionaries(st.sampled_from(["extra", "x-y", "ID", "Method", "_meta"]), json_values, max_size=2))
    if what == "tool":
        method, p = draw(st.sampled_from(CALL_SPELLINGS)), {
            "name": draw(st.sampled_from(TOOL_SPELLINGS)), "arguments": draw(st.dictionaries(texts, json_values,
                                                                                               max_size=2))}
    elif what == "secret":
        method, p = draw(st.sampled_from(SECRET_METHODS)), draw(st.dictionaries(texts, json_values, max_size=2))
    elif what == "resource":
        method, p = draw(st.sampled_from(READ_METHODS)), {"uri": draw(st.sampled_from(ETC_URIS))}
    else:
        method, p = "subscriptions/listen", {"notifications": {"resourceSubscriptions": [
            draw(st.sampled_from(ETC_URIS))]}, "_meta": {VERSION_META: "2026-07-28"}}
    for key, value in draw(st.dictionaries(st.sampled_from(["_meta", "cursor", "extra"]), json_values,
                                           max_size=2)).items():
        p.setdefault(key, value)
    target = {"name": "name", "uri": "uri"}
    members = ['"jsonrpc": "2.0"', f'"method": {escaped(method, mask)}']
    body_params = ", ".join(
        f'{json.dumps(k)}: {escaped(v, mask) if k in target and isinstance(v, str) else json.dumps(v)}'
        for k, v in p.items())
    members.append(f'"params": {{{body_params}}}')
    if what == "listen" or draw(st.integers(0, 5)):  # else a notification (a listen one is a finding, below)
        members.append('"id": ' + json.dumps(draw(st.one_of(
            st.integers(-5, 5), st.integers(-(10**30), 10**30), st.text(max_size=3), st.just("")))))
    members += [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in extra.items() if k not in ("jsonrpc", "id")]
    order = draw(st.permutations(members))
    return "{" + ", ".join(order) + "}"


ALLOWED = ['{"jsonrpc": "2.0", "id": "a%d", "method": "tools/call", "params": {"name": "read_file"}}',
           '{"jsonrpc": "2.0", "id": "b%d", "method": "ping"}', '{"jsonrpc": "2.0", "method": "notifications/x%d"}',
           '{"jsonrpc": "2.0", "id": "c%d", "result": {}}']


@st.composite
def denied_requests(draw) -> Denied:
    headers: dict[str, str] = {}
    if draw(st.integers(0, 9)) == 0:  # the body-less DELETE, in any case
        return Denied(draw(st.sampled_from(["DELETE", "delete", "Delete"])), "", headers)
    shape = draw(st.sampled_from(["one", "one", "batch", "headers-only"]))
    if shape == "headers-only":
        # the body names an allowed tool, the 2026 routing headers the denied one: an upstream that
        # dispatches on the header would run it
        text = ('{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "read_file", '
                f'"_meta": {{"{VERSION_META}": "2026-07-28"}}}}}}')
        name = draw(st.sampled_from(TOOL_SPELLINGS))
        headers["mcp-name"] = draw(st.sampled_from([name, b64(name)]))
        headers["mcp-method"] = "tools/call"
        headers["mcp-protocol-version"] = "2026-07-28"
        return Denied("POST", text, headers)
    member = draw(denied_members())
    if shape == "one":
        text = member
    else:
        fillers = [draw(st.sampled_from(ALLOWED)) % i for i in range(draw(st.integers(0, 3)))]
        at = draw(st.integers(0, len(fillers)))
        text = "[" + ", ".join([*fillers[:at], member, *fillers[at:]]) + "]"
    if draw(st.integers(0, 3)) == 0:
        headers["mcp-protocol-version"] = "2026-07-28"
    return Denied("POST", text, headers)


@settings(max_examples=examples(250), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(denied_requests(), st.sampled_from(["none", "none", "gzip"]))
async def test_a_denied_message_is_never_forwarded_in_any_spelling(deny_rules, req, coding):
    body = req.text.encode("utf-8", "surrogatepass")
    headers = dict(req.headers)
    if coding == "gzip" and body:
        body, headers["content-encoding"] = gzip.compress(body), "gzip"
    async with gateway(ruleset=deny_rules) as b:
        f = b.flow(req.verb, body if req.verb == "POST" else None, headers=headers)
        await send(b, f)
    assert not forwarded(f), f"forwarded: {req.text!r}"
    assert_refused_clearly(f, req.text.encode("utf-8", "surrogatepass"))
    refusal = json.loads(f.response.content)
    codes = {i["error"]["code"] for i in (refusal if isinstance(refusal, list) else [refusal])}
    rules = {i["error"].get("data", {}).get("rule") for i in (refusal if isinstance(refusal, list) else [refusal])}
    # refused by a deny rule, or earlier for being unreadable or ambiguous (never by accident)
    by_rule = errors.DENIED in codes and bool(rules & (DENY_IDS | {"bastion:malformed"}))
    unreadable = codes <= {errors.INVALID_REQUEST, errors.HEADER_MISMATCH, errors.METHOD_NOT_FOUND,
                           errors.REFUSED_INPUT, errors.PARSE_ERROR, errors.FORBIDDEN}
    assert by_rule or unreadable, refusal
    outcome("denied by a rule" if by_rule else f"refused as unreadable: {sorted(codes)}")


@settings(max_examples=examples(60), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(denied_members())
async def test_the_same_messages_with_an_allowed_spelling_control(member):
    """Control for the test above: the generator's messages are well formed, so with the allow-all ruleset
    they are forwarded (the refusals above are the deny rules' doing, not malformed input's)."""
    async with gateway() as b:
        f = b.flow("POST", member.encode("utf-8", "surrogatepass"))
        await send(b, f)
    assert_outcome(b, f, member.encode("utf-8", "surrogatepass"))
    if not forwarded(f):  # only the 2026 wire's own refusal of a removed method may stop it
        assert json.loads(f.response.content)["error"]["code"] == errors.METHOD_NOT_FOUND


# --- findings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["id", "params"])
async def test_finding_a_4300_digit_integer_is_an_internal_error(where):
    big = "1" * 4301
    body = ('{"jsonrpc":"2.0","id":' + big + ',"method":"ping"}' if where == "id"
            else '{"jsonrpc":"2.0","id":1,"method":"ping","params":{"n":' + big + "}}")
    async with gateway() as b:
        f = b.flow("POST", body.encode())
        await send(b, f)
    assert_outcome(b, f, body.encode())


async def test_finding_a_huge_integer_argument_is_an_internal_error(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\ndefault: allow\nrules:\n  - id: small\n    match: {tools: [pay], arguments: "
                     "[{path: n, lt: 5}]}\n    action: deny\n")
    body = ('{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"pay","arguments":{"n":1'
            + "0" * 400 + "}}}").encode()
    async with gateway(ruleset=str(rules)) as b:
        f = b.flow("POST", body)
        await send(b, f)
    assert_outcome(b, f, body)


@pytest.mark.parametrize("verb", ["GET", "DELETE"])
@pytest.mark.parametrize("coding", ["br", "gzip, gzip", "gzip"])
async def test_finding_a_body_less_verb_with_an_undecodable_body_is_an_internal_error(verb, coding):
    async with gateway() as b:
        f = b.flow(verb, b"[]", headers={"content-encoding": coding})
        await send(b, f)
    assert_outcome(b, f, b"[]")


async def test_finding_a_listen_notification_subscribes_past_the_rules(deny_rules):
    body = json.dumps({"jsonrpc": "2.0", "method": "subscriptions/listen", "params": {
        "notifications": {"resourceSubscriptions": ["file:///etc/passwd"]}, "_meta": {VERSION_META: "2026-07-28"}}})
    async with gateway(ruleset=deny_rules) as b:
        f = b.flow("POST", body.encode(), headers={"mcp-protocol-version": "2026-07-28"})
        await send(b, f)
    assert not forwarded(f)
