"""A tasks round over raw HTTP through the real gateway, with real tokens: a task is its creator's; and a
list a server marks `cacheScope: "public"` leaves the gateway, filtered, as `private`.

No real MCP server of the installed SDKs creates tasks over HTTP yet (the Python SDK 2.3 has the 2025 task
types only; the 2026 extension is not built in), so the upstream here is a small scripted HTTP server that
answers as a tasks-capable server does: a call carrying `params.task` creates task `t-1`, and `tasks/get` /
`tasks/result` report on it.
"""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from bastion_dev.issuer import DevIssuer

from harness import free_port, mitmdump_args, running

pytestmark = pytest.mark.e2e

RULES = """\
version: 1
default: deny
rules:
  - id: no-drop
    match: {tools: [drop_table]}
    action: deny
  - id: tasks-for-engineers
    match:
      groups: [engineering, contractors]
      methods: [tools/call, tools/list, tasks/get, tasks/result, tasks/cancel, tasks/list]
    action: allow
"""


class TasksUpstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        msg = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        self.seen.append(msg["method"])
        method, params = msg["method"], msg.get("params") or {}
        if method == "tools/call":
            result = {"task": {"taskId": "t-1", "status": "working", "ttl": 60000}}
        elif method == "tasks/get":
            result = {"taskId": params["taskId"], "status": "completed"}
        elif method == "tasks/result":
            result = {"content": [{"type": "text", "text": "exported 3 rows"}]}
        elif method == "tools/list":  # a server that lets shared caches keep its (unfiltered) list
            result = {"tools": [{"name": "export", "inputSchema": {"type": "object"}},
                                {"name": "drop_table", "inputSchema": {"type": "object"}}],
                      "cacheScope": "public", "ttlMs": 60000, "resultType": "complete"}
        elif method == "tasks/list":
            result = {"tasks": [{"taskId": "t-1", "status": "completed"}, {"taskId": "t-other", "status": "working"}]}
        else:
            result = {}
        body = json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def tasks_gateway(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), TasksUpstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/mcp"
    try:
        with DevIssuer(audience=endpoint) as issuer:
            args = mitmdump_args(f"http://127.0.0.1:{upstream.server_address[1]}", port,
                                 {"ruleset": str(rules), "oidc_issuer": issuer.url, "oidc_resource": endpoint})
            with running(args, port):
                yield endpoint, issuer
    finally:
        upstream.shutdown()


def rpc(endpoint: str, token: str, method: str, msg_id: int, **params) -> dict:
    r = httpx.post(endpoint, json={"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params},
                   headers={"authorization": f"Bearer {token}", "accept": "application/json, text/event-stream"},
                   timeout=30)
    return r.json()


def test_a_task_round_is_its_creators_alone(tmp_path):
    TasksUpstream.seen = []
    with tasks_gateway(tmp_path) as (endpoint, issuer):
        alice, carol = issuer.mint("alice"), issuer.mint("carol")
        created = rpc(endpoint, alice, "tools/call", 1, name="export", arguments={}, task={"ttl": 60000})
        assert created["result"]["task"]["taskId"] == "t-1"
        assert rpc(endpoint, alice, "tasks/get", 2, taskId="t-1")["result"]["status"] == "completed"
        fetched = rpc(endpoint, alice, "tasks/result", 3, taskId="t-1")
        assert fetched["result"]["content"][0]["text"] == "exported 3 rows"
        listed = rpc(endpoint, alice, "tasks/list", 4)["result"]["tasks"]
        stolen = [rpc(endpoint, carol, m, 5, taskId="t-1") for m in ("tasks/get", "tasks/result", "tasks/cancel")]
        unknown = rpc(endpoint, alice, "tasks/get", 6, taskId="t-other")
    assert [t["taskId"] for t in listed] == ["t-1"]  # only her own
    for answer in (*stolen, unknown):
        assert answer["error"]["data"] == {"reason": "task"}
    assert TasksUpstream.seen == ["tools/call", "tasks/get", "tasks/result", "tasks/list"]  # nothing else arrived


def test_a_public_list_leaves_the_gateway_filtered_and_private(tmp_path):
    with tasks_gateway(tmp_path) as (endpoint, issuer):
        listed = rpc(endpoint, issuer.mint("alice"), "tools/list", 1,
                     _meta={"io.modelcontextprotocol/protocolVersion": "2026-07-28"})
    result = listed["result"]
    assert result["cacheScope"] == "private" and result["ttlMs"] == 60000
    assert [t["name"] for t in result["tools"]] == ["export"]  # drop_table is denied: hidden
