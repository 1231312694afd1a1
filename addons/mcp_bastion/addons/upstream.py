"""
UpstreamCheck: a JSON error instead of mitmproxy's HTML page when the upstream cannot be reached.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import ctx, http

from mcp_bastion.core import errors
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.vocab import Action, Meta, StageName
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.failclosed import fail_closed
from mcp_bastion.glue.replies import refuse

logger = logging.getLogger("mcp_bastion")

PROBE_TIMEOUT = 10.0  # seconds UpstreamCheck waits for a TCP connection to the upstream


class UpstreamCheck:
    """Answers a JSON error instead of mitmproxy's HTML page when the upstream cannot be reached.

    mitmproxy reports a failed upstream connection with its own HTML 502 page,
    and no hook can replace it: the connection is attempted after the last
    request hook, and the error hook runs when the page is already decided.
    So, before the first request of each client connection is forwarded,
    this addon opens (and closes) a TCP connection to the upstream itself; if
    that fails the client gets a JSON-RPC error with the request's id.
    Later requests on the same client connection are not checked again while
    its connection to the upstream stays open: once the upstream closes it (it
    may have died) or a flow on it fails, the next request is checked again.
    Sits after the Gate, so only requests that will be forwarded are checked.
    Forces `connection_strategy=lazy`: with the
    default (eager) a dead upstream in reverse mode makes mitmproxy drop the
    client's connection before it has read a request.
    """

    def __init__(self) -> None:
        # client connection id -> the (host, port) upstreams reached from it (by id: a disconnect forgets its
        # own entries without a pass over every other connection's)
        self._reachable: dict[str, set[tuple[str, int]]] = {}

    def running(self) -> None:
        self._lazy()

    def configure(self, updated: set[str]) -> None:
        if "connection_strategy" in updated:
            self._lazy()

    def _lazy(self) -> None:
        if ctx.options.connection_strategy != "lazy":
            ctx.options.connection_strategy = "lazy"

    @fail_closed(StageName.UPSTREAM)
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not fs.is_mcp(flow):
            return
        if fs.mode_name(flow) not in ("ReverseMode", "RegularMode") or flow.server_conn.via:
            return  # not a direct connection to the upstream: nothing this check could predict
        if Meta.HELD in flow.metadata:
            return  # held for approval: the holding server reaches the upstream once approved, or says why not
        target = (flow.request.host, flow.request.port)
        if target in self._reachable.get(flow.client_conn.id, ()):
            return
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(flow.request.host, flow.request.port), PROBE_TIMEOUT
            )
        except (TimeoutError, OSError) as e:
            # The address and the OS error go to the log, not to the client.
            logger.warning("mcp-bastion: upstream %s unreachable: %s", flow.metadata.get(Meta.UPSTREAM),
                           str(e) or type(e).__name__)
            refuse(
                flow,
                Refusal(502, errors.UPSTREAM_ERROR, "mcp-bastion could not reach the upstream MCP server",
                        {"reason": "upstream_unreachable"}),
                stage=StageName.UPSTREAM,
                action=Action.ERROR,
            )
            return
        writer.close()
        if flow.client_conn.connected:  # a client gone meanwhile has had its client_disconnected already
            self._reachable.setdefault(flow.client_conn.id, set()).add(target)

    def error(self, flow: http.HTTPFlow) -> None:
        self._reachable.get(flow.client_conn.id, set()).discard((flow.request.host, flow.request.port))

    def server_disconnected(self, data) -> None:
        """The upstream closed a connection: the next request on that client connection is checked again."""
        client = getattr(data, "client", None)
        if client is not None:
            self._reachable.pop(client.id, None)

    def client_disconnected(self, client) -> None:
        self._reachable.pop(client.id, None)
