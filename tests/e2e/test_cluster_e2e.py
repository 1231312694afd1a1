"""Scale-out, proven on real parts: two mitmdump replicas with the bundle behind Debian's HAProxy, sharing
Debian's Redis (`scripts/cluster`'s `Cluster`), real tokens (the dev issuer), and a scripted upstream that
counts what reaches it.

- a call held on replica A is approved (or denied) through replica B and runs once; a grant made on B is
  honoured on A;
- alice's 2025 session cannot be driven by bob through the other replica; a task created through A is
  refused to another identity through B;
- a replica killed while a call is held: nobody forwards it, the decision attempt says why, and the audit
  logs record it; Redis restarted: the gateways refuse, then recover, and nothing is decided twice.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from bastion_dev.cluster import Cluster
from bastion_dev.issuer import DevIssuer
from mcp_bastion.glue.sharedstate import HEARTBEAT_TTL

from harness import REDIS_SERVER, ROOT

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not (shutil.which(REDIS_SERVER) and shutil.which("haproxy")),
                                 reason="redis-server and haproxy are not installed (scripts/setup installs them "
                                        "as root)")]

RULES = """\
version: 1
default: allow
rules:
  - id: deploys
    match: {tools: [deploy]}
    action: approve
    reason: deploys need an SRE
    approval: {approvers: [sre], timeout: 2m}
  - id: restarts
    match: {tools: [restart]}
    action: approve
    reason: restarts need an SRE, then the caller may restart for an hour
    approval: {approvers: [sre], timeout: 2m, grant: 1h}
"""
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


class Upstream(BaseHTTPRequestHandler):
    """A Streamable HTTP MCP server that hands out sessions, creates a task for `params.task`, and counts."""

    protocol_version = "HTTP/1.1"
    calls: list[tuple[str, dict]] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        msg = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
        method, params = msg.get("method"), msg.get("params") or {}
        headers = {}
        if "id" not in msg:
            self.send_response(202)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        if method == "initialize":
            result = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                      "serverInfo": {"name": "counted", "version": "1"}}
            headers["mcp-session-id"] = uuid.uuid4().hex
        elif method == "tools/call":
            Upstream.calls.append((params.get("name"), params.get("arguments") or {}))
            if "task" in params:
                result = {"task": {"taskId": f"t-{len(Upstream.calls)}", "status": "working", "ttl": 60000}}
            else:
                result = {"content": [{"type": "text", "text": f"ran {params.get('name')}"}]}
        elif method == "tasks/get":
            result = {"taskId": params.get("taskId"), "status": "completed"}
        else:
            result = {}
        body = json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    (tmp / "rules.yaml").write_text(RULES)
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        with DevIssuer() as issuer:
            c = Cluster(f"http://127.0.0.1:{upstream.server_address[1]}/mcp", replicas=2, dir=tmp / "run",
                        options={"ruleset": str(tmp / "rules.yaml"), "oidc_issuer": issuer.url},
                        env={"BASTION_AUDIT_KEY": "k" * 32})
            issuer.audience = c.front_url
            with c:
                yield c, issuer
    finally:
        upstream.shutdown()


def post(url: str, token: str, body: dict, session: str | None = None, timeout: float = 60) -> httpx.Response:
    headers = {**ACCEPT, "authorization": f"Bearer {token}", "mcp-protocol-version": "2025-06-18"}
    if session:
        headers["mcp-session-id"] = session
    return httpx.post(url, headers=headers, json=body, timeout=timeout)


def call(tool: str, i: int, **args) -> dict:
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": tool, "arguments": args}}


def api(replica, token: str, method: str = "GET", path: str = "", body: dict | None = None) -> httpx.Response:
    url = replica.url.rsplit("/", 1)[0] if replica.url.endswith("/mcp") else replica.url
    return httpx.request(method, f"{url}/bastion/approvals{path}", json=body, timeout=30,
                         headers={"authorization": f"Bearer {token}", "accept": "application/json"})


def pending_on(replica, token: str, tool: str, timeout: float = 20) -> dict:
    """The approval request for `tool` as another replica lists it, once it appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = [a for a in api(replica, token).json() if a["tool"] == tool and a["status"] == "pending"]
        if items:
            return items[-1]
        time.sleep(0.1)
    raise AssertionError(f"no pending approval for {tool}")


def held_in_background(url: str, token: str, body: dict) -> tuple[ThreadPoolExecutor, object]:
    pool = ThreadPoolExecutor(1)
    return pool, pool.submit(post, url, token, body, None, 120)


def test_a_call_held_on_one_replica_is_approved_through_the_other_and_runs_once(cluster):
    c, issuer = cluster
    a, b = c.replicas
    alice, bob = issuer.mint("alice", audience=c.front_url), issuer.mint("bob", audience=c.front_url)
    before = len(Upstream.calls)
    pool, answer = held_in_background(a.url, alice, call("deploy", 1, env="prod"))
    request = pending_on(b, bob, "deploy")
    assert request["requester"] and request["can_decide"] is True
    assert len(Upstream.calls) == before  # held: nothing reached the upstream
    decided = api(b, bob, "POST", f"/{request['id']}/approve", {"reason": "change 42"})
    assert decided.status_code == 200 and decided.json()["status"] == "approved"
    again = api(a, bob, "POST", f"/{request['id']}/approve", {"reason": "twice?"})
    assert again.status_code == 409  # decided once, whichever replica is asked
    r = answer.result(60)
    pool.shutdown()
    assert r.status_code == 200 and r.json()["result"]["content"][0]["text"] == "ran deploy"
    assert Upstream.calls[before:] == [("deploy", {"env": "prod"})]  # exactly once
    assert api(b, bob, "GET", f"/{request['id']}").json()["status"] == "used"


def test_a_call_held_on_one_replica_is_denied_through_the_other(cluster):
    c, issuer = cluster
    a, b = c.replicas
    alice, bob = issuer.mint("alice", audience=c.front_url), issuer.mint("bob", audience=c.front_url)
    before = len(Upstream.calls)
    pool, answer = held_in_background(b.url, alice, call("deploy", 2, env="staging"))
    request = pending_on(a, bob, "deploy")
    assert api(a, bob, "POST", f"/{request['id']}/deny", {"reason": "freeze week"}).status_code == 200
    r = answer.result(60)
    pool.shutdown()
    err = r.json()["error"]
    assert "freeze week" in err["message"] and err["data"]["approval"] == request["id"]
    assert len(Upstream.calls) == before


def test_a_grant_made_through_one_replica_is_honoured_on_the_other(cluster):
    c, issuer = cluster
    a, b = c.replicas
    alice, bob = issuer.mint("alice", audience=c.front_url), issuer.mint("bob", audience=c.front_url)
    pool, answer = held_in_background(a.url, alice, call("restart", 3, svc="api"))
    request = pending_on(b, bob, "restart")
    assert api(b, bob, "POST", f"/{request['id']}/approve", {}).status_code == 200
    assert answer.result(60).status_code == 200
    pool.shutdown()
    before = len(Upstream.calls)
    r = post(b.url, alice, call("restart", 4, svc="worker"), timeout=10)  # the other replica: no new request
    assert r.json()["result"]["content"][0]["text"] == "ran restart"
    assert Upstream.calls[before:] == [("restart", {"svc": "worker"})]


def test_alices_session_cannot_be_driven_by_bob_through_either_replica(cluster):
    c, issuer = cluster
    a, b = c.replicas
    alice, bob = issuer.mint("alice", audience=c.front_url), issuer.mint("bob", audience=c.front_url)
    init = post(c.front_url, alice, {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    sid = init.headers["mcp-session-id"]
    for url in (a.url, b.url, c.front_url):
        assert post(url, alice, call("echo", 5), session=sid).status_code == 200  # hers, on every replica
        stolen = post(url, bob, call("echo", 6), session=sid)
        assert stolen.status_code == 404 and stolen.json()["error"]["data"] == {"reason": "session"}


def test_a_task_created_through_one_replica_is_refused_to_another_identity_through_the_other(cluster):
    c, issuer = cluster
    a, b = c.replicas
    alice, carol = issuer.mint("alice", audience=c.front_url), issuer.mint("carol", audience=c.front_url)
    created = post(a.url, alice, {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                                  "params": {"name": "export", "arguments": {}, "task": {"ttl": 60000}}}).json()
    task = created["result"]["task"]["taskId"]
    get = {"jsonrpc": "2.0", "id": 8, "method": "tasks/get", "params": {"taskId": task}}
    assert post(b.url, alice, get).json()["result"]["status"] == "completed"
    refused = post(b.url, carol, get).json()
    assert refused["error"]["data"] == {"reason": "task"}


def test_a_replica_killed_while_a_call_is_held_forwards_nothing_and_the_decision_is_audited(cluster):
    c, issuer = cluster
    a, b = c.replicas
    alice, bob = issuer.mint("alice", audience=c.front_url), issuer.mint("bob", audience=c.front_url)
    before = len(Upstream.calls)
    pool, answer = held_in_background(a.url, alice, call("deploy", 9, env="dr"))
    request = pending_on(b, bob, "deploy")
    c.kill(0)
    with contextlib.suppress(Exception):
        answer.result(30)  # the client's connection went with the replica
    pool.shutdown()
    # Once its heartbeat has lapsed, a decision through the other replica finds the holder gone.
    time.sleep(HEARTBEAT_TTL + 0.5)
    r = api(b, bob, "POST", f"/{request['id']}/approve", {"reason": "go"})
    assert r.status_code == 409 and "r1" in r.json()["error"] and "not forwarded" in r.json()["error"]
    assert api(b, bob, "GET", f"/{request['id']}").json()["status"] == "cancelled"
    c.start_replica(0)
    assert len(Upstream.calls) == before  # nobody forwarded it, before or after the restart
    survivor = [json.loads(line) for line in b.audit_log.read_text().splitlines() if line.strip()]
    assert [x for x in survivor if request["id"] in json.dumps(x)], "the decision attempt is in B's audit log"
    verify = subprocess.run([str(ROOT / "scripts" / "audit"), *c.verify_command()[1:]], capture_output=True,
                            text=True, env={"BASTION_AUDIT_KEY": "k" * 32, "PATH": "/usr/bin:/bin"})
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_redis_restarted_the_gateways_refuse_then_recover_and_nothing_is_decided_twice(cluster):
    c, issuer = cluster
    a, b = c.replicas
    alice, bob = issuer.mint("alice", audience=c.front_url), issuer.mint("bob", audience=c.front_url)
    init = post(a.url, alice, {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    sid = init.headers["mcp-session-id"]
    pool, answer = held_in_background(b.url, alice, call("deploy", 10, env="qa"))
    request = pending_on(a, bob, "deploy")
    assert api(a, bob, "POST", f"/{request['id']}/approve", {}).status_code == 200
    assert answer.result(60).status_code == 200
    pool.shutdown()
    c.stop_redis()
    try:
        refused = post(b.url, alice, call("echo", 11), session=sid, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["data"]["reason"] == "state_unavailable"
        for r in c.replicas:
            ready = httpx.get(f"{r.admin_url}/readyz", timeout=10)
            assert ready.status_code == 503 and ready.json()["checks"]["state"]["ok"] is False
        assert api(a, bob, "POST", f"/{request['id']}/approve", {}).status_code >= 500
    finally:
        c.start_redis()
    deadline = time.monotonic() + 20
    while post(b.url, alice, call("echo", 12), session=sid, timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the gateways did not recover"
        time.sleep(0.3)
    for r in c.replicas:
        assert httpx.get(f"{r.admin_url}/readyz", timeout=10).status_code == 200
    again = api(b, bob, "POST", f"/{request['id']}/deny", {"reason": "second thoughts"})
    assert again.status_code == 409 and "already decided" in again.json()["error"]


def test_a_call_waiting_with_progress_on_one_replica_is_released_by_the_other(cluster):
    c, issuer = cluster
    a, b = c.replicas
    alice, bob = issuer.mint("alice", audience=c.front_url), issuer.mint("bob", audience=c.front_url)
    before = len(Upstream.calls)
    body = {"jsonrpc": "2.0", "id": 20, "method": "tools/call",
            "params": {"name": "deploy", "arguments": {"env": "canary"}, "_meta": {"progressToken": "p20"}}}
    events: list[dict] = []

    def listen() -> None:
        headers = {**ACCEPT, "authorization": f"Bearer {alice}", "mcp-protocol-version": "2025-06-18"}
        with httpx.stream("POST", a.url, headers=headers, json=body, timeout=90) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))

    t = threading.Thread(target=listen)
    t.start()
    request = pending_on(b, bob, "deploy")
    deadline = time.monotonic() + 20
    while not any(e.get("method") == "notifications/progress" for e in events):
        assert time.monotonic() < deadline, events
        time.sleep(0.1)
    assert api(b, bob, "POST", f"/{request['id']}/approve", {"reason": "ok"}).status_code == 200
    t.join(60)
    assert events[-1]["id"] == 20 and events[-1]["result"]["content"][0]["text"] == "ran deploy"
    assert Upstream.calls[before:] == [("deploy", {"env": "canary"})]


def test_a_replica_stopped_while_a_call_is_held_cancels_it_for_every_replica(cluster):
    c, issuer = cluster
    a, b = c.replicas
    alice, bob = issuer.mint("alice", audience=c.front_url), issuer.mint("bob", audience=c.front_url)
    before = len(Upstream.calls)
    pool, answer = held_in_background(a.url, alice, call("deploy", 30, env="eu"))
    request = pending_on(b, bob, "deploy")
    c.kill(0, signal.SIGTERM)
    with contextlib.suppress(Exception):
        answer.result(30)
    pool.shutdown()
    try:
        shown = api(b, bob, "GET", f"/{request['id']}").json()
        assert shown["status"] == "cancelled" and "stopped" in shown["decision_reason"]
        assert api(b, bob, "POST", f"/{request['id']}/approve", {}).status_code == 409
    finally:
        c.start_replica(0)
    assert len(Upstream.calls) == before
