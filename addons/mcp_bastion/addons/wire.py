"""
The Wire stage: a 2026-07-28 request's headers must say what its body says.

A message stage, first in the Pipeline: before any rule reads the body, it
refuses a request whose `MCP-Protocol-Version` header and `_meta` protocol
version disagree, or whose `Mcp-Method`, `Mcp-Name` or `Mcp-Param-*` headers do
not match the body (400, `-32020` HeaderMismatch; see `core.wire`). An upstream
that dispatches on a header then runs exactly what the gateway checked. On the
way back it learns, from each `tools/list` answer, which `Mcp-Param-*` headers
each tool declares, and which caller each multi-round-trip `requestState` was
issued to: a retry carrying one issued to another caller (or never seen) is refused.
"""

from __future__ import annotations

import hashlib

from mcp_bastion.core import errors
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.message import Message
from mcp_bastion.core.pipeline import Context, Outcome, Pass, Refuse, Verdict
from mcp_bastion.core.sessions import IDLE_TTL as STATE_TTL
from mcp_bastion.core.sessions import MAX_SESSIONS, SessionBindings, owner_of
from mcp_bastion.core.state import Backend, Hub
from mcp_bastion.core.vocab import Action, Direction, Kind, StageName
from mcp_bastion.core.wire import (
    MAX_TOOLS,
    REMOVED_2026,
    Mismatch,
    ParamHeaders,
    check_headers,
    era,
    request_version,
    rewritten_params,
)


class Wire:
    name = StageName.WIRE

    def __init__(self, hub: Hub | None = None) -> None:
        self.params: ParamHeaders  # which Mcp-Param-* headers each tool declares
        self.states: SessionBindings  # requestState digest -> the identity it was issued to

        def build(backend: Backend) -> None:
            self.states = SessionBindings(table=backend.table("request_states", idle_ttl=STATE_TTL,
                                                              max_items=MAX_SESSIONS))
            # A client may list the tools through one replica and call through another.
            self.params = ParamHeaders(table=backend.table("param_headers", idle_ttl=STATE_TTL, max_items=MAX_TOOLS))

        (hub or Hub()).watch(build)

    def check(self, m: Message, cx: Context) -> Outcome:
        if m.carried:
            return Pass()  # carried inside a message this stage already read
        if m.direction == Direction.S2C:
            if m.kind == Kind.RESPONSE and (m.answers == "tools/list" or m.answers is None):
                self.params.learn(cx.upstream, m.params)
            state = m.params.get("requestState") if m.kind == Kind.RESPONSE and isinstance(m.params, dict) else None
            if isinstance(state, str):
                self.states.bind(_digest(state), owner_of(cx.identity))
            return Pass()
        if m.kind not in (Kind.REQUEST, Kind.NOTIFICATION):
            return Pass()
        try:
            modern = era(cx.protocol_version, request_version(m)) == "2026"
            check_headers(m, m.headers, self.params, cx.upstream)
        except Mismatch as e:
            refusal = Refusal(400, errors.HEADER_MISMATCH, f"request refused: {e}", {"reason": "header_mismatch"})
            return Refuse(refusal, (Verdict(StageName.WIRE, Action.DENY, None, str(e)),))
        if modern and m.kind == Kind.REQUEST and m.method in REMOVED_2026:
            gone = Refusal(404, errors.METHOD_NOT_FOUND, f"Method not found: {m.method} is not part of MCP 2026-07-28",
                           {"reason": "removed_method"})
            return Refuse(gone, (Verdict(StageName.WIRE, Action.DENY, None, "removed in 2026-07-28"),))
        state = m.params.get("requestState") if isinstance(m.params, dict) else None
        if state is not None and not (isinstance(state, str)
                                      and self.states.check(_digest(state), owner_of(cx.identity)).ok):
            # Issued to another caller, or never through this gateway: a retry may only carry the
            # state its own caller was given, or it would continue someone else's call.
            why = "a requestState this caller was not given"
            refusal = Refusal(403, errors.FORBIDDEN, f"request refused: {m.what()} carries {why}",
                              {"reason": "request_state"})
            return Refuse(refusal, (Verdict(StageName.WIRE, Action.DENY, None, why),))
        return Pass()

    def rewrite_headers(self, before: Message, after: Message, upstream: str | None) -> dict[str, str | None]:
        """Header changes that keep a request a stage rewrote in agreement with its headers."""
        return rewritten_params(before, after, self.params, upstream)


def _digest(state: str) -> str:
    return hashlib.sha256(state.encode("utf-8", "surrogatepass")).hexdigest()
