"""Approval decision channels end to end: `mode: retry`, the webhook, mitmweb resume/kill, a restart while a
call waits. Real mitmdump/mitmweb with the bundle, the SDK server, real tokens (DevIssuer), `scripts/approvals`.

alice is the requester; bob (group `sre`) decides.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from bastion_dev.issuer import DevIssuer
from mcp_bastion.core.approvals import LOCAL_OPERATOR

from harness import MITMWEB, ROOT, Proc, free_port, mitmdump_args, sdk_server, wait_port

pytestmark = pytest.mark.e2e

AUDIT_ENV = {"BASTION_AUDIT_KEY": "k" * 32}
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json",
          "mcp-protocol-version": "2025-06-18"}
APPROVAL_REQUIRED = -31002


def rules(mode: str = "wait", timeout: str = "1m") -> str:
    return f"""\
version: 1
default: allow
rules:
  - id: big-sums
    match: {{tools: [add], arguments: [{{path: a, ge: 1000}}]}}
    action: approve
    reason: big sums need a second engineer
    approval: {{approvers: [sre], timeout: {timeout}, mode: {mode}}}
"""


# --- helpers ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def stack(tmp: Path, ruleset: str, options: dict | None = None, web_port: int | None = None
          ) -> Iterator[tuple[Proc, DevIssuer, Callable[[], Proc]]]:
    """The SDK server, a DevIssuer and the gateway (mitmdump, or mitmweb with its UI on `web_port`).

    Yields (gateway, issuer, restart): `restart()` stops the gateway (SIGTERM) and starts it again on the
    same port with the same options (audit log included), returning the new one.
    """
    (tmp / "rules.yaml").write_text(ruleset)
    port = free_port()
    with DevIssuer(audience=f"http://127.0.0.1:{port}") as issuer, sdk_server() as server:
        opts = {"ruleset": str(tmp / "rules.yaml"), "oidc_issuer": issuer.url, "audit_log": str(tmp / "audit.jsonl"),
                **(options or {})}
        if web_port is not None:
            opts.update(web_open_browser=False, web_host="127.0.0.1", web_port=web_port)
        args = mitmdump_args(server.url, port, opts, **({"tool": MITMWEB} if web_port is not None else {}))
        procs: list[Proc] = []

        def start() -> Proc:
            p = Proc(args, port, AUDIT_ENV)
            procs.append(p)
            p.wait_ready(30)
            if web_port is not None:
                wait_port(web_port, 30.0, p.proc)
            return p

        def restart() -> Proc:
            procs[-1].stop()
            return start()

        try:
            yield start(), issuer, restart
        finally:
            for p in procs:
                p.stop()


def session(gw: Proc, token: str) -> dict:
    headers = {**ACCEPT, "authorization": f"Bearer {token}"}
    r = httpx.post(f"{gw.url}/mcp", headers=headers, timeout=15, json={
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    assert r.status_code == 200, r.text
    headers["mcp-session-id"] = r.headers["mcp-session-id"]
    httpx.post(f"{gw.url}/mcp", headers=headers, timeout=15,
               json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    return headers


def add(gw: Proc, headers: dict, a: int, b: int, id_: int, timeout: float = 30) -> dict:
    """tools/call add (no progress token): the JSON-RPC answer, from a JSON body or an event stream."""
    r = httpx.post(f"{gw.url}/mcp", headers=headers, timeout=timeout, json={
        "jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": "add", "arguments": {"a": a, "b": b}}})
    text = r.text
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        text = next(line[5:] for line in r.text.splitlines() if line.startswith("data:") and f'"id":{id_}' in line)
    return json.loads(text)


def in_background(fn: Callable[[], dict]) -> tuple[threading.Thread, dict]:
    """Run a call in a thread: its answer lands in got["answer"], or the exception in got["error"]."""
    got: dict = {}

    def run() -> None:
        try:
            got["answer"] = fn()
        except Exception as e:  # a connection lost is an outcome too
            got["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got


def result_text(answer: dict) -> str:
    assert "result" in answer, answer
    return answer["result"]["content"][0]["text"]


def approvals(gw: Proc, token: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "approvals"), *args, "--gateway", gw.url], capture_output=True,
                          text=True, timeout=30, env={**os.environ, "BASTION_APPROVER_TOKEN": token})


def listed(gw: Proc, token: str, everything: bool = False) -> list[dict]:
    """`scripts/approvals list --json` (the pending requests; with `everything`, `--all`: the decided too)."""
    out = approvals(gw, token, "list", "--json", *(["--all"] if everything else []))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def pending(gw: Proc, token: str, arguments: dict, seen: set[str] = frozenset(), timeout: float = 10) -> dict:
    """The one pending request for `arguments` not in `seen` (waits for it to appear)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = [i for i in listed(gw, token)
                 if i["status"] == "pending" and i["arguments"] == arguments and i["id"] not in seen]
        assert len(items) <= 1, items
        if items:
            return items[0]
        time.sleep(0.05)
    raise AssertionError(f"nothing pending for {arguments}")


def audit(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "audit.jsonl").read_text().splitlines() if line.strip()]


def forwarded(records: list[dict], session_id: str, id_: int) -> list[dict]:
    """The `forward` records (written before a request reaches the upstream) of this session's JSON-RPC id."""
    return [r for r in records if r.get("kind") == "forward" and r.get("session") == session_id
            and any(m.get("id") == id_ for m in r.get("messages") or ())]


def requests(records: list[dict], session_id: str, id_: int) -> list[dict]:
    return [r for r in records if r.get("kind") == "request" and r.get("session") == session_id
            and r.get("id") == id_]


def wait_for(check: Callable[[], object], timeout: float = 10, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --- 1. mode: retry ------------------------------------------------------------------------------------


def test_retry_mode_answers_at_once_and_an_approval_runs_the_same_call_exactly_once(tmp_path):
    with stack(tmp_path, rules(mode="retry")) as (gw, issuer, _):
        alice, bob = issuer.mint("alice"), issuer.mint("bob")
        headers = session(gw, alice)
        sid = headers["mcp-session-id"]

        started = time.monotonic()
        first = add(gw, headers, 1000, 1, 11)
        assert time.monotonic() - started < 5  # an answer at once, not a held request
        err = first["error"]
        assert err["code"] == APPROVAL_REQUIRED, first
        approval_id = err["data"]["approval"]
        assert err["data"]["status"] == "pending" and err["data"]["rule"] == "big-sums"
        assert approval_id in err["message"] and "retry" in err["message"]
        assert not forwarded(audit(tmp_path), sid, 11)

        # asking again before a decision names the same request (no second one)
        again = add(gw, headers, 1000, 1, 12)
        assert again["error"]["code"] == APPROVAL_REQUIRED and again["error"]["data"]["approval"] == approval_id
        (item,) = [i for i in listed(gw, bob) if i["status"] == "pending"]
        assert (item["id"], item["mode"], item["arguments"], item["requester"], item["waiting"]) == (
            approval_id, "retry", {"a": 1000, "b": 1}, "Alice Martin", False)

        ok = approvals(gw, bob, "approve", approval_id, "--reason", "ticket 7")
        assert ok.returncode == 0, ok.stderr

        # the approval binds to the exact call: other arguments, or another caller, are not covered
        other_args = add(gw, headers, 1000, 2, 13)["error"]
        assert other_args["code"] == APPROVAL_REQUIRED and other_args["data"]["approval"] != approval_id
        bob_headers = session(gw, bob)
        other_caller = add(gw, bob_headers, 1000, 1, 14)["error"]
        assert other_caller["code"] == APPROVAL_REQUIRED and other_caller["data"]["approval"] != approval_id

        # the same call by alice passes, once
        assert result_text(add(gw, headers, 1000, 1, 15)) == "1001"
        third = add(gw, headers, 1000, 1, 16)["error"]
        assert third["code"] == APPROVAL_REQUIRED and third["data"]["status"] == "pending"
        assert third["data"]["approval"] not in (approval_id, other_args["data"]["approval"],
                                                   other_caller["data"]["approval"])

        statuses = {i["id"]: i["status"] for i in listed(gw, bob, everything=True)}
        assert statuses[approval_id] == "used" and statuses[third["data"]["approval"]] == "pending"
        used = approvals(gw, bob, "approve", approval_id)
        assert used.returncode == 1 and "already decided" in used.stderr

    records = audit(tmp_path)
    expected = {11: approval_id, 12: approval_id, 13: other_args["data"]["approval"], 16: third["data"]["approval"]}
    for id_, held_by in expected.items():  # refused at once, recorded as held for that request, never forwarded
        assert not forwarded(records, sid, id_), id_
        (rec,) = requests(records, sid, id_)
        assert rec["action"] in ("hold", "approve") and rec["stage"] == "approval", rec
        assert (rec["approval"]["id"], rec["approval"]["status"], rec["approval"]["mode"]) == (
            held_by, "pending", "retry"), rec
    assert not forwarded(records, bob_headers["mcp-session-id"], 14)
    assert len(forwarded(records, sid, 15)) == 1
    (passed,) = requests(records, sid, 15)
    assert passed["rpc"] == "result" and passed["approval"]["id"] == approval_id
    assert passed["approval"]["decided_by"] == "Bob Okafor" and passed["approval"]["decision_reason"] == "ticket 7"


# --- 2. the webhook ------------------------------------------------------------------------------------


@contextlib.contextmanager
def hook_listener() -> Iterator[tuple[str, queue.Queue]]:
    """A local HTTP listener on 127.0.0.1: every POST's (path, JSON body) goes into the queue."""
    posts: queue.Queue = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            posts.put((self.path, self.headers.get("content-type"), json.loads(body)))
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", posts
    finally:
        server.shutdown()
        server.server_close()


def test_the_webhook_hears_each_request_with_its_command_then_the_decision(tmp_path):
    with hook_listener() as (url, posts), stack(tmp_path, rules(), {"approval_webhook": url}) as (gw, issuer, _):
        alice, bob = issuer.mint("alice"), issuer.mint("bob")
        headers = session(gw, alice)
        assert posts.empty()  # an ordinary call is not announced
        t, got = in_background(lambda: add(gw, headers, 1000, 1, 21))
        item = pending(gw, bob, {"a": 1000, "b": 1})

        path, ctype, request = posts.get(timeout=10)
        assert path == "/hook" and ctype == "application/json"
        assert item["id"] in request["text"] and f"scripts/approvals approve {item['id']}" in request["text"]
        assert "Alice Martin" in request["text"] and "big-sums" in request["text"]
        assert request["approval"]["id"] == item["id"] and request["approval"]["status"] == "pending"
        assert request["approval"]["arguments"] == {"a": 1000, "b": 1}
        assert posts.empty()  # nothing decided yet

        ok = approvals(gw, bob, "approve", item["id"], "--reason", "ticket 9")
        assert ok.returncode == 0, ok.stderr
        _, _, decision = posts.get(timeout=10)
        assert item["id"] in decision["text"] and "approved" in decision["text"] and "Bob Okafor" in decision["text"]
        assert decision["approval"]["id"] == item["id"] and decision["approval"]["status"] == "approved"
        assert decision["approval"]["decided_by"] == "Bob Okafor"
        t.join(15)
        assert result_text(got["answer"]) == "1001"

        # a denial is announced too, with its reason, after its own request
        t, got = in_background(lambda: add(gw, headers, 2000, 1, 22))
        denied = pending(gw, bob, {"a": 2000, "b": 1})
        _, _, request = posts.get(timeout=10)
        assert request["approval"]["id"] == denied["id"] and request["approval"]["status"] == "pending"
        assert approvals(gw, bob, "deny", denied["id"], "--reason", "not today").returncode == 0
        _, _, decision = posts.get(timeout=10)
        assert decision["approval"]["id"] == denied["id"] and decision["approval"]["status"] == "denied"
        assert "denied" in decision["text"] and "not today" in decision["text"]
        t.join(15)
        assert got["answer"]["error"]["data"]["approval"] == denied["id"]
        time.sleep(0.3)
        assert posts.empty()  # one notice per request and per decision ("used" is not announced)


# --- 3. mitmweb: resume approves, kill denies ------------------------------------------------------------


class Web:
    """mitmweb's REST API: the password as a bearer token, and tornado's XSRF cookie echoed in a header."""

    def __init__(self, port: int, password: str):
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10,
                                   headers={"authorization": f"Bearer {password}"})
        xsrf = "bastion-e2e-xsrf"
        self.client.cookies.set("_mitmproxy_xsrf", xsrf, domain="127.0.0.1")
        self.client.headers["x-xsrftoken"] = xsrf

    def flows(self) -> list[dict]:
        r = self.client.get("/flows")
        assert r.status_code == 200, r.text
        return r.json()

    def held(self, arguments: dict) -> dict:
        """The one intercepted flow whose request calls add with `arguments`."""
        for f in self.flows():
            if f.get("intercepted") and f["request"]["path"] == "/mcp":
                body = self.client.get(f"/flows/{f['id']}/request/content.data").content
                if json.loads(body).get("params", {}).get("arguments") == arguments:
                    return f
        return {}

    def post(self, path: str) -> httpx.Response:
        return self.client.post(path)


def test_in_mitmweb_a_held_call_shows_intercepted_resume_runs_it_and_kill_denies_it(tmp_path):
    web_port, password = free_port(), "bastion-e2e"
    with stack(tmp_path, rules(), {"web_password": password}, web_port=web_port) as (gw, issuer, _):
        alice, bob = issuer.mint("alice"), issuer.mint("bob")
        web = Web(web_port, password)
        headers = session(gw, alice)
        sid = headers["mcp-session-id"]

        # resume = approve (the local operator's decision), and the call runs
        t, got = in_background(lambda: add(gw, headers, 1000, 1, 31))
        flow = wait_for(lambda: web.held({"a": 1000, "b": 1}), what="an intercepted flow in mitmweb")
        item = pending(gw, bob, {"a": 1000, "b": 1})
        assert "answer" not in got and "error" not in got
        assert not forwarded(audit(tmp_path), sid, 31)
        assert result_text(add(gw, headers, 1, 2, 32)) == "3"  # other calls go on meanwhile
        r = web.post(f"/flows/{flow['id']}/resume")
        assert r.status_code == 200, r.text
        t.join(15)
        assert result_text(got["answer"]) == "1001"
        shown = {i["id"]: i for i in listed(gw, bob, everything=True)}[item["id"]]
        assert shown["status"] == "used" and shown["decided_by"] == LOCAL_OPERATOR.shown()
        assert not [f for f in web.flows() if f.get("intercepted")]

        # kill = deny: never forwarded
        t, got = in_background(lambda: add(gw, headers, 2000, 1, 33))
        flow = wait_for(lambda: web.held({"a": 2000, "b": 1}), what="a second intercepted flow")
        killed = pending(gw, bob, {"a": 2000, "b": 1})
        r = web.post(f"/flows/{flow['id']}/kill")
        assert r.status_code == 200, r.text
        t.join(15)
        assert not t.is_alive()
        if "answer" in got:  # the client may hear why, or just lose its connection
            assert got["answer"]["error"]["data"]["approval"] == killed["id"]
        shown = {i["id"]: i for i in listed(gw, bob, everything=True)}[killed["id"]]
        assert shown["status"] == "denied" and shown["decided_by"] == LOCAL_OPERATOR.shown()
        late = approvals(gw, bob, "approve", killed["id"])
        assert late.returncode == 1 and "already decided" in late.stderr

        def written() -> list[dict]:
            return requests(audit(tmp_path), sid, 33)

        wait_for(written, what="the killed call's audit record")

    records = audit(tmp_path)
    assert len(forwarded(records, sid, 31)) == 1
    (resumed,) = requests(records, sid, 31)
    assert resumed["rpc"] == "result" and resumed["approval"]["id"] == item["id"]
    assert resumed["approval"]["decided_by"] == LOCAL_OPERATOR.shown()
    assert not forwarded(records, sid, 33)
    (denied,) = requests(records, sid, 33)
    assert denied["action"] != "allow" and denied["approval"]["status"] == "denied", denied
    assert denied["approval"]["decided_by"] == LOCAL_OPERATOR.shown()


# --- 4. a restart while a call waits ---------------------------------------------------------------------


def test_a_restart_while_a_call_waits_cancels_it_and_the_same_call_asks_again(tmp_path):
    with stack(tmp_path, rules()) as (gw, issuer, restart):
        alice, bob = issuer.mint("alice"), issuer.mint("bob")
        headers = session(gw, alice)
        sid = headers["mcp-session-id"]
        t, got = in_background(lambda: add(gw, headers, 1000, 1, 41))
        first = pending(gw, bob, {"a": 1000, "b": 1})

        gw = restart()  # SIGTERM while the call waits, then the same gateway, port and audit log again
        t.join(15)
        assert not t.is_alive()
        if "answer" in got:  # the client heard why (it may also just lose its connection)
            assert got["answer"]["error"]["data"]["status"] == "cancelled"
        records = audit(tmp_path)
        (cancelled,) = requests(records, sid, 41)
        assert cancelled["approval"]["id"] == first["id"] and cancelled["approval"]["status"] == "cancelled"
        assert cancelled["action"] != "allow"
        assert not forwarded(records, sid, 41)

        assert listed(gw, bob) == [] and listed(gw, bob, everything=True) == []  # nothing held over
        late = approvals(gw, bob, "approve", first["id"])
        assert late.returncode == 1 and "no approval request" in late.stderr

        # the same call by the same caller asks again, and waits again
        headers = session(gw, alice)
        sid2 = headers["mcp-session-id"]
        t, got = in_background(lambda: add(gw, headers, 1000, 1, 41))
        second = pending(gw, bob, {"a": 1000, "b": 1})
        assert second["id"] != first["id"]
        time.sleep(0.3)
        assert t.is_alive() and not forwarded(audit(tmp_path), sid2, 41)
        assert approvals(gw, bob, "deny", second["id"], "--reason", "after the restart").returncode == 0
        t.join(15)
        assert got["answer"]["error"]["data"]["approval"] == second["id"]

    records = audit(tmp_path)
    assert not [r for r in records if r.get("kind") == "forward"
                and any(m.get("method") == "tools/call" and m.get("id") == 41 for m in r.get("messages") or ())]
