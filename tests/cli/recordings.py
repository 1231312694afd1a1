"""Session recordings made up for the command tests: flows as the Recorder writes them (metadata included)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mitmproxy import http, io
from mitmproxy.test import tflow

T0 = 1_790_000_000.0  # a fixed start (2026-09-21), so the timeline's times do not depend on today


def call_flow(msg_id: int, tool: str, *, upstream: str = "http://127.0.0.1:9000/mcp", subject: str | None = "alice",
              action: str = "allow", rule: str = "engineering-read", reason: str | None = None,
              arguments: dict[str, Any] | None = None, at: float = 0.0, extra: dict[str, Any] | None = None,
              answered: bool = True) -> http.HTTPFlow:
    """One recorded tools/call with its JSON answer and the decision the gateway made."""
    body = {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments or {}}}
    f = tflow.tflow(req=http.Request.make("POST", upstream, json.dumps(body),
                                          {"content-type": "application/json",
                                           "accept": "application/json, text/event-stream",
                                           "mcp-session-id": "sess-1"}))
    f.request.timestamp_start = T0 + at
    answer = ({"jsonrpc": "2.0", "id": msg_id, "result": {"content": [{"type": "text", "text": "ok"}]}}
              if action in ("allow", "mask") else
              {"jsonrpc": "2.0", "id": msg_id, "error": {"code": -31001, "message": reason or "denied"}})
    f.response = http.Response.make(200, json.dumps(answer), {"content-type": "application/json"})
    f.response.timestamp_start = f.response.timestamp_end = T0 + at + 0.012
    if not answered:
        f.response = None
    decision = {"stage": "policy", "direction": "client_to_server", "id": msg_id, "method": "tools/call",
                "action": action, "rule": rule, **({"reason": reason} if reason else {})}
    f.metadata.update({
        "bastion.mcp": {"request": [{"kind": "request", "method": "tools/call", "id": msg_id, "tool": tool}],
                        "response": [{"kind": "response" if "result" in answer else "error", "id": msg_id}]},
        "bastion.identity": {"sub": subject, "groups": ["engineering"]} if subject else None,
        "bastion.upstream": "127.0.0.1:9000",
        "bastion.decisions": [decision],
        "bastion.record": {"session": "sess-1", "latency_ms": 12.0},
    })
    if action not in ("allow", "mask"):
        f.metadata["bastion.refused"] = True
    f.metadata.update(extra or {})
    return f


def session(subjects: tuple[str, ...] = ("alice",)) -> list[http.HTTPFlow]:
    """A session with long tool names, long rule ids and long details: what makes a narrow table hard."""
    flows = []
    for i in range(6):
        who = subjects[i % len(subjects)]
        flows.append(call_flow(i + 1, ["lookup_customer", "search_logs_across_every_region", "deploy"][i % 3],
                               subject=who, at=i * 0.1, arguments={"i": i}))
    flows.append(call_flow(7, "drop_table", subject=subjects[0], action="deny", rule="no-drop-table-in-production",
                           reason="irreversible; schema changes go through the migration pipeline, never MCP",
                           at=0.7))
    flows.append(call_flow(8, "deploy", subject=subjects[-1], action="approve", rule="engineering-deploy-prod",
                           reason="production deploys need a second engineer", at=0.8,
                           extra={"bastion.approval": {"ids": [8], "rule": "engineering-deploy-prod",
                                                       "status": "pending-workflow"}}))
    return flows


def write(flows: list[http.HTTPFlow], path: Path) -> Path:
    with open(path, "wb") as fo:
        w = io.FlowWriter(fo)
        for f in flows:
            w.add(f)
    return path
