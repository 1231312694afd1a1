"""
The holding line (`glue.holding.HoldingServer`) on its own, and the Accept
parsing (`accepts_event_stream`) that decides whether a held call gets it.

No mitmproxy runs here: the test plays mitmproxy (it writes, on a plain TCP
connection to the holding server, the request mitmproxy would send), and a
scripted upstream on 127.0.0.1 (an asyncio server reading the forwarded
request with h11) stands in for the real MCP server.

Tests marked `xfail(strict=True)` are findings: the behaviour they assert is
the one wanted, and they fail on the code as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gzip
import ipaddress
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import pytest

from mcp_bastion.addons.approvals import accepts_event_stream
from mcp_bastion.glue.holding import FORWARD, TICKET_HEADER, HoldingServer, Ticket, expectation

pytestmark = pytest.mark.anyio

TIMEOUT = 10.0  # no exchange here should take anywhere near this long

REQ_ID = 7
CALL = {"jsonrpc": "2.0", "id": REQ_ID, "method": "tools/call",
        "params": {"name": "deploy", "arguments": {"env": "prod"}, "_meta": {"progressToken": "p1"}}}
BODY = json.dumps(CALL, separators=(",", ":")).encode()
RESULT = {"jsonrpc": "2.0", "id": REQ_ID, "result": {"content": [{"type": "text", "text": "deployed"}]}}
DENIAL = {"jsonrpc": "2.0", "id": REQ_ID, "error": {"code": -32001, "message": "denied by bob: no"}}
HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


# --- helpers: the decision, the ticket ---------------------------------------------------------


class Decision:
    """A ticket's `outcome`: pending until the test decides; remembers whether it was cancelled."""

    def __init__(self) -> None:
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.started = asyncio.Event()
        self.cancelled = False

    def forward(self) -> None:
        self.future.set_result(FORWARD)

    def refuse(self, message: dict[str, Any] = DENIAL) -> None:
        self.future.set_result(message)

    async def __call__(self) -> Any:
        self.started.set()
        try:
            return await asyncio.shield(self.future)
        except asyncio.CancelledError:
            self.cancelled = True
            raise


@dataclass
class Heard:
    """What a ticket's callbacks heard."""

    received: int = 0
    gone: list[str] = field(default_factory=list)
    forwarded: list[int] = field(default_factory=list)
    ticks: list[tuple[int, float]] = field(default_factory=list)  # (n, monotonic time) per `notices(n)`


def progress(n: int) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "p1", "progress": n}}


def make_ticket(port: int, outcome: Callable[[], Awaitable[Any]], *, scheme: str = "http", host: str = "127.0.0.1",
                every: float = 0.05, **kw: Any) -> tuple[Ticket, Heard]:
    heard = Heard()

    def notices(n: int) -> list[dict[str, Any]]:
        heard.ticks.append((n, time.monotonic()))
        return [progress(n)]

    def received() -> None:
        heard.received += 1

    ticket = Ticket(scheme=scheme, host=host, port=port, request_id=REQ_ID, outcome=outcome, notices=notices,
                    every=every, received=received, gone=heard.gone.append, forwarded=heard.forwarded.append, **kw)
    return ticket, heard


async def decided(value: Any) -> Any:
    """An `outcome` that is already decided."""
    return value


# --- helpers: the upstream ---------------------------------------------------------------------


def reply(status: int = 200, body: bytes = b"", ctype: str | None = "application/json", *,
          extra: bytes = b"", reason: bytes = b"X") -> bytes:
    """A whole HTTP/1.1 answer with a Content-Length."""
    head = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    if ctype is not None:
        head += b"content-type: " + ctype.encode() + b"\r\n"
    return head + b"content-length: %d\r\n" % len(body) + extra + b"\r\n" + body


def chunked(status: int = 200, chunks: list[bytes] = (), ctype: str = "text/event-stream", *,
            end: bool = True, extra: bytes = b"") -> bytes:
    """An HTTP/1.1 answer in chunked encoding (`end=False`: without its last chunk)."""
    out = b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n%s\r\n" % (
        status, ctype.encode(), extra)
    for c in chunks:
        out += b"%x\r\n%s\r\n" % (len(c), c)
    return out + (b"0\r\n\r\n" if end else b"")


def sse(*messages: dict[str, Any]) -> bytes:
    return b"".join(b"event: message\ndata: " + json.dumps(m).encode() + b"\n\n" for m in messages)


Answer = bytes | Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    """A scripted upstream on 127.0.0.1: reads one request per connection, records it, then answers
    (`answer`: bytes written at once, or a coroutine function given the connection)."""

    def __init__(self, answer: Answer = b"", ssl_context: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.ssl_context = ssl_context
        self.connections = 0
        self.requests: list[tuple[h11.Request, bytes]] = []
        self.ended = asyncio.Event()  # the other side closed a connection after its request

    async def __aenter__(self) -> Upstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()
        self.server.close_clients()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        request, body = None, bytearray()
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return
            self.requests.append((request, bytes(body)))
            if callable(self.answer):
                await self.answer(reader, writer)
            else:
                writer.write(self.answer)
                await writer.drain()
        except (ConnectionError, h11.ProtocolError, ssl.SSLError):
            pass
        finally:
            writer.close()


async def until_closed(reader: asyncio.StreamReader, ended: asyncio.Event) -> None:
    """(In an upstream's answer) wait for the holding server to close the connection, and say so."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass
    ended.set()


# --- helpers: mitmproxy's side of the holding server -------------------------------------------


def request(key: str | None, *, body: bytes = BODY, target: bytes = b"/mcp", method: bytes = b"POST",
            headers: list[tuple[bytes, bytes]] | None = None, framing: str = "length") -> bytes:
    """The request mitmproxy sends to the holding server (HTTP/1.1, ticket header set)."""
    head = [(b"Host", b"mcp.example:8000"), (b"Content-Type", b"application/json"),
            (b"Accept", b"application/json, text/event-stream"), (b"Authorization", b"Bearer upstream-secret")]
    if headers is not None:
        head = list(headers)
    if key is not None:
        head.append((TICKET_HEADER.encode(), key.encode()))
    if framing == "length":
        head.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "chunked":
        head.append((b"Transfer-Encoding", b"chunked"))
    out = method + b" " + target + b" HTTP/1.1\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in head) + b"\r\n"
    if framing == "chunked":
        return out + (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    return out + body


@dataclass
class Reply:
    status: int | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False  # the body ended as its framing says (not cut off)

    @property
    def events(self) -> list[dict[str, Any]]:
        """The JSON data of every complete `message` event (a block that is not JSON raises)."""
        out = []
        for block in self.body.split(b"\n\n")[:-1]:
            lines = block.split(b"\n")
            data = [ln[5:].lstrip(b" ") for ln in lines if ln.startswith(b"data:")]
            kind = next((ln[6:].strip() for ln in lines if ln.startswith(b"event:")), b"message")
            if data and kind == b"message":
                out.append(json.loads(b"\n".join(data)))
        return out

    @property
    def tail(self) -> bytes:
        """Bytes after the last complete event."""
        return self.body.split(b"\n\n")[-1]


class Listener:
    """Reads the holding server's answer on one connection, in as many steps as the test likes."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.conn = h11.Connection(h11.CLIENT)
        self.conn.send(h11.Request(method="POST", target="/", headers=[("host", "x"), ("content-length", "0")]))
        self.conn.send(h11.EndOfMessage())
        self.reply = Reply()
        self.done = False

    async def read(self, until: Callable[[Reply], bool] | None = None) -> Reply:
        """Everything so far, once the answer ended (or `until(reply)` holds)."""
        out = self.reply
        while not self.done:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                self.done = True  # cut off mid-body
                break
            if event is h11.NEED_DATA:
                try:
                    data = await self.reader.read(65536)
                except ConnectionError:  # reset: the server closed with our request unread
                    data = b""
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                out.status = event.status_code
                out.headers = dict(event.headers)
            elif isinstance(event, h11.Data):
                out.body += bytes(event.data)
                if until is not None and until(out):
                    return out
            else:  # EndOfMessage, or ConnectionClosed
                out.complete = isinstance(event, h11.EndOfMessage)
                self.done = True
        return out


async def read_reply(reader: asyncio.StreamReader, *, until: Callable[[Reply], bool] | None = None) -> Reply:
    """Read the holding server's answer (to its end, or until `until(reply)` holds)."""
    return await Listener(reader).read(until)


async def hold(port: int, raw: bytes) -> Reply:
    """Send `raw` to the holding server on a fresh connection and read the whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        return await asyncio.wait_for(read_reply(reader), TIMEOUT)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def holding():
    server = HoldingServer()
    await server.start()
    try:
        yield server
    finally:
        server.close()


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


def is_error_for_call(message: dict[str, Any], reason: str | None = None) -> bool:
    return (message.get("id") == REQ_ID and "error" in message and "result" not in message
            and (reason is None or message["error"].get("data", {}).get("reason") == reason))


async def forward_with(answer: Answer, **ticket_kw: Any) -> tuple[Reply, Upstream, Heard]:
    """A held call, approved at once, whose upstream answers `answer`."""
    async with Upstream(answer) as up, holding() as server:
        ticket, heard = make_ticket(up.port, lambda: decided(FORWARD), **ticket_kw)
        got = await hold(server.port, request(server.issue(ticket)))
        return got, up, heard


# --- tickets ------------------------------------------------------------------------------------


async def test_starts_on_loopback_and_closes():
    server = HoldingServer()
    assert not server.ready
    await server.start()
    assert server.ready and server.port
    assert server._server.sockets[0].getsockname()[0] == "127.0.0.1"
    server.close()
    assert not server.ready and server.port is None


@pytest.mark.parametrize("key", [None, "", "not-a-ticket", "A" * 43])
async def test_a_request_without_a_valid_ticket_is_404(key):
    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        ticket, heard = make_ticket(up.port, lambda: decided(FORWARD))
        real = server.issue(ticket)
        got = await hold(server.port, request(key))
        assert got.status == 404 and got.body == b"" and got.complete
        assert got.headers.get(b"connection") == b"close"
        assert up.connections == 0 and heard.received == 0
        assert server.withdraw(real) is ticket  # an unrelated request leaves a real ticket alone


async def test_tickets_are_random_and_url_safe():
    server = HoldingServer()
    keys = {server.issue(make_ticket(1, lambda: decided(FORWARD))[0]) for _ in range(200)}
    assert len(keys) == 200
    assert all(len(k) >= 43 and k.replace("-", "").replace("_", "").isalnum() for k in keys)


async def test_a_ticket_is_single_use():
    async with holding() as server:
        ticket, heard = make_ticket(1, lambda: decided(DENIAL))
        key = server.issue(ticket)
        first = await hold(server.port, request(key))
        assert first.status == 200 and first.events[-1] == DENIAL
        second = await hold(server.port, request(key))
        assert second.status == 404
        assert heard.received == 1


async def test_a_ticket_is_single_use_even_while_its_call_waits():
    async with holding() as server:
        decision = Decision()
        ticket, heard = make_ticket(1, decision)
        key = server.issue(ticket)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request(key))
        await writer.drain()
        await asyncio.wait_for(decision.started.wait(), TIMEOUT)
        replay = await hold(server.port, request(key))
        assert replay.status == 404
        decision.refuse()
        got = await asyncio.wait_for(read_reply(reader), TIMEOUT)
        writer.close()
        assert got.events[-1] == DENIAL and heard.received == 1


async def test_a_withdrawn_ticket_is_404():
    async with holding() as server:
        ticket, heard = make_ticket(1, lambda: decided(FORWARD))
        key = server.issue(ticket)
        assert server.withdraw(key) is ticket
        assert server.withdraw(key) is None
        assert (await hold(server.port, request(key))).status == 404
        assert heard.received == 0


async def test_close_forgets_tickets_and_ends_held_calls():
    server = HoldingServer()
    await server.start()
    decision = Decision()
    ticket, heard = make_ticket(1, decision)
    key = server.issue(ticket)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request(key))
    await writer.drain()
    await asyncio.wait_for(decision.started.wait(), TIMEOUT)
    other = server.issue(make_ticket(1, lambda: decided(FORWARD))[0])
    server.close()
    got = await asyncio.wait_for(read_reply(reader), TIMEOUT)
    writer.close()
    assert got.status == 200 and not got.complete  # the stream was cut, never completed
    assert await eventually(lambda: decision.cancelled)
    assert server.withdraw(other) is None


# --- while the decision is pending ---------------------------------------------------------------


async def test_the_stream_starts_at_once_with_the_notices_of_tick_0():
    async with holding() as server:
        decision = Decision()
        ticket, heard = make_ticket(1, decision, every=30)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        sent = time.monotonic()
        writer.write(request(server.issue(ticket)))
        await writer.drain()
        listener = Listener(reader)
        got = await asyncio.wait_for(listener.read(until=lambda r: bool(r.events)), 2)
        assert time.monotonic() - sent < 1.0  # long before the first `every`
        assert got.status == 200
        assert got.headers[b"content-type"] == b"text/event-stream"
        assert got.headers[b"cache-control"] == b"no-store"
        assert got.headers[b"transfer-encoding"] == b"chunked"
        assert got.events == [progress(0)]
        assert heard.received == 1 and [n for n, _ in heard.ticks] == [0]
        decision.refuse()
        rest = await asyncio.wait_for(listener.read(), TIMEOUT)
        writer.close()
        assert rest.events == [progress(0), DENIAL] and rest.complete


async def test_notices_come_every_tick_while_pending():
    every = 0.15
    async with holding() as server:
        decision = Decision()
        ticket, heard = make_ticket(1, decision, every=every)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request(server.issue(ticket)))
        await writer.drain()
        listener = Listener(reader)
        await asyncio.wait_for(listener.read(until=lambda r: len(r.events) >= 4), TIMEOUT)
        decision.refuse()
        rest = await asyncio.wait_for(listener.read(), TIMEOUT)
        writer.close()
    assert rest.events[:4] == [progress(n) for n in range(4)]
    ticks = [n for n, _ in heard.ticks]
    assert ticks == list(range(len(ticks)))
    gaps = [b - a for (_, a), (_, b) in zip(heard.ticks, heard.ticks[1:], strict=False)][:3]
    assert all(every * 0.8 <= g <= every * 4 for g in gaps), gaps
    assert rest.events[-1] == DENIAL and rest.complete


async def test_a_ticket_may_send_several_or_no_notices_per_tick():
    async with holding() as server:
        decision = Decision()
        log = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "notice", "data": "x"}}
        ticket, _ = make_ticket(1, decision, every=0.05)
        ticket.notices = lambda n: [log, progress(0)] if n == 0 else []
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request(server.issue(ticket)))
        await writer.drain()
        await asyncio.sleep(0.3)
        decision.refuse()
        got = await asyncio.wait_for(read_reply(reader), TIMEOUT)
        writer.close()
    assert got.events == [log, progress(0), DENIAL]


# --- refused: the error, and nothing upstream ---------------------------------------------------


async def test_a_denial_sends_the_error_and_ends_without_contacting_the_upstream():
    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        decision = Decision()
        ticket, heard = make_ticket(up.port, decision, every=0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request(server.issue(ticket)))
        await writer.drain()
        await asyncio.sleep(0.12)
        decision.refuse()
        got = await asyncio.wait_for(read_reply(reader), TIMEOUT)
        writer.close()
        assert got.complete and got.tail == b""
        assert got.events[-1] == DENIAL
        assert all(e["method"] == "notifications/progress" for e in got.events[:-1]) and len(got.events) >= 2
        assert up.connections == 0 and up.requests == []
        assert heard.forwarded == [] and heard.gone == []


async def test_an_outcome_already_decided_sends_tick_0_then_the_error():
    async with holding() as server:
        ticket, _ = make_ticket(1, lambda: decided(DENIAL))
        got = await hold(server.port, request(server.issue(ticket)))
    assert got.events == [progress(0), DENIAL] and got.complete


# --- approved: the request, once, to the upstream ------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_an_approved_call_reaches_the_upstream_once_as_received(framing):
    sent_headers = [
        (b"Host", b"mcp.example:8000"), (b"Content-Type", b"application/json"),
        (b"Accept", b"application/json, text/event-stream"), (b"Authorization", b"Bearer upstream-secret"),
        (b"Mcp-Session-Id", b"s-1"), (b"MCP-Protocol-Version", b"2025-06-18"),
        (b"X-Dup", b"one"), (b"X-Dup", b"two"),
        (b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"), (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"), (b"Trailer", b"x-t"), (b"Upgrade", b"h2c"),
    ]
    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        ticket, heard = make_ticket(up.port, lambda: decided(FORWARD))
        raw = request(server.issue(ticket), target=b"/mcp/v1?x=1&y=%20", headers=sent_headers, framing=framing)
        got = await hold(server.port, raw)
        assert got.status == 200 and got.complete
        assert up.connections == 1 and len(up.requests) == 1
        forwarded, body = up.requests[0]
    assert forwarded.method == b"POST" and forwarded.target == b"/mcp/v1?x=1&y=%20"
    assert body == BODY
    names = [k for k, _ in forwarded.headers]
    assert TICKET_HEADER.encode() not in names
    assert not HOP & {k.decode() for k in names} - {"connection"}
    kept = [(k, v) for k, v in forwarded.headers if k not in (b"content-length", b"connection")]
    assert kept == [(k.lower(), v) for k, v in sent_headers if k.lower().decode() not in HOP]
    assert dict(forwarded.headers)[b"content-length"] == str(len(BODY)).encode()
    assert dict(forwarded.headers)[b"connection"] == b"close"
    assert heard.forwarded == [200]
    assert got.events == [progress(0), RESULT]


async def test_an_empty_body_is_forwarded_with_a_zero_length():
    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        ticket, _ = make_ticket(up.port, lambda: decided(FORWARD))
        await hold(server.port, request(server.issue(ticket), method=b"GET", body=b""))
        forwarded, body = up.requests[0]
    assert forwarded.method == b"GET" and body == b""
    assert dict(forwarded.headers)[b"content-length"] == b"0"


async def test_the_client_of_an_approved_call_hears_the_upstream_once_per_ticket():
    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        ticket, _ = make_ticket(up.port, lambda: decided(FORWARD))
        key = server.issue(ticket)
        first = await hold(server.port, request(key))
        again = await hold(server.port, request(key))
    assert first.events[-1] == RESULT and again.status == 404
    assert up.connections == 1


async def test_held_calls_are_independent():
    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        decisions = [Decision() for _ in range(5)]
        conns = []
        for d in decisions:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(request(server.issue(make_ticket(up.port, d)[0])))
            await writer.drain()
            conns.append((reader, writer))
        for d in decisions:
            await asyncio.wait_for(d.started.wait(), TIMEOUT)
        for i, d in enumerate(decisions):
            d.forward() if i % 2 == 0 else d.refuse()
        replies = [await asyncio.wait_for(read_reply(r), TIMEOUT) for r, _ in conns]
        for _, w in conns:
            w.close()
        assert up.connections == 3
    assert [r.events[-1] for r in replies] == [RESULT, DENIAL, RESULT, DENIAL, RESULT]


async def test_the_ticket_header_name_is_case_insensitive():
    async with holding() as server:
        ticket, heard = make_ticket(1, lambda: decided(DENIAL))
        raw = request(None, headers=[(b"Host", b"x"), (b"X-Bastion-HOLD", server.issue(ticket).encode())])
        got = await hold(server.port, raw)
    assert got.status == 200 and got.events[-1] == DENIAL and heard.received == 1


async def test_expect_100_continue_does_not_stall_the_held_call():
    # mitmproxy answers `Expect: 100-continue` itself and removes the header (mitmproxy/proxy/layers/http/
    # __init__.py, handle_request_headers), so it should never get here; if it does, the body is there already.
    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        ticket, _ = make_ticket(up.port, lambda: decided(FORWARD))
        key = server.issue(ticket)
        raw = request(key, headers=[(b"Host", b"x"), (b"Expect", b"100-continue")])
        got = await asyncio.wait_for(hold(server.port, raw), 5)
        assert got.events[-1] == RESULT and up.requests[0][1] == BODY


@pytest.mark.parametrize("raw", [
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS ClientHello
    b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
], ids=["h2-preface", "no-host", "tls", "cl-and-te"])
async def test_what_is_not_http_1_1_is_dropped_and_the_server_goes_on(raw):
    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        got = await hold(server.port, raw)
        assert got.status in (None, 400, 404)
        ticket, _ = make_ticket(up.port, lambda: decided(FORWARD))
        assert (await hold(server.port, request(server.issue(ticket)))).events[-1] == RESULT
        assert len(up.requests) == 1


async def test_an_http_1_0_request_is_held_and_forwarded_as_http_1_1():
    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        ticket, _ = make_ticket(up.port, lambda: decided(FORWARD))
        raw = request(server.issue(ticket)).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
        got = await hold(server.port, raw)
        forwarded, body = up.requests[0]
    assert got.status == 200 and b"transfer-encoding" not in got.headers  # no chunked for an HTTP/1.0 peer
    assert got.events[-1] == RESULT
    assert forwarded.http_version == b"1.1" and body == BODY


# --- the upstream's answer, in the stream ---------------------------------------------------------


async def test_a_json_answer_is_one_event():
    got, up, heard = await forward_with(reply(200, json.dumps(RESULT).encode(), "Application/JSON; charset=utf-8"))
    assert got.events == [progress(0), RESULT] and got.complete and got.tail == b""
    assert heard.forwarded == [200]


async def test_a_json_batch_answer_is_one_event_per_message():
    other = {"jsonrpc": "2.0", "id": 8, "result": {}}
    got, _, _ = await forward_with(reply(200, json.dumps([RESULT, other]).encode()))
    assert got.events == [progress(0), RESULT, other]


async def test_a_json_rpc_error_is_relayed_whatever_the_status():
    error = {"jsonrpc": "2.0", "id": REQ_ID, "error": {"code": -32602, "message": "bad arguments"}}
    got, _, heard = await forward_with(reply(400, json.dumps(error).encode()))
    assert got.events == [progress(0), error]
    assert heard.forwarded == [400]


async def test_a_json_answer_on_a_connection_the_upstream_keeps_open():
    async def keep_open(reader, writer):
        writer.write(reply(200, json.dumps(RESULT).encode(), extra=b"connection: keep-alive\r\n"))
        await writer.drain()
        await asyncio.sleep(TIMEOUT)

    got, _, _ = await asyncio.wait_for(forward_with(keep_open), 5)
    assert got.events == [progress(0), RESULT] and got.complete


async def test_a_json_answer_delimited_by_the_end_of_the_connection():
    async def http10(reader, writer):
        writer.write(b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n" + json.dumps(RESULT).encode())
        await writer.drain()

    got, _, _ = await forward_with(http10)
    assert got.events == [progress(0), RESULT]


async def test_an_event_stream_is_relayed_as_it_comes():
    note = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "p1", "progress": 50}}
    stream = b": hello\n\n" + sse(note) + b"id: 3\nretry: 100\n" + sse(RESULT)
    got, _, heard = await forward_with(chunked(200, [stream[:10], stream[10:37], stream[37:]]))
    assert got.complete
    assert got.body == b"event: message\ndata: " + json.dumps(progress(0), separators=(",", ":")).encode() + \
        b"\n\n" + stream
    assert got.events == [progress(0), note, RESULT]
    assert heard.forwarded == [200]


async def test_an_event_stream_is_relayed_chunk_by_chunk():
    first = sse({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "a"}})
    release = asyncio.Event()

    async def slow(reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"%x\r\n%s\r\n" % (len(first), first))
        await writer.drain()
        await release.wait()
        last = sse(RESULT)
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(last), last))
        await writer.drain()

    async with Upstream(slow) as up, holding() as server:
        ticket, _ = make_ticket(up.port, lambda: decided(FORWARD))
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request(server.issue(ticket)))
        await writer.drain()
        listener = Listener(reader)
        early = await asyncio.wait_for(listener.read(until=lambda r: len(r.events) >= 2), TIMEOUT)
        seen = len(early.events)
        release.set()
        rest = await asyncio.wait_for(listener.read(), TIMEOUT)
        writer.close()
    assert seen == 2 and rest.events[1]["method"] == "notifications/message"  # before the upstream finished
    assert rest.events[2:] == [RESULT] and rest.complete


@pytest.mark.parametrize(("answer", "status"), [
    (reply(500, b"Internal Server Error", "text/plain"), 500),
    (reply(200, b"<html>login</html>", "text/html"), 200),
    (reply(202, b"", None), 202),
    (reply(204, b"", None), 204),
    (reply(200, b"", "application/json"), 200),
    (reply(200, b"{not json", "application/json"), 200),
    (reply(200, b"null", "application/json"), 200),
    (reply(200, b"[1, 2]", "application/json"), 200),
    (reply(200, b"[]", "application/json"), 200),
    (reply(200, json.dumps(RESULT).encode(), "text/plain"), 200),  # JSON, but not declared as such
    (reply(200, json.dumps(RESULT).encode(), "application/json-seq"), 200),
    (reply(200, b'{"x": 1' + b"9" * 5000 + b"}", "application/json"), 200),  # int too long for Python
    (reply(401, sse(RESULT), "text/event-stream"), 401),  # an event stream, but not a success
    (chunked(503, [b"data: x\n\n"]), 503),
], ids=["500-text", "200-html", "202-empty", "204", "200-json-empty", "200-json-broken", "200-json-null",
        "200-json-numbers", "200-json-empty-batch", "200-json-as-text", "200-json-seq", "200-huge-int",
        "401-sse", "503-sse-chunked"])
async def test_anything_else_is_a_json_rpc_error_for_the_call(answer, status):
    got, _, heard = await forward_with(answer)
    assert got.complete and got.tail == b""
    assert got.events[0] == progress(0)
    assert len(got.events) == 2 and is_error_for_call(got.events[-1], f"upstream_http_{status}")
    assert str(status) in got.events[-1]["error"]["message"]
    assert heard.forwarded == [status]


async def test_an_answer_with_oversized_headers_is_an_error_event():
    # h11's client default bounds an incomplete head (16 KiB beyond what one 64 KiB read brings): memory
    # stays bounded, the call fails visibly.
    big = b"x-big: " + b"a" * 200_000 + b"\r\n"
    got, up, heard = await forward_with(reply(200, json.dumps(RESULT).encode(), extra=big))
    assert len(up.requests) == 1
    assert got.complete and is_error_for_call(got.events[-1], "upstream_failed")


async def test_an_unreachable_upstream_is_an_error_event():
    async with Upstream() as up:
        port = up.port  # closed again once this block ends
    async with holding() as server:
        ticket, heard = make_ticket(port, lambda: decided(FORWARD))
        got = await hold(server.port, request(server.issue(ticket)))
    assert got.complete and is_error_for_call(got.events[-1], "upstream_unreachable")
    assert heard.forwarded == []


async def test_an_upstream_that_closes_without_answering_is_an_error_event():
    got, up, heard = await forward_with(b"")
    assert len(up.requests) == 1
    assert got.complete and is_error_for_call(got.events[-1], "upstream_failed")
    assert heard.forwarded == []


async def test_an_upstream_that_answers_garbage_is_an_error_event():
    got, _, heard = await forward_with(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    assert got.complete and is_error_for_call(got.events[-1], "upstream_failed")


async def test_a_json_answer_cut_short_is_an_error_event():
    body = json.dumps(RESULT).encode()
    got, _, _ = await forward_with(reply(200, body)[:-5])
    assert got.complete and is_error_for_call(got.events[-1], "upstream_failed")
    assert RESULT not in got.events


async def test_a_json_answer_larger_than_max_body_is_refused():
    big = {"jsonrpc": "2.0", "id": REQ_ID, "result": {"text": "x" * 5000}}
    raw = json.dumps(big).encode()
    chunks = [raw[i:i + 1000] for i in range(0, len(raw), 1000)]
    got, _, heard = await forward_with(chunked(200, chunks, "application/json"), max_body=3000)
    assert got.complete and is_error_for_call(got.events[-1], "too_large")
    assert big not in got.events
    small, _, _ = await forward_with(reply(200, json.dumps(big).encode()), max_body=6000)
    assert small.events[-1] == big


async def test_an_event_stream_is_not_limited_by_max_body():
    # Events go on as they come: the gateway's SSE stage bounds each event, not the holding server.
    events = sse(*[{"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "x" * 500}}] * 20)
    got, _, _ = await forward_with(chunked(200, [events, sse(RESULT)]), max_body=1000)
    assert got.events[-1] == RESULT and len(got.events) == 22


# --- the client goes away -----------------------------------------------------------------------


async def test_the_client_going_away_while_pending_is_heard_and_nothing_is_forwarded():
    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        decision = Decision()
        ticket, heard = make_ticket(up.port, decision, every=0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request(server.issue(ticket)))
        await writer.drain()
        await asyncio.wait_for(read_reply(reader, until=lambda r: len(r.events) >= 2), TIMEOUT)
        writer.close()
        assert await eventually(lambda: bool(heard.gone))
        assert heard.gone == ["the client went away"]
        decision.forward()  # approved a moment too late
        await asyncio.sleep(0.3)
        assert up.connections == 0 and heard.forwarded == []


async def test_the_client_going_away_before_the_first_tick_is_heard():
    async with holding() as server:
        decision = Decision()
        ticket, heard = make_ticket(1, decision, every=30)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request(server.issue(ticket)))
        await writer.drain()
        await asyncio.wait_for(decision.started.wait(), TIMEOUT)
        writer.close()
        assert await eventually(lambda: bool(heard.gone), 2)
        decision.refuse()


async def test_a_half_closed_client_counts_as_gone():
    # mitmproxy sends nothing after the request: end of input means the client's side is over.
    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        decision = Decision()
        ticket, heard = make_ticket(up.port, decision, every=30)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request(server.issue(ticket)))
        writer.write_eof()
        await writer.drain()
        assert await eventually(lambda: bool(heard.gone))
        decision.forward()
        await asyncio.sleep(0.2)
        writer.close()
        assert up.connections == 0


# --- TLS to the upstream --------------------------------------------------------------------------


def self_signed(tmp_path, *, names: list[str], ips: list[str]) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mcp upstream test")])
    now = datetime.datetime.now(datetime.UTC)
    san = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    stem = "-".join(names + ips).replace(":", "_")
    cert_file, key_file = tmp_path / f"{stem}.pem", tmp_path / f"{stem}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def server_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.parametrize(("verify", "trust", "san", "ok"), [
    (True, False, "ip", False),   # self-signed, verified against the default store: refused
    (False, False, "ip", True),   # verification off (ssl_insecure): works
    (True, True, "ip", True),     # the certificate as the trusted CA file: works
    (True, True, "dns", False),   # trusted, but issued for another name than the one dialled: refused
    (False, True, "dns", True),
], ids=["verify-untrusted", "insecure", "verify-cafile", "verify-wrong-name", "insecure-wrong-name"])
async def test_tls_to_the_upstream(tmp_path, verify, trust, san, ok):
    cert, key = self_signed(tmp_path, names=["localhost"], ips=["127.0.0.1"] if san == "ip" else [])
    async with Upstream(reply(200, json.dumps(RESULT).encode()), server_context(cert, key)) as up, \
            holding() as server:
        ticket, heard = make_ticket(up.port, lambda: decided(FORWARD), scheme="https", verify=verify,
                                    cafile=cert if trust else None)
        got = await hold(server.port, request(server.issue(ticket)))
    assert got.complete
    if ok:
        assert got.events[-1] == RESULT and heard.forwarded == [200] and len(up.requests) == 1
    else:
        assert is_error_for_call(got.events[-1], "upstream_unreachable")
        assert up.requests == [] and heard.forwarded == []


async def test_plain_http_to_a_tls_upstream_is_an_error_event(tmp_path):
    cert, key = self_signed(tmp_path, names=["localhost"], ips=["127.0.0.1"])
    async with Upstream(reply(200, json.dumps(RESULT).encode()), server_context(cert, key)) as up, \
            holding() as server:
        ticket, _ = make_ticket(up.port, lambda: decided(FORWARD), scheme="http")
        got = await hold(server.port, request(server.issue(ticket)))
    assert got.complete and is_error_for_call(got.events[-1])
    assert up.requests == []


# --- findings (attacks and failure modes); strict xfails assert the behaviour wanted ------------


@pytest.mark.parametrize("interim", [b"HTTP/1.1 100 Continue\r\n\r\n",
                                     b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"])
async def test_finding_an_interim_1xx_answer_is_skipped(interim):
    got, up, heard = await forward_with(interim + reply(200, json.dumps(RESULT).encode()))
    assert len(up.requests) == 1
    assert got.events[-1] == RESULT
    assert heard.forwarded == [200]


@pytest.mark.parametrize("body", [
    b'{"jsonrpc":"2.0","id":7,"result":{"v":NaN}}',
    b'{"jsonrpc":"2.0","id":7,"result":{"v":"\\ud800"}}',
    b'{"jsonrpc":"2.0","id":7,"result":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
], ids=["nan", "lone-surrogate", "deep-nesting"])
async def test_finding_an_unserialisable_json_answer_is_an_error_event(body):
    got, _, _ = await forward_with(reply(200, body))
    assert got.complete, "the stream was cut off without an answer"
    assert is_error_for_call(got.events[-1])


async def test_finding_a_request_without_a_ticket_is_refused_before_its_body_is_read():
    async with holding() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n" + b"{" * 1000)
        await writer.drain()
        try:
            got = await asyncio.wait_for(read_reply(reader), 1.0)
        finally:
            writer.close()
    assert got.status == 404


@pytest.mark.xfail(strict=True, reason=(
    "h11 is stricter than mitmproxy's HTTP/1 reader (a query byte >= 0x80 or DEL, a bare CR in a header "
    "value, a head over 64 KiB): the holding server alone cannot read such a request, nor so its ticket. "
    "The Approvals addon never sends one here (it holds such a call quietly instead) and withdraws a ticket "
    "whose flow ends without reaching the server, and tickets expire (TICKET_LIFETIME)."))
@pytest.mark.parametrize("raw", [
    lambda key: request(key, target=b"/mcp?q=\xff"),
    lambda key: request(key, target=b"/mcp?q=\x7f"),
    lambda key: request(key, headers=[(b"Host", b"x"), (b"X-Note", b"a\rb"), (b"Content-Type", b"application/json")]),
    lambda key: request(key, headers=[(b"Host", b"x"), (b"Cookie", b"c=" + b"a" * 200_000)]),
], ids=["query-0xff", "query-del", "bare-cr-in-header", "200KiB-head"])
async def test_finding_a_request_h11_cannot_read_still_spends_its_ticket(raw):
    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        ticket, heard = make_ticket(up.port, lambda: decided(FORWARD))
        key = server.issue(ticket)
        got = await hold(server.port, raw(key))
        assert up.requests == [] or up.requests[0][1] == BODY
        assert got.status == 200 or heard.gone, "dropped without an answer, and the ticket never heard of it"
        assert server.withdraw(key) is None, "the ticket is still redeemable"


async def test_finding_the_upstream_connection_ends_when_the_client_goes_away_after_approval():
    async with Upstream() as up, holding() as server:
        async def quiet_stream(reader, writer):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            await writer.drain()
            await until_closed(reader, up.ended)

        up.answer = quiet_stream
        ticket, heard = make_ticket(up.port, lambda: decided(FORWARD))
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request(server.issue(ticket)))
        await writer.drain()
        assert await eventually(lambda: heard.forwarded == [200])
        writer.close()
        await asyncio.wait_for(up.ended.wait(), 2.0)


async def test_finding_an_event_stream_cut_mid_event_ends_with_a_readable_error():
    part = sse(RESULT)[:30]
    got, _, _ = await forward_with(chunked(200, [part], end=False))
    assert got.complete
    events = got.events  # raises if a block is not JSON
    assert is_error_for_call(events[-1], "upstream_failed")


async def test_finding_a_compressed_event_stream_is_not_relayed_as_bytes():
    stream = gzip.compress(sse(RESULT))
    got, _, _ = await forward_with(chunked(200, [stream], extra=b"content-encoding: gzip\r\n"))
    assert stream not in got.body
    assert is_error_for_call(got.events[-1])


async def test_finding_an_unframed_body_is_not_forwarded_as_another_body():
    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        ticket, heard = make_ticket(up.port, lambda: decided(FORWARD), every=30)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request(server.issue(ticket), framing="none"))
        await writer.drain()
        got = await asyncio.wait_for(read_reply(reader), TIMEOUT)
        writer.close()
        # Bytes beyond the request's framing: refused before anything is held or forwarded.
        assert up.requests == [] and got.status == 400 and heard.gone and heard.received == 0


async def test_a_request_other_than_the_one_checked_is_refused():
    expected = expectation("POST", "/mcp", BODY)
    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        for raw in (request("{}", body=BODY.replace(b"prod", b"dev!")), request("{}", target=b"/other"),
                    request("{}", method=b"PUT")):
            ticket, heard = make_ticket(up.port, lambda: decided(FORWARD), every=30, expect=expected)
            key = server.issue(ticket)
            got = await hold(server.port, raw.replace(b"{}", key.encode(), 1))
            assert got.status == 400 and heard.gone and heard.received == 0
        ticket, heard = make_ticket(up.port, lambda: decided(FORWARD), every=30, expect=expected)
        got = await hold(server.port, request(server.issue(ticket)))
        assert got.events[-1] == RESULT and [body for _, body in up.requests] == [BODY]


async def test_finding_a_client_already_gone_when_the_decision_comes_is_not_forwarded():
    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        ticket, heard = make_ticket(up.port, lambda: decided(FORWARD), every=30)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request(server.issue(ticket)))
        writer.write_eof()  # mitmproxy's side is over before the decision is read
        await writer.drain()
        await asyncio.wait_for(read_reply(reader), TIMEOUT)
        writer.close()
        assert up.requests == []
        assert heard.gone


@pytest.mark.parametrize("broken", ["notices", "outcome"])
async def test_finding_a_failing_ticket_callback_ends_with_an_error_event(broken):
    async def failing_outcome():
        await asyncio.sleep(0.1)
        raise RuntimeError("store failed")

    def failing_notices(n):
        if n:
            raise RuntimeError("notices failed")
        return [progress(0)]

    async with Upstream(reply(200, json.dumps(RESULT).encode())) as up, holding() as server:
        decision = Decision()
        ticket, heard = make_ticket(up.port, failing_outcome if broken == "outcome" else decision, every=0.05)
        if broken == "notices":
            ticket.notices = failing_notices
        got = await hold(server.port, request(server.issue(ticket)))
        assert up.requests == []
        assert got.complete and is_error_for_call(got.events[-1])


# --- accepts_event_stream (the approvals addon) ---------------------------------------------------


@pytest.mark.parametrize(("values", "expected"), [
    (["application/json, text/event-stream"], True),
    (["text/event-stream"], True),
    (["TEXT/Event-Stream"], True),
    (["  text/event-stream  ;  q=0.5 "], True),
    (["text/event-stream;charset=utf-8"], True),
    (["text/event-stream; Q=1"], True),
    (["text/event-stream;q=0.001"], True),
    (["text/event-stream;q=0"], False),
    (["text/event-stream;q=0.0"], False),
    (["text/event-stream; q = 0"], False),
    (["text/event-stream;q=0.000"], False),
    (["text/event-stream;q=-1"], False),
    (["text/event-stream;q=abc"], False),  # a q that is no number: not acceptable
    (["text/event-stream;q="], False),
    (["text/event-stream;q"], False),
    (['text/event-stream;q="1"'], False),
    (["text/event-stream;q=nan"], False),
    (["text/*"], True),
    (["text/*;q=0"], False),
    (["*/*"], True),
    (["*/*;q=0.1"], True),
    (["*/*;q=0"], False),
    (["application/json"], False),
    (["application/json;q=1, text/html"], False),
    (["text/html, */*;q=0"], False),
    ([], False),
    ([""], False),
    ([" , ,"], False),
    (["text/event-streams"], False),
    (["text/event-stream-x"], False),
    (["event-stream"], False),
    # The most specific range present decides, whatever its place:
    (["text/event-stream;q=0, */*"], False),
    (["*/*, text/event-stream;q=0"], False),
    (["text/event-stream;q=0, text/*"], False),
    (["text/*;q=0, text/event-stream"], True),
    (["text/*;q=0, */*"], False),
    (["text/*, */*;q=0"], True),
    (["text/event-stream;q=0", "*/*"], False),
    # Several header lines, several entries of the same range: the best q counts.
    (["application/json", "text/event-stream"], True),
    (["application/json", "text/event-stream;q=0", "text/event-stream;q=0.2"], True),
    (["text/event-stream;q=0.2, text/event-stream;q=0"], True),
    (["text/event-stream;q=0, text/event-stream;q=0"], False),
    (["text/event-stream;level=1;q=0.5"], True),
    (["text/event-stream;q=0.5;level=1"], True),
])
def test_accepts_event_stream(values, expected):
    assert accepts_event_stream(values) is expected
