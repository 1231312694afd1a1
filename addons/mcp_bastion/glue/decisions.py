"""
A finished flow's decisions, one entry per message: what the decision log, the console line and the
traces say (the same per-message view the audit log records, from `core.audit.build_records`).
"""

from __future__ import annotations

import weakref
from typing import Any

from mitmproxy import http

from mcp_bastion.core import audit
from mcp_bastion.core.vocab import Meta
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.recording.facts import flow_facts

FIELDS = ("time", "flow", "session", "subject", "groups", "client_id", "upstream", "direction", "kind", "method",
          "id", "tool", "resource", "prompt", "task", "target", "action", "rule", "stage", "reason", "status",
          "latency_ms", "error", "approval", "pins")
TARGETS = ("tool", "resource", "prompt", "task", "target")


_built: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[tuple, list[dict[str, Any]]]] = weakref.WeakKeyDictionary()


def records(flow: http.HTTPFlow, incomplete: str | None = None) -> list[dict[str, Any]]:
    """The per-message audit view of a finished flow (`core.audit.build_records`), built once however many
    readers there are (audit log, decision log, traces). The records are shared: readers must not change them."""
    if incomplete is not None:
        return audit.build_records(flow_facts(flow, incomplete))
    key = (len(flow.metadata.get(Meta.DECISIONS) or ()), flow.response.status_code if flow.response else None,
           flow.error.msg if flow.error else None, len(fs.mcp_state(flow).get("events") or ()))
    hit = _built.get(flow)
    if hit is not None and hit[0] == key:
        return hit[1]
    built = audit.build_records(flow_facts(flow))
    _built[flow] = (key, built)
    return built


def lines(flow: http.HTTPFlow) -> list[dict[str, Any]]:
    """The decision-log entries of a finished flow, one per message decision."""
    if not fs.is_mcp(flow) and not flow.metadata.get(Meta.DECISIONS):
        return []
    return [{k: r[k] for k in FIELDS if r.get(k) is not None} for r in records(flow)]


def console_line(entry: dict[str, Any]) -> str:
    who = entry.get("subject") or entry.get("client_id") or "anonymous"
    target = next((entry[k] for k in TARGETS if entry.get(k)), "")
    what = f"{entry.get('method') or entry.get('kind') or '?'} {target}".strip()
    if entry.get("direction") == "server_to_client":
        what = f"(server) {what}"
    line = f"{who}  {what}  -> {entry.get('action', 'forward')}"
    if entry.get("rule"):
        line += f" [{entry['rule']}]"
    if entry.get("action") not in ("allow", "forward", None) and entry.get("reason"):
        line += f": {str(entry['reason'])[:160]}"
    if entry.get("latency_ms") is not None:
        line += f"  {entry['latency_ms']:.0f} ms"
    if entry.get("error"):
        line += f"  ({str(entry['error'])[:80]})"
    return line


