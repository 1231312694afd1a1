"""Approvals in the shipped bundle: held calls, the API, grants, retry mode, and who may decide."""

from __future__ import annotations

import asyncio
import json

import pytest

from mcp_bastion.addons.approvals import Approvals
from mcp_bastion.core import errors
from mcp_bastion.core.vocab import Meta

from bundled import bundled, error_of, forwarded
from bundled import tool_call as call

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


ALICE = {"sub": "alice", "groups": ["engineering"], "iss": "https://idp", "name": "Alice"}
BOB = {"sub": "bob", "groups": ["engineering", "sre"], "iss": "https://idp", "name": "Bob"}
SRE_ALICE = {**ALICE, "groups": ["engineering", "sre"]}
CAROL = {"sub": "carol", "groups": ["contractors"], "iss": "https://idp"}

RULES = """\
version: 1
default: allow
rules:
  - id: prod-deploys
    match: {tools: [deploy], arguments: [{path: env, equals: prod}]}
    action: approve
    reason: production changes need a second engineer
    approval: {approvers: [sre], timeout: 5m, grant: 15m}
  - id: rotate
    match: {tools: [rotate_keys]}
    action: approve
    approval: {approvers: [sre], mode: retry}
  - id: quick
    match: {tools: [quick]}
    action: approve
    approval: {approvers: [sre], timeout: 1}
"""


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return str(path)


async def api(b, who, method="GET", path="", body=None):
    f = b.flow(method, body, path="/bastion/approvals" + path)
    if method == "GET":
        f.request.headers.pop("accept", None)
    await b.request(f, identity=who)
    return f.response.status_code, json.loads(f.response.content)


async def pending_id(b, who=BOB) -> str:
    for _ in range(1000):  # up to 10 s on a busy machine
        status, items = await api(b, who)
        if items and items[-1]["status"] == "pending":
            return items[-1]["id"]
        await asyncio.sleep(0.01)
    raise AssertionError("nothing pending")


async def test_a_held_call_waits_other_calls_go_on_and_it_runs_once_approved(rules):
    with bundled(ruleset=rules) as b:
        held = b.flow("POST", call("deploy", 1, env="prod"))
        task = asyncio.create_task(b.request(held, identity=ALICE))
        approval = await pending_id(b)
        assert not task.done() and held.response is None  # nothing reached the upstream, nothing answered
        other = b.flow("POST", call("deploy", 2, env="staging"))
        await b.request(other, identity=ALICE)
        assert forwarded(other)  # the held call holds nothing else up
        status, items = await api(b, BOB)
        (item,) = [i for i in items if i["id"] == approval]
        assert item["requester"] == "Alice" and item["tool"] == "deploy" and item["arguments"] == {"env": "prod"}
        assert item["rule"] == "prod-deploys" and item["status"] == "pending" and item["expires"]
        status, out = await api(b, BOB, "POST", f"/{approval}/approve", {"reason": "change ticket 42"})
        assert status == 200 and out["status"] == "approved" and out["decided_by"] == "Bob"
        await asyncio.wait_for(task, 5)
        assert forwarded(held)
        info = held.metadata[Meta.APPROVAL]
        assert info["id"] == approval and info["decided_by"] == "Bob" and info["waited_ms"] >= 0
        status, out = await api(b, BOB, "POST", f"/{approval}/approve")
        assert status == 409  # decided once; the call ran once


async def test_a_denial_names_the_rule_the_reason_and_the_approval(rules):
    with bundled(ruleset=rules) as b:
        held = b.flow("POST", call("deploy", 3, env="prod"))
        task = asyncio.create_task(b.request(held, identity=ALICE))
        approval = await pending_id(b)
        status, out = await api(b, BOB, "POST", f"/{approval}/deny", {})
        assert status == 409 and "needs a reason" in out["error"]
        await api(b, BOB, "POST", f"/{approval}/deny", {"reason": "freeze until Monday"})
        await asyncio.wait_for(task, 5)
        assert not forwarded(held)
        err = error_of(held)
        assert err["code"] == errors.DENIED and err["data"]["approval"] == approval
        assert err["data"]["rule"] == "prod-deploys" and "freeze until Monday" in err["message"]


@pytest.mark.parametrize(("who", "why"), [(ALICE, "not an approver"), (SRE_ALICE, "own request"),
                                          (CAROL, "not an approver")])
async def test_who_may_not_decide(rules, who, why):
    with bundled(ruleset=rules) as b:
        held = b.flow("POST", call("deploy", 4, env="prod"))
        task = asyncio.create_task(b.request(held, identity=SRE_ALICE))
        approval = await pending_id(b, BOB)
        status, out = await api(b, who, "POST", f"/{approval}/approve")
        assert status in (404, 409), (why, out)
        assert not task.done()
        b.addon(Approvals).done()  # the gateway stops: what was pending is cancelled, never run
        await asyncio.wait_for(task, 5)
        assert not forwarded(held) and error_of(held)["data"]["status"] == "cancelled"


async def test_an_unanswered_request_expires_and_is_refused(rules):
    with bundled(ruleset=rules) as b:
        held = b.flow("POST", call("quick", 5))
        await asyncio.wait_for(b.request(held, identity=ALICE), 5)
        assert not forwarded(held)
        assert error_of(held)["code"] == errors.APPROVAL_REQUIRED and error_of(held)["data"]["status"] == "expired"


async def test_retry_mode_answers_at_once_and_the_same_call_passes_once_approved(rules):
    with bundled(ruleset=rules) as b:
        first = b.flow("POST", call("rotate_keys", 6, key="db"))
        await b.request(first, identity=ALICE)
        err = error_of(first)
        assert err["code"] == errors.APPROVAL_REQUIRED
        approval = err["data"]["approval"]
        again = b.flow("POST", call("rotate_keys", 7, key="db"))
        await b.request(again, identity=ALICE)
        assert error_of(again)["data"]["approval"] == approval  # the same request, not a new one
        await api(b, BOB, "POST", f"/{approval}/approve")
        other_args = b.flow("POST", call("rotate_keys", 8, key="cache"))
        await b.request(other_args, identity=ALICE)
        assert not forwarded(other_args)  # a decision binds to the exact call
        ok = b.flow("POST", call("rotate_keys", 9, key="db"))
        await b.request(ok, identity=ALICE)
        assert forwarded(ok)
        once = b.flow("POST", call("rotate_keys", 10, key="db"))
        await b.request(once, identity=ALICE)
        assert not forwarded(once)  # approved once, runs once


async def test_a_grant_window_lets_the_same_identity_through(rules):
    with bundled(ruleset=rules) as b:
        held = b.flow("POST", call("deploy", 11, env="prod"))
        task = asyncio.create_task(b.request(held, identity=ALICE))
        approval = await pending_id(b)
        await api(b, BOB, "POST", f"/{approval}/approve", {"reason": "release day"})
        await asyncio.wait_for(task, 5)
        again = b.flow("POST", call("deploy", 12, env="prod"))
        await b.request(again, identity=ALICE)
        assert forwarded(again) and again.metadata[Meta.APPROVAL]["status"] == "granted"
        someone_else = b.flow("POST", call("deploy", 13, env="prod"))
        task = asyncio.create_task(b.request(someone_else, identity=BOB))
        await pending_id(b, SRE_ALICE)  # bob's call is held: the grant was alice's
        b.addon(Approvals).done()
        await asyncio.wait_for(task, 5)


async def test_the_api_needs_a_verified_reviewer(rules):
    with bundled(ruleset=rules) as b:
        status, out = await api(b, None)
        assert status == 403 and "verified reviewer" in out["error"]


async def test_the_webhook_hears_of_each_request_and_decision(rules):
    import http.server
    import threading

    heard: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            heard.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with bundled(ruleset=rules, approval_webhook=f"http://127.0.0.1:{srv.server_port}/hook") as b:
            held = b.flow("POST", call("deploy", 21, env="prod"))
            task = asyncio.create_task(b.request(held, identity=ALICE))
            approval = await pending_id(b)
            await api(b, BOB, "POST", f"/{approval}/approve", {"reason": "go"})
            await asyncio.wait_for(task, 5)
            for _ in range(200):
                if len(heard) >= 2:
                    break
                await asyncio.sleep(0.01)
    finally:
        srv.shutdown()
    assert approval in heard[0]["text"] and "scripts/approvals approve" in heard[0]["text"]
    assert heard[0]["approval"]["tool"] == "deploy" and heard[0]["approval"]["status"] == "pending"
    assert "approved by Bob: go" in heard[1]["text"]


def test_a_webhook_that_is_not_a_url_stops_the_gateway_at_start(rules):
    from mitmproxy import exceptions

    with pytest.raises(exceptions.OptionsError, match="approval_webhook"):
        with bundled(ruleset=rules, approval_webhook="slack-channel"):
            pass


@pytest.mark.parametrize("operator", ["resume", "kill"])
async def test_in_mitmweb_a_held_call_is_intercepted_resume_approves_and_kill_denies(rules, operator):
    with bundled(ruleset=rules) as b:
        held = b.flow("POST", call("deploy", 31, env="prod"))
        task = asyncio.create_task(b.request(held, identity=ALICE))
        approval = await pending_id(b)
        assert held.intercepted  # what mitmweb shows
        getattr(held, operator)()
        await asyncio.wait_for(task, 5)
        status, item = await api(b, BOB, "GET", f"/{approval}")
        if operator == "resume":
            assert forwarded(held) and item["status"] == "used"
        else:
            assert not forwarded(held) and item["status"] == "denied"
        assert item["decided_by"] == "the gateway's local operator (mitmweb)"
        assert not held.intercepted


@pytest.mark.parametrize("created", [
    {"task": {"taskId": "t-9", "status": "working", "ttl": 60000}},
    {"resultType": "task", "taskId": "t-9", "status": "working", "ttlMs": 60000},
], ids=["2025", "2026"])
async def test_an_approved_call_that_became_a_task_can_be_fetched_without_asking_again(rules, created):
    from bundled import call as request
    from bundled import result

    with bundled(ruleset=rules) as b:
        held = b.flow("POST", request("tools/call", 41, name="deploy", arguments={"env": "prod"}, task={"ttl": 60000}))
        task = asyncio.create_task(b.request(held, identity=ALICE))
        approval = await pending_id(b)
        await api(b, BOB, "POST", f"/{approval}/approve", {"reason": "ok"})
        await asyncio.wait_for(task, 5)
        assert forwarded(held)
        await b.response(held, result(41, created))
        f = b.flow("POST", request("tasks/get", 42, taskId="t-9"))
        await b.request(f, identity=ALICE)
        assert forwarded(f), f.response and f.response.content
        status, items = await api(b, BOB)
        assert not [i for i in items if i["status"] == "pending"]  # the fetch asked nobody again


async def test_an_approval_stage_that_fails_refuses_the_call(rules):
    with bundled(ruleset=rules) as b:
        def broken(approval):
            raise RuntimeError("store down")

        b.addon(Approvals).store.create = broken
        f = b.flow("POST", call("deploy", 51, env="prod"))
        await b.request(f, identity=ALICE)
        assert not forwarded(f)
        assert error_of(f)["code"] == errors.GATEWAY_ERROR and "approval" in json.dumps(error_of(f))


async def test_a_2026_stateless_call_is_held_and_approved_the_same_way(rules):
    from bundled import META, V2026, rpc

    with bundled(ruleset=rules) as b:
        body = rpc("tools/call", {"name": "deploy", "arguments": {"env": "prod"}, "_meta": META}, 61)
        held = b.flow("POST", body, headers={**V2026, "mcp-method": "tools/call", "mcp-name": "deploy"})
        task = asyncio.create_task(b.request(held, identity=ALICE))
        approval = await pending_id(b)
        assert held.response is None
        await api(b, BOB, "POST", f"/{approval}/approve", {"reason": "2026"})
        await asyncio.wait_for(task, 5)
        assert forwarded(held) and held.metadata[Meta.APPROVAL]["status"] == "used"


async def test_the_rounds_of_an_approved_2026_multi_round_trip_call_are_not_asked_again(tmp_path):
    from bundled import META, V2026, result, rpc

    rules = tmp_path / "no-grant.yaml"  # no grant window: only the requestState lets a round through
    rules.write_text(RULES.replace(", grant: 15m", ""))

    def deploy(id_, state=None, **extra):
        params = {"name": "deploy", "arguments": {"env": "prod", **extra}, "_meta": META}
        if state is not None:
            params |= {"requestState": state, "inputResponses": {"who": {"action": "accept"}}}
        return b.flow("POST", rpc("tools/call", params, id_),
                      headers={**V2026, "mcp-method": "tools/call", "mcp-name": "deploy"})

    with bundled(ruleset=str(rules)) as b:
        held = deploy(71)
        task = asyncio.create_task(b.request(held, identity=ALICE))
        approval = await pending_id(b)
        await api(b, BOB, "POST", f"/{approval}/approve", {"reason": "mrtr"})
        await asyncio.wait_for(task, 5)
        assert forwarded(held)
        await b.response(held, result(71, {"resultType": "input_required", "requestState": "s-1",
                                           "inputRequests": {"who": {"method": "elicitation/create"}}}))
        again = deploy(72, state="s-1")
        await asyncio.wait_for(b.request(again, identity=ALICE), 5)  # not held: the same call's next round
        assert forwarded(again) and again.metadata[Meta.APPROVAL]["status"] == "continued"
        assert again.metadata[Meta.APPROVAL]["id"] == approval
        await b.response(again, result(72, {"resultType": "input_required", "requestState": "s-2",
                                            "inputRequests": {"sure": {"method": "elicitation/create"}}}))
        third = deploy(73, state="s-2")  # and the round after it
        await asyncio.wait_for(b.request(third, identity=ALICE), 5)
        assert forwarded(third)
        other = deploy(74, state="s-1", force=True)  # the state does not carry over to another call
        task = asyncio.create_task(b.request(other, identity=ALICE))
        await asyncio.sleep(0.2)
        assert not task.done() and other.response is None, other.response and other.response.content
        task.cancel()


@pytest.mark.parametrize(("change", "holdable"), [
    (lambda f: None, True),
    (lambda f: setattr(f.request, "path", "/mcp?q=\xff"), False),
    (lambda f: setattr(f.request, "path", "/mcp?q=\x7f"), False),
    (lambda f: f.request.headers.__setitem__("x-note", "a\rb"), False),
    (lambda f: f.request.headers.__setitem__("cookie", "c=" + "a" * 40_000), False),
    (lambda f: f.request.headers.__setitem__("x-name", "Zoë"), False),
])
def test_only_a_request_the_holding_server_reads_as_mitmproxy_does_is_held_on_a_stream(change, holdable):
    from mitmproxy.proxy.mode_specs import ProxyMode
    from mitmproxy.test import taddons, tflow

    from mcp_bastion.addons.approvals import _holdable

    with taddons.context():
        f = tflow.tflow()
        f.client_conn.proxy_mode = ProxyMode.parse("reverse:http://127.0.0.1:9")
        f.request.path = "/mcp"
        change(f)
        assert _holdable(f) is holdable


async def test_a_held_call_whose_flow_ends_before_the_holding_server_is_cancelled(rules):
    with bundled(ruleset=rules) as b:
        approvals = b.addon(Approvals)
        f = b.flow("POST", call("deploy", 81, env="prod"))
        cancelled: list[str] = []
        from mcp_bastion.glue.holding import Ticket

        async def never():
            raise AssertionError("not redeemed")

        key = approvals.holding.issue(Ticket("http", "127.0.0.1", 9, 81, never, lambda n: [],
                                             gone=cancelled.append))
        approvals._tickets[f.id] = key
        approvals.error(f)
        assert cancelled and approvals.holding.withdraw(key) is None


def test_the_gate_refuses_a_call_still_waiting_for_approval_that_was_not_diverted():
    from mitmproxy.test import taddons, tflow

    from mcp_bastion.addons.gate import Gate
    from mcp_bastion.glue import flowstate as fs

    gate = Gate(request=["parse"], response=[])
    with taddons.context(gate):
        f = tflow.tflow()
        f.metadata[Meta.MCP] = {"request": []}
        fs.mark_stage(f, "parse")
        f.metadata[Meta.APPROVAL] = {"id": "apr-1", "status": "pending"}
        gate.request(f)
        assert f.response is not None and error_of(f)["data"]["missing"] == ["approval"]
        g = tflow.tflow()
        g.metadata[Meta.MCP] = {"request": []}
        fs.mark_stage(g, "parse")
        g.metadata[Meta.APPROVAL] = {"id": "apr-2", "status": "pending"}
        g.metadata[Meta.HELD] = {"approval": "apr-2"}
        gate.request(g)
        assert g.response is None  # on its way to the holding server, which waits for the decision
