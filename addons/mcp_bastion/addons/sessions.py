"""
Sessions: an MCP session belongs to the identity that created it.

A 2025-era server names a session by the id it handed out (`Mcp-Session-Id`,
or the `session_id` of an HTTP+SSE message endpoint), and will serve anyone who
presents it. This addon binds each session id the upstream hands out to the
caller it was handed to (`core.sessions`), and refuses a request that presents a
session id bound to someone else, or one the gateway never saw created (a
forged or stale id). Both get the same answer, 404 as the MCP transport says for
a session the server does not know, so the client starts a new session and no
caller learns whether another's session exists. A DELETE by its owner ends it.
"""

from __future__ import annotations

import logging

from mitmproxy import http

from mcp_bastion.core import errors
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.sessions import IDLE_TTL, MAX_SESSIONS, SessionBindings, owner_of
from mcp_bastion.core.state import Backend, Hub
from mcp_bastion.core.vocab import Action, StageName
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.failclosed import fail_closed
from mcp_bastion.glue.replies import refuse
from mcp_bastion.glue.stream import SSEStream

logger = logging.getLogger("mcp_bastion")

HEADER = "mcp-session-id"


def presented(flow: http.HTTPFlow) -> str | None:
    """The session id a request presents: the header, or an HTTP+SSE endpoint's `session_id`."""
    sid = fs.header(flow.request.headers, HEADER)
    if sid is None and "?" in flow.request.path:
        values = flow.request.query.get_all("session_id")
        sid = values[0] if values else None
    return sid


class Sessions:
    name = StageName.SESSION

    def __init__(self, hub: Hub | None = None) -> None:
        self.bindings: SessionBindings

        def build(backend: Backend) -> None:
            self.bindings = SessionBindings(table=backend.table("sessions", idle_ttl=IDLE_TTL, max_items=MAX_SESSIONS))

        (hub or Hub()).watch(build)

    @fail_closed(StageName.SESSION)
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not fs.is_mcp(flow):
            return
        sid = presented(flow)
        if sid is not None:
            verdict = self.bindings.check(sid, owner_of(fs.identity(flow)))
            if not verdict.ok:
                logger.info("mcp-bastion: refused session %r on %s (%s)", sid[:16], flow.request.path, verdict.reason)
                refuse(flow, Refusal(404, errors.FORBIDDEN, "session not found: start a new session",
                                     {"reason": "session"}), stage=StageName.SESSION, action=Action.DENY)
                return
        fs.mark_stage(flow, StageName.SESSION)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not fs.is_mcp(flow) or fs.refused(flow) or flow.response is None:
            return
        owner = owner_of(fs.identity(flow))
        sid = fs.header(flow.response.headers, HEADER)
        if sid is not None and 200 <= flow.response.status_code < 300 and presented(flow) is None:
            if not self.bindings.bind(sid, owner):  # the upstream handed out a session someone else holds
                logger.error("mcp-bastion: upstream reused session id %r for another identity", sid[:16])
                flow.response.headers.pop(HEADER)
        if isinstance(flow.response.stream, SSEStream):
            flow.response.stream.on_endpoint.append(
                lambda _flow, legacy: legacy is not None and self.bindings.bind(legacy, owner))
        if (flow.request.method == "DELETE" and 200 <= flow.response.status_code < 300
                and (sid := presented(flow)) is not None):
            self.bindings.end(sid, owner)


