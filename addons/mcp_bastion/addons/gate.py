"""
The last word before a flow leaves the gateway.

mitmproxy logs an addon's exception and carries on with the flow. `fail_closed`
already turns an exception inside a hook into a refusal; the Gate is the second
line: a claimed MCP request goes upstream only if every enforcement stage
`bundle()` put before it has marked it, and a buffered response reaches the
client only if every response stage has. The list is fixed when the bundle is
built, so a stage that crashed, was skipped or was unloaded cannot turn into a
bypass: its mark is missing and the flow is refused.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

from mitmproxy import http

from mcp_bastion.core import errors
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.vocab import Action, Direction, Meta, StageName
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.replies import refuse

logger = logging.getLogger("mcp_bastion")


class Gate:
    def __init__(self, request: Sequence[StageName], response: Sequence[StageName]) -> None:
        self.request_stages = tuple(request)
        self.response_stages = tuple(response)

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if flow.metadata.get(Meta.PASSTHROUGH):
            return
        missing = [str(s) for s in self.request_stages if not fs.passed(flow, s)] if fs.is_mcp(flow) else ["claim"]
        if (flow.metadata.get(Meta.APPROVAL) or {}).get("status") == "pending" and Meta.HELD not in flow.metadata:
            missing.append("approval")  # a call still waiting for a person goes nowhere but the holding server
        if missing:
            # Refuse first, then say so: nothing (not even a logging failure) may come between.
            _last_line(flow, Refusal(500, errors.GATEWAY_ERROR,
                                     "mcp-bastion could not complete its checks; the request was not forwarded",
                                     {"missing": missing}))
            with contextlib.suppress(Exception):
                logger.error("mcp-bastion: refused %s: enforcement stages not passed: %s",
                             flow.request.pretty_url, missing)

    def response(self, flow: http.HTTPFlow) -> None:
        if not fs.is_mcp(flow) or fs.refused(flow) or flow.response is None:
            return
        missing = [str(s) for s in self.response_stages if not fs.passed(flow, s)]
        if missing and callable(flow.response.stream):
            # An event stream is already sent; its SSEStream refused every event it could not put
            # through the stages, so the record keeps what the client got and says why.
            logger.error("mcp-bastion: event stream of %s ran without stages: %s", flow.request.pretty_url, missing)
            flow.metadata.setdefault(Meta.ERROR, f"gate: event stream without stages {missing}")
            fs.add_decision(flow, stage=StageName.GATE, direction=Direction.S2C, action=Action.ERROR,
                            reason=f"stages not passed: {', '.join(missing)}")
        elif missing:
            _last_line(flow, Refusal(502, errors.GATEWAY_ERROR,
                                     "mcp-bastion could not check the upstream's answer; it was withheld",
                                     {"missing": missing}))
            with contextlib.suppress(Exception):
                logger.error("mcp-bastion: withheld the response of %s: stages not passed: %s",
                             flow.request.pretty_url, missing)


def _last_line(flow: http.HTTPFlow, refusal: Refusal) -> None:
    """Answer `refusal`; if even that fails, kill the flow: the Gate never lets one through."""
    try:
        refuse(flow, refusal, stage=StageName.GATE, action=Action.ERROR)
    except Exception:
        flow.kill()
