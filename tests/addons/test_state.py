"""The State addon: two bundles on one real Redis behave as one gateway; an unreachable Redis refuses what
needs it (and only that), and the readiness probe says why."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from mitmproxy import exceptions

from mcp_bastion.addons.metrics import Metrics
from mcp_bastion.addons.state import State
from mcp_bastion.core.vocab import Meta

from bundled import bundled, call, error_of, forwarded, result
from harness import REDIS_SERVER, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(not shutil.which(REDIS_SERVER),
                                                    reason="redis-server is not installed")]

ALICE = {"sub": "alice", "groups": ["engineering"], "iss": "https://idp"}
BOB = {"sub": "bob", "groups": ["engineering"], "iss": "https://idp"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def url(redis_url):
    return redis_url


async def initialize(b, identity, sid):
    f = b.flow("POST", call("initialize", 0, protocolVersion="2025-06-18", capabilities={}))
    await b.request(f, identity=identity)
    assert forwarded(f)
    await b.response(f, result(0, {"protocolVersion": "2025-06-18"}), headers={"mcp-session-id": sid})
    return f


async def with_session(b, identity, sid, body=None):
    f = b.flow("POST", body or call("tools/call", 1, name="add"), headers={"mcp-session-id": sid})
    await b.request(f, identity=identity)
    return f


async def test_a_session_opened_on_one_replica_is_its_creators_on_the_other(url):
    with bundled(state_url=url, replica_id="ra") as a, bundled(state_url=url, replica_id="rb") as b:
        await initialize(a, ALICE, "sess-1")
        assert forwarded(await with_session(b, ALICE, "sess-1"))
        bob = await with_session(b, BOB, "sess-1")
        assert not forwarded(bob) and bob.response.status_code == 404
        assert error_of(bob)["data"] == {"reason": "session"}
        forged = await with_session(b, ALICE, "sess-never")
        assert forged.response.status_code == 404


async def test_a_task_is_its_creators_on_every_replica(url):
    with bundled(state_url=url) as a, bundled(state_url=url) as b:
        f = a.flow("POST", call("tools/call", 1, name="export", task={"ttl": 60000}))
        await a.request(f, identity=ALICE)
        await a.response(f, result(1, {"task": {"taskId": "t-77", "status": "working"}}))
        assert forwarded(f) or f.response.status_code == 200
        same = {"url": a.upstream, "mode": f"reverse:{a.upstream}"}  # both replicas front one upstream
        mine = b.flow("POST", call("tasks/get", 2, taskId="t-77"), **same)
        await b.request(mine, identity=ALICE)
        assert forwarded(mine)
        theirs = b.flow("POST", call("tasks/result", 3, taskId="t-77"), **same)
        await b.request(theirs, identity=BOB)
        assert not forwarded(theirs) and error_of(theirs)["data"] == {"reason": "task"}


async def test_unreachable_redis_refuses_what_needs_it_and_only_that():
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with bundled(state_url=dead, pin_tools=False) as b:
        f = await with_session(b, ALICE, "sess-1")
        assert not forwarded(f) and f.response.status_code == 503
        err = error_of(f)
        assert err["data"]["reason"] == "state_unavailable" and "shared state is unreachable" in err["message"]
        assert f.response.headers["retry-after"] == "1"
        assert "Unavailable" in f.metadata[Meta.ERROR]
        # No session, no task, no approval, no pins: nothing shared is needed, so it goes on.
        plain = b.flow("POST", call("tools/call", 2, name="add"))
        await b.request(plain, identity=ALICE)
        assert forwarded(plain)
        # A session the upstream hands out cannot be bound: the answer is withheld, never given unbound.
        init = b.flow("POST", call("initialize", 0, protocolVersion="2025-06-18", capabilities={}))
        await b.request(init, identity=ALICE)
        await b.response(init, result(0, {"protocolVersion": "2025-06-18"}), headers={"mcp-session-id": "s-new"})
        assert init.response.status_code in (502, 503) and "mcp-session-id" not in init.response.headers
        ok, checks = b.addon(Metrics).ready()
        assert not ok and checks["state"]["ok"] is False and "unreachable" in checks["state"]["why"]


async def test_the_readiness_probe_names_the_store_when_it_answers(url):
    with bundled(state_url=url) as b:
        ok, checks = b.addon(Metrics).ready()
        assert checks["state"] == {"ok": True, "store": f"redis {url} (replica {b.addon(State).hub.replica})"}


async def test_the_embedded_default_is_ready_without_anything_to_run():
    with bundled() as b:
        assert b.addon(Metrics).ready()[1]["state"] == {"ok": True, "store": "memory"}


@pytest.mark.parametrize("bad", ["http://127.0.0.1:6379", "127.0.0.1:6379", "redis://127.0.0.1:port/0"])
def test_a_bad_state_url_is_refused_at_start(bad):
    with pytest.raises(exceptions.OptionsError, match="state_url"), bundled(state_url=bad):
        pass


def test_a_missing_password_variable_is_refused_at_start(url, monkeypatch):
    monkeypatch.delenv("BASTION_TEST_NO_SUCH_VAR", raising=False)
    with pytest.raises(exceptions.OptionsError, match="BASTION_TEST_NO_SUCH_VAR"), \
            bundled(state_url=url, state_password_env="BASTION_TEST_NO_SUCH_VAR"):
        pass


def test_the_state_store_cannot_change_while_running(url):
    with bundled(state_url=url) as b, pytest.raises(exceptions.OptionsError, match="restart"):
        b.tctx.options.update(state_url=f"redis://127.0.0.1:{free_port()}/0")


async def test_with_pinning_on_every_tool_call_needs_the_shared_pins():
    with bundled(state_url=f"redis://127.0.0.1:{free_port()}/0") as b:
        f = b.flow("POST", call("tools/call", 2, name="add"))
        await b.request(f, identity=ALICE)
        assert not forwarded(f) and f.response.status_code == 503
        assert error_of(f)["data"] == {"stage": "pin", "error": "Unavailable", "reason": "state_unavailable"}


def test_pins_in_a_file_and_shared_pins_are_refused_together(url, tmp_path):
    with pytest.raises(exceptions.OptionsError, match="pin_store"), \
            bundled(state_url=url, pin_store=str(tmp_path / "pins.json")):
        pass


async def test_a_request_state_issued_through_one_replica_is_its_callers_on_the_other(url):
    with bundled(state_url=url, pin_tools=False) as a, bundled(state_url=url, pin_tools=False) as b:
        f = a.flow("POST", call("tools/call", 1, name="deploy"))
        await a.request(f, identity=ALICE)
        await a.response(f, result(1, {"resultType": "input_required", "requestState": "opaque-state-1",
                                       "inputRequests": {}}))
        retry = {"name": "deploy", "requestState": "opaque-state-1", "inputResponses": {}}
        mine = b.flow("POST", call("tools/call", 2, **retry))
        await b.request(mine, identity=ALICE)
        assert forwarded(mine)
        theirs = b.flow("POST", call("tools/call", 3, **retry))
        await b.request(theirs, identity=BOB)
        assert not forwarded(theirs) and error_of(theirs)["data"] == {"reason": "request_state"}


async def test_an_http_sse_endpoint_announced_through_one_replica_is_reachable_through_the_other(url):
    from mcp_bastion.addons.gateway import Gateway

    with bundled(state_url=url) as a, bundled(state_url=url) as b:
        before = b.flow("POST", call("tools/call", 1, name="add"), path="/custom/msg?session_id=s1")
        await b.request(before, identity=ALICE)
        assert error_of(before)["data"] == {"reason": "path"}
        stream = a.flow("GET", None, path="/sse", headers={"accept": "text/event-stream"})
        await a.request(stream, identity=ALICE)
        await a.response(stream, b"event: endpoint\ndata: /custom/msg?session_id=s1\n\n", ctype="text/event-stream")
        assert a.addon(Gateway).announced.get("/custom/msg") is not None
        after = b.flow("POST", call("tools/call", 2, name="add"), path="/custom/msg?session_id=s1")
        await b.request(after, identity=ALICE)
        assert forwarded(after)


APPROVE_DEPLOYS = """\
version: 1
default: allow
rules:
  - id: deploys
    match: {tools: [deploy]}
    action: approve
    approval: {approvers: [sre], timeout: 5m}
"""


async def test_redis_lost_between_the_decision_and_the_run_refuses_the_held_call(tmp_path):
    """The approved call must be marked used in the shared store before it runs; if that write cannot be
    made (Redis gone), the call is refused, never forwarded on the strength of a local copy."""
    from mcp_bastion.addons.approvals import Approvals
    from mcp_bastion.core.approvals import Person

    from harness import redis_server

    rules = tmp_path / "rules.yaml"
    rules.write_text(APPROVE_DEPLOYS)
    with redis_server() as r, bundled(state_url=r.endpoint, ruleset=str(rules), pin_tools=False) as b:
        store = b.addon(Approvals).store
        used = store.use

        def redis_gone_then_use(approval_id):
            r.stop()
            return used(approval_id)

        store.use = redis_gone_then_use
        held = b.flow("POST", call("tools/call", 1, name="deploy"))
        task = asyncio.create_task(b.request(held, identity=ALICE))
        for _ in range(500):
            pending = list(store.pending()) if r.proc.poll() is None else []
            if pending:
                break
            await asyncio.sleep(0.01)
        store.decide(pending[0].id, Person("bob", "https://idp", ("sre",)), True, None)
        await asyncio.wait_for(task, 10)
    assert not forwarded(held) and held.response.status_code == 503
    assert error_of(held)["data"]["reason"] == "state_unavailable"
