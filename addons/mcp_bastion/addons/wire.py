"""
The Wire stage: a 2026-07-28 request's headers must say what its body says.

A message stage, first in the Pipeline: before any rule reads the body, it
refuses a request whose `MCP-Protocol-Version` header and `_meta` protocol
version disagree, or whose `Mcp-Method`, `Mcp-Name` or `Mcp-Param-*` headers do
not match the body (400, `-32020` HeaderMismatch; see `core.wire`). An upstream
that dispatches on a header then runs exactly what the gateway checked. On the
way back it learns, from each `tools/list` answer, which `Mcp-Param-*` headers
each tool declares.
"""

from __future__ import annotations

from mcp_bastion.core import errors
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.message import Message
from mcp_bastion.core.pipeline import Context, Outcome, Pass, Refuse, Verdict
from mcp_bastion.core.vocab import Action, Direction, Kind, StageName
from mcp_bastion.core.wire import Mismatch, ParamHeaders, check_headers, era, request_version


class Wire:
    name = StageName.WIRE

    def __init__(self) -> None:
        self.params = ParamHeaders()

    def check(self, m: Message, cx: Context) -> Outcome:
        if m.direction == Direction.S2C:
            if m.kind == Kind.RESPONSE and (m.answers == "tools/list" or m.answers is None):
                self.params.learn(cx.upstream, m.params)
            return Pass()
        if m.kind not in (Kind.REQUEST, Kind.NOTIFICATION):
            return Pass()
        try:
            era(cx.protocol_version, request_version(m))
            check_headers(m, m.headers, self.params, cx.upstream)
        except Mismatch as e:
            refusal = Refusal(400, errors.HEADER_MISMATCH, f"request refused: {e}", {"reason": "header_mismatch"})
            return Refuse(refusal, (Verdict(StageName.WIRE, Action.DENY, None, str(e)),))
        return Pass()
