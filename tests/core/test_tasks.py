"""The task registry: a task is its creator's, remembered with the call it runs."""

from __future__ import annotations

import pytest

from mcp_bastion.core.message import classify
from mcp_bastion.core.tasks import TaskRegistry, created_task

CALL = classify({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "export"}})


@pytest.mark.parametrize(("result", "task_id"), [
    ({"task": {"taskId": "t-1", "status": "working"}}, "t-1"),
    ({"resultType": "task", "taskId": "t-2", "status": "working"}, "t-2"),
    ({"content": []}, None), ({"task": {"taskId": 7}}, None), ({"resultType": "complete", "taskId": "x"}, None),
    ("not a result", None),
], ids=["2025", "2026", "plain", "id-not-text", "not-a-task", "garbage"])
def test_created_task(result, task_id):
    assert created_task(result) == task_id


def test_only_the_creator_owns_a_task_per_upstream():
    r = TaskRegistry()
    assert r.created("up:1", "t", "alice", CALL)
    kept = r.owned("up:1", "t", "alice").call  # rebuilt from what the store keeps (it may be shared)
    assert (kept.raw, kept.kind, kept.method, kept.tool_name) == (CALL.raw, CALL.kind, "tools/call", "export")
    assert r.owned("up:1", "t", "bob") is None and r.owned("up:2", "t", "alice") is None
    assert not r.created("up:1", "t", "bob", CALL)  # an id cannot change hands
    assert r.owned("up:1", "t", "alice") is not None


def test_bounded_and_forgotten_when_idle():
    now = [0.0]
    r = TaskRegistry(max_tasks=2, idle_ttl=10, clock=lambda: now[0])
    for t in ("a", "b", "c"):
        r.created(None, t, "alice", CALL)
    assert len(r) == 2 and r.get(None, "a") is None
    now[0] = 11
    assert r.get(None, "b") is None
