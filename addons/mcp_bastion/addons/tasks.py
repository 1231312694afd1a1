"""
The Tasks stage: a task belongs to the caller whose call created it.

A message stage, after Wire and before Policy (see `core.tasks`):

- a call's result that creates a task (either era) is remembered with its caller
  and the call itself;
- `tasks/get`, `tasks/result`, `tasks/cancel`, `tasks/update` for a task of
  another caller, or one never seen created, are refused (the same answer for
  both); for the caller's own task the request goes on linked to the call it
  belongs to (`Message.request`), so the Policy checks that call again under the
  ruleset in force now;
- a `tasks/list` answer shows a caller only their own tasks.
"""

from __future__ import annotations

from mcp_bastion.core import errors
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.message import Carrier, Message
from mcp_bastion.core.pipeline import Context, Outcome, Pass, Refuse, Replace, Verdict
from mcp_bastion.core.sessions import owner_of
from mcp_bastion.core.state import Backend, Hub
from mcp_bastion.core.tasks import IDLE_TTL, LIST_METHOD, MAX_TASKS, TASK_METHODS, TaskRegistry, created_task
from mcp_bastion.core.vocab import Action, Direction, Kind, StageName


class Tasks:
    name = StageName.TASKS

    def __init__(self, hub: Hub | None = None) -> None:
        self.registry: TaskRegistry

        def build(backend: Backend) -> None:
            self.registry = TaskRegistry(table=backend.table("tasks", idle_ttl=IDLE_TTL, max_items=MAX_TASKS))

        (hub or Hub()).watch(build)

    def check(self, m: Message, cx: Context) -> Outcome:
        if m.carrier is Carrier.INPUT_REQUIRED:
            return Pass()  # a listen subscription to task ids is checked like tasks/get
        owner = owner_of(cx.identity)
        if m.direction == Direction.S2C:
            if m.kind != Kind.RESPONSE:
                return Pass()
            if m.answers == LIST_METHOD:
                return self._own_tasks_only(m, cx, owner)
            task_id = created_task(m.params)
            if task_id is not None and m.request is not None:
                if not self.registry.created(cx.upstream, task_id, owner, m.request):
                    refusal = Refusal(502, errors.UPSTREAM_ERROR, "the upstream handed out a task id that belongs "
                                      "to another caller; the answer was withheld", {"reason": "task"})
                    return Refuse(refusal, (Verdict(StageName.RESP_TASKS, Action.DENY, None, "task id reused"),))
            return Pass()
        if m.kind != Kind.REQUEST or m.method not in TASK_METHODS:
            return Pass()
        task_id = m.params.get("taskId") if isinstance(m.params, dict) else None
        record = self.registry.owned(cx.upstream, task_id, owner) if isinstance(task_id, str) else None
        if record is None:
            why = "no task of this caller has that id"
            refusal = Refusal(403, errors.FORBIDDEN, f"{m.method} refused: {why}", {"reason": "task"})
            return Refuse(refusal, (Verdict(StageName.TASKS, Action.DENY, None, why),))
        # The same content, linked to the call the task runs: the Policy checks that call again.
        return Replace(m.placed(request=record.call))

    def _own_tasks_only(self, m: Message, cx: Context, owner: str) -> Outcome:
        tasks = m.params.get("tasks") if isinstance(m.params, dict) else None
        if not isinstance(tasks, list):
            return Pass()
        mine = [t for t in tasks if isinstance(t, dict) and isinstance(t.get("taskId"), str)
                and self.registry.owned(cx.upstream, t["taskId"], owner) is not None]
        if len(mine) == len(tasks):
            return Pass()
        v = Verdict(StageName.RESP_TASKS, Action.FILTER, None, f"{len(tasks) - len(mine)} task(s) of other callers "
                    "hidden", {"method": LIST_METHOD})
        return Replace(m.replace({**m.raw, "result": {**m.params, "tasks": mine}}), (v,))
