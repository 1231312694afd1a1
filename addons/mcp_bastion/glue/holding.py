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
import hashlib
import json
import logging
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11

from mcp_bastion.core.jsonrpc import dumps
from mcp_bastion.core.media import media_type
from mcp_bastion.core.sse import format_event, json_without_loose_breaks

logger = logging.getLogger("mcp_bastion")

TICKET_HEADER = "x-bastion-hold"
FORWARD = "forward"  # what a ticket's `outcome` returns when the call may go on
CONNECT_TIMEOUT = 10.0
HEAD_TIMEOUT = 10.0  # to receive a request from mitmproxy, which sends it at once
TICKET_LIFETIME = 120.0  # seconds a ticket waits for its request before it is dropped
READ_LIMIT = 64 * 1024
# Hop-by-hop headers, and the ticket: not sent on to the upstream.
_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
        b"content-length", b"expect", TICKET_HEADER.encode()}


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
    capath: str | None = None
    max_body: int = 32 * 1024 * 1024  # a JSON answer larger than this is refused
    # (method, target, SHA-256 of the body) of the request the gateway checked: anything else is refused.
    expect: tuple[bytes, bytes, str] | None = None
    received: Callable[[], None] | None = None  # the request arrived here (mitmproxy is done sending it)
    gone: Callable[[str], None] | None = None  # the call ends without a decision being carried out, with why
    forwarded: Callable[[int], None] | None = None  # the request was sent upstream; its HTTP status
    issued: float = field(default_factory=time.monotonic)


def expectation(method: str, target: str, body: bytes) -> tuple[bytes, bytes, str]:
    return method.encode(), target.encode("latin-1", "replace"), hashlib.sha256(body).hexdigest()


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
        now = time.monotonic()
        for key, old in list(self._tickets.items()):  # never redeemed: the flow ended on the way here
            if now - old.issued > TICKET_LIFETIME:
                self._drop(key, "its request never reached the holding server")
        key = secrets.token_urlsafe(32)
        self._tickets[key] = ticket
        return key

    def withdraw(self, key: str, why: str = "withdrawn") -> Ticket | None:
        """Drop a ticket not yet redeemed (the flow ended before its request arrived); it, if it was live."""
        return self._drop(key, why)

    def _drop(self, key: str, why: str) -> Ticket | None:
        ticket = self._tickets.pop(key, None)
        if ticket is not None and ticket.gone is not None:
            with contextlib.suppress(Exception):
                ticket.gone(why)
        return ticket

    # --- serving ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._hold(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, h11.ProtocolError, TimeoutError) as e:
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
        request = await asyncio.wait_for(_next_event(conn, reader), HEAD_TIMEOUT)
        if not isinstance(request, h11.Request):
            raise h11.RemoteProtocolError("no request")
        key = next((v.decode("latin-1") for k, v in request.headers if k == TICKET_HEADER.encode()), "")
        ticket = self._tickets.pop(key, None) if key else None
        if ticket is None:  # before reading a body: nothing here for a request without a live ticket
            await _plain(writer, conn, 404)
            return
        try:
            body = await asyncio.wait_for(_read_body(conn, reader, ticket), HEAD_TIMEOUT)
        except (h11.ProtocolError, TimeoutError, ConnectionError, ValueError) as e:
            if ticket.gone is not None:
                ticket.gone(f"the held request could not be read ({e or type(e).__name__})")
            raise
        if conn.trailing_data[0] or (ticket.expect is not None and (
                request.method, request.target, hashlib.sha256(body).hexdigest()) != ticket.expect):
            # Not the request the gateway checked (or not all of it): nothing of it goes anywhere.
            logger.error("mcp-bastion: a held request arrived altered; refused (%s %s)", request.method,
                         request.target[:80])
            if ticket.gone is not None:
                ticket.gone("the held request arrived altered; it was refused")
            await _plain(writer, conn, 400)
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
            outcome = await self._wait(ticket, decision, closed, send)
            if outcome is None:
                return
            if closed.done():  # gone at the very moment the decision came: nothing is carried out
                if ticket.gone is not None:
                    ticket.gone("the client went away")
                return
            if outcome == FORWARD:
                relay = asyncio.ensure_future(self._forward(ticket, request, body, send))
                await asyncio.wait({relay, closed}, return_when=asyncio.FIRST_COMPLETED)
                if not relay.done():  # the client left: the upstream connection is closed too
                    relay.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await relay
                    return
                relay.result()
            else:
                await send(_event(ticket, outcome))
        finally:
            if not decision.done():
                decision.cancel()
            closed.cancel()
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    @staticmethod
    async def _wait(ticket: Ticket, decision: asyncio.Future, closed: asyncio.Future,
                    send: Callable[[bytes], Awaitable[None]]) -> Any:
        """Notices until the decision; None if the client left first (or the ticket's code failed)."""
        tick = 0
        while True:
            try:
                notices = ticket.notices(tick)
            except Exception as e:  # fails closed: the call ends with an error, nothing is forwarded
                logger.error("mcp-bastion: held call's notices failed: %r", e, exc_info=e)
                if ticket.gone is not None:
                    ticket.gone("the gateway could not keep the held call")
                return _error(ticket, "mcp-bastion could not keep the held call; it was not forwarded",
                              "holding_failed")
            for message in notices:
                await send(_event(ticket, message))
            tick += 1
            await asyncio.wait({decision, closed}, timeout=ticket.every, return_when=asyncio.FIRST_COMPLETED)
            if decision.done():
                try:
                    return decision.result()
                except Exception as e:  # fails closed: an error for the call, nothing forwarded
                    logger.error("mcp-bastion: held call's decision failed: %r", e, exc_info=e)
                    return _error(ticket, "mcp-bastion could not carry out the approval decision; the call was "
                                          "not forwarded", "approval_failed")
            if closed.done():
                if ticket.gone is not None:
                    ticket.gone("the client went away")
                await asyncio.wait({decision}, timeout=5)
                return None

    async def _forward(self, ticket: Ticket, request: h11.Request, body: bytes,
                       send: Callable[[bytes], Awaitable[None]]) -> None:
        """The request, once, to the real upstream; its answer into the stream."""
        context = None
        if ticket.scheme == "https":
            context = ssl.create_default_context(cafile=ticket.cafile or _default_cafile(), capath=ticket.capath)
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
        tail = b""
        try:
            client = h11.Connection(h11.CLIENT)
            named = {v.strip().lower() for k, v in request.headers if k == b"connection" for v in v.split(b",")}
            headers = [(k, v) for k, v in request.headers if k not in _HOP and k not in named]
            headers += [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]
            writer.write(client.send(h11.Request(method=request.method, target=request.target, headers=headers)))
            writer.write(client.send(h11.Data(data=body)))
            writer.write(client.send(h11.EndOfMessage()))
            await writer.drain()
            response = await _next_event(client, reader)
            while isinstance(response, h11.InformationalResponse):  # 100 Continue, 103 Early Hints
                response = await _next_event(client, reader)
            if not isinstance(response, h11.Response):
                raise h11.RemoteProtocolError("no response")
            if ticket.forwarded is not None:
                ticket.forwarded(response.status_code)
            kind = media_type(_header(response, b"content-type"))
            encoding = _header(response, b"content-encoding").strip().lower()
            if encoding not in ("", "identity"):
                await send(_error_event(ticket, f"the upstream answered the approved call compressed ({encoding[:20]}"
                                                "), which the gateway does not read", "upstream_encoding"))
                return
            if 200 <= response.status_code < 300 and kind == "text/event-stream":
                while True:  # whole events only: one cut short is dropped, not merged with an error
                    event = await _next_event(client, reader)
                    if isinstance(event, h11.Data):
                        tail += bytes(event.data)
                        end = _last_boundary(tail)
                        if end:
                            await send(tail[:end])
                            tail = tail[end:]
                        if len(tail) > ticket.max_body:
                            tail = b""
                            await send(_error_event(ticket, "an event of the upstream's answer to the approved "
                                                            "call is too large", "too_large"))
                            return
                    elif isinstance(event, h11.EndOfMessage):
                        await send(tail)
                        return
                    elif isinstance(event, h11.ConnectionClosed):
                        raise h11.RemoteProtocolError("the upstream closed its event stream early")
            answer = bytearray()
            while True:
                event = await _next_event(client, reader)
                if isinstance(event, h11.Data):
                    answer += event.data
                    if len(answer) > ticket.max_body:
                        await send(_error_event(ticket, "the upstream's answer to the approved call is too large",
                                                "too_large"))
                        return
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise h11.RemoteProtocolError("the upstream closed before its answer ended")
            await send(_answer_events(ticket, response.status_code, kind, bytes(answer)))
        except (OSError, h11.ProtocolError, TimeoutError) as e:
            logger.warning("mcp-bastion: approved call to %s:%s failed: %r", ticket.host, ticket.port, e)
            await send(_error_event(ticket, "the upstream failed while answering the approved call",
                                    "upstream_failed"))
        finally:
            with contextlib.suppress(Exception):
                writer.close()


_BLANK_LINE = re.compile(rb"(\r\n|\r(?!\n)|\n)(\r\n|\r(?!\n)|\n)")


def _last_boundary(data: bytes) -> int:
    """Where the last complete SSE event of `data` ends (0: none yet). A final CR may begin a CRLF."""
    searched = data[:-1] if data.endswith(b"\r") else data
    end = 0
    for m in _BLANK_LINE.finditer(searched):
        end = m.end()
    return end


async def _read_body(conn: h11.Connection, reader: asyncio.StreamReader, ticket: Ticket) -> bytes:
    body = bytearray()
    limit = ticket.max_body
    while True:
        event = await _next_event(conn, reader)
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > limit:
                raise ValueError("the held request is larger than any the gateway forwards")
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:
            raise h11.RemoteProtocolError("the request ended early")


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(READ_LIMIT))
            continue
        return event


async def _plain(writer: asyncio.StreamWriter, conn: h11.Connection, status: int) -> None:
    writer.write(conn.send(h11.Response(status_code=status, headers=[(b"content-length", b"0"),
                                                                     (b"connection", b"close")])))
    writer.write(conn.send(h11.EndOfMessage()))
    await writer.drain()


def _header(response: h11.Response, name: bytes) -> str:
    return next((v.decode("latin-1") for k, v in response.headers if k == name), "")


def _default_cafile() -> str | None:
    """mitmproxy verifies upstreams against certifi's bundle unless told otherwise; so does this."""
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()


def _event(ticket: Ticket, message: Any) -> bytes:
    try:
        return format_event(json_without_loose_breaks(dumps(message).decode()), event="message")
    except (ValueError, TypeError, RecursionError):
        return _error_event(ticket, "mcp-bastion could not write a message for the held call", "unwritable")


def _error(ticket: Ticket, message: str, reason: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": ticket.request_id,
            "error": {"code": -32603, "message": message, "data": {"reason": reason}}}


def _error_event(ticket: Ticket, message: str, reason: str) -> bytes:
    return format_event(json_without_loose_breaks(dumps(_error(ticket, message, reason)).decode()), event="message")


def _answer_events(ticket: Ticket, status: int, kind: str, answer: bytes) -> bytes:
    """A buffered upstream answer as stream events: its JSON message(s), or an error for the call."""
    value: Any = None
    if kind == "application/json" and answer:
        with contextlib.suppress(ValueError, RecursionError):
            value = json.loads(answer)
    messages = value if isinstance(value, list) else [value] if isinstance(value, dict) else []
    if messages and all(isinstance(m, dict) for m in messages):
        try:
            return b"".join(format_event(json_without_loose_breaks(dumps(m).decode()), event="message")
                            for m in messages)
        except (ValueError, TypeError, RecursionError):
            pass  # NaN, lone surrogates, nesting: not a message a client could read
    return _error_event(ticket, f"the upstream answered the approved call with HTTP {status} and no MCP message",
                        f"upstream_http_{status}")
