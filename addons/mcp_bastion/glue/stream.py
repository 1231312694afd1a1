"""
Event streams, event by event: the `response.stream` callable for one SSE response.

`SSEStream` parses chunks into events, turns each event's JSON-RPC content into
`Message` values (server to client, linked to the request they answer), hands
them to the message stages (`stages`, attached by the Pipeline addon in
`responseheaders`), and emits the event as soon as it is complete: unchanged
events byte for byte, changed ones serialised once. The bytes sent go to each
`outputs` sink (the Recorder's spool) and, bounded, to `shown` for mitmweb.

It fails closed: if anything fails, or no stages were attached, pending
requests get a JSON-RPC error event and nothing more of the upstream's stream
reaches the client.

The old HTTP+SSE transport announces where to POST messages in an `endpoint`
event. That URL must be on the stream's own origin (otherwise the client would
send its messages around the gateway, so the stream fails closed); with
`relative_endpoint` (reverse mode) an absolute URL is rewritten to its path,
which the client resolves against the gateway.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urljoin, urlsplit

from mitmproxy import http

from mcp_bastion.core import errors
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.jsonrpc import DEFAULT_MAX_DEPTH, ParseError, dumps, parse_body, placed
from mcp_bastion.core.message import Carrier, Message
from mcp_bastion.core.pipeline import StageError
from mcp_bastion.core.sse import SSEError, SSEEvent, SSEParser, has_loose_breaks, json_without_loose_breaks
from mcp_bastion.core.vocab import Action, Direction, Kind, Meta, StageName
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue import replies

logger = logging.getLogger("mcp_bastion")

SHOW_LIMIT = 1024 * 1024  # bytes of a streamed response kept on the flow for people to read in mitmweb
MAX_SUMMARIES = 200  # per flow, in metadata (a long stream keeps a count beyond this)

# What the stages make of one event's messages: the JSON values the client gets, in order.
EventStages = Callable[[http.HTTPFlow, list[Message], bool], list[Any]]


class SSEStream:
    """The `response.stream` callable for one event-stream response."""

    def __init__(
        self,
        flow: http.HTTPFlow,
        max_event: int,
        max_depth: int = DEFAULT_MAX_DEPTH,
        broken: str | None = None,
        relative_endpoint: bool = False,
    ) -> None:
        self.flow = flow
        self.max_depth = max_depth
        self.sent = 0
        self.shown = bytearray()  # the first SHOW_LIMIT bytes sent, for the flow's body in mitmweb
        self.stages: EventStages | None = None  # attached by the Pipeline addon
        self.sensitive: Callable[[str], bool] | None = None  # on a masked stream: text a profile would mask
        self.outputs: list[Callable[[http.HTTPFlow, bytes], None]] = []  # attached by the Recorder
        self.on_endpoint: list[Callable[[http.HTTPFlow, str | None], object]] = []  # an HTTP+SSE endpoint event
        self.parser = SSEParser(max_event)
        self.relative_endpoint = relative_endpoint
        self.dead = False
        body = fs.request_body(flow)
        self.pending: list[Any] = list(body.request_ids) if body else []
        self.asked = fs.asked(flow)
        self.state = fs.mcp_state(flow)
        self.state.setdefault("sse_events", 0)
        self.state.setdefault("events", [])
        self._broken = broken

    def __call__(self, chunk: bytes) -> list[bytes]:
        # A list, never b"": mitmproxy sends a returned b"" as an empty chunk,
        # which in HTTP/1.1 chunked encoding ends the body for the client.
        out = self._process(chunk)
        return [out] if out else []

    def _process(self, chunk: bytes) -> bytes:
        if self.dead:
            return b""
        try:
            if self._broken:
                raise SSEError(self._broken)
            if self.stages is None:
                raise SSEError("no message stages are attached to this stream")
            if not chunk:  # end of stream: an unterminated block is discarded, as clients do
                rest = self.parser.close()
                if rest.strip():
                    self.state["discarded_tail_bytes"] = len(rest)
                return b""
            out = bytearray()
            for event in self.parser.feed(chunk):
                out += self._handle(event)
            return bytes(out)
        except Exception as exc:  # fail closed
            logger.error("mcp-bastion: SSE stream failed on %s: %r", self.flow.request.pretty_url, exc, exc_info=exc)
            if isinstance(exc, SSEError):
                why = str(exc)
            elif isinstance(exc, StageError):
                why = f"{exc.stage} failed: {exc}"
            else:
                why = f"{type(exc).__name__}: {exc}"
            return self._fail(why)

    def _handle(self, event: SSEEvent) -> bytes:
        assert self.stages is not None
        messages: list[Message] = []
        batch = False
        if event.has_data and event.event == "message" and event.data:
            try:
                body = parse_body(event.data, max_bytes=self.parser.max_event_bytes, max_depth=self.max_depth)
            except ParseError as e:
                raise SSEError(f"unreadable JSON-RPC in SSE event: {e.reason}") from None
            if any(m.kind == Kind.INVALID for m in body.messages):
                raise SSEError("SSE event is not a valid JSON-RPC message")
            batch = body.batch
            # Positions count every message of the stream (a summary is kept only for the first ones):
            # a decision always names its own message, never a neighbour's.
            messages = placed(body, Direction.S2C, Carrier.EVENT, self.asked, summaries="events",
                              base=self.state.setdefault("event_messages", 0))
            self.state["event_messages"] += len(messages)
        self.state["sse_events"] += 1
        if messages and len(self.state["events"]) < MAX_SUMMARIES:
            self.state["events"].extend(m.summary() for m in messages)
        sent: list[Any] = []
        # Forwarded byte for byte only when every line splitter reads it as the gateway did, and
        # (on a masked stream) when no field that is not a message holds what would be masked.
        scrubbed = self._scrubbed(event)
        loose = has_loose_breaks(event.raw) or scrubbed
        if event.has_data and event.event not in ("message", "endpoint"):
            # An event type MCP does not use: no stage can read it, and a client may read it otherwise.
            raise SSEError(f"upstream sent an event of type {event.event[:40]!r}, which MCP does not use")
        if event.has_data and event.event == "endpoint" and self._check_endpoint(event):
            out = event.encode()  # the announced endpoint was rewritten
        elif not messages:
            out = event.encode() if loose else event.raw
        else:
            values = sent = self.stages(self.flow, messages, batch)
            if (not loose and len(values) == len(messages)
                    and all(v is m.raw for v, m in zip(values, messages, strict=True))):
                out = event.raw  # unchanged: byte for byte
            elif values:
                event.data = json_without_loose_breaks(dumps(values if batch else values[0]).decode("utf-8"))
                event.has_data = True
                out = event.encode()
            else:
                out = b""  # every message of the event was dropped or refused
        if out:
            self._sent(out)
        # Answered only once an answer is on its way (what was sent, not what the upstream sent):
        # until then, a failure still answers it.
        if out and messages:
            for v in sent:
                if isinstance(v, dict) and ("result" in v or "error" in v) and v.get("id") in self.pending:
                    self.pending.remove(v["id"])
                    if not self.pending:
                        self.state["answered"] = True  # every request of this POST got its answer
        return out

    def _scrubbed(self, event: SSEEvent) -> bool:
        """Drop comments, `id:` and `retry:` values a masking profile would mask; True if any was."""
        if self.sensitive is None or not (event.comments or event.id or event.retry is not None):
            return False
        kept = [c for c in event.comments if not self.sensitive(c)]
        changed = len(kept) != len(event.comments)
        event.comments = kept
        if event.id and self.sensitive(event.id):
            event.id, changed = None, True
        if event.retry is not None and self.sensitive(str(event.retry)):
            event.retry, changed = None, True
        if changed:
            self.state["scrubbed_fields"] = self.state.get("scrubbed_fields", 0) + 1
        return changed

    def _check_endpoint(self, event: SSEEvent) -> bool:
        """Check (and in reverse mode rewrite) an announced message endpoint; True if rewritten."""
        announced = event.data.strip()
        # Only printable ASCII without `\`: URL parsers differ on the rest (a WHATWG parser reads `/\host`
        # as `//host`; a line separator dropped later turns `/<LS>/host` into `//host`).
        if not _ENDPOINT_CHARS.fullmatch(announced):
            raise SSEError(f"upstream announced a message endpoint that is not a plain URL: {announced[:80]!r}")
        try:
            target = urlsplit(urljoin(self.flow.request.url, announced))
            same = _origin(target) == _origin(urlsplit(self.flow.request.url))
        except ValueError:  # an invalid port, say
            same = False
        if not same:
            raise SSEError(f"upstream announced a message endpoint on another origin: {announced!r}")
        self.state["endpoint"] = target.path + (f"?{target.query}" if target.query else "")
        sid = parse_qs(target.query).get("session_id")
        if sid and Meta.LEGACY_SESSION not in self.flow.metadata:
            self.flow.metadata[Meta.LEGACY_SESSION] = sid[0]
        for listener in self.on_endpoint:  # the Gateway makes the path reachable, Sessions binds the id
            listener(self.flow, sid[0] if sid else None)
        if self.relative_endpoint and urlsplit(announced).netloc:
            event.data = self.state["endpoint"]
            return True
        return False

    def _fail(self, why: str) -> bytes:
        self.dead = True
        self.flow.metadata[Meta.ERROR] = f"sse: {why}"
        fs.add_decision(self.flow, stage=StageName.RESP_SSE, direction=Direction.S2C, action=Action.ERROR, reason=why)
        err = Refusal(502, errors.GATEWAY_ERROR, "mcp-bastion stopped this event stream: it could not be checked",
                      {"reason": "stream"})
        out = replies.sse_errors(err, self.pending)
        self.pending = []
        try:
            self._sent(out)
        except Exception:  # pragma: no cover - recording must not resurrect the stream
            logger.exception("mcp-bastion: stream output handler failed")
        return out

    def _sent(self, out: bytes) -> None:
        """Bytes on their way to the client: to the output sinks, and (bounded) kept for display."""
        self.sent += len(out)
        if len(self.shown) < SHOW_LIMIT:
            self.shown += out[: SHOW_LIMIT - len(self.shown)]
        for sink in self.outputs:
            sink(self.flow, out)


_ENDPOINT_CHARS = re.compile(r"[!#-\[\]-~]+")  # printable ASCII but space, `"` and `\`


def _origin(parts) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a split URL, with the scheme's default port made explicit."""
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


class Replacement:
    """A `response.stream` that sends `body` instead of whatever the upstream streams."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __call__(self, chunk: bytes) -> list[bytes]:
        return [] if chunk else [self.body]
