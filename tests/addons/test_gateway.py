"""
Gateway, Gate and UpstreamCheck as mitmproxy addons (taddons/tflow; no network
except a local socket for UpstreamCheck).

Hooks run through mitmproxy's own AddonManager (`trigger_event`), which logs
an addon's exception and carries on, exactly as in mitmdump: that is the
behaviour the bundle must turn into a refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from urllib.parse import urlsplit

import pytest
from mitmproxy import exceptions, flow, http
from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpRequestHook, HttpResponseHeadersHook, HttpResponseHook
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

from harness import free_port
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.core import errors
from mcp_bastion.addons.gate import Gate
from mcp_bastion.addons.gateway import CLIENT_HOST, Gateway, Replacement, SSEStream, UpstreamCheck

UPSTREAM = "http://127.0.0.1:8000"

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


# --- helpers ---------------------------------------------------------------


def make_flow(method: str = "POST", body: object = None, *, path: str = "/mcp", host: str | None = None,
              headers: dict | None = None, mode: str = f"reverse:{UPSTREAM}", url: str = UPSTREAM) -> http.HTTPFlow:
    """A live flow as the gateway sees it; in reverse mode the client addressed localhost:8080."""
    f = tflow.tflow()
    content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    f.request = http.Request.make(method, url + path, content)  # sets Host and Content-Length from these
    f.request.headers["host"] = host or ("localhost:8080" if mode.startswith("reverse") else urlsplit(url).netloc)
    if method == "POST":
        f.request.headers["content-type"] = "application/json"
    f.request.headers.update(headers or {})
    f.client_conn.proxy_mode = ProxyMode.parse(mode)
    return f


def call(method: str = "tools/call", msg_id: object = 1, **params) -> dict:
    return {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}


def respond(f: http.HTTPFlow, status: int = 200, content: bytes = b"", ctype: str | None = "application/json",
            headers: dict | None = None) -> None:
    f.response = http.Response.make(status, content, {"content-type": ctype} if ctype else {})
    f.response.headers.update(headers or {})  # after make(), which sets Content-Length


async def request_side(tctx, f: http.HTTPFlow) -> None:
    """requestheaders and request, as mitmproxy runs them."""
    await tctx.master.addons.trigger_event(HttpRequestHeadersHook(f))
    await tctx.master.addons.trigger_event(HttpRequestHook(f))


async def response_side(tctx, f: http.HTTPFlow) -> None:
    await tctx.master.addons.trigger_event(HttpResponseHeadersHook(f))
    await tctx.master.addons.trigger_event(HttpResponseHook(f))


def error_of(f: http.HTTPFlow) -> dict:
    assert f.response is not None
    return json.loads(f.response.content)["error"]


@contextlib.contextmanager
def bundle(*extra, after_gate=(), **options):
    """Gateway, extra enforcement addons, the Gate, then `after_gate`: the bundle's order."""
    gw = Gateway()
    with taddons.context(gw, *extra, Gate(), *after_gate) as tctx:
        tctx.configure(gw, **options)
        yield tctx


def forwarded(f: http.HTTPFlow) -> bool:
    """True when mitmproxy would send the request upstream."""
    return f.response is None and f.error is None


# --- request side ----------------------------------------------------------


async def test_post_is_parsed_cached_summarised_and_annotated():
    with bundle() as tctx:
        f = make_flow(body=call(name="deploy", arguments={"env": "prod"}))
        await request_side(tctx, f)
        assert forwarded(f)
        body = fs.request_body(f)
        assert body is not None and body.messages[0].tool_name == "deploy"
        assert f.metadata[fs.MCP]["request"] == [{"kind": "request", "id": 1, "method": "tools/call", "tool": "deploy"}]
        assert fs.passed(f, "parse")
        assert f.comment == "tools/call deploy"
        assert f.request.headers["accept-encoding"] == "identity"


async def test_batch_with_an_invalid_member_is_refused_with_the_ids_it_has():
    with bundle() as tctx:
        f = make_flow(body=[call("ping", 1), {"jsonrpc": "1.0", "id": 2, "method": "x"}, call("ping", 3)])
        await request_side(tctx, f)
        assert f.response.status_code == 400
        answers = json.loads(f.response.content)
        assert [a["id"] for a in answers] == [1, 3]
        assert all(a["error"]["code"] == errors.INVALID_REQUEST for a in answers)


@pytest.mark.parametrize(
    "method,body,headers,status,code",
    [
        ("POST", b"{not json", {}, 400, errors.PARSE_ERROR),
        ("POST", b'{"jsonrpc":"2.0","id":1,"id":2,"method":"x"}', {}, 400, errors.REFUSED_INPUT),
        ("POST", json.dumps(call("ping")).encode(), {"content-type": "text/plain"}, 415, errors.REFUSED_INPUT),
        ("GET", b"sneaky", {}, 400, errors.REFUSED_INPUT),
        ("PUT", b"", {}, 405, errors.REFUSED_INPUT),
    ],
)
async def test_unreadable_requests_are_refused(method, body, headers, status, code):
    with bundle() as tctx:
        f = make_flow(method, body, headers=headers)
        await request_side(tctx, f)
        assert f.response.status_code == status
        assert error_of(f)["code"] == code
        assert f.response.headers["content-type"] == "application/json"


async def test_gzip_body_is_checked_and_forwarded_decoded():
    """Bug: the decoded body went upstream with the compressed body's Content-Length (truncated)."""
    with bundle() as tctx:
        raw = json.dumps(call("ping")).encode()
        f = make_flow(body=gzip.compress(raw), headers={"content-encoding": "gzip"})
        assert f.request.headers["content-length"] != str(len(raw))
        await request_side(tctx, f)
        assert forwarded(f)
        assert f.request.raw_content == raw and "content-encoding" not in f.request.headers
        assert f.request.headers["content-length"] == str(len(raw))


async def test_gzip_json_response_is_checked_and_forwarded_decoded():
    with bundle() as tctx:
        f = await claimed(tctx)
        raw = json.dumps({"jsonrpc": "2.0", "id": 5, "result": {}}).encode()
        respond(f, 200, gzip.compress(raw), headers={"content-encoding": "gzip"})
        await response_side(tctx, f)
        assert f.response.raw_content == raw and "content-encoding" not in f.response.headers
        assert f.response.headers["content-length"] == str(len(raw))


async def test_declared_oversized_body_is_refused_before_it_is_read():
    with bundle(max_body_size="1k") as tctx:
        f = make_flow(body=b"x", headers={"content-length": "5000"})
        await tctx.master.addons.trigger_event(HttpRequestHeadersHook(f))
        assert f.response.status_code == 413
        assert error_of(f)["data"]["reason"] == "too_large"


async def test_foreign_origin_and_query_token_are_refused():
    with bundle() as tctx:
        f = make_flow(body=call("ping"), headers={"origin": "http://evil.example"})
        await request_side(tctx, f)
        assert f.response.status_code == 403 and error_of(f)["data"]["reason"] == "origin"
        f = make_flow(body=call("ping"), path="/mcp?access_token=abc")
        await request_side(tctx, f)
        assert f.response.status_code == 400 and error_of(f)["data"]["reason"] == "token_in_query"


async def test_reverse_mode_checks_the_clients_host_then_rewrites_it():
    with bundle() as tctx:
        f = make_flow(body=call("ping"), host="localhost:8080")
        await request_side(tctx, f)
        assert forwarded(f)
        assert f.request.host_header == "127.0.0.1:8000"  # what the upstream expects
        assert f.metadata[CLIENT_HOST] == "localhost:8080"
        f = make_flow(body=call("ping"), host="evil.example:8080")
        await request_side(tctx, f)
        assert f.response.status_code == 403 and error_of(f)["data"]["reason"] == "host"
        assert f.request.host_header == "evil.example:8080"  # never forwarded: the record shows what was sent


async def test_allowed_hosts_is_configurable():
    with bundle(allowed_hosts=["mcp.example.com"]) as tctx:
        f = make_flow(body=call("ping"), host="mcp.example.com")
        await request_side(tctx, f)
        assert forwarded(f)
        f = make_flow(body=call("ping"), host="localhost:8080")
        await request_side(tctx, f)
        assert f.response.status_code == 403


async def test_regular_mode_scope_refuses_or_passes_through_other_hosts():
    with bundle(mcp_hosts=["mcp.example.com:443"]) as tctx:
        f = make_flow(body=call("ping"), mode="regular", url="https://other.example.com")
        await request_side(tctx, f)
        assert f.response.status_code == 403 and not fs.is_mcp(f)
        f = make_flow(body=call("ping"), mode="regular", url="https://mcp.example.com")
        await request_side(tctx, f)
        assert forwarded(f) and fs.is_mcp(f)
        assert f.request.host_header == "mcp.example.com"  # regular mode: Host is left alone
    with bundle(mcp_hosts=["mcp.example.com"], mcp_passthrough_other=True) as tctx:
        f = make_flow("POST", b"<html>", mode="regular", url="https://other.example.com", headers={"content-type": "text/html"})
        await request_side(tctx, f)
        assert forwarded(f) and not fs.is_mcp(f)


async def test_ipv6_upstream_matches_a_bracketed_scope_pattern():
    """Bug: the scope check wrote `::1:8443`, which no `[::1]:*` pattern can match."""
    with bundle(mcp_hosts=["[::1]:*"]) as tctx:
        f = make_flow(body=call("ping"), mode="regular", url="https://[::1]:8443")
        await request_side(tctx, f)
        assert forwarded(f) and fs.is_mcp(f)
        assert f.metadata[fs.UPSTREAM] == "[::1]:8443"


@pytest.mark.parametrize(
    "options",
    [
        {"allowed_hosts": ["http://localhost"]},
        {"allowed_origins": ["localhost:8080"]},
        {"allowed_hosts": ["localhost:abc"]},
        {"mcp_hosts": ["a/b"]},
        {"max_body_size": "-1"},
        {"max_json_depth": 1},
        {"stream_large_bodies": "1m"},
    ],
)
def test_bad_options_are_refused_at_configure(options):
    gw = Gateway()
    with taddons.context(Proxyserver(), gw) as tctx:
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(gw, **options)


def test_keep_host_header_is_forced_on():
    gw = Gateway()
    with taddons.context(Proxyserver(), gw) as tctx:
        tctx.configure(gw, keep_host_header=False)
        assert tctx.options.keep_host_header is True


# --- fail closed: request side -------------------------------------------


class CrashingPolicy:
    """An enforcement addon that raises, protected by fs.fail_closed."""

    request_stage = "boom"

    @fs.fail_closed("boom")
    def request(self, flow):
        raise RuntimeError("policy engine exploded")


class CrashingPolicyUnguarded:
    """The same mistake without the decorator: mitmproxy logs it and goes on."""

    request_stage = "boom"

    def request(self, flow):
        raise RuntimeError("policy engine exploded")


@pytest.mark.parametrize("addon", [CrashingPolicy, CrashingPolicyUnguarded])
async def test_a_crashing_enforcement_step_never_lets_the_request_through(addon):
    with bundle(addon()) as tctx:
        f = make_flow(body=call("ping", 7))
        await request_side(tctx, f)
        assert not forwarded(f)
        assert f.response.status_code == 500
        body = json.loads(f.response.content)
        assert body["id"] == 7 and body["error"]["code"] == errors.GATEWAY_ERROR
        assert f.marked  # visible in mitmweb
        assert any(d["action"] == "error" for d in f.metadata[fs.DECISIONS])


async def test_the_gate_refuses_a_flow_nobody_claimed():
    gate = Gate()
    with taddons.context(gate) as tctx:
        f = make_flow(body=call("ping"))
        await request_side(tctx, f)
        assert f.response.status_code == 500
        assert error_of(f)["data"]["missing"] == ["claim"]


async def test_a_crashing_gateway_parse_is_refused(monkeypatch):
    def explode(*a, **kw):
        raise MemoryError("parser ran out of memory")

    monkeypatch.setattr("mcp_bastion.addons.gateway.parse_body", explode)
    with bundle() as tctx:
        f = make_flow(body=call("ping", 3))
        await request_side(tctx, f)
        assert f.response.status_code == 500
        assert error_of(f)["code"] == errors.GATEWAY_ERROR  # no id: the body could not be read
        assert f.metadata[fs.ERROR].startswith("parse: MemoryError")


# --- response side ---------------------------------------------------------


async def claimed(tctx, body=None) -> http.HTTPFlow:
    f = make_flow(body=body if body is not None else call("tools/list", 5))
    await request_side(tctx, f)
    assert forwarded(f)
    return f


async def test_json_response_is_parsed_and_passes():
    with bundle() as tctx:
        f = await claimed(tctx)
        respond(f, 200, json.dumps({"jsonrpc": "2.0", "id": 5, "result": {"tools": []}}).encode())
        await response_side(tctx, f)
        assert f.response.status_code == 200 and fs.passed(f, "resp:parse")
        assert f.metadata[fs.MCP]["response"] == [{"kind": "response", "id": 5}]
        assert fs.response_body(f).messages[0].id == 5


@pytest.mark.parametrize(
    "status,content,ctype",
    [
        (200, b"{broken", "application/json"),
        (200, b"<html>hi</html>", "text/html"),
        (200, b"data", None),
    ],
)
async def test_unreadable_2xx_responses_are_withheld(status, content, ctype):
    with bundle() as tctx:
        f = await claimed(tctx)
        respond(f, status, content, ctype)
        await response_side(tctx, f)
        assert f.response.status_code == 502
        assert error_of(f)["code"] == errors.UPSTREAM_ERROR
        assert json.loads(f.response.content)["id"] == 5


async def test_an_upstream_error_page_is_forwarded_as_is():
    with bundle() as tctx:
        f = await claimed(tctx)
        respond(f, 421, b"Invalid Host header", "text/plain")
        await response_side(tctx, f)
        assert (f.response.status_code, f.response.content) == (421, b"Invalid Host header")


async def test_202_accepted_text_body_is_not_forwarded_unread():
    """Bug: the old SSE transport answers POSTs with `202 Accepted` in text/plain; the gateway withheld it (502)."""
    with bundle() as tctx:
        f = await claimed(tctx, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        respond(f, 202, b"Accepted", "text/plain; charset=utf-8")
        await response_side(tctx, f)
        assert f.response.status_code == 202 and f.response.content == b""
        assert fs.passed(f, "resp:parse")
        assert f.metadata[fs.MCP]["discarded_body_bytes"] == len(b"Accepted")


async def test_a_non_sse_response_is_never_streamed_unread():
    """mitmproxy's stream_large_bodies (or another addon) may have set stream=True: the gateway takes it back."""
    with bundle() as tctx:
        f = await claimed(tctx)
        respond(f, 200, b"", "application/json")
        f.response.stream = True
        await tctx.master.addons.trigger_event(HttpResponseHeadersHook(f))
        assert f.response.stream is False


async def test_declared_oversized_response_is_replaced_without_buffering():
    with bundle(max_body_size="1k") as tctx:
        f = await claimed(tctx)
        respond(f, 200, b"", "application/json", {"content-length": "999999"})
        await tctx.master.addons.trigger_event(HttpResponseHeadersHook(f))
        assert f.response.status_code == 502
        assert isinstance(f.response.stream, Replacement)
        body = f.response.content
        # mitmproxy streams the upstream's chunks through it, then asks for the tail
        assert sent(f.response.stream, b"x" * 4096) == b"" and sent(f.response.stream, b"") == body
        assert json.loads(body)["error"]["code"] == errors.UPSTREAM_ERROR
        assert int(f.response.headers["content-length"]) == len(body)


async def test_a_crash_while_routing_the_response_withholds_it(monkeypatch):
    def explode(self, flow):
        raise RuntimeError("routing exploded")

    monkeypatch.setattr(Gateway, "_route_response", explode)
    with bundle() as tctx:
        f = await claimed(tctx)
        respond(f, 200, json.dumps({"jsonrpc": "2.0", "id": 5, "result": {}}).encode())
        f.response.stream = True
        await response_side(tctx, f)
        assert f.response.status_code == 502
        assert f.metadata[fs.ERROR].startswith("resp:parse: RuntimeError")


class CrashingMasker:
    response_stage = "resp:boom"

    @fs.fail_closed("resp:boom")
    def response(self, flow):
        raise RuntimeError("masking exploded")


class CrashingMaskerUnguarded:
    response_stage = "resp:boom"

    def response(self, flow):
        raise RuntimeError("masking exploded")


@pytest.mark.parametrize("addon", [CrashingMasker, CrashingMaskerUnguarded])
async def test_a_crashing_response_step_never_lets_the_answer_through(addon):
    with bundle(addon()) as tctx:
        f = await claimed(tctx)
        secret = json.dumps({"jsonrpc": "2.0", "id": 5, "result": {"secret": "s3cr3t"}}).encode()
        respond(f, 200, secret)
        await response_side(tctx, f)
        assert f.response.status_code == 502
        assert b"s3cr3t" not in f.response.content
        assert json.loads(f.response.content)["error"]["code"] == errors.GATEWAY_ERROR


# --- the SSE stream wrapper ------------------------------------------------


def sse(obj: object, **fields) -> bytes:
    head = "".join(f"{k}: {v}\n" for k, v in fields.items())
    return f"{head}data: {json.dumps(obj)}\n\n".encode()


async def streaming(tctx, headers: dict | None = None, mode: str = f"reverse:{UPSTREAM}", get: bool = False):
    """A POST of tools/call #5 (or a GET stream) whose event-stream response headers have arrived."""
    f = make_flow("GET", mode=mode) if get else make_flow(body=call("tools/call", 5, name="count"), mode=mode)
    await request_side(tctx, f)
    respond(f, 200, b"", "text/event-stream", {"content-length": "100", **(headers or {})})
    await tctx.master.addons.trigger_event(HttpResponseHeadersHook(f))
    assert isinstance(f.response.stream, SSEStream)
    return f


def sent(stream, chunk: bytes) -> bytes:
    """What the client receives for one upstream chunk."""
    return b"".join(stream(chunk))


class Recorder:
    """Collects what the stream handlers see."""

    def __init__(self):
        self.events: list[fs.StreamEvent] = []
        self.output: list[bytes] = []

    def mcp_stream_event(self, ev):
        self.events.append(ev)

    def mcp_stream_output(self, flow, data):
        self.output.append(data)


async def test_stream_forwards_each_event_when_complete_byte_for_byte():
    rec = Recorder()
    with bundle(rec) as tctx:
        f = await streaming(tctx)
        assert "content-length" not in f.response.headers
        progress = sse({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}, id="e1")
        result = b': keep-alive\r\nretry: 500\r\ndata: {"jsonrpc":"2.0",\r\ndata: "id":5,"result":{}}\r\n\r\n'
        wire = progress + result
        stream = f.response.stream
        cut = len(progress) + 3
        out = [sent(stream, c) for c in (wire[:10], wire[10:cut], wire[cut:-2], wire[-2:], b"")]
        assert out[0] == b""
        assert out[1] == progress  # complete: forwarded at once, without the partial second event
        assert out[2] == b"" and out[3] == result
        assert b"".join(rec.output) == wire
        assert [e.body.messages[0].kind for e in rec.events] == ["notification", "response"]
        assert f.metadata[fs.MCP]["sse_events"] == 2
        assert stream.pending == []


async def test_a_chunk_that_completes_no_event_sends_nothing():
    """Bug: the wrapper returned b"", which mitmproxy sends as an empty chunk: in HTTP/1.1 chunked
    encoding that is the end of the body, so the client lost the rest of the stream."""
    with bundle() as tctx:
        f = await streaming(tctx)
        assert f.response.stream(b"data: {") == []
        assert f.response.stream(b'"jsonrpc":"2.0","id":5,"result":{}}\n\n') == [b'data: {"jsonrpc":"2.0","id":5,"result":{}}\n\n']
        assert f.response.stream(b"") == []


async def test_stream_fails_closed_on_an_unreadable_event():
    with bundle() as tctx:
        f = await streaming(tctx)
        stream = f.response.stream
        out = sent(stream, b"data: {not json\n\n")
        err = json.loads(out.decode().removeprefix("data: ").strip())
        assert err["id"] == 5 and err["error"]["code"] == errors.GATEWAY_ERROR
        # nothing more of the upstream's stream reaches the client
        assert sent(stream, sse({"jsonrpc": "2.0", "id": 5, "result": {"secret": 1}})) == b""
        assert sent(stream, b"") == b""
        assert f.metadata[fs.ERROR].startswith("sse: ")
        assert f.marked


async def test_stream_fails_closed_when_a_stream_handler_raises():
    """Bug: the answer's id left `pending` before the handlers ran, so the failure answered nothing."""

    class Exploding:
        def mcp_stream_event(self, ev):
            raise RuntimeError("masking exploded")

    with bundle(Exploding()) as tctx:
        f = await streaming(tctx)
        out = sent(f.response.stream, sse({"jsonrpc": "2.0", "id": 5, "result": {"secret": 1}}))
        assert b"secret" not in out
        assert json.loads(out.decode().removeprefix("data: "))["error"]["code"] == errors.GATEWAY_ERROR


async def test_stream_fails_closed_on_an_oversized_event():
    with bundle(sse_max_event_size="1k") as tctx:
        f = await streaming(tctx)
        out = sent(f.response.stream, b"data: " + b"x" * 2000)
        assert json.loads(out.decode().removeprefix("data: "))["id"] == 5


async def test_compressed_stream_answers_pending_requests_with_an_error():
    """Bug: the error events made at construction were never sent; the client waited forever."""
    with bundle() as tctx:
        f = await streaming(tctx, {"content-encoding": "gzip"})
        out = sent(f.response.stream, gzip.compress(sse({"jsonrpc": "2.0", "id": 5, "result": {}})))
        assert json.loads(out.decode().removeprefix("data: "))["id"] == 5
        assert sent(f.response.stream, b"more") == b""


async def test_handlers_may_replace_or_drop_events():
    class Rewriter:
        def mcp_stream_event(self, ev):
            if ev.body and ev.body.messages[0].kind == "notification":
                ev.drop("not for this client")
            elif ev.body:
                ev.replace({"jsonrpc": "2.0", "id": 5, "result": {"masked": True}})

    with bundle(Rewriter()) as tctx:
        f = await streaming(tctx)
        stream = f.response.stream
        assert sent(stream, sse({"jsonrpc": "2.0", "method": "notifications/progress", "params": {}})) == b""
        assert sent(stream, sse({"jsonrpc": "2.0", "id": 5, "result": {"secret": 1}}, id="7")) == (
            b'id: 7\ndata: {"jsonrpc":"2.0","id":5,"result":{"masked":true}}\n\n'
        )


@pytest.mark.parametrize(
    "mode,announced,expected",
    [
        (f"reverse:{UPSTREAM}", "/messages/?session_id=1", "/messages/?session_id=1"),
        (f"reverse:{UPSTREAM}", f"{UPSTREAM}/messages/?session_id=1", "/messages/?session_id=1"),
        ("regular", f"{UPSTREAM}/messages/?session_id=1", f"{UPSTREAM}/messages/?session_id=1"),
    ],
)
async def test_old_transport_endpoint_event(mode, announced, expected):
    with bundle() as tctx:
        f = await streaming(tctx, mode=mode, get=True)
        out = sent(f.response.stream, f"event: endpoint\ndata: {announced}\n\n".encode())
        assert out == f"event: endpoint\ndata: {expected}\n\n".encode()
        assert f.metadata[fs.MCP]["endpoint"] == "/messages/?session_id=1"


@pytest.mark.parametrize("announced", ["http://evil.example/messages/", "//evil.example/m", "https://127.0.0.1:8000/m"])
async def test_endpoint_on_another_origin_fails_the_stream_closed(announced):
    with bundle() as tctx:
        f = await streaming(tctx)
        out = sent(f.response.stream, f"event: endpoint\ndata: {announced}\n\n".encode())
        assert b"evil" not in out and b"endpoint" not in out
        assert "another origin" in f.metadata[fs.ERROR]


# --- UpstreamCheck ---------------------------------------------------------


def test_upstream_check_forces_lazy_connections():
    check = UpstreamCheck()
    with taddons.context(Proxyserver(), check) as tctx:
        check.running()
        assert tctx.options.connection_strategy == "lazy"
        tctx.configure(check, connection_strategy="eager")
        assert tctx.options.connection_strategy == "lazy"


def reverse_to(port: int, msg_id: int) -> http.HTTPFlow:
    return make_flow(body=call("ping", msg_id), mode=f"reverse:http://127.0.0.1:{port}", url=f"http://127.0.0.1:{port}")


async def test_upstream_check_answers_json_when_the_upstream_is_down():
    with bundle(after_gate=[UpstreamCheck()]) as tctx:
        f = reverse_to(free_port(), 4)
        await request_side(tctx, f)
        assert f.response.status_code == 502
        body = json.loads(f.response.content)
        assert body["id"] == 4 and body["error"]["code"] == errors.UPSTREAM_ERROR
        assert body["error"]["data"]["reason"] == "upstream_unreachable"


async def test_upstream_check_connects_once_per_client_connection(monkeypatch):
    probes = []
    real_open = asyncio.open_connection

    async def counting_open(host, port):
        probes.append((host, port))
        return await real_open(host, port)

    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(asyncio, "open_connection", counting_open)
    check = UpstreamCheck()
    try:
        with bundle(after_gate=[check]) as tctx:
            first, second, third = reverse_to(port, 1), reverse_to(port, 2), reverse_to(port, 3)
            second.client_conn = third.client_conn = first.client_conn
            await request_side(tctx, first)
            await request_side(tctx, second)
            assert forwarded(first) and forwarded(second)
            assert probes == [("127.0.0.1", port)]
            check.error(second)  # a failed flow: the next request on that connection checks again
            await request_side(tctx, third)
            assert forwarded(third) and len(probes) == 2
            other = reverse_to(port, 4)  # another client connection
            await request_side(tctx, other)
            assert len(probes) == 3
            check.client_disconnected(first.client_conn)
            assert check._reachable == {(other.client_conn.id, "127.0.0.1", port)}
    finally:
        server.close()
        await server.wait_closed()


async def test_upstream_check_leaves_refused_and_unclaimed_flows_alone():
    with bundle(after_gate=[UpstreamCheck()]) as tctx:
        f = reverse_to(free_port(), 1)
        f.request.headers["origin"] = "http://evil.example"
        await request_side(tctx, f)
        assert f.response.status_code == 403  # the gateway's answer, not a probe's


async def test_a_client_closing_an_answered_stream_is_not_an_error():
    """The SDK closes a POST's event stream once the answer arrived; an unanswered one is an error."""
    from mitmproxy.proxy.layers.http import HttpErrorHook

    with bundle() as tctx:
        answered = await streaming(tctx)
        sent(answered.response.stream, sse({"jsonrpc": "2.0", "id": 5, "result": {}}))
        answered.error = flow.Error("Client disconnected.")
        await tctx.master.addons.trigger_event(HttpErrorHook(answered))
        assert not [d for d in answered.metadata.get(fs.DECISIONS, []) if d["stage"] == "transport"]
        assert answered.metadata[fs.MCP]["closed"] == "Client disconnected."
        assert "error" not in answered.comment

        cut = await streaming(tctx)
        cut.error = flow.Error("Client disconnected.")
        await tctx.master.addons.trigger_event(HttpErrorHook(cut))
        assert [d["action"] for d in cut.metadata[fs.DECISIONS] if d["stage"] == "transport"] == ["error"]


async def test_a_streamed_answer_is_readable_on_the_flow_once_sent_up_to_a_bound(monkeypatch):
    """mitmproxy keeps no body for a streamed response: the gateway puts what the client got on the flow."""
    from mitmproxy.proxy.layers.http import HttpResponseHook

    from mcp_bastion.addons import gateway as gw

    with bundle() as tctx:
        f = await streaming(tctx)
        wire = sse({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}) + \
            sse({"jsonrpc": "2.0", "id": 5, "result": {"ok": True}})
        sent(f.response.stream, wire)
        sent(f.response.stream, b"")
        await tctx.master.addons.trigger_event(HttpResponseHook(f))
        assert f.response.raw_content == wire
        assert "shown_bytes" not in f.metadata[fs.MCP]

        monkeypatch.setattr(gw, "SHOW_LIMIT", 10)
        f = await streaming(tctx)
        sent(f.response.stream, wire)
        await tctx.master.addons.trigger_event(HttpResponseHook(f))
        assert f.response.raw_content == wire[:10] and f.metadata[fs.MCP]["shown_bytes"] == 10
