"""
The event-stream wrapper (`glue.stream.SSEStream`) and `Replacement`, on their
own: a flow whose request was parsed, a stream built as the Gateway builds it,
and a plain function standing in for the message stages the Pipeline attaches.

How the shipped bundle builds and feeds these streams is tested in
tests/addons/test_gateway.py.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest
from mitmproxy import http

from mcp_bastion.core import errors
from mcp_bastion.core.jsonrpc import Body, parse_body, placed
from mcp_bastion.core.message import Carrier, Message
from mcp_bastion.core.vocab import Action, Direction, Kind, Meta, StageName
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue import stream as stream_mod
from mcp_bastion.glue.stream import Replacement, SSEStream

from bundled import call, make_flow

UPSTREAM = "http://127.0.0.1:8000"


# --- helpers ---------------------------------------------------------------


def streamed_flow(body: object = None, *, method: str = "POST", url: str = UPSTREAM) -> http.HTTPFlow:
    """A claimed flow whose request (tools/call #5 unless `body`) was parsed, answered with an event stream."""
    if method == "POST":
        f = make_flow("POST", body if body is not None else call("tools/call", 5, name="count"), url=url)
        parsed = parse_body(f.request.content)
        fs.set_request_body(f, Body(placed(parsed, Direction.C2S), parsed.batch, parsed.data))
    else:
        f = make_flow(method, url=url)
    f.metadata[Meta.MCP] = {}
    f.response = http.Response.make(200, b"", {"content-type": "text/event-stream"})
    return f


class Stages:
    """Stands in for the Pipeline: records what it was given, passes every message unchanged."""

    def __init__(self):
        self.calls: list[tuple[list[Message], bool]] = []

    def __call__(self, flow: http.HTTPFlow, messages: list[Message], batch: bool) -> list[Any]:
        self.calls.append((messages, batch))
        return [m.raw for m in messages]


def sse_stream(f: http.HTTPFlow, stages=None, max_event: int = 1 << 20, **kw: Any) -> SSEStream:
    s = SSEStream(f, max_event, **kw)
    s.stages = stages if stages is not None else Stages()
    f.response.stream = s
    return s


def sse(obj: object, **fields) -> bytes:
    head = "".join(f"{k}: {v}\n" for k, v in fields.items())
    return f"{head}data: {json.dumps(obj)}\n\n".encode()


def sent(stream, chunk: bytes) -> bytes:
    """What the client receives for one upstream chunk."""
    return b"".join(stream(chunk))


def event_errors(out: bytes) -> list[dict]:
    return [json.loads(line.removeprefix("data: ")) for line in out.decode().splitlines() if line.startswith("data: ")]


# --- streaming event by event ------------------------------------------------


def test_stream_forwards_each_event_when_complete_byte_for_byte():
    f = streamed_flow()
    stages = Stages()
    stream = sse_stream(f, stages)
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
    assert out[4] == b""
    assert b"".join(output) == wire
    assert stream.sent == len(wire) and bytes(stream.shown) == wire
    assert [[m.kind for m in msgs] for msgs, _ in stages.calls] == [["notification"], ["response"]]
    answer = stages.calls[1][0][0]
    assert (answer.direction, answer.carrier) == (Direction.S2C, Carrier.EVENT)
    assert answer.request is not None and answer.request.tool_name == "count"  # linked to what it answers
    state = f.metadata[Meta.MCP]
    assert state["sse_events"] == 2
    assert [e["kind"] for e in state["events"]] == ["notification", "response"]
    assert stream.pending == [] and state["answered"] is True


def test_a_chunk_that_completes_no_event_sends_nothing():
    """Bug: the wrapper returned b"", which mitmproxy sends as an empty chunk: in HTTP/1.1 chunked
    encoding that is the end of the body, so the client lost the rest of the stream."""
    stream = sse_stream(streamed_flow())
    assert stream(b"data: {") == []
    assert stream(b'"jsonrpc":"2.0","id":5,"result":{}}\n\n') == [b'data: {"jsonrpc":"2.0","id":5,"result":{}}\n\n']
    assert stream(b"") == []


def test_events_without_messages_pass_untouched_without_the_stages():
    f = streamed_flow()
    stages = Stages()
    stream = sse_stream(f, stages)
    wire = b": comment\n\nretry: 100\n\nid: 7\n\n"
    assert sent(stream, wire) == wire
    assert stages.calls == []


@pytest.mark.parametrize("wire", [
    b"event: ping\ndata: hello\n\n",
    b"event: x\xe2\x80\xa8event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n",
    b"event: MESSAGE\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\n\n",
])
def test_an_event_type_mcp_does_not_use_ends_the_stream_with_an_error(wire):
    """No stage reads it, and a client may read it as something else: it fails the stream closed."""
    stream = sse_stream(streamed_flow())
    out = sent(stream, wire)
    assert b"hello" not in out and b'"result"' not in out and b"-31010" in out


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"])
def test_no_forwarded_line_splits_differently_for_another_line_splitter(sep):
    """What the gateway sends reads the same to a client that splits lines like str.splitlines()."""
    wires = [f": keep{sep}data: {{}}\n\n", f"id: 1{sep}data: {{}}\n\n"]
    in_json = sep not in "\x0b\x0c\x1c\x1d\x1e"  # JSON strings may hold these raw; control characters not
    text = json.dumps({"jsonrpc": "2.0", "id": 5, "result": {"t": f"a{sep}data: x"}}, ensure_ascii=False)
    if in_json:
        wires.append(f"data: {text}\n\n")
    for wire in wires:
        out = sent(sse_stream(streamed_flow(), Stages()), wire.encode()).decode()
        assert sep not in out, (wire, out)
        assert out.splitlines() == out.split("\n")[:len(out.splitlines())]
    if in_json:  # the value is kept, written as an escape
        out = sent(sse_stream(streamed_flow(), Stages()), f"data: {text}\n\n".encode()).decode()
        assert json.loads(out[len("data: "):])["result"]["t"] == f"a{sep}data: x"


def test_an_unterminated_tail_is_discarded_at_the_end_of_the_stream():
    f = streamed_flow()
    stream = sse_stream(f)
    assert sent(stream, b'data: {"jsonrpc":"2.0","id":5,"result":{}}') == b""
    assert sent(stream, b"") == b""
    assert f.metadata[Meta.MCP]["discarded_tail_bytes"] > 0


# --- failing closed ----------------------------------------------------------


def test_stream_fails_closed_on_an_unreadable_event():
    f = streamed_flow()
    stream = sse_stream(f)
    output: list[bytes] = []
    stream.outputs.append(lambda flow, data: output.append(data))
    out = sent(stream, b"data: {not json\n\n")
    (err,) = event_errors(out)
    assert err["id"] == 5 and err["error"]["code"] == errors.GATEWAY_ERROR
    assert b"".join(output) == out  # the error events are what the client got: recorded too
    # nothing more of the upstream's stream reaches the client
    assert sent(stream, sse({"jsonrpc": "2.0", "id": 5, "result": {"secret": 1}})) == b""
    assert sent(stream, b"") == b""
    assert f.metadata[Meta.ERROR].startswith("sse: ")
    assert f.marked
    assert [(d["stage"], d["action"]) for d in f.metadata[Meta.DECISIONS]] == [(StageName.RESP_SSE, Action.ERROR)]


@pytest.mark.parametrize("data", [b'data: {"jsonrpc":"1.0","id":5}\n\n', b'data: [1, 2]\n\n'])
def test_stream_fails_closed_on_an_event_that_is_not_json_rpc(data):
    stream = sse_stream(streamed_flow())
    (err,) = event_errors(sent(stream, data))
    assert err["id"] == 5 and err["error"]["code"] == errors.GATEWAY_ERROR


def test_stream_fails_closed_when_the_stages_raise():
    """Bug: the answer's id left `pending` before the handlers ran, so the failure answered nothing."""

    def exploding(flow, messages, batch):
        raise RuntimeError("masking exploded")

    f = streamed_flow()
    stream = sse_stream(f, exploding)
    out = sent(stream, sse({"jsonrpc": "2.0", "id": 5, "result": {"secret": 1}}))
    assert b"secret" not in out
    (err,) = event_errors(out)
    assert err["id"] == 5 and err["error"]["code"] == errors.GATEWAY_ERROR
    assert "masking exploded" in f.metadata[Meta.ERROR]


def test_a_stream_with_no_stages_attached_fails_closed():
    f = streamed_flow()
    stream = SSEStream(f, 1 << 20)
    out = sent(stream, sse({"jsonrpc": "2.0", "id": 5, "result": {"secret": 1}}))
    assert b"secret" not in out
    (err,) = event_errors(out)
    assert err["id"] == 5 and err["error"]["code"] == errors.GATEWAY_ERROR
    assert "no message stages" in f.metadata[Meta.ERROR]


def test_stream_fails_closed_on_an_oversized_event():
    stream = sse_stream(streamed_flow(), max_event=1024)
    out = sent(stream, b"data: " + b"x" * 2000)
    assert event_errors(out)[0]["id"] == 5


def test_a_broken_stream_answers_pending_requests_with_an_error():
    """Bug: the error events made at construction were never sent; the client waited forever."""
    stream = sse_stream(streamed_flow(), broken="compressed event stream (gzip)")
    out = sent(stream, gzip.compress(sse({"jsonrpc": "2.0", "id": 5, "result": {}})))
    assert event_errors(out)[0]["id"] == 5
    assert sent(stream, b"more") == b""


def test_a_failure_answers_every_pending_request_of_a_batch_but_not_the_answered_ones():
    f = streamed_flow([call("tools/call", 1, name="a"), call("tools/call", 2, name="b"), call("ping", 3)])
    stream = sse_stream(f)
    first = sse({"jsonrpc": "2.0", "id": 2, "result": {}})
    assert sent(stream, first) == first
    assert stream.pending == [1, 3]
    out = sent(stream, b"data: {broken\n\n")
    assert [e["id"] for e in event_errors(out)] == [1, 3]
    assert "answered" not in f.metadata[Meta.MCP]


def test_an_answer_the_stages_drop_is_still_pending():
    """Answered only once the answer is on its way: a dropped answer is answered by a later failure."""
    f = streamed_flow()
    stream = sse_stream(f, lambda flow, messages, batch: [])
    assert sent(stream, sse({"jsonrpc": "2.0", "id": 5, "result": {"secret": 1}})) == b""
    assert stream.pending == [5]
    (err,) = event_errors(sent(stream, b"data: {broken\n\n"))
    assert err["id"] == 5


# --- what the stages make of an event --------------------------------------------


def test_stages_may_replace_or_drop_events():
    def rewrite(flow, messages, batch):
        if messages[0].kind == Kind.NOTIFICATION:
            return []  # not for this client
        return [{"jsonrpc": "2.0", "id": 5, "result": {"masked": True}}]

    stream = sse_stream(streamed_flow(), rewrite)
    assert sent(stream, sse({"jsonrpc": "2.0", "method": "notifications/progress", "params": {}})) == b""
    assert sent(stream, sse({"jsonrpc": "2.0", "id": 5, "result": {"secret": 1}}, id="7")) == (
        b'id: 7\ndata: {"jsonrpc":"2.0","id":5,"result":{"masked":true}}\n\n'
    )
    assert stream.pending == []


def test_a_batch_event_is_handed_over_whole_and_rewritten_as_a_batch():
    f = streamed_flow([call("ping", 1), call("ping", 2)])
    seen = []

    def keep_first(flow, messages, batch):
        seen.append((len(messages), batch))
        return [messages[0].raw]

    stream = sse_stream(f, keep_first)
    event = sse([{"jsonrpc": "2.0", "id": 1, "result": {}}, {"jsonrpc": "2.0", "id": 2, "result": {}}])
    assert sent(stream, event) == b'data: [{"jsonrpc":"2.0","id":1,"result":{}}]\n\n'
    assert seen == [(2, True)]


# --- the old HTTP+SSE transport's endpoint event -----------------------------------


@pytest.mark.parametrize(
    "relative,announced,expected",
    [
        (True, "/messages/?session_id=1", "/messages/?session_id=1"),
        (True, f"{UPSTREAM}/messages/?session_id=1", "/messages/?session_id=1"),
        (False, f"{UPSTREAM}/messages/?session_id=1", f"{UPSTREAM}/messages/?session_id=1"),
        (False, "/messages/?session_id=1", "/messages/?session_id=1"),
    ],
)
def test_old_transport_endpoint_event(relative, announced, expected):
    f = streamed_flow(method="GET")
    stream = sse_stream(f, relative_endpoint=relative)
    out = sent(stream, f"event: endpoint\ndata: {announced}\n\n".encode())
    assert out == f"event: endpoint\ndata: {expected}\n\n".encode()
    assert f.metadata[Meta.MCP]["endpoint"] == "/messages/?session_id=1"
    assert f.metadata[Meta.LEGACY_SESSION] == "1"


@pytest.mark.parametrize("announced", ["http://evil.example/messages/", "//evil.example/m", "https://127.0.0.1:8000/m"])
def test_endpoint_on_another_origin_fails_the_stream_closed(announced):
    f = streamed_flow()
    stream = sse_stream(f, relative_endpoint=True)
    out = sent(stream, f"event: endpoint\ndata: {announced}\n\n".encode())
    assert b"evil" not in out and b"endpoint" not in out
    assert "another origin" in f.metadata[Meta.ERROR]


# --- what is kept for display ------------------------------------------------------


def test_what_is_shown_is_bounded(monkeypatch):
    monkeypatch.setattr(stream_mod, "SHOW_LIMIT", 10)
    stream = sse_stream(streamed_flow())
    wire = sse({"jsonrpc": "2.0", "id": 5, "result": {"ok": True}})
    assert sent(stream, wire) == wire
    assert bytes(stream.shown) == wire[:10] and stream.sent == len(wire)


# --- Replacement -------------------------------------------------------------------


def test_replacement_sends_its_body_instead_of_the_upstreams():
    r = Replacement(b'{"error":1}')
    assert r(b"x" * 4096) == [] and r(b"more") == []
    assert r(b"") == [b'{"error":1}']
