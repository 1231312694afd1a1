"""Approval end to end: real mitmdump with the bundle, the SDK server, real tokens, `scripts/approvals`."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import httpx
import pytest

from bastion_dev.issuer import DevIssuer

from harness import ROOT, free_port, mitmdump_args, running, sdk_server

pytestmark = pytest.mark.e2e

ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json",
          "mcp-protocol-version": "2025-06-18"}
RULES = """\
version: 1
default: allow
rules:
  - id: big-sums
    match: {tools: [add], arguments: [{path: a, ge: 1000}]}
    action: approve
    reason: big sums need a second engineer
    approval: {approvers: [sre], timeout: 1m}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("approvals")
    (tmp / "rules.yaml").write_text(RULES)
    port = free_port()
    with DevIssuer(audience=f"http://127.0.0.1:{port}") as issuer, sdk_server() as server:
        options = {"ruleset": str(tmp / "rules.yaml"), "oidc_issuer": issuer.url,
                   "audit_log": str(tmp / "audit.jsonl"), "record_dir": str(tmp / "sessions")}
        args = mitmdump_args(server.url, port, options)
        with running(args, port, env={"BASTION_AUDIT_KEY": "k" * 32}) as gw:
            yield gw, issuer, tmp


def session(gw, token: str) -> dict:
    headers = {**ACCEPT, "authorization": f"Bearer {token}"}
    r = httpx.post(f"{gw.url}/mcp", headers=headers, timeout=30, json={
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    assert r.status_code == 200, r.text
    headers["mcp-session-id"] = r.headers["mcp-session-id"]
    httpx.post(f"{gw.url}/mcp", headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    return headers


def add(gw, headers: dict, a: int, b: int, id_: int) -> dict:
    r = httpx.post(f"{gw.url}/mcp", headers=headers, timeout=90, json={
        "jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": "add", "arguments": {"a": a, "b": b}}})
    text = r.text
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        text = next(line[5:] for line in r.text.splitlines() if line.startswith("data:") and f'"id":{id_}' in line)
    return json.loads(text)


def approvals(gw, token: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "approvals"), *args, "--gateway", gw.url], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "BASTION_APPROVER_TOKEN": token})


def pending(gw, token: str) -> list[dict]:
    for _ in range(200):
        out = approvals(gw, token, "list", "--json")
        assert out.returncode == 0, out.stderr
        items = json.loads(out.stdout)
        if items:
            return items
        time.sleep(0.05)
    raise AssertionError("nothing pending")


def test_a_held_call_is_approved_by_a_second_engineer_and_runs_once(stack):
    gw, issuer, tmp = stack
    alice, bob = issuer.mint("alice"), issuer.mint("bob")
    headers = session(gw, alice)
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(answer=add(gw, headers, 1000, 1, 7)), daemon=True)
    t.start()
    (item,) = pending(gw, bob)
    assert (item["requester"], item["tool"], item["arguments"], item["rule"]) == (
        "Alice Martin", "add", {"a": 1000, "b": 1}, "big-sums")
    assert add(gw, headers, 1, 2, 8)["result"]["content"][0]["text"] == "3"  # other calls go on meanwhile
    mine = approvals(gw, alice, "approve", item["id"])
    assert mine.returncode == 1 and "refused" in mine.stderr  # not an approver (and her own request)
    ok = approvals(gw, bob, "approve", item["id"], "--reason", "ticket 42")
    assert ok.returncode == 0, ok.stderr
    t.join(60)
    assert got["answer"]["result"]["content"][0]["text"] == "1001"
    again = approvals(gw, bob, "approve", item["id"])
    assert again.returncode == 1 and "already decided" in again.stderr
    records = [json.loads(line) for line in (tmp / "audit.jsonl").read_text().splitlines()]
    held = [r for r in records if r.get("id") == 7 and r["kind"] == "request"]
    assert held and held[-1]["approval"]["decided_by"] == "Bob Okafor" and held[-1]["approval"]["id"] == item["id"]


def test_a_denied_call_never_reaches_the_upstream(stack):
    gw, issuer, _ = stack
    alice, bob = issuer.mint("alice"), issuer.mint("bob")
    headers = session(gw, alice)
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(answer=add(gw, headers, 5000, 1, 9)), daemon=True)
    t.start()
    (item,) = [i for i in pending(gw, bob) if i["arguments"] == {"a": 5000, "b": 1}]
    no_reason = approvals(gw, bob, "deny", item["id"])
    assert no_reason.returncode == 2  # --reason is required: could not run
    out = approvals(gw, bob, "deny", item["id"], "--reason", "not today")
    assert out.returncode == 0, out.stderr
    t.join(60)
    err = got["answer"]["error"]
    assert err["data"]["approval"] == item["id"] and "not today" in err["message"]


def test_the_command_line_without_a_gateway_or_token_cannot_run(stack):
    gw, issuer, _ = stack
    out = subprocess.run([str(ROOT / "scripts" / "approvals"), "list"], capture_output=True, text=True, timeout=30,
                         env={k: v for k, v in os.environ.items() if not k.startswith("BASTION_")})
    assert out.returncode == 2 and "gateway" in out.stderr
    bad = approvals(gw, "not-a-token", "list")
    assert bad.returncode == 2 and "401" in bad.stderr


GRANT_RULES = """\
version: 1
default: allow
rules:
  - id: big-sums
    match: {tools: [add], arguments: [{path: a, ge: 1000}]}
    action: approve
    approval: {approvers: [sre], timeout: 1m, grant: 3s}
"""


def test_a_grant_window_is_reused_then_ends_and_a_stop_cancels_what_waits(tmp_path):
    (tmp_path / "rules.yaml").write_text(GRANT_RULES)
    port = free_port()
    with DevIssuer(audience=f"http://127.0.0.1:{port}") as issuer, sdk_server() as server:
        options = {"ruleset": str(tmp_path / "rules.yaml"), "oidc_issuer": issuer.url,
                   "audit_log": str(tmp_path / "audit.jsonl")}
        alice, bob = issuer.mint("alice"), issuer.mint("bob")
        with running(mitmdump_args(server.url, port, options), port, env={"BASTION_AUDIT_KEY": "k" * 32}) as gw:
            headers = session(gw, alice)
            got: dict = {}
            t = threading.Thread(target=lambda: got.update(first=add(gw, headers, 1000, 1, 1)), daemon=True)
            t.start()
            (item,) = pending(gw, bob)
            assert approvals(gw, bob, "approve", item["id"]).returncode == 0
            t.join(60)
            assert got["first"]["result"]["content"][0]["text"] == "1001"
            # within the grant: the same caller, rule and tool pass without asking
            assert add(gw, headers, 2000, 1, 2)["result"]["content"][0]["text"] == "2001"
            time.sleep(3.5)  # the grant ends
            t = threading.Thread(target=lambda: got.update(late=add(gw, headers, 3000, 1, 3)), daemon=True)
            t.start()
            (late,) = pending(gw, bob)
            assert late["arguments"] == {"a": 3000, "b": 1}
            gw.proc.terminate()  # the gateway stops while the call waits: it is cancelled, never run
            t.join(30)
    err = got.get("late", {}).get("error")
    if err is not None:  # the client heard why (it may also just lose its connection)
        assert err["data"]["status"] == "cancelled"
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    three = [r for r in records if r.get("id") == 3 and r["kind"] == "request"]
    assert three and three[-1]["approval"]["status"] == "cancelled" and three[-1]["action"] != "allow"
    assert not any(r["kind"] == "forward" and any(m.get("id") == 3 for m in r["messages"]) for r in records)
