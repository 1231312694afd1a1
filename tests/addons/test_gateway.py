"""
The Gateway (and the Gate) as mitmproxy addons (taddons/tflow; no network
except local sockets standing in for the upstream).

End-to-end behaviour runs the shipped `bundle()` through `tests/bundled.py`:
hooks go through mitmproxy's own AddonManager (`trigger_event`), which logs an
addon's exception and carries on, exactly as in mitmdump: that is the
behaviour the bundle must turn into a refusal. Tests of the Gateway's options
(and of the Gate on its own) load just that addon.

The SSE stream wrapper itself is tested in tests/glue/test_stream.py, the
UpstreamCheck in tests/addons/test_upstream.py.
"""

from __future__ import annotations

import gzip
import json
import socket
from urllib.parse import urlsplit

import pytest
from mitmproxy import exceptions, flow, http
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy.layers.http import (
    HttpRequestHeadersHook,
    HttpRequestHook,
    HttpResponseHeadersHook,
    HttpResponseHook,
)
from mitmproxy.test import taddons

from mcp_bastion.addons.admission import Admission
from mcp_bastion.addons.gate import Gate
from mcp_bastion.addons.gateway import Gateway
from mcp_bastion.addons.pipeline import Pipeline
from mcp_bastion.addons.policy import Policy
from mcp_bastion.core import errors
from mcp_bastion.core.vocab import Direction, Meta, StageName
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue import stream as stream_mod
from mcp_bastion.glue.stream import Replacement, SSEStream

from bundled import Bundled, bundled, call, error_of, forwarded, make_flow

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


# --- helpers ---------------------------------------------------------------


async def trigger(b: Bundled, hook: type, f: http.HTTPFlow) -> None:
    """One hook on every addon of the bundle, in bundle order."""
    await b.tctx.master.addons.trigger_event(hook(f))


def respond(f: http.HTTPFlow, status: int = 200, content: bytes = b"", ctype: str | None = "application/json",
            headers: dict | None = None) -> None:
    """The upstream's response headers (and buffered body) arrive; `ctype=None` sends no Content-Type."""
    f.response = http.Response.make(status, content, {"content-type": ctype} if ctype else {})
    f.response.headers.update(headers or {})  # after make(), which sets Content-Length


async def response_side(b: Bundled, f: http.HTTPFlow) -> None:
    await trigger(b, HttpResponseHeadersHook, f)
    await trigger(b, HttpResponseHook, f)


async def claimed(b: Bundled, body=None) -> http.HTTPFlow:
    """A request the bundle forwarded (tools/list #5 unless `body`)."""
    f = b.flow(body=body if body is not None else call("tools/list", 5))
    await b.request(f)
    assert forwarded(f), f.response and f.response.content
    return f


def hostport(b: Bundled) -> str:
    return urlsplit(b.upstream).netloc


# --- request side ----------------------------------------------------------


async def test_post_is_parsed_cached_summarised_and_annotated():
    with bundled() as b:
        f = b.flow(body=call(name="deploy", arguments={"env": "prod"}))
        await b.request(f)
        assert forwarded(f)
        body = fs.request_body(f)
        assert body is not None and body.messages[0].tool_name == "deploy"
        assert f.metadata[Meta.MCP]["request"] == [
            {"kind": "request", "id": 1, "method": "tools/call", "tool": "deploy"}]
        assert fs.passed(f, StageName.PARSE)
        # the summary, then the decision of the last stage (the allow-all ruleset)
        assert f.comment == "tools/call deploy -> allow [allow-all]"
        assert f.request.headers["accept-encoding"] == "identity"


async def test_batch_with_an_invalid_member_is_refused_with_the_ids_it_has():
    with bundled() as b:
        f = b.flow(body=[call("ping", 1), {"jsonrpc": "1.0", "id": 2, "method": "x"}, call("ping", 3)])
        await b.request(f)
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
    with bundled() as b:
        f = b.flow(method, body, headers=headers)
        await b.request(f)
        assert f.response.status_code == status
        assert error_of(f)["code"] == code
        assert f.response.headers["content-type"] == "application/json"


async def test_gzip_body_is_checked_and_forwarded_decoded():
    """Bug: the decoded body went upstream with the compressed body's Content-Length (truncated)."""
    with bundled() as b:
        raw = json.dumps(call("ping")).encode()
        f = b.flow(body=gzip.compress(raw), headers={"content-encoding": "gzip"})
        assert f.request.headers["content-length"] != str(len(raw))
        await b.request(f)
        assert forwarded(f)
        assert f.request.raw_content == raw and "content-encoding" not in f.request.headers
        assert f.request.headers["content-length"] == str(len(raw))


async def test_gzip_json_response_is_checked_and_forwarded_decoded():
    with bundled() as b:
        f = await claimed(b)
        raw = json.dumps({"jsonrpc": "2.0", "id": 5, "result": {}}).encode()
        respond(f, 200, gzip.compress(raw), headers={"content-encoding": "gzip"})
        await response_side(b, f)
        assert f.response.status_code == 200
        assert f.response.raw_content == raw and "content-encoding" not in f.response.headers
        assert f.response.headers["content-length"] == str(len(raw))


async def test_declared_oversized_body_is_refused_before_it_is_read():
    with bundled(max_body_size="1k") as b:
        f = b.flow(body=b"x", headers={"content-length": "5000"})
        await trigger(b, HttpRequestHeadersHook, f)
        assert f.response.status_code == 413
        assert error_of(f)["data"]["reason"] == "too_large"


async def test_foreign_origin_and_query_token_are_refused():
    with bundled() as b:
        f = b.flow(body=call("ping"), headers={"origin": "http://evil.example"})
        await b.request(f)
        assert f.response.status_code == 403 and error_of(f)["data"]["reason"] == "origin"
        f = b.flow(body=call("ping"), path="/mcp?access_token=abc")
        await b.request(f)
        assert f.response.status_code == 400 and error_of(f)["data"]["reason"] == "token_in_query"


async def test_reverse_mode_checks_the_clients_host_then_rewrites_it():
    with bundled() as b:
        f = b.flow(body=call("ping"), host="localhost:8080")
        await b.request(f)
        assert forwarded(f)
        assert f.request.host_header == hostport(b)  # what the upstream expects
        assert f.metadata[Meta.CLIENT_HOST] == "localhost:8080"
        f = b.flow(body=call("ping"), host="evil.example:8080")
        await b.request(f)
        assert f.response.status_code == 403 and error_of(f)["data"]["reason"] == "host"
        assert f.request.host_header == "evil.example:8080"  # never forwarded: the record shows what was sent


async def test_allowed_hosts_is_configurable():
    with bundled(allowed_hosts=["mcp.example.com"]) as b:
        f = b.flow(body=call("ping"), host="mcp.example.com")
        await b.request(f)
        assert forwarded(f)
        f = b.flow(body=call("ping"), host="localhost:8080")
        await b.request(f)
        assert f.response.status_code == 403


async def test_regular_mode_scope_refuses_or_passes_through_other_hosts():
    with bundled() as b:
        # the MCP server is the listening upstream (UpstreamCheck probes it before forwarding)
        b.tctx.options.update(mcp_hosts=[hostport(b)])
        f = b.flow(body=call("ping"), mode="regular", url="https://other.example.com")
        await b.request(f)
        assert f.response.status_code == 403 and not fs.is_mcp(f)
        f = b.flow(body=call("ping"), mode="regular")
        await b.request(f)
        assert forwarded(f) and fs.is_mcp(f)
        assert f.request.host_header == hostport(b)  # regular mode: Host is left alone
    with bundled(mcp_hosts=["mcp.example.com"], mcp_passthrough_other=True) as b:
        f = b.flow("POST", b"<html>", mode="regular", url="https://other.example.com",
                   headers={"content-type": "text/html"})
        await b.request(f)
        assert forwarded(f) and not fs.is_mcp(f)


async def test_ipv6_upstream_matches_a_bracketed_scope_pattern():
    """Bug: the scope check wrote `::1:8443`, which no `[::1]:*` pattern can match."""
    try:
        upstream = socket.socket(socket.AF_INET6)
        upstream.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with upstream, bundled(mcp_hosts=["[::1]:*"]) as b:
        upstream.listen(8)
        port = upstream.getsockname()[1]
        f = b.flow(body=call("ping"), mode="regular", url=f"https://[::1]:{port}")
        await b.request(f)
        assert forwarded(f) and fs.is_mcp(f)
        assert f.metadata[Meta.UPSTREAM] == f"[::1]:{port}"


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


def crash_the_policy_stage(monkeypatch):
    """The ruleset raises on a client message: the Pipeline's hook is protected by fail_closed."""
    real = Policy.check

    def check(self, m, cx):
        if m.direction == Direction.C2S:
            raise RuntimeError("policy engine exploded")
        return real(self, m, cx)

    monkeypatch.setattr(Policy, "check", check)


def crash_the_pipeline_unguarded(monkeypatch):
    """The same mistake in a hook without the decorator: mitmproxy logs it and goes on."""

    async def request(self, flow):
        raise RuntimeError("policy engine exploded")

    monkeypatch.setattr(Pipeline, "request", request)


def crash_admission_unguarded(monkeypatch):
    def request(self, flow):
        raise RuntimeError("admission exploded")

    monkeypatch.setattr(Admission, "request", request)


@pytest.mark.parametrize("crash", [crash_the_policy_stage, crash_the_pipeline_unguarded, crash_admission_unguarded])
async def test_a_crashing_enforcement_step_never_lets_the_request_through(crash, monkeypatch):
    crash(monkeypatch)
    with bundled() as b:
        f = b.flow(body=call("ping", 7))
        await b.request(f)
        assert not forwarded(f)
        assert f.response.status_code == 500
        body = json.loads(f.response.content)
        assert body["id"] == 7 and body["error"]["code"] == errors.GATEWAY_ERROR
        assert f.marked  # visible in mitmweb
        assert any(d["action"] == "error" for d in f.metadata[Meta.DECISIONS])


async def test_the_gate_refuses_a_flow_nobody_claimed():
    gate = Gate(request=[StageName.PARSE], response=[StageName.RESP_PARSE])
    with taddons.context(gate) as tctx:
        f = make_flow(body=call("ping"))
        await tctx.master.addons.trigger_event(HttpRequestHeadersHook(f))
        await tctx.master.addons.trigger_event(HttpRequestHook(f))
        assert f.response.status_code == 500
        assert error_of(f)["data"]["missing"] == ["claim"]


async def test_the_gate_refuses_a_claimed_flow_that_missed_a_stage():
    gate = Gate(request=[StageName.PARSE, StageName.AUTH], response=[StageName.RESP_PARSE])
    with taddons.context(gate) as tctx:
        f = make_flow(body=call("ping"))
        f.metadata[Meta.MCP] = {}
        fs.mark_stage(f, StageName.PARSE)
        await tctx.master.addons.trigger_event(HttpRequestHook(f))
        assert f.response.status_code == 500
        assert error_of(f)["data"]["missing"] == ["auth"]


async def test_the_shipped_gate_requires_every_request_and_response_stage():
    with bundled() as b:
        gate = b.addon(Gate)
        assert list(gate.request_stages) == [StageName.PARSE, StageName.AUTH, StageName.SESSION, StageName.ADMISSION,
                                              StageName.WIRE, StageName.TASKS, StageName.POLICY, StageName.PIN,
                                              StageName.MASK, StageName.APPROVAL]
        assert list(gate.response_stages) == [StageName.RESP_PARSE, StageName.RESP_WIRE, StageName.RESP_TASKS,
                                              StageName.RESP_POLICY, StageName.RESP_PIN, StageName.RESP_MASK,
                                              StageName.RESP_APPROVAL]


async def test_a_crashing_gateway_parse_is_refused(monkeypatch):
    def explode(*a, **kw):
        raise MemoryError("parser ran out of memory")

    monkeypatch.setattr("mcp_bastion.addons.gateway.parse_body", explode)
    with bundled() as b:
        f = b.flow(body=call("ping", 3))
        await b.request(f)
        assert f.response.status_code == 500
        assert error_of(f)["code"] == errors.GATEWAY_ERROR  # no id: the body could not be read
        assert f.metadata[Meta.ERROR].startswith("parse: MemoryError")


# --- response side ---------------------------------------------------------


async def test_json_response_is_parsed_and_passes():
    with bundled() as b:
        f = await claimed(b)
        respond(f, 200, json.dumps({"jsonrpc": "2.0", "id": 5, "result": {"tools": []}}).encode())
        await response_side(b, f)
        assert f.response.status_code == 200 and fs.passed(f, StageName.RESP_PARSE)
        assert f.metadata[Meta.MCP]["response"] == [{"kind": "response", "id": 5}]
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
    with bundled() as b:
        f = await claimed(b)
        respond(f, status, content, ctype)
        await response_side(b, f)
        assert f.response.status_code == 502
        assert error_of(f)["code"] == errors.UPSTREAM_ERROR
        assert json.loads(f.response.content)["id"] == 5


@pytest.mark.parametrize(("status", "body", "ctype"), [
    (421, b"Invalid Host header", "text/plain"), (500, b"<html>Traceback ... AWS_SECRET=abc</html>", "text/html"),
    (404, b"Not Found", None), (503, b"busy", "text/plain; charset=latin1"), (302, b"moved", "text/html"),
])
async def test_an_upstream_error_page_keeps_its_status_but_not_its_body(status, body, ctype):
    """Issue 16: a non-2xx answer nobody could read reached the client as-is, a secret in an error page included."""
    with bundled() as b:
        f = await claimed(b)
        respond(f, status, body, ctype)
        await response_side(b, f)
        assert f.response.status_code == status and body not in f.response.content
        answer = json.loads(f.response.content)
        assert answer["id"] == 5 and answer["error"]["data"] == {"reason": "upstream_status", "status": status}
        assert f.response.headers["content-type"] == "application/json"


async def test_a_json_error_answer_is_read_and_passes():
    with bundled() as b:
        f = await claimed(b)
        respond(f, 400, b'{"jsonrpc":"2.0","id":5,"error":{"code":-32602,"message":"bad"}}', "application/json")
        await response_side(b, f)
        assert f.response.status_code == 400 and json.loads(f.response.content)["error"]["code"] == -32602


async def test_202_accepted_text_body_is_not_forwarded_unread():
    """Bug: the old SSE transport answers POSTs with `202 Accepted` in text/plain; the gateway withheld it (502)."""
    with bundled() as b:
        f = await claimed(b, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        respond(f, 202, b"Accepted", "text/plain; charset=utf-8")
        await response_side(b, f)
        assert f.response.status_code == 202 and f.response.content == b""
        assert fs.passed(f, StageName.RESP_PARSE)
        assert f.metadata[Meta.MCP]["discarded_body_bytes"] == len(b"Accepted")


async def test_a_non_sse_response_is_never_streamed_unread():
    """mitmproxy's stream_large_bodies (or another addon) may have set stream=True: the gateway takes it back."""
    with bundled() as b:
        f = await claimed(b)
        respond(f, 200, b"", "application/json")
        f.response.stream = True
        await trigger(b, HttpResponseHeadersHook, f)
        assert f.response.stream is False


def sent(stream, chunk: bytes) -> bytes:
    """What the client receives for one upstream chunk."""
    return b"".join(stream(chunk))


async def test_declared_oversized_response_is_replaced_without_buffering():
    with bundled(max_body_size="1k") as b:
        f = await claimed(b)
        respond(f, 200, b"", "application/json", {"content-length": "999999"})
        await trigger(b, HttpResponseHeadersHook, f)
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
    with bundled() as b:
        f = await claimed(b)
        respond(f, 200, json.dumps({"jsonrpc": "2.0", "id": 5, "result": {}}).encode())
        f.response.stream = True
        await response_side(b, f)
        assert f.response.status_code == 502
        assert f.metadata[Meta.ERROR].startswith("resp:parse: RuntimeError")


def crash_the_policy_stage_on_answers(monkeypatch):
    """A response stage raises on the server's answer: the Pipeline's hook is protected by fail_closed."""
    real = Policy.check

    def check(self, m, cx):
        if m.direction == Direction.S2C:
            raise RuntimeError("masking exploded")
        return real(self, m, cx)

    monkeypatch.setattr(Policy, "check", check)


def crash_the_pipeline_response_unguarded(monkeypatch):
    async def response(self, flow):
        raise RuntimeError("masking exploded")

    monkeypatch.setattr(Pipeline, "response", response)


@pytest.mark.parametrize("crash", [crash_the_policy_stage_on_answers, crash_the_pipeline_response_unguarded])
async def test_a_crashing_response_step_never_lets_the_answer_through(crash, monkeypatch):
    crash(monkeypatch)
    with bundled() as b:
        f = await claimed(b)
        secret = json.dumps({"jsonrpc": "2.0", "id": 5, "result": {"secret": "s3cr3t"}}).encode()
        respond(f, 200, secret)
        await response_side(b, f)
        assert f.response.status_code == 502
        assert b"s3cr3t" not in f.response.content
        assert json.loads(f.response.content)["error"]["code"] == errors.GATEWAY_ERROR


# --- event streams through the bundle (SSEStream itself: tests/glue/test_stream.py) ---


def sse(obj: object, **fields) -> bytes:
    head = "".join(f"{k}: {v}\n" for k, v in fields.items())
    return f"{head}data: {json.dumps(obj)}\n\n".encode()


async def streaming(b: Bundled, headers: dict | None = None, mode: str | None = None, get: bool = False):
    """A POST of tools/call #5 (or a GET stream) whose event-stream response headers have arrived."""
    kw = {"mode": mode} if mode else {}
    f = b.flow("GET", **kw) if get else b.flow(body=call("tools/call", 5, name="count"), **kw)
    await b.request(f)
    assert forwarded(f), f.response and f.response.content
    respond(f, 200, b"", "text/event-stream", {"content-length": "100", **(headers or {})})
    await trigger(b, HttpResponseHeadersHook, f)
    assert isinstance(f.response.stream, SSEStream)
    return f


async def test_stream_forwards_each_event_when_complete_byte_for_byte():
    with bundled() as b:
        f = await streaming(b)
        assert "content-length" not in f.response.headers
        stream = f.response.stream
        assert stream.stages is not None  # the Pipeline attached the message stages
        output: list[bytes] = []
        stream.outputs.append(lambda flow, data: output.append(data))
        progress = sse({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}, id="e1")
        result = b': keep-alive\r\nretry: 500\r\ndata: {"jsonrpc":"2.0",\r\ndata: "id":5,"result":{}}\r\n\r\n'
        wire = progress + result
        cut = len(progress) + 3
        out = [sent(stream, c) for c in (wire[:10], wire[10:cut], wire[cut:-2], wire[-2:], b"")]
        assert out[0] == b""
        assert out[1] == progress  # complete: forwarded at once, without the partial second event
        assert out[2] == b"" and out[3] == result
        assert b"".join(output) == wire
        assert [e["kind"] for e in f.metadata[Meta.MCP]["events"]] == ["notification", "response"]
        assert [d["stage"] for d in f.metadata[Meta.DECISIONS] if d.get("direction") == Direction.S2C] == [
            StageName.RESP_POLICY]  # the notification went through the ruleset (answers are only filtered)
        assert f.metadata[Meta.MCP]["sse_events"] == 2
        assert stream.pending == []
        await trigger(b, HttpResponseHook, f)
        assert f.response.status_code == 200 and f.response.raw_content == wire


async def test_a_chunk_that_completes_no_event_sends_nothing():
    """Bug: the wrapper returned b"", which mitmproxy sends as an empty chunk: in HTTP/1.1 chunked
    encoding that is the end of the body, so the client lost the rest of the stream."""
    with bundled() as b:
        f = await streaming(b)
        assert f.response.stream(b"data: {") == []
        assert f.response.stream(b'"jsonrpc":"2.0","id":5,"result":{}}\n\n') == [
            b'data: {"jsonrpc":"2.0","id":5,"result":{}}\n\n']
        assert f.response.stream(b"") == []


async def test_stream_fails_closed_on_an_unreadable_event():
    with bundled() as b:
        f = await streaming(b)
        stream = f.response.stream
        out = sent(stream, b"data: {not json\n\n")
        err = json.loads(out.decode().removeprefix("data: ").strip())
        assert err["id"] == 5 and err["error"]["code"] == errors.GATEWAY_ERROR
        # nothing more of the upstream's stream reaches the client
        assert sent(stream, sse({"jsonrpc": "2.0", "id": 5, "result": {"secret": 1}})) == b""
        assert sent(stream, b"") == b""
        assert f.metadata[Meta.ERROR].startswith("sse: ")
        assert f.marked


async def test_stream_fails_closed_when_a_message_stage_raises(monkeypatch):
    """Bug: the answer's id left `pending` before the stages ran, so the failure answered nothing."""
    crash_the_policy_stage_on_answers(monkeypatch)
    with bundled() as b:
        f = await streaming(b)
        out = sent(f.response.stream, sse({"jsonrpc": "2.0", "id": 5, "result": {"secret": 1}}))
        assert b"secret" not in out
        err = json.loads(out.decode().removeprefix("data: "))
        assert err["id"] == 5 and err["error"]["code"] == errors.GATEWAY_ERROR
        assert f.metadata[Meta.ERROR].startswith("sse: ") and "masking exploded" in f.metadata[Meta.ERROR]


async def test_a_stream_the_stages_never_joined_fails_closed(monkeypatch):
    """The Pipeline's responseheaders hook raises (unguarded): the stages never join the stream, so the
    response is buffered and withheld; nothing unchecked goes out."""

    def explode(self, flow):
        raise RuntimeError("attach exploded")

    monkeypatch.setattr(Pipeline, "responseheaders", explode)
    with bundled() as b:
        f = b.flow(body=call("tools/call", 5, name="count"))
        await b.request(f)
        out = await b.response(f, sse({"jsonrpc": "2.0", "id": 5, "result": {"secret": 1}}), ctype="text/event-stream")
        assert b"secret" not in out
        err = json.loads(out.decode().removeprefix("data: "))
        assert err["id"] == 5 and err["error"]["code"] == errors.GATEWAY_ERROR
        assert "resp:pipeline.responseheaders: RuntimeError: attach exploded" in f.metadata[Meta.ERROR]


async def test_stream_fails_closed_on_an_oversized_event():
    with bundled(sse_max_event_size="1k") as b:
        f = await streaming(b)
        out = sent(f.response.stream, b"data: " + b"x" * 2000)
        assert json.loads(out.decode().removeprefix("data: "))["id"] == 5


async def test_compressed_stream_answers_pending_requests_with_an_error():
    """Bug: the error events made at construction were never sent; the client waited forever."""
    with bundled() as b:
        f = await streaming(b, {"content-encoding": "gzip"})
        out = sent(f.response.stream, gzip.compress(sse({"jsonrpc": "2.0", "id": 5, "result": {}})))
        assert json.loads(out.decode().removeprefix("data: "))["id"] == 5
        assert sent(f.response.stream, b"more") == b""


async def test_the_ruleset_may_drop_server_messages_from_a_stream(tmp_path):
    """Stages replace or drop events: a denied notification never reaches the client, the answer does."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\ndefault: allow\nrules:\n"
        "  - id: no-progress\n    action: deny\n"
        "    match: {direction: server_to_client, methods: [notifications/progress]}\n"
    )
    with bundled(ruleset=str(rules)) as b:
        f = await streaming(b)
        stream = f.response.stream
        assert sent(stream, sse({"jsonrpc": "2.0", "method": "notifications/progress", "params": {}})) == b""
        answer = sse({"jsonrpc": "2.0", "id": 5, "result": {"ok": True}}, id="7")
        assert sent(stream, answer) == answer
        assert [d["action"] for d in f.metadata[Meta.DECISIONS] if d.get("direction") == Direction.S2C] == ["deny"]


@pytest.mark.parametrize(
    "regular,announced,expected",
    [
        (False, "/messages/?session_id=1", "/messages/?session_id=1"),
        (False, "{up}/messages/?session_id=1", "/messages/?session_id=1"),
        (True, "{up}/messages/?session_id=1", "{up}/messages/?session_id=1"),
    ],
)
async def test_old_transport_endpoint_event(regular, announced, expected):
    with bundled() as b:
        announced, expected = announced.format(up=b.upstream), expected.format(up=b.upstream)
        f = await streaming(b, mode="regular" if regular else None, get=True)
        out = sent(f.response.stream, f"event: endpoint\ndata: {announced}\n\n".encode())
        assert out == f"event: endpoint\ndata: {expected}\n\n".encode()
        assert f.metadata[Meta.MCP]["endpoint"] == "/messages/?session_id=1"
        assert f.metadata[Meta.LEGACY_SESSION] == "1"


@pytest.mark.parametrize("announced", ["http://evil.example/messages/", "//evil.example/m", "https://{host}/m"])
async def test_endpoint_on_another_origin_fails_the_stream_closed(announced):
    with bundled() as b:
        announced = announced.format(host=hostport(b))
        f = await streaming(b)
        out = sent(f.response.stream, f"event: endpoint\ndata: {announced}\n\n".encode())
        assert b"evil" not in out and b"endpoint" not in out
        assert "another origin" in f.metadata[Meta.ERROR]


async def test_a_client_closing_an_answered_stream_is_not_an_error():
    """The SDK closes a POST's event stream once the answer arrived; an unanswered one is an error."""
    with bundled() as b:
        answered = await streaming(b)
        sent(answered.response.stream, sse({"jsonrpc": "2.0", "id": 5, "result": {}}))
        answered.error = flow.Error("Client disconnected.")
        await b.error(answered)
        assert not [d for d in answered.metadata.get(Meta.DECISIONS, []) if d["stage"] == StageName.TRANSPORT]
        assert answered.metadata[Meta.MCP]["closed"] == "Client disconnected."
        assert "error" not in answered.comment

        cut = await streaming(b)
        cut.error = flow.Error("Client disconnected.")
        await b.error(cut)
        assert [d["action"] for d in cut.metadata[Meta.DECISIONS] if d["stage"] == StageName.TRANSPORT] == ["error"]


async def test_a_streamed_answer_is_readable_on_the_flow_once_sent_up_to_a_bound(monkeypatch):
    """mitmproxy keeps no body for a streamed response: the gateway puts what the client got on the flow."""
    with bundled() as b:
        f = await streaming(b)
        wire = sse({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}) + \
            sse({"jsonrpc": "2.0", "id": 5, "result": {"ok": True}})
        sent(f.response.stream, wire)
        sent(f.response.stream, b"")
        await trigger(b, HttpResponseHook, f)
        assert f.response.raw_content == wire
        assert "shown_bytes" not in f.metadata[Meta.MCP]

        monkeypatch.setattr(stream_mod, "SHOW_LIMIT", 10)
        f = await streaming(b)
        sent(f.response.stream, wire)
        await trigger(b, HttpResponseHook, f)
        assert f.response.raw_content == wire[:10] and f.metadata[Meta.MCP]["shown_bytes"] == 10


async def test_the_whole_stream_through_the_bundle_driver():
    """bundled.Bundled.response streams an event stream through the shipped bundle end to end."""
    with bundled() as b:
        f = b.flow(body=call("tools/call", 5, name="count"))
        await b.request(f)
        wire = sse({"jsonrpc": "2.0", "id": 5, "result": {"content": []}})
        out = await b.response(f, wire, ctype="text/event-stream")
        assert out == wire
        assert fs.passed(f, StageName.RESP_PARSE) and fs.passed(f, StageName.RESP_POLICY)
