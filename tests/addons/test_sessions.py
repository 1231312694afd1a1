"""Sessions through the shipped bundle: bound to the identity they were handed to."""

from __future__ import annotations

import json

import pytest

from mcp_bastion.addons.sessions import Sessions
from mcp_bastion.core.vocab import Meta, StageName

from bundled import bundled, call, error_of, forwarded, result

pytestmark = pytest.mark.anyio

ALICE = {"sub": "alice", "groups": ["engineering"], "iss": "https://idp"}
BOB = {"sub": "bob", "groups": ["engineering"], "iss": "https://idp"}


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def initialize(b, identity, sid="sess-A"):
    f = b.flow("POST", call("initialize", 0, protocolVersion="2025-06-18", capabilities={}))
    await b.request(f, identity=identity)
    assert forwarded(f)
    await b.response(f, result(0, {"protocolVersion": "2025-06-18"}), headers={"mcp-session-id": sid})
    return sid


async def with_session(b, identity, sid, method="POST"):
    body = call("tools/call", 1, name="add") if method == "POST" else None
    f = b.flow(method, body, headers={"mcp-session-id": sid})
    await b.request(f, identity=identity)
    return f


async def test_the_creator_uses_its_session():
    with bundled() as b:
        sid = await initialize(b, ALICE)
        f = await with_session(b, ALICE, sid)
        assert forwarded(f) and StageName.SESSION in f.metadata[Meta.STAGES]


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
async def test_another_identity_presenting_the_session_is_refused_like_an_unknown_one(method):
    with bundled() as b:
        sid = await initialize(b, ALICE)
        other = await with_session(b, BOB, sid, method)
        forged = await with_session(b, BOB, "never-handed-out", method)
    for f in (other, forged):
        assert not forwarded(f) and f.response.status_code == 404
        assert error_of(f)["data"] == {"reason": "session"}
    assert json.loads(other.response.content)["error"] == json.loads(forged.response.content)["error"]


async def test_anonymous_callers_do_not_share_an_identitys_session():
    with bundled() as b:
        sid = await initialize(b, ALICE)
        f = await with_session(b, None, sid)
        assert f.response.status_code == 404


async def test_a_delete_by_the_owner_ends_the_session():
    with bundled() as b:
        sid = await initialize(b, ALICE)
        delete = await with_session(b, ALICE, sid, "DELETE")
        assert forwarded(delete)
        await b.response(delete, b"", ctype="application/json")
        after = await with_session(b, ALICE, sid)
        assert after.response.status_code == 404


async def test_an_upstream_that_hands_out_a_bound_session_again_does_not_give_it_away():
    with bundled() as b:
        await initialize(b, ALICE, "dup")
        f = b.flow("POST", call("initialize", 0, protocolVersion="2025-06-18", capabilities={}))
        await b.request(f, identity=BOB)
        await b.response(f, result(0, {}), headers={"mcp-session-id": "dup"})
        assert "mcp-session-id" not in f.response.headers
        assert b.addon(Sessions).bindings.check("dup", "https://idp bob").reason == "other_identity"


async def test_an_http_sse_session_is_bound_to_the_stream_that_announced_it():
    with bundled() as b:
        stream = b.flow("GET", headers={"accept": "text/event-stream"}, path="/sse")
        await b.request(stream, identity=ALICE)
        await b.response(stream, "event: endpoint\ndata: /messages?session_id=legacy-1\n\n", ctype="text/event-stream")
        mine = b.flow("POST", call("tools/call", 1, name="add"), path="/messages?session_id=legacy-1")
        await b.request(mine, identity=ALICE)
        theirs = b.flow("POST", call("tools/call", 1, name="add"), path="/messages?session_id=legacy-1")
        await b.request(theirs, identity=BOB)
    assert forwarded(mine)
    assert theirs.response.status_code == 404


async def test_a_session_check_that_raises_refuses_never_forwards(monkeypatch):
    """Fail closed: an exception in the session check answers a JSON error naming the stage."""
    from mcp_bastion.core.sessions import SessionBindings

    def explode(self, *a):
        raise RuntimeError("store broken")

    with bundled() as b:
        sid = await initialize(b, ALICE)
        monkeypatch.setattr(SessionBindings, "check", explode)
        f = await with_session(b, ALICE, sid)
    assert not forwarded(f) and f.response.status_code == 500
    assert error_of(f)["data"] == {"stage": "session", "error": "RuntimeError"}


@pytest.mark.parametrize(("module", "cls", "method"), [
    ("mcp_bastion.core.wire", "ParamHeaders", "of"), ("mcp_bastion.core.tasks", "TaskRegistry", "owned")])
async def test_a_2026_stage_that_raises_refuses_never_forwards(monkeypatch, module, cls, method):
    import importlib

    def explode(self, *a):
        raise RuntimeError("broken")

    monkeypatch.setattr(getattr(importlib.import_module(module), cls), method, explode)
    with bundled() as b:
        if method == "of":
            body = call("tools/call", 1, name="deploy", arguments={"env": "x"})
            f = b.flow("POST", body, headers={"mcp-protocol-version": "2026-07-28", "mcp-param-env": "x"})
        else:
            f = b.flow("POST", call("tasks/get", 1, taskId="t-1"))
        await b.request(f, identity=ALICE)
    assert not forwarded(f) and f.response.status_code == 500
    assert error_of(f)["data"]["stage"] in ("wire", "tasks")
