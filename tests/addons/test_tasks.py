"""Tasks through the shipped bundle: a task belongs to the caller whose call created it (both eras)."""

from __future__ import annotations

import json

import pytest

from mcp_bastion.core import errors

from bundled import bundled, call, error_of, forwarded, result

pytestmark = pytest.mark.anyio

ALICE = {"sub": "alice", "groups": ["engineering"], "iss": "https://idp"}
BOB = {"sub": "bob", "groups": ["engineering"], "iss": "https://idp"}
RULES = """\
version: 1
default: allow
rules:
  - id: no-export
    match: {subjects: [bob], tools: [export]}
    action: deny
"""
TASK_2025 = {"task": {"taskId": "t-1", "status": "working", "ttl": 60000}}
TASK_2026 = {"resultType": "task", "taskId": "t-1", "status": "working", "ttlMs": 60000}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def ruleset(tmp_path):
    p = tmp_path / "rules.yaml"
    p.write_text(RULES)
    return p


async def create(b, created, identity=ALICE, tool="export"):
    f = b.flow("POST", call("tools/call", 1, name=tool, arguments={}, task={"ttl": 60000}))
    await b.request(f, identity=identity)
    assert forwarded(f)
    await b.response(f, result(1, created))


async def fetch(b, method, identity, task_id="t-1", **extra):
    f = b.flow("POST", call(method, 2, taskId=task_id, **extra))
    await b.request(f, identity=identity)
    return f


@pytest.mark.parametrize("created", [TASK_2025, TASK_2026], ids=["2025", "2026"])
@pytest.mark.parametrize("method", ["tasks/get", "tasks/result", "tasks/cancel", "tasks/update"])
async def test_only_the_creator_reaches_a_task(ruleset, created, method):
    with bundled(ruleset=str(ruleset)) as b:
        await create(b, created)
        mine = await fetch(b, method, ALICE)
        theirs = await fetch(b, method, BOB)
        anonymous = await fetch(b, method, None)
        unknown = await fetch(b, method, ALICE, task_id="t-404")
    assert forwarded(mine)
    for f in (theirs, anonymous, unknown):
        assert not forwarded(f)
        assert error_of(f)["code"] == errors.FORBIDDEN and error_of(f)["data"] == {"reason": "task"}
    assert json.loads(theirs.response.content)["error"]["message"] == \
        json.loads(unknown.response.content)["error"]["message"]  # nobody learns another's task exists


async def test_a_task_listing_shows_a_caller_only_their_tasks(ruleset):
    with bundled(ruleset=str(ruleset)) as b:
        await create(b, TASK_2025, ALICE)
        await create(b, {"task": {"taskId": "t-2", "status": "working"}}, BOB, tool="read")
        f = b.flow("POST", call("tasks/list", 3))
        await b.request(f, identity=ALICE)
        out = await b.response(f, result(3, {"tasks": [{"taskId": "t-1"}, {"taskId": "t-2"}, {"taskId": "t-x"}]}))
    assert [t["taskId"] for t in json.loads(out)["result"]["tasks"]] == ["t-1"]


async def test_a_task_fetch_is_checked_as_its_call_under_the_ruleset_in_force(ruleset):
    """Alice's export ran as a task; once a rule denies her exports, she cannot fetch its outcome."""
    with bundled(ruleset=str(ruleset)) as b:
        await create(b, TASK_2026, ALICE)
        assert forwarded(await fetch(b, "tasks/get", ALICE))
        ruleset.write_text(RULES.replace("subjects: [bob]", "subjects: [alice, bob]"))
        b.tctx.options.update(ruleset="")
        b.tctx.options.update(ruleset=str(ruleset))
        f = await fetch(b, "tasks/get", ALICE)
    assert not forwarded(f)
    err = error_of(f)
    assert err["code"] == errors.DENIED and err["data"]["rule"] == "no-export"
    assert "tools/call export" in err["message"]


async def test_an_upstream_that_reuses_a_task_id_for_another_caller_is_withheld(ruleset):
    with bundled(ruleset=str(ruleset)) as b:
        await create(b, TASK_2025, ALICE)
        f = b.flow("POST", call("tools/call", 1, name="read", arguments={}))
        await b.request(f, identity=BOB)
        out = await b.response(f, result(1, TASK_2025))
    assert json.loads(out)["error"]["code"] == errors.UPSTREAM_ERROR
