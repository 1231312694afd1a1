"""
The data path: decide which flows are MCP, refuse what cannot be read, parse
every JSON-RPC message, and stream SSE responses event by event.

Other addons of the bundle never parse bodies themselves: they read
`flowstate.request_body(flow)` for requests, `flow.metadata[flowstate.MCP]` for
summaries, and receive each SSE event through their `mcp_stream_event(ev)`
method (a `flowstate.StreamEvent`), and the bytes actually sent to the client
through `mcp_stream_output(flow, data)`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Callable
from urllib.parse import urljoin, urlsplit

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import traverse
from mitmproxy.net.http import url
from mitmproxy.utils import human

from mcp_bastion.glue import flowstate as fs
from mcp_bastion.core import errors
from mcp_bastion.core.encoding import decode_content
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.jsonrpc import DEFAULT_MAX_DEPTH, Body, ParseError, parse_body
from mcp_bastion.core.origin import (
    DEFAULT_HOSTS,
    DEFAULT_ORIGINS,
    host_allowed,
    origin_allowed,
    validate_patterns,
)
from mcp_bastion.core.sse import SSEError, SSEParser, format_event

logger = logging.getLogger("mcp_bastion")

SHOW_LIMIT = 1024 * 1024  # bytes of a streamed response kept on the flow for people to read in mitmweb
MAX_SUMMARIES = 200  # per flow, in metadata (a long stream keeps a count beyond this)
CLIENT_HOST = fs.CLIENT_HOST
PROBE_TIMEOUT = 10.0  # seconds UpstreamCheck waits for a TCP connection to the upstream

_PARSE_STATUS = {
    "too_large": (413, errors.REFUSED_INPUT),
    "bad_encoding": (415, errors.REFUSED_INPUT),
    "invalid_json": (400, errors.PARSE_ERROR),
    "invalid_utf8": (400, errors.PARSE_ERROR),
    "duplicate_key": (400, errors.REFUSED_INPUT),
    "too_deep": (400, errors.REFUSED_INPUT),
    "batch_refused": (400, errors.INVALID_REQUEST),
    "invalid_request": (400, errors.INVALID_REQUEST),
}


def parse_refusal(err: ParseError) -> Refusal:
    status, code = _PARSE_STATUS.get(err.reason, (400, errors.REFUSED_INPUT))
    return Refusal(status, code, f"request refused: {err.detail}", {"reason": err.reason})


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _hostport(host: str, port: int) -> str:
    """host:port with IPv6 literals in brackets, as in a Host header."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _mode_name(flow: http.HTTPFlow) -> str:
    return type(getattr(flow.client_conn, "proxy_mode", None)).__name__


def _reverse_mode(flow: http.HTTPFlow) -> bool:
    return _mode_name(flow) == "ReverseMode"


def _upstream_error(why: str) -> Refusal:
    return Refusal(502, errors.UPSTREAM_ERROR, f"mcp-bastion withheld the upstream's answer: {why}", {"reason": "upstream"})


class Gateway:
    """Accepts MCP traffic for enforcement and keeps it readable end to end."""

    request_stage = "parse"
    response_stage = "resp:parse"

    def __init__(self) -> None:
        self.max_body = 4 * 1024 * 1024
        self.max_event = 16 * 1024 * 1024
        self.max_depth = DEFAULT_MAX_DEPTH
        self.allowed_hosts: tuple[str, ...] = DEFAULT_HOSTS
        self.allowed_origins: tuple[str, ...] = DEFAULT_ORIGINS
        self.mcp_hosts: tuple[str, ...] = ()

    def load(self, loader) -> None:
        loader.add_option(
            "mcp_hosts",
            Sequence[str],
            [],
            """
            Hosts (host or host:port) whose traffic is MCP and is enforced. Empty: every
            flow through the gateway is MCP (the right setting for reverse mode). In
            regular (forward) mode, flows to other hosts are refused unless
            mcp_passthrough_other is set.
            """,
        )
        loader.add_option(
            "mcp_passthrough_other",
            bool,
            False,
            "In regular mode, forward flows to hosts not listed in mcp_hosts without enforcement.",
        )
        loader.add_option(
            "allowed_hosts",
            Sequence[str],
            list(DEFAULT_HOSTS),
            """
            DNS-rebinding protection in reverse mode: Host header values the gateway answers
            to (host, host:port, host:*). The upstream cannot check Host itself behind a
            reverse proxy, so the gateway does.
            """,
        )
        loader.add_option(
            "allowed_origins",
            Sequence[str],
            list(DEFAULT_ORIGINS),
            """
            Origin header values accepted (scheme://host[:port], port may be *). Requests
            without Origin (non-browser clients) are accepted; any other origin gets 403.
            """,
        )
        loader.add_option(
            "max_body_size", str, "4m", "Largest MCP request or JSON response body accepted (e.g. 4m)."
        )
        loader.add_option(
            "max_json_depth", int, 64, "Deepest JSON nesting accepted in an MCP message."
        )
        loader.add_option(
            "sse_max_event_size", str, "16m", "Largest single SSE event accepted from the upstream."
        )

    def configure(self, updated: set[str]) -> None:
        # List options are read once here: each ctx.options read of a list copies it.
        if "allowed_hosts" in updated or "allowed_origins" in updated:
            try:
                validate_patterns(ctx.options.allowed_hosts, origins=False)
                validate_patterns(ctx.options.allowed_origins, origins=True)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from e
            self.allowed_hosts = tuple(ctx.options.allowed_hosts)
            self.allowed_origins = tuple(ctx.options.allowed_origins)
        if "mcp_hosts" in updated:
            try:
                validate_patterns(ctx.options.mcp_hosts, origins=False)
            except ValueError as e:
                raise exceptions.OptionsError(f"mcp_hosts: {e}") from e
            self.mcp_hosts = tuple(ctx.options.mcp_hosts)
        for name in ("max_body_size", "sse_max_event_size"):
            if name in updated:
                try:
                    size = human.parse_size(getattr(ctx.options, name))
                except ValueError as e:
                    raise exceptions.OptionsError(f"{name}: {e}") from e
                if not size or size <= 0:
                    raise exceptions.OptionsError(f"{name} must be a positive size")
                if name == "max_body_size":
                    self.max_body = size
                else:
                    self.max_event = size
        if "stream_large_bodies" in updated and ctx.options.stream_large_bodies:
            # mitmproxy would forward a large body before any hook has read it.
            raise exceptions.OptionsError(
                "stream_large_bodies cannot be used with mcp-bastion: every MCP body is read before it is "
                "forwarded (event streams are streamed event by event anyway); use max_body_size"
            )
        if "keep_host_header" in updated and not ctx.options.keep_host_header:
            self._keep_host()
        if "max_json_depth" in updated:
            if ctx.options.max_json_depth < 2:
                raise exceptions.OptionsError("max_json_depth must be at least 2")
            self.max_depth = ctx.options.max_json_depth

    # --- which flows are ours ------------------------------------------------

    def _in_scope(self, flow: http.HTTPFlow) -> bool:
        hosts = self.mcp_hosts
        if not hosts:
            return True
        req = flow.request
        return host_allowed(_hostport(req.host, req.port), hosts) or host_allowed(
            f"[{req.host}]" if ":" in req.host else req.host, hosts
        )

    # --- request side --------------------------------------------------------

    def running(self) -> None:
        self._keep_host()

    def _keep_host(self) -> None:
        # mitmproxy rewrites Host in reverse mode before any hook runs; keep the
        # client's so that it can be checked (requestheaders then rewrites it).
        if not ctx.options.keep_host_header:
            ctx.options.keep_host_header = True

    @fs.fail_closed("parse")
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        flow.metadata[fs.STARTED] = time.monotonic()
        if not self._in_scope(flow):
            if ctx.options.mcp_passthrough_other:
                flow.metadata["bastion.passthrough"] = True
                return
            fs.refuse(
                flow,
                Refusal(403, errors.FORBIDDEN, f"host {flow.request.host} is not an MCP server this gateway fronts"),
                stage="parse",
            )
            return
        self._claim(flow)
        req = flow.request
        origin = req.headers.get("origin")
        if not origin_allowed(origin, self.allowed_origins):
            fs.refuse(flow, Refusal(403, errors.FORBIDDEN, f"origin {origin!r} is not allowed", {"reason": "origin"}), stage="parse")
            return
        if "?" in req.path and "access_token" in req.query:  # req.query parses the URL: skip it when there is none
            fs.refuse(
                flow,
                Refusal(400, errors.UNAUTHENTICATED, "tokens in the query string are refused; send an Authorization header",
                        {"reason": "token_in_query"}, {"www-authenticate": 'Bearer error="invalid_request"'}),
                stage="parse",
            )
            return
        if _reverse_mode(flow):
            client_host = req.host_header or ""
            flow.metadata[CLIENT_HOST] = client_host
            if not host_allowed(client_host, self.allowed_hosts):
                fs.refuse(  # the flow keeps the Host the client sent, for whoever reads the recording
                    flow,
                    Refusal(403, errors.FORBIDDEN, f"host {client_host!r} is not allowed (DNS-rebinding protection)",
                            {"reason": "host"}),
                    stage="parse",
                )
                return
            req.host_header = url.hostport(req.scheme, req.host, req.port)
        length = req.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            fs.refuse(
                flow,
                Refusal(413, errors.REFUSED_INPUT, f"request refused: body of {length} bytes exceeds {self.max_body}",
                        {"reason": "too_large"}),
                stage="parse",
            )

    @fs.fail_closed("parse")
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not fs.is_mcp(flow):
            return
        req = flow.request
        # The gateway reads every response it forwards: ask the upstream not to compress.
        req.headers["accept-encoding"] = "identity"
        state = fs.mcp_state(flow)
        state["session"] = req.headers.get("mcp-session-id")
        if req.method == "POST":
            self._parse_post(flow)
        elif req.method in ("GET", "DELETE", "HEAD", "OPTIONS"):
            if req.content:
                fs.refuse(flow, Refusal(400, errors.REFUSED_INPUT, f"request refused: {req.method} with a body", {"reason": "unexpected_body"}), stage="parse")
                return
            state["request"] = [{"kind": "http", "method": req.method}]
            state["transport"] = "sse-stream" if req.method == "GET" else "streamable-http"
            fs.annotate(flow)
        else:
            fs.refuse(flow, Refusal(405, errors.REFUSED_INPUT, f"method {req.method} is not part of MCP", {"reason": "method"}), stage="parse")
            return
        if not flow.response:
            fs.mark_stage(flow, "parse")

    def _claim(self, flow: http.HTTPFlow) -> None:
        flow.metadata.setdefault(fs.MCP, {})
        flow.metadata[fs.UPSTREAM] = _hostport(flow.request.host, flow.request.port)

    def _parse_post(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        ctype = _media_type(req.headers.get("content-type"))
        if ctype != "application/json":
            fs.refuse(
                flow,
                Refusal(415, errors.REFUSED_INPUT, f"request refused: content-type {ctype or 'missing'!s} (MCP requires application/json)",
                        {"reason": "content_type"}),
                stage="parse",
            )
            return
        try:
            raw = decode_content(req.raw_content or b"", req.headers.get("content-encoding"), self.max_body)
            body = parse_body(raw, max_bytes=self.max_body, max_depth=self.max_depth)
        except ParseError as e:
            fs.refuse(flow, parse_refusal(e), stage="parse", body=None)
            return
        if "content-encoding" in req.headers:
            del req.headers["content-encoding"]
            req.content = raw  # forward what was checked, uncompressed (and its new Content-Length)
        bad = [m for m in body.messages if m.kind == "invalid"]
        if bad:
            fs.refuse(
                flow,
                Refusal(400, errors.INVALID_REQUEST, "request refused: not a valid JSON-RPC 2.0 message"
                        + (f" (batch member {body.messages.index(bad[0])})" if body.batch else ""),
                        {"reason": "invalid_request"}),
                stage="parse",
                body=body,
            )
            return
        fs.set_request_body(flow, body)
        state = fs.mcp_state(flow)
        state["transport"] = "streamable-http" if "mcp-session-id" in req.headers or _has_init(body) else "http"
        state["batch"] = body.batch
        state["request"] = [m.summary() for m in body.messages[:MAX_SUMMARIES]]
        fs.annotate(flow)

    # --- response side -------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not fs.is_mcp(flow) or flow.metadata.get("bastion.refused") or flow.response is None:
            return
        try:
            self._route_response(flow)
        except Exception as exc:
            # Not streamed: the body is buffered and `response` withholds it.
            logger.error("mcp-bastion: resp:parse failed on %s: %r", flow.request.pretty_url, exc, exc_info=exc)
            flow.metadata[fs.ERROR] = f"resp:parse: {type(exc).__name__}: {exc}"
            flow.response.stream = False

    def _route_response(self, flow: http.HTTPFlow) -> None:
        """Stream an event stream through `SSEStream`; buffer everything else so that `response` reads it."""
        resp = flow.response
        assert resp is not None
        if _media_type(resp.headers.get("content-type")) != "text/event-stream":
            resp.stream = False  # never forward a body nobody has read
            length = resp.headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_body:
                self._withhold_unread(flow, _upstream_error(f"body of {length} bytes exceeds {self.max_body}"))
            return
        fs.mcp_state(flow)["sse"] = True
        # Events may be rewritten or dropped in flight: the length is no longer known.
        if "content-length" in resp.headers:
            del resp.headers["content-length"]
            if resp.http_version == "HTTP/1.1":
                resp.headers["transfer-encoding"] = "chunked"
        coding = resp.headers.get("content-encoding", "identity").strip().lower()
        resp.stream = SSEStream(
            flow,
            self._stream_handlers(),
            self.max_event,
            max_depth=self.max_depth,
            broken=None if coding in ("", "identity") else f"compressed event stream ({coding})",
            relative_endpoint=_reverse_mode(flow),
        )

    def _withhold_unread(self, flow: http.HTTPFlow, refusal: Refusal) -> None:
        """Answer `refusal` instead of a response whose body is still on its way, without buffering it."""
        fs.refuse(flow, refusal, stage="resp:parse", action="error")
        assert flow.response is not None
        flow.response.stream = Replacement(flow.response.content or b"")

    def _stream_handlers(self) -> tuple[list[Callable], list[Callable]]:
        on_event, on_output = [], []
        for addon in traverse(ctx.master.addons.chain):
            if hasattr(addon, "mcp_stream_event"):
                on_event.append(addon.mcp_stream_event)
            if hasattr(addon, "mcp_stream_output"):
                on_output.append(addon.mcp_stream_output)
        return on_event, on_output

    @fs.fail_closed("resp:parse")
    def response(self, flow: http.HTTPFlow) -> None:
        if not fs.is_mcp(flow) or flow.metadata.get("bastion.refused"):
            return
        resp = flow.response
        if resp is None:
            return
        if isinstance(resp.stream, SSEStream):
            # Already sent; mitmproxy keeps no streamed body, so give mitmweb what the client got
            # (bounded; recordings keep every byte through mcp_stream_output).
            resp.raw_content = bytes(resp.stream.shown)
            if resp.stream.sent > len(resp.stream.shown):
                fs.mcp_state(flow)["shown_bytes"] = len(resp.stream.shown)
            fs.mark_stage(flow, "resp:parse")
            return
        if resp.stream:
            return  # streamed by someone else, unread: the Gate withholds (or records) it
        if fs.ERROR in flow.metadata:  # e.g. routing failed in responseheaders
            self._withhold(flow, "the response could not be checked")
            return
        ctype = _media_type(resp.headers.get("content-type"))
        state = fs.mcp_state(flow)
        if ctype == "application/json" and resp.raw_content:
            try:
                raw = decode_content(resp.raw_content, resp.headers.get("content-encoding"), self.max_body)
                body = parse_body(raw, max_bytes=self.max_body, max_depth=self.max_depth)
            except ParseError as e:
                self._withhold(flow, f"upstream sent an unreadable response ({e.reason})")
                return
            if "content-encoding" in resp.headers:
                del resp.headers["content-encoding"]
                resp.content = raw  # what was checked, with its own Content-Length
            fs.set_response_body(flow, body)
            state["response"] = [m.summary() for m in body.messages[:MAX_SUMMARIES]]
        elif resp.raw_content and resp.status_code == 202:
            # "Accepted" carries no message (the old SSE transport's POSTs answer
            # with a text body): the client gets the status, not unread content.
            state["discarded_body_bytes"] = len(resp.raw_content)
            resp.content = b""
        elif resp.raw_content and 200 <= resp.status_code < 300 and flow.request.method != "OPTIONS":
            self._withhold(flow, f"upstream answered {resp.status_code} with content-type {ctype or 'missing'}")
            return
        fs.mark_stage(flow, "resp:parse")

    def _withhold(self, flow: http.HTTPFlow, why: str) -> None:
        fs.refuse(flow, _upstream_error(why), stage="resp:parse", action="error")

    def error(self, flow: http.HTTPFlow) -> None:
        if not fs.is_mcp(flow) or not flow.error:
            return
        state = fs.mcp_state(flow)
        if state.get("answered"):
            # Clients close a POST's event stream once its answer arrived: not a failure.
            state["closed"] = flow.error.msg
            return
        fs.add_decision(flow, stage="transport", action="error", reason=flow.error.msg)


def _has_init(body: Body) -> bool:
    return any(m.method == "initialize" for m in body.messages)


class Replacement:
    """A `response.stream` that sends `body` instead of whatever the upstream streams."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __call__(self, chunk: bytes) -> list[bytes]:
        return [] if chunk else [self.body]


class UpstreamCheck:
    """Answers a JSON error instead of mitmproxy's HTML page when the upstream cannot be reached.

    mitmproxy reports a failed upstream connection with its own HTML 502 page,
    and no hook can replace it: the connection is attempted after the last
    request hook, and the error hook runs when the page is already decided.
    So, before the first request of each client connection is forwarded,
    this addon opens (and closes) a TCP connection to the upstream itself; if
    that fails the client gets a JSON-RPC error with the request's id.
    Later requests on the same client connection are not checked again until
    a flow on it fails. Sits after the Gate, so only requests that will be
    forwarded are checked. Forces `connection_strategy=lazy`: with the
    default (eager) a dead upstream in reverse mode makes mitmproxy drop the
    client's connection before it has read a request.
    """

    def __init__(self) -> None:
        self._reachable: set[tuple[str, str, int]] = set()  # (client connection id, host, port)

    def running(self) -> None:
        self._lazy()

    def configure(self, updated: set[str]) -> None:
        if "connection_strategy" in updated:
            self._lazy()

    def _lazy(self) -> None:
        if ctx.options.connection_strategy != "lazy":
            ctx.options.connection_strategy = "lazy"

    @fs.fail_closed("upstream")
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not fs.is_mcp(flow):
            return
        if _mode_name(flow) not in ("ReverseMode", "RegularMode") or flow.server_conn.via:
            return  # not a direct connection to the upstream: nothing this check could predict
        key = (flow.client_conn.id, flow.request.host, flow.request.port)
        if key in self._reachable:
            return
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(flow.request.host, flow.request.port), PROBE_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError) as e:
            # The address and the OS error go to the log, not to the client.
            logger.warning("mcp-bastion: upstream %s unreachable: %s", flow.metadata.get(fs.UPSTREAM),
                           str(e) or type(e).__name__)
            fs.refuse(
                flow,
                Refusal(502, errors.UPSTREAM_ERROR, "mcp-bastion could not reach the upstream MCP server",
                        {"reason": "upstream_unreachable"}),
                stage="upstream",
                action="error",
            )
            return
        writer.close()
        self._reachable.add(key)

    def error(self, flow: http.HTTPFlow) -> None:
        self._reachable.discard((flow.client_conn.id, flow.request.host, flow.request.port))

    def client_disconnected(self, client) -> None:
        self._reachable = {k for k in self._reachable if k[0] != client.id}


class SSEStream:
    """The `response.stream` callable for one event-stream response.

    Parses chunks into events, offers each to the bundle's stream handlers,
    and emits an event as soon as it is complete. If anything fails, it fails
    closed: pending requests get a JSON-RPC error event and nothing more of the
    upstream's stream reaches the client.

    The old HTTP+SSE transport announces where to POST messages in an
    `endpoint` event. That URL must be on the stream's own origin (otherwise
    the client would send its messages around the gateway, so the stream
    fails closed); with `relative_endpoint` (reverse mode) an absolute URL is
    rewritten to its path, which the client resolves against the gateway.
    """

    def __init__(
        self,
        flow: http.HTTPFlow,
        handlers: tuple[list[Callable], list[Callable]],
        max_event: int,
        max_depth: int = DEFAULT_MAX_DEPTH,
        broken: str | None = None,
        relative_endpoint: bool = False,
    ) -> None:
        self.flow = flow
        self.max_depth = max_depth
        self.sent = 0
        self.shown = bytearray()  # the first SHOW_LIMIT bytes sent, for the flow's body in mitmweb
        self.on_event, self.on_output = handlers
        self.parser = SSEParser(max_event)
        self.relative_endpoint = relative_endpoint
        self.dead = False
        body = fs.request_body(flow)
        self.pending: list[Any] = list(body.request_ids) if body else []
        self.state = fs.mcp_state(flow)
        self.state.setdefault("sse_events", 0)
        self.state.setdefault("events", [])
        self._backlog = self._fail(broken) if broken else b""

    def __call__(self, chunk: bytes) -> list[bytes]:
        # A list, never b"": mitmproxy sends a returned b"" as an empty chunk,
        # which in HTTP/1.1 chunked encoding ends the body for the client.
        out = self._process(chunk)
        return [out] if out else []

    def _process(self, chunk: bytes) -> bytes:
        if self.dead:
            out, self._backlog = self._backlog, b""
            return out
        try:
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
            return self._fail(f"{type(exc).__name__}: {exc}")

    def _handle(self, event) -> bytes:
        body: Body | None = None
        if event.has_data and event.event == "message" and event.data:
            try:
                body = parse_body(event.data, max_bytes=self.parser.max_event_bytes, max_depth=self.max_depth)
            except ParseError as e:
                raise SSEError(f"unreadable JSON-RPC in SSE event: {e.reason}") from None
            if any(m.kind == "invalid" for m in body.messages):
                raise SSEError("SSE event is not a valid JSON-RPC message")
        self.state["sse_events"] += 1
        if body is not None and len(self.state["events"]) < MAX_SUMMARIES:
            self.state["events"].extend(m.summary() for m in body.messages)
        ev = fs.StreamEvent(self.flow, event, body)
        if event.has_data and event.event == "endpoint":
            self._check_endpoint(ev)
        for handler in self.on_event:
            handler(ev)
            if ev.dropped:
                break
        out = ev.output()
        if out:
            self._sent(out)
        if body is not None and not ev.dropped:
            # Answered only once the answer is on its way: until then, a failure still answers it.
            for m in body.messages:
                if m.kind in ("response", "error") and m.id in self.pending:
                    self.pending.remove(m.id)
                    if not self.pending:
                        self.state["answered"] = True  # every request of this POST got its answer
        return out

    def _check_endpoint(self, ev: fs.StreamEvent) -> None:
        announced = ev.event.data.strip()
        target = urlsplit(urljoin(self.flow.request.url, announced))
        if _origin(target) != _origin(urlsplit(self.flow.request.url)):
            raise SSEError(f"upstream announced a message endpoint on another origin: {announced!r}")
        self.state["endpoint"] = target.path + (f"?{target.query}" if target.query else "")
        if self.relative_endpoint and urlsplit(announced).netloc:
            ev.replace(self.state["endpoint"])

    def _fail(self, why: str) -> bytes:
        self.dead = True
        self.flow.metadata[fs.ERROR] = f"sse: {why}"
        fs.add_decision(self.flow, stage="resp:sse", direction="server_to_client", action="error", reason=why)
        err = Refusal(502, errors.GATEWAY_ERROR, "mcp-bastion stopped this event stream: it could not be checked", {"reason": "stream"})
        out = b"".join(
            format_event(json_text(err, i)) for i in self.pending
        )
        self.pending = []
        try:
            self._sent(out)
        except Exception:  # pragma: no cover - recording must not resurrect the stream
            logger.exception("mcp-bastion: stream output handler failed")
        return out

    def _sent(self, out: bytes) -> None:
        """Bytes on their way to the client: to the output handlers, and (bounded) kept for display."""
        self.sent += len(out)
        if len(self.shown) < SHOW_LIMIT:
            self.shown += out[: SHOW_LIMIT - len(self.shown)]
        for handler in self.on_output:
            handler(self.flow, out)


def _origin(parts) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a split URL, with the scheme's default port made explicit."""
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def json_text(refusal: Refusal, msg_id: Any) -> str:
    return refusal.body_for([msg_id]).decode("utf-8")
