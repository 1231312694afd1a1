"""
What travels on a flow, and how an enforcement step fails closed.

Every addon of the bundle reads and writes a flow's state through this module:

- `flow.metadata` holds only serialisable values (they are saved in recordings
  and shown in mitmweb), under the keys of `core.vocab.Meta`.
- The parsed messages of the request and of a buffered response (live
  `Message` values, after every stage) are kept per flow in weak maps, so no
  addon parses a body again.
- Decisions are appended with `record()` (one per stage and message) or
  `add_decision()`, and `annotate()` turns them into the line a reviewer reads
  in mitmweb's flow list (`flow.comment`) and a mark.
Replies to the client or the upstream are built in `glue.replies`; how a hook
fails closed is `glue.failclosed`.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable
from typing import Any

from mitmproxy import http

from mcp_bastion.core.identity import Identity
from mcp_bastion.core.jsonrpc import Body
from mcp_bastion.core.message import Message, summary_label
from mcp_bastion.core.pipeline import Context, Verdict
from mcp_bastion.core.vocab import Action, Direction, Kind, Meta, StageName

logger = logging.getLogger("mcp_bastion")

MAX_RECORDED = 500  # decisions kept per flow; allows beyond it are only counted (long event streams)

_bodies: weakref.WeakKeyDictionary[http.HTTPFlow, Body] = weakref.WeakKeyDictionary()
# The upstream's own credential (header, value) set on a forwarded request: never in metadata, so
# never recorded or shown; kept for the gateway's answers to the upstream on the client's behalf.
_credentials: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[str, str]] = weakref.WeakKeyDictionary()
_response_bodies: weakref.WeakKeyDictionary[http.HTTPFlow, Body] = weakref.WeakKeyDictionary()


def is_mcp(flow: http.HTTPFlow) -> bool:
    """True once the gateway has accepted the flow as MCP traffic it must enforce."""
    return Meta.MCP in flow.metadata


def mcp_state(flow: http.HTTPFlow) -> dict[str, Any]:
    return flow.metadata.setdefault(Meta.MCP, {})


def forget(flow: http.HTTPFlow) -> None:
    """Drop everything the gateway noted on a flow (a replayed flow comes back with its first pass's state)."""
    for key in [k for k in flow.metadata if isinstance(k, str) and k.startswith("bastion.")]:
        del flow.metadata[key]
    _bodies.pop(flow, None)
    _response_bodies.pop(flow, None)
    _credentials.pop(flow, None)
    _headlines.pop(flow, None)


def mode_name(flow: http.HTTPFlow) -> str:
    """The proxy mode the client reached the gateway through (`ReverseMode`, `RegularMode`, ...)."""
    return type(getattr(flow.client_conn, "proxy_mode", None)).__name__


def refused(flow: http.HTTPFlow) -> bool:
    """The gateway answered this flow itself (a refusal or an error)."""
    return bool(flow.metadata.get(Meta.REFUSED))


# --- parsed messages --------------------------------------------------------


def set_request_body(flow: http.HTTPFlow, body: Body | None) -> None:
    if body is None:
        _bodies.pop(flow, None)
    else:
        _bodies[flow] = body


def request_body(flow: http.HTTPFlow) -> Body | None:
    """The request's parsed JSON-RPC messages, after every stage (None for GET/DELETE or a body-less request)."""
    return _bodies.get(flow)


def set_response_body(flow: http.HTTPFlow, body: Body | None) -> None:
    if body is None:
        _response_bodies.pop(flow, None)
    else:
        _response_bodies[flow] = body


def response_body(flow: http.HTTPFlow) -> Body | None:
    """The parsed JSON-RPC messages of a buffered application/json response, after every stage."""
    return _response_bodies.get(flow)


def set_upstream_credential(flow: http.HTTPFlow, header: str, value: str) -> None:
    _credentials[flow] = (header.lower(), value)


def upstream_credential(flow: http.HTTPFlow) -> tuple[str, str] | None:
    return _credentials.get(flow)


def asked(flow: http.HTTPFlow) -> dict[Any, Message]:
    """Request id -> the client's request on this flow, so an answer knows what it answers."""
    body = _bodies.get(flow)
    if body is None:
        return {}
    return {m.id: m for m in body.messages if m.kind == Kind.REQUEST and m.id is not None}


# --- headers ----------------------------------------------------------------------

_header_maps: dict[int, tuple[tuple, dict[str, str]]] = {}  # id(fields) -> (fields, map); holds `fields`
_HEADER_MAPS_MAX = 1024  # header versions remembered (a few per flow in flight)


def header(headers: http.Headers, name: str, default: str | None = None) -> str | None:
    """`headers.get(name, default)` for a lowercase ASCII `name`, from a map built once per
    version of the headers (mitmproxy's own lookup scans and decodes every field each time,
    and a flow's headers are read a few dozen times). Any change to headers replaces their
    `fields` tuple, so a changed set gets a new map; the cache holds each tuple it maps, so
    an id is never reused while it is cached."""
    fields = headers.fields
    known = _header_maps.get(id(fields))
    if known is None or known[0] is not fields:
        values: dict[str, list[str]] = {}
        for key, value in fields:
            values.setdefault(key.lower().decode("utf-8", "surrogateescape"), []).append(
                value.decode("utf-8", "surrogateescape"))
        known = (fields, {key: ", ".join(v) for key, v in values.items()})  # folded, like Headers.get
        if len(_header_maps) >= _HEADER_MAPS_MAX:
            _header_maps.clear()
        _header_maps[id(fields)] = known
    return known[1].get(name, default)


# --- who, and the stages passed ----------------------------------------------


_identities: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[dict[str, Any], Identity]] = weakref.WeakKeyDictionary()


def identity(flow: http.HTTPFlow) -> Identity:
    """The caller, read from the flow's identity claims (built once per flow while the claims stay the same)."""
    claims = flow.metadata.get(Meta.IDENTITY)
    if not isinstance(claims, dict):
        return Identity.from_claims(claims)
    known = _identities.get(flow)
    if known is not None and known[0] == claims:
        return known[1]
    ident = Identity.from_claims(claims)
    _identities[flow] = (dict(claims), ident)
    return ident


def context(flow: http.HTTPFlow, masking_profiles: frozenset[str] = frozenset(), approvals: bool = False) -> Context:
    """What the message stages know about this flow besides each message."""
    return Context(
        identity=identity(flow),
        upstream=flow.metadata.get(Meta.UPSTREAM),
        session=header(flow.request.headers, "mcp-session-id"),
        flow_id=flow.id,
        http_method=flow.request.method,
        protocol_version=header(flow.request.headers, "mcp-protocol-version"),
        masking_profiles=masking_profiles,
        mask_profiles=tuple((flow.metadata.get(Meta.MASK) or {}).get("profiles") or ()),
        approvals=approvals,
    )


def mark_stage(flow: http.HTTPFlow, stage: StageName | str) -> None:
    stages = flow.metadata.setdefault(Meta.STAGES, [])
    if stage not in stages:
        stages.append(str(stage))


def mark_stages(flow: http.HTTPFlow, names: tuple[str, ...]) -> None:
    """`mark_stage` for each of `names` (plain strings)."""
    stages = flow.metadata.setdefault(Meta.STAGES, [])
    for name in names:
        if name not in stages:
            stages.append(name)


def passed(flow: http.HTTPFlow, stage: StageName | str) -> bool:
    return stage in flow.metadata.get(Meta.STAGES, ())


# --- decisions and what people see ------------------------------------------


def add_decision(flow: http.HTTPFlow, **decision: Any) -> None:
    """Append one decision (allow/deny/mask/approve/filter/drop/error) and refresh the annotation."""
    flow.metadata.setdefault(Meta.DECISIONS, []).append(
        {k: (str(v) if isinstance(v, (StageName, Action, Direction)) else v)
         for k, v in decision.items() if v is not None}
    )
    annotate(flow)


def record(flow: http.HTTPFlow, m: Message, verdicts: Iterable[Verdict], **extra: Any) -> None:
    """Append a stage's verdicts on message `m`; beyond MAX_RECORDED decisions, allows are only counted."""
    for v in verdicts:
        if v.action == Action.ALLOW and len(flow.metadata.get(Meta.DECISIONS, ())) >= MAX_RECORDED:
            state = mcp_state(flow)
            state["unrecorded_allows"] = state.get("unrecorded_allows", 0) + 1
            continue
        flow.metadata.setdefault(Meta.DECISIONS, []).append({**v.record(m), **extra})
        if isinstance(v.extra.get("approval"), dict):
            # The approval stage's account of the hold: id, status, who asked, who decided, how long it waited.
            flow.metadata[Meta.APPROVAL] = {**(flow.metadata.get(Meta.APPROVAL) or {}), **v.extra["approval"]}
        elif v.action == Action.APPROVE and m.direction != Direction.S2C:
            # No approval held it (no approvers, or no approval stage): the call is answered APPROVAL_REQUIRED.
            approval = flow.metadata.setdefault(Meta.APPROVAL, {"rule": v.rule, "status": "pending-workflow",
                                                                "ids": []})
            if m.id is not None and m.id not in approval.setdefault("ids", []):
                approval["ids"].append(m.id)
        pin = v.extra.get("pin")
        if isinstance(pin, dict) and pin.get("item") and (pin.get("status") or pin.get("finding")):
            # A changed or suspicious tool definition: named on the listing in mitmweb.
            pins = flow.metadata.setdefault(Meta.PINS, [])
            what = pin.get("status") or (pin.get("finding") or {}).get("check")
            entry = f"{pin.get('kind', 'tool')} {pin['item']} {what}"
            if entry not in pins and len(pins) < 20:
                pins.append(entry)
        if v.action == Action.MASK and v.extra.get("profile"):
            mask = flow.metadata.setdefault(Meta.MASK, {"profile": v.extra["profile"], "rule": v.rule, "profiles": []})
            if v.extra["profile"] not in mask["profiles"]:
                mask["profiles"].append(v.extra["profile"])
    annotate(flow)


# Marks are emoji short codes (mitmproxy's vocabulary) whose glyphs are plain text symbols,
# so they read without an emoji font, in mitmweb and in the console alike.
MARKS = {
    Action.ERROR: ":warning:",  # ⚠
    Action.DENY: ":heavy_multiplication_x:",  # ✖
    Action.APPROVE: ":point_up:",  # ☝ (a person must decide)
    Action.MASK: ":black_small_square:",  # ▪
}
_RANK = {action: rank for rank, action in enumerate(MARKS)}  # most severe first


def _bears_on_call(d: dict[str, Any]) -> bool:
    """Whether a decision is about the call the flow carries, rather than about a side message.

    The client's own messages, and anything that stopped, failed or changed the
    answer (an error, a refused or masked result) are; a server notification or
    request dropped from the stream (progress, a denied elicitation) and list
    filtering are not: the call itself still got its answer.
    """
    if d.get("direction") != Direction.S2C:
        return True
    action = d.get("action")
    if action == Action.ERROR:
        return True
    return d.get("kind") in (Kind.RESPONSE, Kind.ERROR) and action in (Action.DENY, Action.APPROVE, Action.MASK)


class Headline:
    """What `annotate` has read of a flow's decisions: the decision the label names, and the
    count of side decisions (on server messages) that were not allow.

    The label names the first of the most severe decisions on the call itself
    (see `_bears_on_call`), else the last decision on the call. A long event
    stream adds hundreds of decisions, each followed by `annotate`: reading
    only the new ones keeps that linear. Decisions are only ever appended; a
    list replaced or cut is read again from the start.
    """

    __slots__ = ("decisions", "count", "tail", "best", "rank", "last", "side")

    def __init__(self, decisions: list[dict[str, Any]]):
        self.decisions = decisions
        self.count = 0
        self.tail: dict[str, Any] | None = None  # the last decision read, to notice a list rewritten in place
        self.best: dict[str, Any] | None = None
        self.rank: int | None = None
        self.last: dict[str, Any] | None = None
        self.side = 0

    def stale(self, decisions: list[dict[str, Any]]) -> bool:
        return (decisions is not self.decisions or self.count > len(decisions)
                or (self.count > 0 and decisions[self.count - 1] is not self.tail))

    def read(self) -> tuple[dict[str, Any] | None, int]:
        for d in self.decisions[self.count:]:
            if not _bears_on_call(d):
                if d.get("action") not in (Action.ALLOW, None):
                    self.side += 1
                continue
            self.last = d
            rank = _RANK.get(d.get("action"))
            if rank is not None and (self.rank is None or rank < self.rank):
                self.best, self.rank = d, rank
        self.count = len(self.decisions)
        self.tail = self.decisions[-1] if self.decisions else None
        return (self.best or self.last), self.side


_headlines: weakref.WeakKeyDictionary[http.HTTPFlow, Headline] = weakref.WeakKeyDictionary()


def headline(decisions: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, int]:
    """The decision a label names, and the count of side decisions that were not allow (see Headline)."""
    return Headline(decisions).read()


def _flow_headline(flow: http.HTTPFlow) -> tuple[dict[str, Any] | None, int]:
    decisions = flow.metadata.get(Meta.DECISIONS, [])
    h = _headlines.get(flow)
    if h is None or h.stale(decisions):
        h = _headlines[flow] = Headline(decisions)
    return h.read()


def annotate(flow: http.HTTPFlow) -> None:
    """The one line for people in mitmweb: `flow.comment` (who: what -> decision [rule]) and a mark."""
    state = flow.metadata.get(Meta.MCP, {})
    summaries = state.get("request", [])
    parts = [summary_label(s) for s in summaries[:3]]
    if len(summaries) > 3:
        parts.append(f"(+{len(summaries) - 3} more)")
    line = ", ".join(parts) or flow.request.method
    d, side = _flow_headline(flow)
    if d is not None:
        line += f" -> {d.get('action')}"
        if d.get("rule"):
            line += f" [{d['rule']}]"
        if d.get("reason") and d.get("action") != Action.ALLOW:
            line += f": {d['reason']}"
    if side:
        line += f" ({side} server message{'s' if side != 1 else ''} filtered or dropped)"
    pins = flow.metadata.get(Meta.PINS)
    if pins:
        line += f" [pins: {', '.join(pins[:5])}{' ...' if len(pins) > 5 else ''}]"
    who = identity(flow).who
    if who:
        line = f"{who}: {line}"
    flow.comment = line
    flow.marked = MARKS.get(d.get("action") if d else None, "")


def elapsed_ms(flow: http.HTTPFlow) -> float | None:
    t0 = flow.metadata.get(Meta.STARTED)
    return None if t0 is None else round((time.monotonic() - t0) * 1000, 3)
