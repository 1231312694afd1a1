"""
The gateway's own error answers: stable JSON-RPC error codes and JSON bodies.

Every refusal the gateway makes is readable by the client: a JSON-RPC error
carrying the request's id where there is one, or a small JSON object otherwise.
The gateway's own codes are stable (clients and dashboards may key on them)
and lie outside -32768..-32000, which JSON-RPC and MCP keep for themselves: no
MCP revision or SDK assigns them (the first wave's -32001..-32011 collided with
the SDKs' request timeout, 2025's "resource not found" and 2026 release
candidates). Where MCP itself names the condition (-32020 HeaderMismatch,
-32601 for a method a revision removed) the gateway answers with MCP's code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .jsonrpc import Body, dumps

# JSON-RPC standard codes
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INTERNAL_ERROR = -32603
METHOD_NOT_FOUND = -32601

# MCP's own codes the gateway answers with (2026-07-28)
HEADER_MISMATCH = -32020  # routing headers (Mcp-Method, Mcp-Name, Mcp-Param-*, protocol version) differ from the body

# mcp-bastion's own codes (stable; one table in the README)
DENIED = -31001  # a rule denied the message
APPROVAL_REQUIRED = -31002  # held for a human and not (yet) approved
REFUSED_INPUT = -31003  # ambiguous or oversized input refused before evaluation
UNAUTHENTICATED = -31004  # no or bad bearer token
FORBIDDEN = -31005  # token fine, scope or origin not allowed
GATEWAY_ERROR = -31010  # an enforcement step failed: the gateway failed closed
UPSTREAM_ERROR = -31011  # the upstream could not be reached or answered unreadably


@dataclass
class Refusal:
    """What the gateway answers instead of forwarding.

    `status` is the HTTP status; `code`/`message`/`data` form the JSON-RPC error.
    `headers` are extra response headers (WWW-Authenticate, ...).
    """

    status: int
    code: int
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def error_object(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data:
            err["data"] = self.data
        return err

    def body_for(self, ids: list[str | int] | None, batch: bool = False) -> bytes:
        """A JSON-RPC error for each request id; a bare error object when there is none."""
        err = self.error_object()
        if ids:
            items = [{"jsonrpc": "2.0", "id": i, "error": err} for i in ids]
            return dumps(items if batch else items[0])
        return dumps({"jsonrpc": "2.0", "id": None, "error": err})

    def body_for_parsed(self, body: Body | None) -> bytes:
        if body is None:
            return self.body_for(None)
        return self.body_for(body.request_ids, batch=body.batch)


def error_message(msg_id: str | int, code: int, message: str, data: dict | None = None) -> dict:
    """One JSON-RPC error response object (used to answer server-to-client requests)."""
    err: dict[str, Any] = {"code": code, "message": message}
    if data:
        err["data"] = data
    return {"jsonrpc": "2.0", "id": msg_id, "error": err}
