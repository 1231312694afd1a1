"""
An MCP content view for mitmweb and the mitmproxy console.

JSON-RPC bodies (a single message, a batch, or an event stream of them) are
shown one message at a time: a `#` header line with the message's kind,
method, id and tool/resource/prompt, then the message pretty-printed. For
event streams each event gets its own header (event type, SSE id) and
keep-alive comments are shown as such.

The view selects itself (`render_priority` 2, above mitmproxy's JSON view at
1) for request and response bodies of flows the gateway marked as MCP
(`bastion.mcp` in the flow's metadata, which recordings keep), and (priority
1.5) for any JSON or event-stream body that contains JSON-RPC 2.0, so
recordings opened without the bundle still look right:

    mitmweb -s addons/mcp_bastion/addons/contentview.py -r sessions/FILE.mitm
"""

from __future__ import annotations

import json
from typing import Any

from mitmproxy import contentviews, http
from mitmproxy.contentviews import Contentview, Metadata

from mcp_bastion.core.message import classify, summary_target
from mcp_bastion.core.sse import SSEParser
from mcp_bastion.core.vocab import Meta

MCP_METADATA = Meta.MCP
JSON_TYPES = ("application/json", "application/json-rpc")
SSE_TYPE = "text/event-stream"


def describe(obj: Any, asked: dict[Any, dict] | None = None) -> str:
    """`request · tools/call · id 3 · tool echo` for one decoded JSON-RPC value.

    `asked` maps the flow's request ids to their summaries, so that an answer
    names what it answers (`response · id 3 · to tools/call echo`).
    """
    msg = classify(obj)
    parts = [msg.kind]
    if msg.method:
        parts.append(msg.method)
    if msg.id is not None:
        parts.append(f"id {msg.id!r}" if isinstance(msg.id, str) else f"id {msg.id}")
    if msg.kind in ("response", "error") and asked and msg.id in asked:
        q = asked[msg.id]
        target = summary_target(q)
        parts.append(" ".join(str(x) for x in ("to", q.get("method"), target) if x))
    if msg.tool_name:
        parts.append(f"tool {msg.tool_name}")
    elif msg.prompt_name:
        parts.append(f"prompt {msg.prompt_name}")
    elif msg.resource_uri:
        parts.append(f"resource {msg.resource_uri}")
    if msg.kind == "error" and isinstance(msg.params, dict):
        parts.append(f"code {msg.params.get('code')}: {msg.params.get('message')}")
    elif msg.kind == "response" and isinstance(msg.params, dict) and msg.params.get("isError") is True:
        parts.append("isError")
    return " · ".join(str(p) for p in parts)


def render_json(value: Any, asked: dict[Any, dict] | None = None) -> list[str]:
    """Header and pretty JSON for a single message or each member of a batch."""
    if isinstance(value, list):
        out = [f"# batch of {len(value)}"]
        for i, item in enumerate(value, 1):
            out.append(f"# [{i}/{len(value)}] {describe(item, asked)}")
            out.append(json.dumps(item, indent=2, ensure_ascii=False))
        return out
    return [f"# {describe(value, asked)}", json.dumps(value, indent=2, ensure_ascii=False)]


def render_sse(data: bytes, asked: dict[Any, dict] | None = None) -> str:
    parser = SSEParser(max_event_bytes=max(len(data), 1))
    events = list(parser.feed(data))
    tail = parser.close()
    out: list[str] = []
    n = 0
    for ev in events:
        if not ev.has_data:
            comment = "; ".join(c.strip() for c in ev.comments) or "(empty)"
            retry = f" retry {ev.retry}" if ev.retry is not None else ""
            out.append(f"# ·· keep-alive{retry}: {comment}")
            continue
        n += 1
        head = f"# ── event {n}"
        if ev.event != "message":
            head += f" · event: {ev.event}"
        if ev.id is not None:
            head += f" · sse id {ev.id}"
        out.append(head)
        try:
            value = json.loads(ev.data)
        except ValueError:
            out.append(ev.data)
            continue
        out.extend(render_json(value, asked))
    if tail.strip():
        out.append(f"# ── unterminated tail ({len(tail)} bytes, discarded by clients)")
        out.append(tail.decode("utf-8", errors="replace"))
    if not out:
        out.append("# (no events)")
    return "\n".join(out) + "\n"


def _is_mcp_flow(metadata: Metadata) -> bool:
    return isinstance(metadata.flow, http.HTTPFlow) and MCP_METADATA in metadata.flow.metadata


def _asked(metadata: Metadata) -> dict[Any, dict]:
    """The flow's request summaries by id (from the gateway's metadata), for answers."""
    if not _is_mcp_flow(metadata) or metadata.http_message is metadata.flow.request:
        return {}
    state = metadata.flow.metadata[MCP_METADATA]
    summaries = state.get("request") if isinstance(state, dict) else None
    return {s["id"]: s for s in summaries or () if isinstance(s, dict) and "id" in s}


class MCPContentview(Contentview):
    """JSON-RPC messages of MCP traffic, one by one, with method, id and tool."""

    name = "MCP"
    syntax_highlight = "yaml"  # JSON is YAML; the `#` headers show as comments

    def prettify(self, data: bytes, metadata: Metadata) -> str:
        asked = _asked(metadata)
        if metadata.content_type == SSE_TYPE:
            return render_sse(data, asked)
        return "\n".join(render_json(json.loads(data), asked)) + "\n"

    def render_priority(self, data: bytes, metadata: Metadata) -> float:
        if not data or metadata.content_type not in (*JSON_TYPES, SSE_TYPE):
            return -1
        if _is_mcp_flow(metadata):
            return 2
        return 1.5 if b'"jsonrpc"' in data else -1


mcp_view = MCPContentview()


class ContentView:
    """Registers the MCP view with mitmproxy when the bundle (or this file as a script) loads."""

    observes = True  # reads finished flows, never changes them (glue.dispatch: a failure is only logged)

    def load(self, loader) -> None:
        contentviews.add(mcp_view)


addons = [ContentView()]
