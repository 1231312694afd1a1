"""The stage contract: outcome precedence, replaced messages, holds, and decisions (no mitmproxy)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest

from mcp_bastion.core import errors
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.identity import ANONYMOUS
from mcp_bastion.core.message import Carrier, Message, classify
from mcp_bastion.core.pipeline import (
    Context,
    ContractError,
    Drop,
    Hold,
    Outcome,
    Pass,
    Refuse,
    Replace,
    Stage,
    StageError,
    Verdict,
    direction_of,
    run,
    run_now,
)
from mcp_bastion.core.vocab import Action, Direction, StageName

CX = Context(identity=ANONYMOUS, upstream="127.0.0.1:9", flow_id="f1")


def call(tool: str, msg_id: int = 1, **arguments) -> Message:
    params = {"name": tool, **({"arguments": arguments} if arguments else {})}
    raw = {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": params}
    return classify(raw).placed(direction=Direction.C2S)


def refusal(why: str = "no") -> Refusal:
    return Refusal(403, errors.DENIED, why, {"rule": why})


class Scripted:
    """A stage that records every message it is handed and answers with `decide(message)`."""

    def __init__(self, name: str, decide: Callable[[Message], object] = lambda m: Pass()):
        self.name = name
        self.decide = decide
        self.seen: list[Message] = []

    def check(self, m: Message, cx: Context) -> Outcome:
        self.seen.append(m)
        return self.decide(m)  # type: ignore[return-value]


def rewritten(env: str) -> Callable[[Message], Outcome]:
    """Replace a tools/call with the same call whose argument `env` is `env` (what a masking stage does)."""
    return lambda m: Replace(m.replace({**m.raw, "params": {**m.params, "arguments": {"env": env}}}),
                             (Verdict("rewrite", Action.ALLOW, "r-rewrite"),))


RUNNERS = {
    "run": lambda stages, msgs: asyncio.run(run(stages, msgs, CX)),
    "run_now": lambda stages, msgs: run_now(stages, msgs, CX),
}


@pytest.fixture(params=list(RUNNERS))
def runner(request):
    return RUNNERS[request.param]


def test_a_test_stage_is_a_stage():
    assert isinstance(Scripted("x"), Stage)


# --- precedence within one message ------------------------------------------------------


def test_all_pass_changes_nothing(runner):
    a, b = Scripted("a"), Scripted("b")
    m = call("read_file")
    out = runner([a, b], [m])
    (r,) = out.results
    assert a.seen == [m] and b.seen == [m]
    assert r.message is m and r.original is m and not r.changed and not out.changed
    assert isinstance(r.outcome, Pass) and r.refusal is None
    assert out.messages == [m] and out.refused == []


def test_the_first_refusal_ends_the_run_for_that_message(runner):
    first = Scripted("first", lambda m: Refuse(refusal("first")))
    second = Scripted("second", lambda m: Refuse(refusal("second")))
    after = Scripted("after")
    out = runner([first, second, after], [call("deploy")])
    (r,) = out.results
    assert second.seen == [] and after.seen == []
    assert r.message is None and r.refusal.message == "first"
    assert out.refused == [r] and out.messages == [] and out.changed


def test_the_first_drop_ends_the_run_for_that_message(runner):
    dropper = Scripted("drop", lambda m: Drop("nobody must see it"))
    refuser = Scripted("refuse", lambda m: Refuse(refusal()))
    out = runner([dropper, refuser], [call("deploy")])
    (r,) = out.results
    assert refuser.seen == []
    assert isinstance(r.outcome, Drop) and r.outcome.reason == "nobody must see it"
    assert r.message is None and r.refusal is None
    assert out.refused == [] and out.messages == [] and out.changed


def test_a_refusal_after_a_replacement_still_refuses(runner):
    out = runner([Scripted("rewrite", rewritten("safe")), Scripted("deny", lambda m: Refuse(refusal()))], [call("x")])
    (r,) = out.results
    assert r.message is None and isinstance(r.outcome, Refuse)


def test_later_stages_see_the_replaced_message_never_the_original(runner):
    """The stale-body defect: a stage after a replacing stage reads the new message."""
    m = call("deploy")
    first = Scripted("first", rewritten("staging"))
    second = Scripted("second")
    third = Scripted("third", rewritten("dry-run"))
    fourth = Scripted("fourth")
    out = runner([first, second, third, fourth], [m])
    (r,) = out.results
    assert first.seen == [m]
    (seen2,) = second.seen
    assert seen2 is not m and seen2.arguments == {"env": "staging"}
    assert third.seen == [seen2]  # a Pass hands the same value on
    (seen4,) = fourth.seen
    assert seen4.arguments == {"env": "dry-run"}
    assert r.original is m and r.message is seen4 and r.changed and out.changed
    assert out.messages == [seen4]
    assert m.arguments is None  # never changed in place
    assert isinstance(r.outcome, Pass)  # the last stage's outcome; `changed` tells a replacement happened


def test_a_replaced_message_keeps_where_it_travels(runner):
    m = call("deploy").placed(carrier=Carrier.EVENT)
    seen = Scripted("seen")
    runner([Scripted("r", rewritten("other")), seen], [m])
    (s,) = seen.seen
    assert (s.direction, s.carrier) == (Direction.C2S, Carrier.EVENT)


def test_each_message_of_a_body_runs_on_its_own(runner):
    """A refusal of one message does not stop the stages over the others; Run.refused lists every one."""
    deny_deploy = Scripted("policy", lambda m: Refuse(refusal(m.tool_name)) if m.tool_name in ("deploy", "drop")
                           else Pass())
    after = Scripted("after")
    msgs = [call("read", 1), call("deploy", 2), call("lookup", 3), call("drop", 4)]
    out = runner([deny_deploy, after], msgs)
    assert [m.tool_name for m in deny_deploy.seen] == ["read", "deploy", "lookup", "drop"]
    assert [m.tool_name for m in after.seen] == ["read", "lookup"]
    assert [r.original.id for r in out.refused] == [2, 4]
    assert [r.refusal.message for r in out.refused] == ["deploy", "drop"]
    assert [m.tool_name for m in out.messages] == ["read", "lookup"]


# --- decisions ------------------------------------------------------------------------------


def test_decisions_accumulate_in_stage_order(runner):
    v1 = Verdict("a", Action.ALLOW, "r1")
    v2 = Verdict("b", Action.MASK, "r2", "profile pii", {"profile": "pii"})
    v3 = Verdict("b", Action.ALLOW, "r3")
    v4 = Verdict("c", Action.DENY, "r4", "no")
    v5 = Verdict("d", Action.ALLOW, "never")
    stages = [Scripted("a", lambda m: Pass((v1,))), Scripted("b", lambda m: Replace(m.replace(m.raw), (v2, v3))),
              Scripted("c", lambda m: Refuse(refusal(), (v4,))), Scripted("d", lambda m: Pass((v5,)))]
    out = runner(stages, [call("x", 1), call("y", 2)])
    assert [r.decisions for r in out.results] == [[v1, v2, v3, v4], [v1, v2, v3, v4]]


def test_verdict_record_is_plain_flow_metadata():
    m = call("deploy", 7)
    v = Verdict(StageName.POLICY, Action.DENY, "no-deploy", "not today", {"profile": "pii", "ruled": "mask"})
    record = v.record(m)
    assert record.items() >= {"stage": "policy", "direction": "client_to_server", "id": 7, "method": "tools/call",
                              "target": "deploy", "action": "deny", "rule": "no-deploy", "reason": "not today",
                              "profile": "pii", "ruled": "mask"}.items()
    assert json.loads(json.dumps(record)) == record  # plain JSON values (saved in recordings)
    bare = classify({"jsonrpc": "2.0", "method": "notifications/progress"})
    assert Verdict("x", Action.ALLOW).record(bare) == {
        "stage": "x", "kind": "notification", "method": "notifications/progress", "action": "allow"}


def test_direction_of():
    assert direction_of(StageName.POLICY, Direction.C2S) is StageName.POLICY
    assert direction_of(StageName.POLICY, Direction.S2C) is StageName.RESP_POLICY
    assert StageName.RESP_POLICY.response is StageName.RESP_POLICY


# --- not an outcome ---------------------------------------------------------------------------


class LooksLikeAnOutcome:
    """Has `decisions`, but is none of Pass, Replace, Drop, Refuse, Hold."""

    decisions = (Verdict("duck", Action.ALLOW),)


NOT_OUTCOMES = [None, True, "pass", {"action": "allow"}, Pass, Action.ALLOW, LooksLikeAnOutcome()]


@pytest.mark.parametrize("bad", NOT_OUTCOMES)
def test_a_stage_returning_a_non_outcome_raises(runner, bad):
    """Never taken as a pass: the run raises (and the Pipeline addon fails closed) before any later stage."""
    after = Scripted("after")
    with pytest.raises(TypeError, match="not an Outcome"):
        runner([Scripted("bad", lambda m: bad), after], [call("x")])
    assert after.seen == []


def test_a_stage_returning_a_message_raises(runner):
    after = Scripted("after")
    with pytest.raises(TypeError, match="a stage returned Message, not an Outcome"):
        runner([Scripted("bad", lambda m: m), after], [call("x")])
    assert after.seen == []


def test_a_hold_whose_wait_gives_a_non_outcome_raises():
    async def wait():
        return "approved"

    after = Scripted("after")
    with pytest.raises(TypeError, match="a stage returned str, not an Outcome"):
        asyncio.run(run([Scripted("hold", lambda m: Hold(wait, "a person decides")), after], [call("x")], CX))
    assert after.seen == []


def test_an_exception_in_a_stage_propagates(runner):
    def boom(m):
        raise RuntimeError("stage exploded")

    with pytest.raises(RuntimeError, match="stage exploded"):
        runner([Scripted("boom", boom)], [call("x")])


# --- holds ----------------------------------------------------------------------------------------


def test_a_hold_is_awaited_while_other_work_goes_on():
    """Two runs at once: one waits on an event, the other completes meanwhile; then the first resumes."""

    async def scenario():
        released = asyncio.Event()
        order: list[str] = []
        held_verdict = Verdict("approval", Action.APPROVE, "r-approve", "a person decides")
        granted = Verdict("approval", Action.ALLOW, "r-approve", None, {"by": "bob"})

        async def wait() -> Outcome:
            order.append("waiting")
            await released.wait()
            order.append("released")
            return Pass((granted,))

        approval = Scripted("approval", lambda m: Hold(wait, "a person decides", (held_verdict,))
                            if m.tool_name == "deploy" else Pass())
        after = Scripted("after")
        held = asyncio.create_task(run([approval, after], [call("deploy", 1)], CX))
        await asyncio.sleep(0)
        assert order == ["waiting"] and not held.done()
        other = await asyncio.wait_for(run([approval, after], [call("read_file", 2)], CX), 1)
        order.append("other done")
        assert [m.tool_name for m in other.messages] == ["read_file"]
        assert [m.tool_name for m in after.seen] == ["read_file"]  # the held call has not gone on
        assert not held.done()
        released.set()
        out = await asyncio.wait_for(held, 1)
        assert order == ["waiting", "other done", "released"]
        (r,) = out.results
        assert r.message is not None and r.message.tool_name == "deploy"
        assert [m.tool_name for m in after.seen] == ["read_file", "deploy"]
        assert r.decisions == [held_verdict, granted]  # the hold's, then the wait's outcome's

    asyncio.run(scenario())


def test_a_hold_resolving_to_a_refusal_ends_the_run():
    async def wait() -> Outcome:
        return Refuse(refusal("refused by bob"), (Verdict("approval", Action.DENY, "r"),), Action.APPROVE)

    after = Scripted("after")
    out = asyncio.run(run([Scripted("approval", lambda m: Hold(wait, "ask")), after], [call("deploy")], CX))
    (r,) = out.results
    assert after.seen == [] and r.message is None and r.refusal.message == "refused by bob"
    assert [d.action for d in r.decisions] == [Action.DENY]


def test_a_hold_resolving_to_another_hold_is_awaited_again():
    async def second() -> Outcome:
        return Replace(call("deploy", env="staging"))

    async def first() -> Outcome:
        return Hold(second, "second person", (Verdict("approval", Action.APPROVE, "r2"),))

    after = Scripted("after")
    out = asyncio.run(run([Scripted("approval", lambda m: Hold(first, "first person",
                                                                  (Verdict("approval", Action.APPROVE, "r1"),))),
                           after], [call("deploy")], CX))
    (r,) = out.results
    assert [m.arguments for m in after.seen] == [{"env": "staging"}]
    assert [d.rule for d in r.decisions] == ["r1", "r2"]


def test_run_now_turns_a_hold_into_a_refusal_never_a_pass():
    awaited: list[bool] = []

    async def wait() -> Outcome:  # pragma: no cover - must never run
        awaited.append(True)
        return Pass()

    v = Verdict("approval", Action.APPROVE, "r-approve", "a person decides")
    after = Scripted("after")
    approval = Scripted("approval", lambda m: Hold(wait, "a person decides", (v,)) if m.tool_name == "deploy"
                        else Pass())
    out = run_now([approval, after], [call("deploy", 5), call("read_file", 6)], CX)
    held, other = out.results
    assert awaited == []
    assert [m.tool_name for m in after.seen] == ["read_file"]  # the held message went no further
    assert held.message is None and isinstance(held.outcome, Refuse)
    assert held.outcome.action == Action.APPROVE
    assert held.refusal.status == 403 and held.refusal.code == errors.APPROVAL_REQUIRED
    assert "tools/call deploy #5 was held by approval (a person decides)" in held.refusal.message
    assert "nothing can wait inside an event stream" in held.refusal.message
    assert held.decisions == [v]
    assert out.refused == [held] and out.messages == [other.message]


def test_run_now_never_awaits_a_hold_even_one_that_would_pass():
    async def wait() -> Outcome:  # pragma: no cover
        return Pass()

    out = run_now([Scripted("approval", lambda m: Hold(wait, "instant"))], [call("x")], CX)
    assert out.messages == [] and len(out.refused) == 1


# --- a replacement changes content, never what the message is ----------------------------------------


@pytest.mark.parametrize("change", [
    pytest.param(lambda m: m.replace({**m.raw, "params": {"name": "drop_table"}}), id="target"),
    pytest.param(lambda m: m.replace({**m.raw, "id": 2}), id="id"),
    pytest.param(lambda m: m.replace({**m.raw, "id": "1"}), id="id-type"),
    pytest.param(lambda m: m.replace({k: v for k, v in m.raw.items() if k != "id"}), id="kind"),
    pytest.param(lambda m: m.replace({**m.raw, "method": "prompts/get"}), id="method"),
    pytest.param(lambda m: m.raw, id="not-a-message"),
])
def test_a_replace_that_changes_what_the_message_is_breaks_the_contract(runner, change):
    after = Scripted("after")
    with pytest.raises(ContractError) as e:
        runner([Scripted("dlp", lambda m: Replace(change(m))), after], [call("read_file")])
    assert e.value.stage == "dlp" and after.seen == []


def test_a_hold_that_fails_names_the_stage_that_held():
    async def wait() -> Outcome:
        raise RuntimeError("approval store down")

    with pytest.raises(StageError) as e:
        asyncio.run(run([Scripted("approval", lambda m: Hold(wait, "ask"))], [call("deploy")], CX))
    assert e.value.stage == "approval" and isinstance(e.value.__cause__, RuntimeError)
