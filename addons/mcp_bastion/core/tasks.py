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

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .message import Message

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
    def __init__(self, max_tasks: int = MAX_TASKS, idle_ttl: float = IDLE_TTL,
                 clock: Callable[[], float] = time.monotonic):
        self.max_tasks = max_tasks
        self.idle_ttl = idle_ttl
        self._clock = clock
        self._tasks: OrderedDict[tuple[str | None, str], tuple[TaskRecord, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tasks)

    def created(self, upstream: str | None, task_id: str, owner: str, call: Message) -> bool:
        """Remember a task; False (and no change) if the id already belongs to someone else."""
        known = self.get(upstream, task_id)
        if known is not None and known.owner != owner:
            return False
        self._tasks[(upstream, task_id)] = (TaskRecord(owner, upstream, call), self._clock())
        self._tasks.move_to_end((upstream, task_id))
        while len(self._tasks) > self.max_tasks:
            self._tasks.popitem(last=False)
        return True

    def get(self, upstream: str | None, task_id: str) -> TaskRecord | None:
        entry = self._tasks.get((upstream, task_id))
        if entry is None:
            return None
        record, used = entry
        if self._clock() - used > self.idle_ttl:
            del self._tasks[(upstream, task_id)]
            return None
        self._tasks[(upstream, task_id)] = (record, self._clock())
        self._tasks.move_to_end((upstream, task_id))
        return record

    def owned(self, upstream: str | None, task_id: str, owner: str) -> TaskRecord | None:
        """The task if `owner` created it (None for anyone else, and for an id never seen)."""
        record = self.get(upstream, task_id)
        return record if record is not None and record.owner == owner else None
