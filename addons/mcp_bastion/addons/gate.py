"""
The last word before a flow leaves the gateway.

mitmproxy logs an addon's exception and carries on with the flow. `fail_closed`
already turns an exception inside a hook into a refusal; the Gate is the second
line: a claimed MCP request goes upstream only if every enforcement stage that
the loaded addons declare (`request_stage`) has marked it, and a buffered
response reaches the client only if every `response_stage` has. Anything else
is refused, so a stage that crashed, was skipped or was unloaded cannot turn
into a bypass.
"""

from __future__ import annotations

import logging

from mitmproxy import ctx, http
from mitmproxy.addonmanager import traverse

from mcp_bastion.glue import flowstate as fs
from mcp_bastion.core import errors
from mcp_bastion.core.errors import Refusal

logger = logging.getLogger("mcp_bastion")


class Gate:
    def __init__(self) -> None:
        self._stages: tuple[list[str], list[str]] | None = None

    def configure(self, updated: set[str]) -> None:
        self._stages = None  # the chain may have changed (script reload)

    def stages(self) -> tuple[list[str], list[str]]:
        if self._stages is None:
            req, resp = [], []
            for addon in traverse(ctx.master.addons.chain):
                if addon is self:
                    continue
                if getattr(addon, "request_stage", None):
                    req.append(addon.request_stage)
                if getattr(addon, "response_stage", None):
                    resp.append(addon.response_stage)
            self._stages = (req, resp)
        return self._stages

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        if flow.metadata.get("bastion.passthrough"):
            return
        required, _ = self.stages()
        missing = [s for s in required if not fs.passed(flow, s)] if fs.is_mcp(flow) else ["claim"]
        if missing:
            logger.error("mcp-bastion: refusing %s: enforcement stages not passed: %s", flow.request.pretty_url, missing)
            fs.refuse(
                flow,
                Refusal(500, errors.GATEWAY_ERROR, "mcp-bastion could not complete its checks; the request was not forwarded",
                        {"missing": missing}),
                stage="gate",
                action="error",
            )

    def response(self, flow: http.HTTPFlow) -> None:
        if not fs.is_mcp(flow) or flow.metadata.get("bastion.refused") or flow.response is None:
            return
        _, required = self.stages()
        missing = [s for s in required if not fs.passed(flow, s)]
        if missing:
            logger.error("mcp-bastion: withholding response of %s: stages not passed: %s", flow.request.pretty_url, missing)
            fs.refuse(
                flow,
                Refusal(502, errors.GATEWAY_ERROR, "mcp-bastion could not check the upstream's answer; it was withheld",
                        {"missing": missing}),
                stage="gate",
                action="error",
            )
