"""
The gateway's own APIs on its MCP listener (`/bastion/approvals`, `/bastion/pins`): claiming a flow as an
API call (not MCP traffic: no message stage applies) and answering it, whatever happens, with JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mitmproxy import http

from mcp_bastion.core.vocab import Meta
from mcp_bastion.glue import replies

logger = logging.getLogger("mcp_bastion")


def under(flow: http.HTTPFlow, prefix: str) -> bool:
    path = flow.request.path.split("?", 1)[0]
    return path == prefix or path.startswith(prefix + "/")


def claim(flow: http.HTTPFlow, prefix: str, what: str) -> None:
    """In `requestheaders`, after Auth: a call under `prefix` is this API's, answered in `request`."""
    if under(flow, prefix) and not (flow.response or flow.error):
        flow.metadata.pop(Meta.MCP, None)
        flow.metadata[Meta.API] = True
        flow.comment = f"{what} (served by mcp-bastion)"


def serve(flow: http.HTTPFlow, prefix: str, what: str, handler: Callable[[http.HTTPFlow], None],
          nothing_done: str) -> None:
    """In `request`: answer a claimed call with `handler`; an exception is a 500 saying `nothing_done`."""
    if not under(flow, prefix) or not flow.metadata.get(Meta.API) or flow.response or flow.error or not flow.live:
        return  # not this API's call, or Auth refused its token (401)
    try:
        handler(flow)
    except Exception as e:  # an API call is answered, whatever happens
        logger.error("mcp-bastion: %s failed on %s: %r", what, flow.request.path, e, exc_info=e)
        replies.document(flow, 500, {"error": f"the {what} failed; {nothing_done}"})
