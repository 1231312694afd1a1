"""The MCP content view: automatic selection and rendering of single, batch and event-stream bodies."""

from __future__ import annotations

import json

from mitmproxy import contentviews
from mitmproxy.contentviews import Metadata
from mitmproxy.test import taddons, tflow

from mcp_bastion.addons.contentview import ContentView, mcp_view

CALL = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "deploy", "arguments": {"env": "prod"}}}
RESULT = {"jsonrpc": "2.0", "id": 3, "result": {"content": [{"type": "text", "text": "ok"}]}}


def flow(mcp: bool = True, ctype: str = "application/json", body: bytes = b"", response: bool = False):
    f = tflow.tflow(resp=True)
    msg = f.response if response else f.request
    msg.headers["content-type"] = ctype
    msg.content = body
    if mcp:
        f.metadata["bastion.mcp"] = {
            "request": [{"kind": "request", "id": 3, "method": "tools/call", "tool": "deploy"}]}
    return f


def render(f, response: bool = False, view: str = "auto"):
    with taddons.context(ContentView()):
        return contentviews.prettify_message(f.response if response else f.request, f, view)


def test_selected_automatically_for_mcp_flows_over_the_json_view():
    f = flow(body=json.dumps(CALL).encode())
    result = render(f)
    assert result.view_name == "MCP"
    assert result.text.startswith("# request · tools/call · id 3 · tool deploy\n")
    assert '"env": "prod"' in result.text


def test_selected_for_json_rpc_without_gateway_metadata_but_not_for_other_json():
    assert render(flow(mcp=False, body=json.dumps(CALL).encode())).view_name == "MCP"
    assert render(flow(mcp=False, body=b'{"a": 1}')).view_name == "JSON"


def test_priorities():
    md = lambda f, ct: Metadata(flow=f, content_type=ct, http_message=f.request)  # noqa: E731
    body = json.dumps(CALL).encode()
    assert mcp_view.render_priority(body, md(flow(), "application/json")) == 2
    assert mcp_view.render_priority(b"data: {}\n\n", md(flow(), "text/event-stream")) == 2
    assert mcp_view.render_priority(body, md(flow(mcp=False), "application/json")) == 1.5
    assert mcp_view.render_priority(b"<html>", md(flow(), "text/html")) < 0
    assert mcp_view.render_priority(b"", md(flow(), "application/json")) < 0


def test_answer_names_what_it_answers():
    f = flow(body=json.dumps(RESULT).encode(), response=True)
    assert render(f, response=True).text.startswith("# response · id 3 · to tools/call deploy\n")


def test_batch_members_each_get_a_header():
    batch = [CALL, {"jsonrpc": "2.0", "method": "notifications/initialized"},
             {"jsonrpc": "2.0", "id": "r1", "method": "resources/read", "params": {"uri": "file:///a"}}]
    text = render(flow(body=json.dumps(batch).encode())).text
    headers = [line for line in text.splitlines() if line.startswith("#")]
    assert headers == [
        "# batch of 3",
        "# [1/3] request · tools/call · id 3 · tool deploy",
        "# [2/3] notification · notifications/initialized",
        "# [3/3] request · resources/read · id 'r1' · resource file:///a",
    ]


def test_event_stream_shows_each_event_in_order():
    stream = (
        b": keep-alive\n\n"
        b"event: message\nid: 7\ndata: " + json.dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                                                       "params": {"progress": 1}}).encode() + b"\n\n"
        b"data: " + json.dumps({"jsonrpc": "2.0", "id": 5, "method": "sampling/createMessage"}).encode() + b"\n\n"
        b"data: " + json.dumps({"jsonrpc": "2.0", "id": 3, "error": {"code": -31001, "message": "denied"}}).encode()
        + b"\n\n"
        b"event: endpoint\ndata: /messages/?session_id=abc\n\n"
        b"data: {\"jsonrpc\":\"2.0\",\"id\":9,"  # cut off
    )
    f = flow(ctype="text/event-stream", body=stream, response=True)
    result = render(f, response=True)
    assert result.view_name == "MCP"
    headers = [line for line in result.text.splitlines() if line.startswith("#")]
    assert headers == [
        "# ·· keep-alive: keep-alive",
        "# ── event 1 · sse id 7",
        "# notification · notifications/progress",
        "# ── event 2",
        "# request · sampling/createMessage · id 5",
        "# ── event 3",
        "# error · id 3 · to tools/call deploy · code -31001: denied",
        "# ── event 4 · event: endpoint",
        "# ── unterminated tail (30 bytes, discarded by clients)",
    ]
    assert "/messages/?session_id=abc" in result.text


def test_unreadable_json_falls_back_to_raw_when_automatic():
    f = flow(body=b'{"jsonrpc": "2.0", "id": ')
    result = render(f)
    assert result.view_name == "Raw" and "failed to parse as MCP" in result.description


def test_registered_under_its_name_for_explicit_choice():
    f = flow(mcp=False, body=b'{"jsonrpc": "2.0", "method": "ping"}')
    with taddons.context(ContentView()):
        assert contentviews.registry["mcp"] is mcp_view
        result = contentviews.prettify_message(f.request, f, "mcp")
    assert result.view_name == "MCP" and result.text.startswith("# notification · ping")
