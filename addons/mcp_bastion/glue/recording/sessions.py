"""Who a flow belongs to, and which MCP session: the names of recordings and the `session` of audit records."""

from __future__ import annotations

import re
import time

from mitmproxy import http

from mcp_bastion.core.vocab import Meta, StageName
from mcp_bastion.glue import flowstate as fs

_UNSAFE = re.compile(r"[^A-Za-z0-9.@-]+")


def subject_of(flow: http.HTTPFlow) -> str | None:
    ident = flow.metadata.get(Meta.IDENTITY)
    sub = ident.get("sub") if isinstance(ident, dict) else None
    return sub if isinstance(sub, str) and sub else None


def session_of(flow: http.HTTPFlow) -> str | None:
    """The MCP session a flow belongs to, if the transport has one.

    `Mcp-Session-Id` from the request, or from the response (the initialize
    POST learns it there); for the older HTTP+SSE transport the `session_id`
    query parameter of the message URL, or the one announced in the stream's
    `endpoint` event (`Meta.LEGACY_SESSION`, set by the Gateway).
    """
    sid = fs.header(flow.request.headers, "mcp-session-id") or (
        flow.request.query.get("session_id") if "?" in flow.request.path else None)
    if sid and flow.metadata.get(Meta.REFUSED) and StageName.SESSION not in flow.metadata.get(Meta.STAGES, ()):
        # Refused before the session was found to be this caller's (forged, stale, another's, or no
        # valid token): not filed under that session, so nobody can write into another's recording.
        return None
    if not sid and flow.response is not None:
        sid = fs.header(flow.response.headers, "mcp-session-id")
    if not sid and "?" in flow.request.path:
        sid = flow.request.query.get("session_id")
    if not sid:
        sid = flow.metadata.get(Meta.LEGACY_SESSION)
    return sid or None


def session_key(flow: http.HTTPFlow) -> str:
    """What a flow's recording and audit records are grouped under.

    The session id where the transport has one (2025 era). The 2026-07-28 wire has
    no sessions: a caller's flows are grouped per UTC day (`day-YYYY-MM-DD`; the
    recording's file name carries the caller). Otherwise (a 2025 server without
    sessions) the client connection: `conn-<id>`.
    """
    sid = session_of(flow)
    if sid:
        return sid
    state = flow.metadata.get(Meta.MCP)
    if isinstance(state, dict) and state.get("era") == "2026":
        started = flow.request.timestamp_start or time.time()
        return "day-" + time.strftime("%Y-%m-%d", time.gmtime(started))
    return f"conn-{flow.client_conn.id}"


def safe_name(text: str, limit: int = 64) -> str:
    """`text` as a piece of a file name: no path separators, no leading dots, at most `limit` characters."""
    return _UNSAFE.sub("-", text).strip("-.")[:limit] or "x"
