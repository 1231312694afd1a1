"""
What travels on a flow, and how an enforcement step fails closed.

Every addon of the bundle reads and writes a flow's state through this module:

- `flow.metadata` holds only serialisable values (they are saved in recordings
  and shown in mitmweb), under the keys below.
- The parsed request body (a live object) is cached per flow in a weak map,
  so each addon does not parse it again.
- `fail_closed(stage)` wraps a hook: if it raises, the flow is answered with a
  JSON error instead of being forwarded (mitmproxy's own default is to log the
  exception and go on, which for an enforcement point is a bypass).
- `refuse()` is the one way to answer a client instead of the upstream.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import weakref
from typing import Any, Callable

from mitmproxy import http

from mcp_bastion.core import errors
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.jsonrpc import Body, dumps
from mcp_bastion.core.sse import SSEEvent

logger = logging.getLogger("mcp_bastion")

# --- flow.metadata keys (values are plain JSON-like data) -------------------
MCP = "bastion.mcp"  # {"transport", "session", "request": [summaries], "response": [...], "sse_events": n}
IDENTITY = "bastion.identity"  # {"sub", "email", "name", "groups", "iss", "client_id", "scopes"} or None
UPSTREAM = "bastion.upstream"  # "host:port" of the upstream MCP server
DECISIONS = "bastion.decisions"  # [{"stage", "direction", "id", "method", "target", "action", "rule", "reason"}]
STAGES = "bastion.stages"  # enforcement stages this flow passed: ["parse", "auth", "policy", "resp:parse", ...]
ERROR = "bastion.error"  # set when an enforcement step failed and the gateway failed closed
STARTED = "bastion.t0"  # time.monotonic() when the gateway first saw the request
CLIENT_HOST = "bastion.client_host"  # the Host the client addressed, before reverse mode rewrites it
SECRET_HEADERS = "bastion.secret_headers"  # lower-case names of request headers carrying credentials (scrubbed when recorded)

_bodies: weakref.WeakKeyDictionary[http.HTTPFlow, Body] = weakref.WeakKeyDictionary()
_response_bodies: weakref.WeakKeyDictionary[http.HTTPFlow, Body] = weakref.WeakKeyDictionary()


def is_mcp(flow: http.HTTPFlow) -> bool:
    """True once the gateway has accepted the flow as MCP traffic it must enforce."""
    return MCP in flow.metadata


def mcp_state(flow: http.HTTPFlow) -> dict[str, Any]:
    return flow.metadata.setdefault(MCP, {})


def set_request_body(flow: http.HTTPFlow, body: Body | None) -> None:
    if body is None:
        _bodies.pop(flow, None)
    else:
        _bodies[flow] = body


def request_body(flow: http.HTTPFlow) -> Body | None:
    """The parsed JSON-RPC request body (None for GET/DELETE or a body-less request)."""
    return _bodies.get(flow)


def set_response_body(flow: http.HTTPFlow, body: Body | None) -> None:
    if body is None:
        _response_bodies.pop(flow, None)
    else:
        _response_bodies[flow] = body


def response_body(flow: http.HTTPFlow) -> Body | None:
    """The parsed JSON-RPC body of a buffered application/json response."""
    return _response_bodies.get(flow)


def mark_stage(flow: http.HTTPFlow, stage: str) -> None:
    stages = flow.metadata.setdefault(STAGES, [])
    if stage not in stages:
        stages.append(stage)


def passed(flow: http.HTTPFlow, stage: str) -> bool:
    return stage in flow.metadata.get(STAGES, ())


def add_decision(flow: http.HTTPFlow, **decision: Any) -> None:
    """Append one decision (allow/deny/mask/approve/error) and refresh the annotation."""
    flow.metadata.setdefault(DECISIONS, []).append(
        {k: v for k, v in decision.items() if v is not None}
    )
    annotate(flow)


_MARKS = {
    "error": ":warning:",
    "deny": ":no_entry:",
    "approve": ":hourglass:",
    "mask": ":performing_arts:",
}
_RANK = {action: rank for rank, action in enumerate(_MARKS)}  # most severe first


class _Scan:
    """How far `annotate` has read a flow's decisions, and the most severe one so far.

    A long event stream adds hundreds of decisions, each followed by
    `annotate`: reading only the new ones keeps that linear. Decisions are
    only ever appended (`add_decision`); a list replaced, cut or with its last
    entry replaced is read again from the start.
    """

    __slots__ = ("decisions", "count", "last", "rank", "index")

    def __init__(self, decisions: list[dict[str, Any]]):
        self.decisions = decisions
        self.count = 0  # decisions read
        self.last: dict[str, Any] | None = None  # the last one read
        self.rank: int | None = None  # of the most severe decision read
        self.index = 0  # of the first decision with that rank


_scans: weakref.WeakKeyDictionary[http.HTTPFlow, _Scan] = weakref.WeakKeyDictionary()


def _headline(flow: http.HTTPFlow, decisions: list[dict[str, Any]]) -> tuple[dict[str, Any], str | None]:
    """The decision the comment names, and the worst severity: the first of the most severe
    decisions (error, deny, approve, mask), else the last decision."""
    scan = _scans.get(flow)
    if (scan is None or scan.decisions is not decisions or scan.count > len(decisions)
            or (scan.count and decisions[scan.count - 1] is not scan.last)):
        scan = _scans[flow] = _Scan(decisions)
    for i in range(scan.count, len(decisions)):
        rank = _RANK.get(decisions[i].get("action"))
        if rank is not None and (scan.rank is None or rank < scan.rank):
            scan.rank, scan.index = rank, i
    scan.count, scan.last = len(decisions), decisions[-1]
    if scan.rank is None:
        return decisions[-1], None
    return decisions[scan.index], decisions[scan.index]["action"]


def annotate(flow: http.HTTPFlow) -> None:
    """Write a one-line summary for people in mitmweb: `flow.comment` and a mark."""
    state = flow.metadata.get(MCP, {})
    parts = []
    for summ in state.get("request", [])[:3]:
        parts.append(_label(summ))
    if len(state.get("request", [])) > 3:
        parts.append(f"(+{len(state['request']) - 3} more)")
    ident = flow.metadata.get(IDENTITY)
    who = ident.get("sub") if isinstance(ident, dict) else None
    decisions = flow.metadata.get(DECISIONS, [])
    worst = None
    line = ", ".join(parts) or flow.request.method
    if decisions:
        d, worst = _headline(flow, decisions)
        line += f" -> {d.get('action')}"
        if d.get("rule"):
            line += f" [{d['rule']}]"
        if d.get("reason") and d.get("action") != "allow":
            line += f": {d['reason']}"
    if who:
        line = f"{who}: {line}"
    flow.comment = line
    flow.marked = _MARKS.get(worst or "", "")


def _label(summ: dict[str, Any]) -> str:
    out = summ.get("method") or summ.get("kind", "?")
    target = summ.get("tool") or summ.get("prompt") or summ.get("uri")
    if target:
        out += f" {target}"
    return out


def refuse(
    flow: http.HTTPFlow,
    refusal: Refusal,
    *,
    stage: str,
    body: Body | None = None,
    action: str = "deny",
    rule: str | None = None,
) -> None:
    """Answer the client with `refusal` instead of forwarding (or instead of the upstream's answer)."""
    if body is None:
        body = request_body(flow)
    headers = {"content-type": "application/json", "cache-control": "no-store"}
    headers.update(refusal.headers)
    flow.response = http.Response.make(
        refusal.status, refusal.body_for_parsed(body), headers
    )
    flow.metadata["bastion.refused"] = True
    add_decision(
        flow,
        stage=stage,
        direction="client_to_server",
        action=action,
        rule=rule,
        reason=refusal.message,
        code=refusal.code,
        status=refusal.status,
    )


def admit_unless_failing(flow: http.HTTPFlow, *, stage: str, failing: bool, hold: float, what: str, reason: str) -> None:
    """For a stage that must write before a flow may go on (recording, audit): mark `stage`, or,
    while its writes are `failing`, answer 503 with Retry-After `hold` seconds instead."""
    if not failing:
        mark_stage(flow, stage)
        return
    refuse(
        flow,
        Refusal(503, errors.GATEWAY_ERROR, f"mcp-bastion cannot {what} right now; the request was not forwarded",
                {"reason": reason}, {"retry-after": str(int(hold))}),
        stage=stage,
        action="error",
    )


def internal_error(stage: str, exc: BaseException) -> Refusal:
    """The refusal used when an enforcement step itself fails."""
    return Refusal(
        status=500 if not stage.startswith("resp") else 502,
        code=errors.GATEWAY_ERROR,
        message=f"mcp-bastion could not complete the {stage} check; the request was not forwarded"
        if not stage.startswith("resp")
        else f"mcp-bastion could not complete the {stage} check; the response was withheld",
        data={"stage": stage, "error": type(exc).__name__},
    )


def fail_closed(stage: str) -> Callable:
    """Decorate an addon hook so that an exception denies the flow instead of letting it through.

    Works for sync and async hooks taking one flow argument. The error and the
    stage are recorded in `flow.metadata` and logged with a traceback.

    Not for `responseheaders`: a refusal set there is overwritten by the
    upstream's body when mitmproxy reads it; that hook must instead make sure
    the body is buffered (not streamed) so that `response` can withhold it.
    """

    def deco(fn: Callable) -> Callable:
        def handle(flow: http.HTTPFlow, exc: BaseException) -> None:
            logger.error("mcp-bastion: %s failed on %s: %r", stage, flow.request.pretty_url, exc, exc_info=exc)
            flow.metadata[ERROR] = f"{stage}: {type(exc).__name__}: {exc}"
            if isinstance(flow.response, http.Response) and callable(flow.response.stream):
                return  # headers already sent; the stream wrapper fails closed on its own
            try:
                refuse(flow, internal_error(stage, exc), stage=stage, action="error")
            except Exception:  # pragma: no cover - last resort, never let a flow through
                flow.kill()

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(self, flow):
                try:
                    return await fn(self, flow)
                except Exception as exc:
                    handle(flow, exc)

            return awrapper

        @functools.wraps(fn)
        def wrapper(self, flow):
            try:
                return fn(self, flow)
            except Exception as exc:
                handle(flow, exc)

        return wrapper

    return deco


def elapsed_ms(flow: http.HTTPFlow) -> float | None:
    t0 = flow.metadata.get(STARTED)
    return None if t0 is None else round((time.monotonic() - t0) * 1000, 3)


class StreamEvent:
    """One SSE event on its way to the client, offered to each addon's `mcp_stream_event`.

    An addon may `replace()` the event's data (the event is re-serialised) or
    `drop()` it (the client never sees it). `body` is the parsed JSON-RPC
    content, or None for events that carry no JSON-RPC message.
    """

    __slots__ = ("flow", "event", "body", "dropped", "reason", "_data", "extra")

    def __init__(self, flow: http.HTTPFlow, event: SSEEvent, body: Body | None):
        self.flow = flow
        self.event = event
        self.body = body
        self.dropped = False
        self.reason: str | None = None
        self._data: str | None = None
        self.extra: list[bytes] = []

    def replace(self, data: str | Any) -> None:
        """Replace the event's data: a string as-is, anything else as compact JSON."""
        self._data = data if isinstance(data, str) else dumps(data).decode("utf-8")

    def drop(self, reason: str) -> None:
        self.dropped = True
        self.reason = reason

    def emit_after(self, raw_event: bytes) -> None:
        """Send an extra, gateway-made SSE block right after this one (e.g. an error)."""
        self.extra.append(raw_event)

    @property
    def modified(self) -> bool:
        return self._data is not None

    def output(self) -> bytes:
        if self.dropped:
            out = b""
        elif self._data is None:
            out = self.event.raw
        else:
            self.event.data = self._data
            self.event.has_data = True
            out = self.event.encode()
        return out + b"".join(self.extra)
