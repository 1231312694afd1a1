"""
Which caller each task belongs to, and which call it runs.

A server may answer a `tools/call` with a task instead of a result (2025-11-25:
`{"task": {"taskId": ...}}` when the client asked with `params.task`; 2026-07-28,
the tasks extension: a flat result with `resultType: "task"` and `taskId`). The
task id is then all a later `tasks/*` request shows, so the gateway remembers, for
each task an upstream created, the identity that made the call and the call itself:
`tasks/*` from anyone else, or for a task id it never saw created, is refused; a
task listing shows a caller only their own tasks; and fetching a task's outcome is
checked as the call itself would be, under the ruleset in force at fetch time.

Bounded and forgotten after a period without use. Pure: no mitmproxy import.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .message import Message, from_record, to_record
from .state import MemoryTable, Table

TASK_METHODS = frozenset({"tasks/get", "tasks/result", "tasks/cancel", "tasks/update"})
LIST_METHOD = "tasks/list"
MAX_TASKS = 100_000
IDLE_TTL = 7 * 24 * 3600.0


def created_task(result: Any) -> str | None:
    """The id of the task a call's result creates, in either form, else None."""
    if not isinstance(result, dict):
        return None
    task = result.get("task")
    if isinstance(task, dict) and isinstance(task.get("taskId"), str):
        return task["taskId"]  # 2025-11-25
    if result.get("resultType") == "task" and isinstance(result.get("taskId"), str):
        return result["taskId"]  # 2026-07-28 tasks extension
    return None


@dataclass(frozen=True, slots=True)
class TaskRecord:
    owner: str
    upstream: str | None
    call: Message  # the client's call the task runs


class TaskRegistry:
    """(upstream, task id) -> its record, over a `core.state.Table` (embedded unless given a shared one)."""

    def __init__(self, max_tasks: int = MAX_TASKS, idle_ttl: float = IDLE_TTL,
                 clock: Callable[[], float] = time.monotonic, table: Table | None = None):
        self.table = table if table is not None else MemoryTable("tasks", idle_ttl, max_tasks, clock)

    def __len__(self) -> int:
        return len(self.table)

    def created(self, upstream: str | None, task_id: str, owner: str, call: Message) -> bool:
        """Remember a task; False (and no change) if the id already belongs to someone else."""
        value = json.dumps({"owner": owner, "upstream": upstream, "call": to_record(call)},
                           ensure_ascii=False, separators=(",", ":"))
        known = self.table.claim(_key(upstream, task_id), value)
        if known == value:
            return True
        record = _record(known)
        if record is None or record.owner != owner:
            return False
        self.table.put(_key(upstream, task_id), value)  # the same caller's task: the latest call it runs
        return True

    def get(self, upstream: str | None, task_id: str) -> TaskRecord | None:
        known = self.table.get(_key(upstream, task_id))
        return _record(known) if known is not None else None

    def owned(self, upstream: str | None, task_id: str, owner: str) -> TaskRecord | None:
        """The task if `owner` created it (None for anyone else, and for an id never seen)."""
        record = self.get(upstream, task_id)
        return record if record is not None and record.owner == owner else None


def _key(upstream: str | None, task_id: str) -> str:
    # The upstream cannot contain a NUL (a canonical origin); the task id may be anything.
    return f"{upstream or ''}\x00{task_id}"


def _record(value: str) -> TaskRecord | None:
    try:
        data = json.loads(value)
        return TaskRecord(data["owner"], data["upstream"], from_record(data["call"]))
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: owned by nobody, so refused
