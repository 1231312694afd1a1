"""
SSE through the real mitmdump: events are forwarded as they complete, not
when the stream ends, and the bytes arrive as the upstream wrote them.

The upstream is a tiny HTTP server in this process that writes its event
stream in explicit chunks and, between two of them, waits until the test
client says it has received the first event. If the gateway held events back,
that would never happen: the assertions are on that order, not on time (the
wait has a generous bound only so that a broken gateway fails instead of
hanging).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from harness import gateway

pytestmark = pytest.mark.e2e

DEADLOCK_GUARD = 30.0  # seconds; only reached when the gateway buffers

ACCEPT = {"accept": "application/json, text/event-stream"}


def message(obj: dict, eol: str = "\n", **fields) -> bytes:
    head = "".join(f"{k}: {v}{eol}" for k, v in fields.items())
    return f"{head}data: {json.dumps(obj)}{eol}{eol}".encode()


PROGRESS = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "t", "progress": 1}}
RESULT = {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "done"}]}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ScriptedUpstream

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.script(self)

    def do_GET(self) -> None:
        self.server.script(self)

    def start_stream(self) -> None:
        self.server.requests.append((self.command, dict(self.headers)))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class ScriptedUpstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: Callable[[Handler], None]):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script = script
        self.requests: list[tuple[str, dict]] = []
        self.client_has_first = threading.Event()
        self.waited: list[bool] = []  # per wait: True if the client's signal came, False if the guard expired

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def wait_for_client(self) -> None:
        self.waited.append(self.client_has_first.wait(DEADLOCK_GUARD))


@contextlib.contextmanager
def upstream(script: Callable[[Handler], None]) -> Iterator[ScriptedUpstream]:
    srv = ScriptedUpstream(script)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def read_stream(resp: httpx.Response, first: bytes, srv: ScriptedUpstream) -> tuple[bytes, bytes]:
    """Read the whole body; once `first` has fully arrived, note what had arrived and signal the upstream."""
    buf = bytearray()
    seen_first = b""
    for piece in resp.iter_raw():
        buf += piece
        if not srv.client_has_first.is_set() and len(buf) >= len(first):
            seen_first = bytes(buf)
            srv.client_has_first.set()
    return seen_first, bytes(buf)


def post_call(client: httpx.Client, url: str):
    return client.stream("POST", url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                                            "params": {"name": "slow", "_meta": {"progressToken": "t"}}},
                         headers=ACCEPT)


def test_first_event_reaches_the_client_before_the_second_is_sent():
    first, second = message(PROGRESS), message(RESULT)

    def script(h: Handler) -> None:
        h.start_stream()
        h.chunk(first)
        h.server.wait_for_client()
        h.chunk(second)
        h.end()

    with upstream(script) as srv, gateway(srv.url) as gw, httpx.Client(timeout=DEADLOCK_GUARD * 2) as client:
        with post_call(client, f"{gw.url}/mcp") as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "text/event-stream"
            seen_first, body = read_stream(resp, first, srv)
    assert srv.waited == [True], "the upstream had to send event 2 before the client saw event 1"
    assert seen_first == first
    assert body == first + second


def test_events_split_across_chunks_with_crlf_comments_ids_and_multiline_data():
    """Event 2 is cut mid-way, between the CR and the LF of a line end: the client must get event 1 alone,
    then event 2 whole."""
    first = b": keep-alive\r\nid: 41\r\nretry: 2500\r\n" + message(PROGRESS, "\r\n")
    second = b'id: 42\r\ndata: {"jsonrpc":"2.0","id":1,\r\ndata:  "result":\r\ndata: {"content":[]}}\r\n\r\n'
    cut = second.index(b"\r\ndata:  ") + 1  # right after a CR
    third = b": the end\n\n"

    def script(h: Handler) -> None:
        h.start_stream()
        h.chunk(first + second[:cut])
        h.server.wait_for_client()
        h.chunk(second[cut:])
        for i in range(len(third)):  # byte by byte
            h.chunk(third[i : i + 1])
        h.end()

    with upstream(script) as srv, gateway(srv.url) as gw, httpx.Client(timeout=DEADLOCK_GUARD * 2) as client:
        with post_call(client, f"{gw.url}/mcp") as resp:
            seen_first, body = read_stream(resp, first, srv)
    assert srv.waited == [True]
    assert seen_first == first  # nothing of the unfinished event 2
    assert body == first + second + third


def test_an_unreadable_event_ends_the_stream_with_an_error_for_the_pending_request():
    secret = message({"jsonrpc": "2.0", "id": 1, "result": {"secret": "s3cr3t"}})

    def script(h: Handler) -> None:
        h.start_stream()
        h.chunk(b"data: {this is not json\n\n" + secret)
        h.end()

    with upstream(script) as srv, gateway(srv.url) as gw, httpx.Client(timeout=DEADLOCK_GUARD) as client:
        with post_call(client, f"{gw.url}/mcp") as resp:
            body = resp.read()
    assert b"s3cr3t" not in body
    (line,) = [ln for ln in body.decode().splitlines() if ln.startswith("data:")]
    err = json.loads(line.removeprefix("data:"))
    assert err["id"] == 1 and err["error"]["code"] == -31010


def test_get_stream_resumes_with_last_event_id():
    def script(h: Handler) -> None:
        if h.command == "POST":  # initialize: the session the GET stream belongs to
            body = json.dumps({"jsonrpc": "2.0", "id": 0, "result": {}}).encode()
            h.send_response(200)
            h.send_header("content-type", "application/json")
            h.send_header("mcp-session-id", "s1")
            h.send_header("content-length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        h.start_stream()
        resumed_after = h.headers.get("last-event-id")
        h.chunk(message({"jsonrpc": "2.0", "method": "notifications/resumed", "params": {"after": resumed_after}},
                        id="8"))
        h.end()

    with upstream(script) as srv, gateway(srv.url) as gw, httpx.Client(timeout=DEADLOCK_GUARD) as client:
        init = client.post(f"{gw.url}/mcp", json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}},
                           headers=ACCEPT)
        assert init.headers["mcp-session-id"] == "s1"
        headers = {"accept": "text/event-stream", "last-event-id": "7", "mcp-session-id": "s1"}
        with client.stream("GET", f"{gw.url}/mcp", headers=headers) as resp:
            body = resp.read()
    method, seen = srv.requests[0]
    assert method == "GET"
    assert {k.lower(): v for k, v in seen.items()}["last-event-id"] == "7"
    assert body == message({"jsonrpc": "2.0", "method": "notifications/resumed", "params": {"after": "7"}}, id="8")


def test_an_oversized_json_answer_is_replaced_without_being_read():
    """A declared Content-Length above max_body_size: the client gets a JSON-RPC error, none of the body."""
    size = 64 * 1024

    def script(h: Handler) -> None:
        h.server.requests.append((h.command, dict(h.headers)))
        h.send_response(200)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(size))
        h.end_headers()
        for _ in range(size // 1024):
            h.wfile.write(b"x" * 1024)
        h.wfile.flush()

    with upstream(script) as srv, gateway(srv.url, {"max_body_size": "16k"}) as gw:
        r = httpx.post(f"{gw.url}/mcp", json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"}, headers=ACCEPT,
                       timeout=DEADLOCK_GUARD)
    assert r.status_code == 502
    assert r.json()["id"] == 3 and r.json()["error"]["code"] == -31011
    assert b"xxxx" not in r.content
