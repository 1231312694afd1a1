"""
The holding line: a call that waits for approval, answered as an event stream meanwhile.

mitmproxy sends a client nothing until the `request` hook returns, and what it
streams to a client must come from a server connection. A call that waits for
a person (`mode: wait`) from a client that asked for progress (a
`progressToken`, and an `Accept` that allows `text/event-stream`) is therefore
sent, fully checked, to this in-process server on 127.0.0.1 instead of the
upstream. It answers at once with an event stream, and while the decision is
pending writes the ticket's notices into it (progress notifications and a log
message). Then:

- approved: it sends the request it received - byte for byte what mitmproxy
  would have sent, upstream credential included - to the real upstream, once,
  and relays the answer into the stream (an event stream as it comes; a JSON
  answer as one event; anything else as a JSON-RPC error);
- denied, expired or cancelled: the ticket's JSON-RPC error, and the stream ends;
- mitmproxy closes the connection (the client went away): the ticket hears
  of it and nothing is forwarded.

Everything the client receives still passes the flow's response stages, as
any upstream answer does. A request reaches this server only with a ticket
(`x-bastion-hold`, 32 random bytes, single use) the gateway set on it.

No mitmproxy import: asyncio and h11 (a mitmproxy dependency).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11

from mcp_bastion.core.jsonrpc import dumps
from mcp_bastion.core.media import media_type
from mcp_bastion.core.sse import format_event

logger = logging.getLogger("mcp_bastion")

TICKET_HEADER = "x-bastion-hold"
FORWARD = "forward"  # what a ticket's `outcome` returns when the call may go on
CONNECT_TIMEOUT = 10.0
READ_LIMIT = 64 * 1024
# Hop-by-hop headers, and the ticket: not sent on to the upstream.
_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
        b"content-length", TICKET_HEADER.encode()}


@dataclass
class Ticket:
    """One held call: where it goes if approved, and how to tell the client what happens meanwhile."""

    scheme: str
    host: str
    port: int
    request_id: Any
    # The decision: FORWARD, or the JSON-RPC message (an error for `request_id`) the client gets instead.
    outcome: Callable[[], Awaitable[Any]]
    # The messages to send at the n-th tick while the decision is pending (n = 0 at once).
    notices: Callable[[int], list[dict[str, Any]]]
    every: float = 5.0  # seconds between ticks
    verify: bool = True  # verify the upstream's TLS certificate
    cafile: str | None = None
    max_body: int = 32 * 1024 * 1024  # a JSON answer larger than this is refused
    received: Callable[[], None] | None = None  # the request arrived here (mitmproxy is done sending it)
    gone: Callable[[str], None] | None = None  # the client went away before the decision, with why
    forwarded: Callable[[int], None] | None = None  # the request was sent upstream; its HTTP status
    log: list[str] = field(default_factory=list)


class HoldingServer:
    """The in-process server held calls are sent to; `start()` on the event loop, `close()` at the end."""

    def __init__(self) -> None:
        self._tickets: dict[str, Ticket] = {}
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self.port: int | None = None

    @property
    def ready(self) -> bool:
        return self._server is not None and self.port is not None

    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=READ_LIMIT)
            self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            self.port = None
        for t in list(self._tasks):
            t.cancel()
        self._tickets.clear()

    def issue(self, ticket: Ticket) -> str:
        """Register `ticket`; the returned value goes in the request's `x-bastion-hold` header."""
        key = secrets.token_urlsafe(32)
        self._tickets[key] = ticket
        return key

    def withdraw(self, key: str) -> Ticket | None:
        return self._tickets.pop(key, None)

    # --- serving ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._hold(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, h11.ProtocolError) as e:
            logger.debug("mcp-bastion: held call's connection ended: %r", e)
        except asyncio.CancelledError:
            pass
        except Exception as e:
            logger.error("mcp-bastion: holding server failed: %r", e, exc_info=e)
        finally:
            if task is not None:
                self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=READ_LIMIT)
        request, body = await _read_request(conn, reader)
        key = next((v.decode("latin-1") for k, v in request.headers if k == TICKET_HEADER.encode()), "")
        ticket = self._tickets.pop(key, None) if key else None
        if ticket is None:
            writer.write(conn.send(h11.Response(status_code=404, headers=[(b"content-length", b"0"),
                                                                          (b"connection", b"close")])))
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            return
        if ticket.received is not None:
            ticket.received()
        writer.write(conn.send(h11.Response(status_code=200, headers=[
            (b"content-type", b"text/event-stream"), (b"cache-control", b"no-store"),
            (b"transfer-encoding", b"chunked"), (b"connection", b"close")])))

        async def send(chunk: bytes) -> None:
            if chunk:
                writer.write(conn.send(h11.Data(data=chunk)))
                await writer.drain()

        decision = asyncio.ensure_future(ticket.outcome())
        closed = asyncio.ensure_future(reader.read(1))  # mitmproxy sends nothing more: b"" is the end
        try:
            tick = 0
            while True:
                for message in ticket.notices(tick):
                    await send(format_event(dumps(message).decode(), event="message"))
                tick += 1
                await asyncio.wait({decision, closed}, timeout=ticket.every, return_when=asyncio.FIRST_COMPLETED)
                if decision.done():
                    break
                if closed.done():
                    if ticket.gone is not None:
                        ticket.gone("the client went away")
                    await asyncio.wait({decision}, timeout=5)
                    return
            outcome = decision.result()
        finally:
            if not decision.done():
                decision.cancel()
        try:
            if outcome == FORWARD:
                await self._forward(ticket, request, body, send)
            else:
                await send(format_event(dumps(outcome).decode(), event="message"))
        finally:
            closed.cancel()
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _forward(self, ticket: Ticket, request: h11.Request, body: bytes,
                       send: Callable[[bytes], Awaitable[None]]) -> None:
        """The request, once, to the real upstream; its answer into the stream."""
        context = None
        if ticket.scheme == "https":
            context = ssl.create_default_context(cafile=ticket.cafile)
            if not ticket.verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(ticket.host, ticket.port, ssl=context, limit=READ_LIMIT,
                                        server_hostname=ticket.host if context else None), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            logger.warning("mcp-bastion: approved call could not reach the upstream %s:%s: %s",
                           ticket.host, ticket.port, str(e) or type(e).__name__)
            await send(_error_event(ticket, "mcp-bastion could not reach the upstream MCP server; the approved "
                                            "call was not forwarded", "upstream_unreachable"))
            return
        try:
            client = h11.Connection(h11.CLIENT)
            headers = [(k, v) for k, v in request.headers if k not in _HOP]
            headers += [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]
            writer.write(client.send(h11.Request(method=request.method, target=request.target, headers=headers)))
            writer.write(client.send(h11.Data(data=body)))
            writer.write(client.send(h11.EndOfMessage()))
            await writer.drain()
            response = await _next_event(client, reader)
            if not isinstance(response, h11.Response):
                raise h11.RemoteProtocolError("no response")
            if ticket.forwarded is not None:
                ticket.forwarded(response.status_code)
            kind = media_type(next((v.decode("latin-1") for k, v in response.headers if k == b"content-type"), ""))
            if 200 <= response.status_code < 300 and kind == "text/event-stream":
                while True:
                    event = await _next_event(client, reader)
                    if isinstance(event, h11.Data):
                        await send(bytes(event.data))
                    elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                        return
            answer = bytearray()
            while True:
                event = await _next_event(client, reader)
                if isinstance(event, h11.Data):
                    answer += event.data
                    if len(answer) > ticket.max_body:
                        await send(_error_event(ticket, "the upstream's answer to the approved call is too large",
                                                "too_large"))
                        return
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            await send(_answer_events(ticket, response.status_code, kind, bytes(answer)))
        except (OSError, h11.ProtocolError, TimeoutError) as e:
            logger.warning("mcp-bastion: approved call to %s:%s failed: %r", ticket.host, ticket.port, e)
            await send(_error_event(ticket, "the upstream failed while answering the approved call", "upstream_failed"))
        finally:
            with contextlib.suppress(Exception):
                writer.close()


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> tuple[h11.Request, bytes]:
    request = await _next_event(conn, reader)
    if not isinstance(request, h11.Request):
        raise h11.RemoteProtocolError("no request")
    body = bytearray()
    while True:
        event = await _next_event(conn, reader)
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        else:
            raise h11.RemoteProtocolError("the request ended early")


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(READ_LIMIT))
            continue
        return event


def _error_event(ticket: Ticket, message: str, reason: str) -> bytes:
    error = {"jsonrpc": "2.0", "id": ticket.request_id,
             "error": {"code": -32603, "message": message, "data": {"reason": reason}}}
    return format_event(dumps(error).decode(), event="message")


def _answer_events(ticket: Ticket, status: int, kind: str, answer: bytes) -> bytes:
    """A buffered upstream answer as stream events: its JSON message(s), or an error for the call."""
    value: Any = None
    if kind == "application/json" and answer:
        with contextlib.suppress(ValueError):
            value = json.loads(answer)
    messages = value if isinstance(value, list) else [value] if isinstance(value, dict) else []
    if messages and all(isinstance(m, dict) for m in messages):
        return b"".join(format_event(dumps(m).decode(), event="message") for m in messages)
    return _error_event(ticket, f"the upstream answered the approved call with HTTP {status} and no MCP message",
                        f"upstream_http_{status}")
