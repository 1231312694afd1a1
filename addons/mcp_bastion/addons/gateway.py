"""
The data path: decide which flows are MCP, refuse what cannot be read, parse
every JSON-RPC message into `Message` values, and stream SSE responses event
by event (`glue.stream.SSEStream`).

Other addons never parse bodies themselves: they read
`flowstate.request_body(flow)` / `flowstate.response_body(flow)` (the messages,
placed: direction, carrier, and for an answer the request it answers) and the
summaries in `flow.metadata[Meta.MCP]`. The Pipeline addon attaches the message
stages to each `SSEStream`; the Recorder attaches its sink for the bytes sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from mitmproxy import ctx, exceptions, http
from mitmproxy.net.http import url
from mitmproxy.utils import human

from mcp_bastion.core import errors
from mcp_bastion.core.encoding import decode_content
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.jsonrpc import DEFAULT_MAX_DEPTH, Body, ParseError, parse_body, placed, repeated_ids
from mcp_bastion.core.media import charset_problem, media_type
from mcp_bastion.core.message import routing_headers
from mcp_bastion.core.origin import (
    DEFAULT_HOSTS,
    DEFAULT_ORIGINS,
    host_allowed,
    origin_allowed,
    validate_patterns,
)
from mcp_bastion.core.state import Backend, Hub, Table
from mcp_bastion.core.vocab import Action, Direction, Meta, StageName
from mcp_bastion.core.wire import VERSION_HEADER, Mismatch, era, request_version
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.failclosed import fail_closed
from mcp_bastion.glue.replies import refuse
from mcp_bastion.glue.stream import MAX_SUMMARIES, Replacement, SSEStream

logger = logging.getLogger("mcp_bastion")

# Where MCP servers serve: streamable HTTP at /mcp, the HTTP+SSE transport's stream and message endpoint.
DEFAULT_PATHS = ("/mcp", "/sse", "/messages", "/messages/")
MAX_ANNOUNCED = 64
ANNOUNCED_TTL = 24 * 3600.0  # seconds an announced endpoint stays reachable through other replicas without use


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


def _hostport(host: str, port: int) -> str:
    """host:port with IPv6 literals in brackets, as in a Host header."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reverse_mode(flow: http.HTTPFlow) -> bool:
    return fs.mode_name(flow) == "ReverseMode"


def _upstream_error(why: str) -> Refusal:
    return Refusal(502, errors.UPSTREAM_ERROR, f"mcp-bastion withheld the upstream's answer: {why}",
                   {"reason": "upstream"})


BODY_SIZE_FLOOR = 32 * 1024 * 1024  # least body_size_limit the Gateway sets when none is configured


class Gateway:
    """Accepts MCP traffic for enforcement and keeps it readable end to end."""

    def __init__(self, hub: Hub | None = None) -> None:
        # HTTP+SSE message endpoints streams announced (on any replica, with shared state)
        self.announced: Table

        def build(backend: Backend) -> None:
            self.announced = backend.table("announced_paths", idle_ttl=ANNOUNCED_TTL, max_items=MAX_ANNOUNCED)

        (hub or Hub()).watch(build)
        self.max_body = 4 * 1024 * 1024
        self.max_event = 16 * 1024 * 1024
        self.max_depth = DEFAULT_MAX_DEPTH
        self.allowed_hosts: tuple[str, ...] = DEFAULT_HOSTS
        self.allowed_origins: tuple[str, ...] = DEFAULT_ORIGINS
        self.mcp_hosts: tuple[str, ...] = ()
        self.mcp_paths: frozenset[str] = frozenset(DEFAULT_PATHS)

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
            "mcp_paths",
            Sequence[str],
            list(DEFAULT_PATHS),
            """
            The upstream's MCP endpoint paths (exact, without query): only these are reachable
            through the gateway; any other path is refused with 404 before any credential is
            added. The message endpoint an HTTP+SSE stream announces is added while it is in use.
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
        if "mcp_paths" in updated:
            paths = tuple(ctx.options.mcp_paths)
            bad = [p for p in paths if not p.startswith("/") or "?" in p or "#" in p]
            if bad or not paths:
                raise exceptions.OptionsError(f"mcp_paths must be absolute paths without query: {bad or paths}")
            self.mcp_paths = frozenset(paths)
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
        if ({"max_body_size", "body_size_limit"} & updated) and "body_size_limit" in ctx.options \
                and ctx.options.body_size_limit is None:  # mitmproxy's own option (absent in bare test contexts)
            # mitmproxy buffers a body it does not stream before any hook sees it, and a chunked one has no
            # length to refuse early: its own limit ends the exchange instead of buffering without bound.
            # mitmproxy checks a declared Content-Length against it before any hook runs (and answers with
            # its own HTML page), so it stays well above max_body_size: up to there, the gateway refuses
            # with its JSON-RPC error without reading the body.
            ctx.options.body_size_limit = str(max(2 * self.max_body, BODY_SIZE_FLOOR))
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
        """Whether any name the request goes by is an MCP host: the URL's host, or its Host header.

        A name is compared as resolvers and front ends read it: case-folded and without the
        trailing dot of a fully qualified name, so no spelling of an MCP host passes through.
        """
        hosts = self.mcp_hosts
        if not hosts:
            return True
        req = flow.request
        names = [(req.host, req.port)]
        header = fs.header(req.headers, "host")
        if header:
            host, _, port = header.rpartition(":") if not header.endswith("]") else (header, "", "")
            if not host or (port and not port.isdigit()):
                host, port = header, ""
            names.append((host.strip("[]"), int(port) if port else req.port))
        for host, port in names:
            host = host.rstrip(".").lower()
            if host_allowed(_hostport(host, port), hosts) or host_allowed(f"[{host}]" if ":" in host else host, hosts):
                return True
        return False

    # --- request side --------------------------------------------------------

    def running(self) -> None:
        self._keep_host()

    def _keep_host(self) -> None:
        # mitmproxy rewrites Host in reverse mode before any hook runs; keep the
        # client's so that it can be checked (requestheaders then rewrites it).
        if not ctx.options.keep_host_header:
            ctx.options.keep_host_header = True

    @fail_closed(StageName.PARSE)
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        fs.forget(flow)  # a replayed flow is checked afresh, as if new
        flow.metadata[Meta.STARTED] = time.monotonic()
        if not self._in_scope(flow):
            if ctx.options.mcp_passthrough_other:
                flow.metadata[Meta.PASSTHROUGH] = True
                return
            refuse(
                flow,
                Refusal(403, errors.FORBIDDEN, f"host {flow.request.host} is not an MCP server this gateway fronts"),
                stage=StageName.PARSE,
            )
            return
        self._claim(flow)
        req = flow.request
        origin = fs.header(req.headers, "origin")
        if not origin_allowed(origin, self.allowed_origins):
            refuse(flow, Refusal(403, errors.FORBIDDEN, f"origin {origin!r} is not allowed", {"reason": "origin"}),
                   stage=StageName.PARSE)
            return
        if "upgrade" in req.headers or req.method == "CONNECT":
            # A WebSocket (or any) upgrade would open a tunnel whose messages no stage reads.
            refuse(flow, Refusal(400, errors.REFUSED_INPUT, "protocol upgrades are not part of MCP; the request was "
                                 "not forwarded", {"reason": "upgrade"}), stage=StageName.PARSE)
            return
        if "?" in req.path and "access_token" in req.query:  # req.query parses the URL: skip it when there is none
            refuse(
                flow,
                Refusal(400, errors.UNAUTHENTICATED,
                        "tokens in the query string are refused; send an Authorization header",
                        {"reason": "token_in_query"}, {"www-authenticate": 'Bearer error="invalid_request"'}),
                stage=StageName.PARSE,
            )
            return
        if _reverse_mode(flow):
            client_host = req.host_header or ""
            flow.metadata[Meta.CLIENT_HOST] = client_host
            if not host_allowed(client_host, self.allowed_hosts):
                refuse(  # the flow keeps the Host the client sent, for whoever reads the recording
                    flow,
                    Refusal(403, errors.FORBIDDEN, f"host {client_host!r} is not allowed (DNS-rebinding protection)",
                            {"reason": "host"}),
                    stage=StageName.PARSE,
                )
                return
            req.host_header = url.hostport(req.scheme, req.host, req.port)
        length = fs.header(req.headers, "content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            refuse(
                flow,
                Refusal(413, errors.REFUSED_INPUT, f"request refused: body of {length} bytes exceeds {self.max_body}",
                        {"reason": "too_large"}),
                stage=StageName.PARSE,
            )

    @fail_closed(StageName.PARSE)
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not fs.is_mcp(flow):
            return
        req = flow.request
        path = req.path.split("?", 1)[0]
        if path not in self.mcp_paths and self.announced.get(path) is None:
            # Only the MCP endpoint is the upstream's to serve through the gateway: any other path (an
            # admin API, a health page) is refused before the upstream's own credential is set.
            refuse(flow, Refusal(404, errors.FORBIDDEN, f"{path[:100]!r} is not an MCP endpoint of this gateway",
                                 {"reason": "path"}), stage=StageName.PARSE)
            return
        # The gateway reads every response it forwards: ask the upstream not to compress.
        req.headers["accept-encoding"] = "identity"
        state = fs.mcp_state(flow)
        state["session"] = fs.header(req.headers, "mcp-session-id")
        if req.method == "POST":
            self._parse_post(flow)
        elif req.method in ("GET", "DELETE", "HEAD", "OPTIONS"):
            if req.raw_content:
                refuse(
                    flow,
                    Refusal(400, errors.REFUSED_INPUT, f"request refused: {req.method} with a body",
                            {"reason": "unexpected_body"}),
                    stage=StageName.PARSE,
                )
                return
            state["request"] = [{"kind": "http", "method": req.method}]
            state["transport"] = "sse-stream" if req.method == "GET" else "streamable-http"
            fs.annotate(flow)
        else:
            refuse(
                flow,
                Refusal(405, errors.REFUSED_INPUT, f"method {req.method} is not part of MCP", {"reason": "method"}),
                stage=StageName.PARSE,
            )
            return
        if not flow.response:
            fs.mark_stage(flow, StageName.PARSE)

    def _claim(self, flow: http.HTTPFlow) -> None:
        flow.metadata.setdefault(Meta.MCP, {})
        flow.metadata[Meta.UPSTREAM] = _hostport(flow.request.host, flow.request.port)

    def _parse_post(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        ctype = media_type(fs.header(req.headers, "content-type"))
        if ctype != "application/json":
            refuse(
                flow,
                Refusal(415, errors.REFUSED_INPUT,
                        f"request refused: content-type {ctype or 'missing'!s} (MCP requires application/json)",
                        {"reason": "content_type"}),
                stage=StageName.PARSE,
            )
            return
        charset = charset_problem(fs.header(req.headers, "content-type"))
        if charset is not None:
            refuse(flow, Refusal(415, errors.REFUSED_INPUT, f"request refused: {charset}", {"reason": "charset"}),
                   stage=StageName.PARSE)
            return
        try:
            raw = decode_content(req.raw_content or b"", fs.header(req.headers, "content-encoding"), self.max_body)
            body = parse_body(raw, max_bytes=self.max_body, max_depth=self.max_depth)
        except ParseError as e:
            refuse(flow, parse_refusal(e), stage=StageName.PARSE, body=None)
            return
        if "content-encoding" in req.headers:
            del req.headers["content-encoding"]
            req.content = raw  # forward what was checked, uncompressed (and its new Content-Length)
        bad = [m for m in body.messages if m.kind == "invalid"]
        if bad:
            refuse(
                flow,
                Refusal(400, errors.INVALID_REQUEST, "request refused: not a valid JSON-RPC 2.0 message"
                        + (f" (batch member {body.messages.index(bad[0])})" if body.batch else ""),
                        {"reason": "invalid_request"}),
                stage=StageName.PARSE,
                body=body,
            )
            return
        repeats = repeated_ids(body)
        if repeats:
            refuse(
                flow,
                Refusal(400, errors.INVALID_REQUEST, f"request refused: request id {repeats[0]!r} is used more than "
                        "once in this batch, so its answers could not be told apart", {"reason": "duplicate_id"}),
                stage=StageName.PARSE,
                body=body,
            )
            return
        headers = routing_headers(req.headers.items(multi=True))
        body = Body(placed(body, Direction.C2S, summaries="request", headers=headers), body.batch, body.data)
        fs.set_request_body(flow, body)
        state = fs.mcp_state(flow)
        state["transport"] = "streamable-http" if "mcp-session-id" in req.headers or _has_init(body) else "http"
        state["batch"] = body.batch
        try:
            state["era"] = era(fs.header(req.headers, VERSION_HEADER), next(
                (v for m in body.messages if (v := request_version(m)) is not None), None))
        except Mismatch:
            state["era"] = "conflicting"  # the Wire stage refuses it
        state["request"] = [m.summary() for m in body.messages[:MAX_SUMMARIES]]
        fs.annotate(flow)

    # --- response side -------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not fs.is_mcp(flow) or fs.refused(flow) or flow.response is None:
            return
        try:
            self._route_response(flow)
        except Exception as exc:
            # Not streamed: the body is buffered and `response` withholds it.
            logger.error("mcp-bastion: resp:parse failed on %s: %r", flow.request.pretty_url, exc, exc_info=exc)
            flow.metadata[Meta.ERROR] = f"resp:parse: {type(exc).__name__}: {exc}"
            flow.response.stream = False

    def _route_response(self, flow: http.HTTPFlow) -> None:
        """Stream an event stream through `SSEStream`; buffer everything else so that `response` reads it."""
        resp = flow.response
        assert resp is not None
        if media_type(fs.header(resp.headers, "content-type")) != "text/event-stream":
            resp.stream = False  # never forward a body nobody has read
            length = fs.header(resp.headers, "content-length", "")
            if length.isdigit() and int(length) > self.max_body:
                self._withhold_unread(flow, _upstream_error(f"body of {length} bytes exceeds {self.max_body}"))
            return
        fs.mcp_state(flow)["sse"] = True
        # Events may be rewritten or dropped in flight: the length is no longer known.
        if "content-length" in resp.headers:
            del resp.headers["content-length"]
            if resp.http_version == "HTTP/1.1":
                resp.headers["transfer-encoding"] = "chunked"
        coding = fs.header(resp.headers, "content-encoding", "identity").strip().lower()
        charset = charset_problem(fs.header(resp.headers, "content-type"))
        broken = f"compressed event stream ({coding})" if coding not in ("", "identity") else (
            f"event stream declaring {charset}" if charset else None)
        if "content-encoding" in resp.headers:
            del resp.headers["content-encoding"]  # what the client gets (events or the error) is plain text
        resp.stream = SSEStream(
            flow,
            self.max_event,
            max_depth=self.max_depth,
            broken=broken,
            relative_endpoint=_reverse_mode(flow),
        )
        resp.stream.on_endpoint.append(self._announced)

    def _announced(self, flow: http.HTTPFlow, session: str | None) -> None:
        """An HTTP+SSE stream announced its message endpoint: its path becomes reachable (bounded)."""
        path = (fs.mcp_state(flow).get("endpoint") or "").split("?", 1)[0]
        if path:
            self.announced.put(path, "1")  # bounded; with shared state, every replica reads it

    def _withhold_unread(self, flow: http.HTTPFlow, refusal: Refusal) -> None:
        """Answer `refusal` instead of a response whose body is still on its way, without buffering it."""
        refuse(flow, refusal, stage=StageName.RESP_PARSE, action=Action.ERROR)
        assert flow.response is not None
        flow.response.stream = Replacement(flow.response.content or b"")

    @fail_closed(StageName.RESP_PARSE)
    def response(self, flow: http.HTTPFlow) -> None:
        if not fs.is_mcp(flow) or fs.refused(flow):
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
            fs.mark_stage(flow, StageName.RESP_PARSE)
            return
        if resp.stream:
            return  # streamed by someone else, unread: the Gate withholds (or records) it
        if Meta.ERROR in flow.metadata:  # e.g. routing failed in responseheaders
            self._withhold(flow, "the response could not be checked")
            return
        ctype = media_type(fs.header(resp.headers, "content-type"))
        state = fs.mcp_state(flow)
        if ctype == "application/json" and resp.raw_content:
            charset = charset_problem(fs.header(resp.headers, "content-type"))
            if charset is not None:
                self._withhold(flow, f"upstream declared {charset}")
                return
            try:
                raw = decode_content(resp.raw_content, fs.header(resp.headers, "content-encoding"), self.max_body)
                body = parse_body(raw, max_bytes=self.max_body, max_depth=self.max_depth)
            except ParseError as e:
                self._withhold(flow, f"upstream sent an unreadable response ({e.reason})")
                return
            if any(m.kind == "invalid" for m in body.messages):
                # JSON, but no JSON-RPC message: nothing any stage could read, so nothing the client gets.
                if resp.status_code >= 300:
                    self._replace_error_page(flow, ctype)
                    fs.mark_stage(flow, StageName.RESP_PARSE)
                else:
                    self._withhold(flow, "upstream answered JSON that is not a JSON-RPC 2.0 message")
                return
            if "content-encoding" in resp.headers:
                del resp.headers["content-encoding"]
                resp.content = raw  # what was checked, with its own Content-Length
            body = Body(placed(body, Direction.S2C, asked=fs.asked(flow), summaries="response"), body.batch, body.data)
            fs.set_response_body(flow, body)
            state["response"] = [m.summary() for m in body.messages[:MAX_SUMMARIES]]
        elif resp.raw_content and resp.status_code == 202:
            # "Accepted" carries no message (the old SSE transport's POSTs answer
            # with a text body): the client gets the status, not unread content.
            state["discarded_body_bytes"] = len(resp.raw_content)
            resp.headers.pop("content-encoding", None)
            resp.content = b""
        elif resp.raw_content and flow.request.method == "OPTIONS" and 200 <= resp.status_code < 300:
            # A preflight's answer is its headers; a body nobody reads is not forwarded.
            state["discarded_body_bytes"] = len(resp.raw_content)
            resp.headers.pop("content-encoding", None)
            resp.content = b""
        elif resp.raw_content and 200 <= resp.status_code < 300:
            self._withhold(flow, f"upstream answered {resp.status_code} with content-type {ctype or 'missing'}")
            return
        elif resp.raw_content and resp.status_code >= 300:
            # An error page (HTML, text) is read by nobody here: it could carry anything, a secret included.
            # The client keeps the status (a 404 still tells it to start a new session), not the page.
            self._replace_error_page(flow, ctype)
        fs.mark_stage(flow, StageName.RESP_PARSE)

    def _replace_error_page(self, flow: http.HTTPFlow, ctype: str) -> None:
        resp = flow.response
        assert resp is not None
        fs.mcp_state(flow)["discarded_body_bytes"] = len(resp.raw_content or b"")
        body = fs.request_body(flow)
        refusal = Refusal(resp.status_code, errors.UPSTREAM_ERROR,
                          f"the upstream answered HTTP {resp.status_code} ({ctype or 'no content-type'}); "
                          "mcp-bastion does not forward bodies it cannot read",
                          {"reason": "upstream_status", "status": resp.status_code})
        for name in ("content-type", "content-encoding", "content-language"):
            resp.headers.pop(name, None)  # first: `content` would otherwise be encoded in the upstream's coding
        resp.content = refusal.body_for_parsed(body)
        resp.headers["content-type"] = "application/json"

    def _withhold(self, flow: http.HTTPFlow, why: str) -> None:
        refuse(flow, _upstream_error(why), stage=StageName.RESP_PARSE, action=Action.ERROR)

    def error(self, flow: http.HTTPFlow) -> None:
        if not fs.is_mcp(flow) or not flow.error:
            return
        state = fs.mcp_state(flow)
        if state.get("answered"):
            # Clients close a POST's event stream once its answer arrived: not a failure.
            state["closed"] = flow.error.msg
            return
        fs.add_decision(flow, stage=StageName.TRANSPORT, action=Action.ERROR, reason=flow.error.msg)


def _has_init(body: Body) -> bool:
    return any(m.method == "initialize" for m in body.messages)
