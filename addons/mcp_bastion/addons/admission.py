"""
Admission: new requests wait while a required writer (recording, audit) cannot write.

The Recorder and the AuditLog write after the exchange (they come after the
Gate, so they see what the client got); each reports its writes to a
`glue.writes.WriteHealth`. This addon sits before the Gate and refuses a new
request with 503 and Retry-After while any required writer is failing, so
nothing after the Gate ever refuses a request.
"""

from __future__ import annotations

from collections.abc import Sequence

from mitmproxy import http

from mcp_bastion.core.vocab import Action, StageName
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.failclosed import fail_closed
from mcp_bastion.glue.replies import refuse
from mcp_bastion.glue.writes import WriteHealth


class Admission:
    name = StageName.ADMISSION

    def __init__(self, writers: Sequence[WriteHealth]) -> None:
        self.writers = tuple(writers)

    @fail_closed(StageName.ADMISSION)
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not fs.is_mcp(flow):
            return
        for health in self.writers:
            refusal = health.refusal()
            if refusal is not None:
                refuse(flow, refusal, stage=StageName.ADMISSION, action=Action.ERROR)
                return
        fs.mark_stage(flow, StageName.ADMISSION)
