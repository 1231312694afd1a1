"""A held call whose client asked for progress hears why it waits, through real mitmdump, tokens and SDK peers."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import threading
import time

import httpx
import pytest

from bastion_dev.issuer import DevIssuer

from harness import ROOT, free_port, mitmdump_args, running, sdk_server

pytestmark = pytest.mark.e2e

HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json",
           "mcp-protocol-version": "2025-06-18"}
RULES = """\
version: 1
default: allow
rules:
  - id: big-sums
    match: {tools: [add, count], arguments: [{path: a, ge: 1000}]}
    action: approve
    reason: big sums need a second engineer
    approval: {approvers: [sre], timeout: 1m}
  - id: long-counts
    match: {tools: [count], arguments: [{path: steps, ge: 2}]}
    action: approve
    approval: {approvers: [sre], timeout: 1m}
  - id: short-wait
    match: {tools: [add], arguments: [{path: a, equals: 7}]}
    action: approve
    approval: {approvers: [sre], timeout: 2s}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("progress")
    (tmp / "rules.yaml").write_text(RULES)
    port = free_port()
    with DevIssuer(audience=f"http://127.0.0.1:{port}") as issuer, sdk_server() as server:
        options = {"ruleset": str(tmp / "rules.yaml"), "oidc_issuer": issuer.url,
                   "audit_log": str(tmp / "audit.jsonl"), "record_dir": str(tmp / "sessions")}
        with running(mitmdump_args(server.url, port, options), port, env={"BASTION_AUDIT_KEY": "k" * 32}) as gw:
            yield gw, issuer, tmp


def session(gw, token: str) -> dict:
    headers = {**HEADERS, "authorization": f"Bearer {token}"}
    r = httpx.post(f"{gw.url}/mcp", headers=headers, timeout=30, json={
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    assert r.status_code == 200, r.text
    headers["mcp-session-id"] = r.headers["mcp-session-id"]
    httpx.post(f"{gw.url}/mcp", headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    return headers


def streamed_call(gw, headers: dict, id_: int, name: str, arguments: dict, out: queue.Queue,
                  progress: bool = True) -> threading.Thread:
    """POST a tools/call in a thread; every JSON-RPC message of the answer goes into `out` as it arrives."""
    params: dict = {"name": name, "arguments": arguments}
    if progress:
        params["_meta"] = {"progressToken": f"p{id_}"}

    def run() -> None:
        try:
            with httpx.stream("POST", f"{gw.url}/mcp", headers=headers, timeout=90,
                              json={"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": params}) as r:
                out.put(("status", r.status_code, r.headers.get("content-type", "")))
                if not r.headers.get("content-type", "").startswith("text/event-stream"):
                    out.put(("message", json.loads(r.read())))
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        out.put(("message", json.loads(line[5:])))
        except Exception as e:  # the test reads it
            out.put(("failed", repr(e)))
        out.put(("end",))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def until(out: queue.Queue, want, timeout: float = 30.0) -> list:
    """Items from `out` up to and including the first for which `want` is true."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        item = out.get(timeout=max(0.1, deadline - time.monotonic()))
        seen.append(item)
        if want(item):
            return seen
        assert item[0] != "end", seen


def approvals(gw, token: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "approvals"), *args, "--gateway", gw.url], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "BASTION_APPROVER_TOKEN": token})


def audit(tmp) -> list[dict]:
    return [json.loads(line) for line in (tmp / "audit.jsonl").read_text().splitlines()]


def forwarded(tmp, id_: int) -> int:
    return sum(1 for r in audit(tmp) if r["kind"] == "forward" and any(m.get("id") == id_ for m in r["messages"]))


def test_a_waiting_call_hears_where_it_waits_then_runs_once_when_approved(stack):
    gw, issuer, tmp = stack
    alice, bob = issuer.mint("alice"), issuer.mint("bob")
    headers = session(gw, alice)
    out: queue.Queue = queue.Queue()
    t = streamed_call(gw, headers, 11, "add", {"a": 1000, "b": 5}, out)
    seen = until(out, lambda i: i[0] == "message" and i[1].get("method") == "notifications/progress")
    assert seen[0][1:] == (200, "text/event-stream")
    log = next(i[1] for i in seen if i[0] == "message" and i[1].get("method") == "notifications/message")
    approval = log["params"]["data"]["approval"]
    text = log["params"]["data"]["message"]
    assert "waits for approval" in text and approval in text and "sre" in text and "/bastion/approvals/" in text
    progress = next(i[1] for i in seen if i[0] == "message" and i[1].get("method") == "notifications/progress")
    assert progress["params"]["progressToken"] == "p11" and progress["params"]["total"] == 60
    shown = json.loads(approvals(gw, bob, "show", approval).stdout)
    assert shown["arguments"] == {"a": 1000, "b": 5} and shown["status"] == "pending"
    assert approvals(gw, bob, "approve", approval).returncode == 0
    seen = until(out, lambda i: i[0] == "message" and i[1].get("id") == 11)
    assert seen[-1][1]["result"]["content"][0]["text"] == "1005"
    t.join(30)
    records = [r for r in audit(tmp) if r.get("id") == 11 and r["kind"] == "request"]
    assert records[-1]["approval"]["status"] == "used" and records[-1]["approval"]["decided_by"] == "Bob Okafor"


def test_an_approved_call_streams_the_upstreams_own_progress_after_the_wait(stack):
    gw, issuer, tmp = stack
    alice, bob = issuer.mint("alice"), issuer.mint("bob")
    headers = session(gw, alice)
    out: queue.Queue = queue.Queue()
    t = streamed_call(gw, headers, 12, "count", {"steps": 3}, out)
    seen = until(out, lambda i: i[0] == "message" and i[1].get("method") == "notifications/message")
    approval = seen[-1][1]["params"]["data"]["approval"]
    assert approvals(gw, bob, "approve", approval).returncode == 0
    seen = until(out, lambda i: i[0] == "message" and i[1].get("id") == 12)
    assert "3" in seen[-1][1]["result"]["content"][0]["text"]
    upstream_progress = [i[1] for i in seen if i[0] == "message" and i[1].get("method") == "notifications/progress"
                         and "approval" not in (i[1]["params"].get("message") or "")]
    assert len(upstream_progress) >= 1  # the server's own, relayed after the approval
    t.join(30)


def test_a_denial_ends_the_stream_with_the_reason_and_nothing_is_forwarded(stack):
    gw, issuer, tmp = stack
    alice, bob = issuer.mint("alice"), issuer.mint("bob")
    headers = session(gw, alice)
    out: queue.Queue = queue.Queue()
    t = streamed_call(gw, headers, 13, "add", {"a": 4000, "b": 1}, out)
    seen = until(out, lambda i: i[0] == "message" and i[1].get("method") == "notifications/message")
    approval = seen[-1][1]["params"]["data"]["approval"]
    assert approvals(gw, bob, "deny", approval, "--reason", "not in a freeze").returncode == 0
    seen = until(out, lambda i: i[0] == "message" and i[1].get("id") == 13)
    err = seen[-1][1]["error"]
    assert err["data"]["approval"] == approval and "not in a freeze" in err["message"]
    assert err["data"]["rule"] == "big-sums"
    until(out, lambda i: i[0] == "end")
    t.join(30)
    time.sleep(0.3)
    records = [r for r in audit(tmp) if r.get("id") == 13 and r["kind"] == "request"]
    assert records[-1]["action"] == "deny" and records[-1]["approval"]["status"] == "denied"


def test_an_expired_wait_ends_the_stream_and_a_client_without_progress_waits_quietly(stack):
    gw, issuer, _ = stack
    alice = issuer.mint("alice")
    headers = session(gw, alice)
    out: queue.Queue = queue.Queue()
    streamed_call(gw, headers, 14, "add", {"a": 7, "b": 1}, out)
    seen = until(out, lambda i: i[0] == "message" and i[1].get("id") == 14, timeout=20)
    assert seen[-1][1]["error"]["data"]["status"] == "expired"
    quiet: queue.Queue = queue.Queue()
    streamed_call(gw, headers, 15, "add", {"a": 7, "b": 2}, quiet, progress=False)
    seen = until(quiet, lambda i: i[0] == "message", timeout=20)
    assert seen[-1][1]["id"] == 15 and seen[-1][1]["error"]["data"]["status"] == "expired"  # nothing before it


def test_a_client_that_goes_away_cancels_its_request(stack):
    gw, issuer, _ = stack
    alice, bob = issuer.mint("alice"), issuer.mint("bob")
    headers = session(gw, alice)

    async def go_away() -> str:
        async with httpx.AsyncClient(timeout=30) as client:
            async with client.stream("POST", f"{gw.url}/mcp", headers=headers, json={
                    "jsonrpc": "2.0", "id": 16, "method": "tools/call",
                    "params": {"name": "add", "arguments": {"a": 9000, "b": 1}, "_meta": {"progressToken": 1}}}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data:") and "notifications/message" in line:
                        return json.loads(line[5:])["params"]["data"]["approval"]
        raise AssertionError("no log message")

    approval = asyncio.run(go_away())
    for _ in range(100):
        shown = json.loads(approvals(gw, bob, "show", approval).stdout)
        if shown["status"] != "pending":
            break
        time.sleep(0.1)
    assert shown["status"] == "cancelled"
    assert approvals(gw, bob, "approve", approval).returncode == 1
