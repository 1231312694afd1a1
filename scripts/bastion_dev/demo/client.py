"""
The demo's scripted MCP client: one session per user through the gateway,
each step recorded as a row (what was asked, what came back).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from mcp_bastion.core.errors import APPROVAL_REQUIRED

STEPS: list[tuple[str, dict[str, Any]]] = [
    ("lookup_customer", {"query": "c-1001"}),
    ("read_file", {"path": "/srv/app/README.md"}),
    ("read_file", {"path": "/etc/ssl/private/deploy.pem"}),
    ("search_logs", {"query": "card"}),
    ("deploy", {"service": "billing-api", "env": "staging"}),
    ("deploy", {"service": "billing-api", "env": "prod"}),
    ("drop_table", {"table": "invoices"}),
    ("ｄｒｏｐ＿ｔａｂｌｅ", {"table": "invoices"}),  # full-width letters: the same tool to the rules
]


@dataclass
class Row:
    user: str
    call: str
    outcome: str  # "ok", "denied", "held" (waiting for approval), "error", "refused"
    detail: str


def _text(result: Any) -> str:
    parts = []
    for item in getattr(result, "content", None) or []:
        text = getattr(item, "text", None)
        if text is not None:
            try:  # a JSON record on one line, so the table shows its fields (masked ones included)
                text = json.dumps(json.loads(text), ensure_ascii=False)
            except ValueError:
                pass
        parts.append(text or f"<{getattr(item, 'type', '?')}>")
    if getattr(result, "structured_content", None) and not parts:
        parts.append(str(result.structured_content))
    return "\n".join(parts)


async def run_session(url: str, user: str, token: str | None) -> list[Row]:
    """Connect as `user` (bearer `token`), list tools, then run every step; never raises for a refusal."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    rows: list[Row] = []
    try:
        async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
            async with Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
                tools = await client.list_tools()
                names = sorted(t.name for t in tools.tools)
                rows.append(Row(user, "tools/list", "ok", ", ".join(names) or "(none visible)"))
                for tool, args in STEPS:
                    label = f"{tool}({', '.join(f'{v}' for v in args.values())})"
                    try:
                        result = await client.call_tool(tool, args)
                    except MCPError as e:
                        outcome = "held" if e.error.code == APPROVAL_REQUIRED else "denied"
                        rows.append(Row(user, label, outcome, f"{e.error.code}: {e.error.message}"))
                        continue
                    outcome = "error" if getattr(result, "is_error", False) else "ok"
                    rows.append(Row(user, label, outcome, _text(result)))
    except Exception as e:  # the gateway refused the session itself (401, 403, ...)
        rows.append(Row(user, "connect", "refused", _describe(e)))
    return rows


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"
