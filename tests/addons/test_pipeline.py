"""
The Pipeline addon in the shipped bundle: regressions for the defects the one
message pipeline fixes.

(a) a stage after the Policy reads the filtered list (JSON body and SSE event),
    never the upstream's unfiltered one (the "stale event body" defect);
(b) a streamed call is labelled with its own decision, not with a side
    notification's (allowed by another rule, or dropped);
(c) an exception inside a stage refuses the request naming that stage, and
    never forwards it;
(d) the Gate refuses a flow whose stage mark is missing (the Pipeline left out
    or unloaded).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from mcp_bastion.addons.gate import Gate
from mcp_bastion.addons.pipeline import Pipeline
from mcp_bastion.bundle import bundle
from mcp_bastion.core import errors
from mcp_bastion.core.message import Message
from mcp_bastion.core.pipeline import Context, Drop, Hold, Pass, Replace, Verdict
from mcp_bastion.core.vocab import Action, Direction, Kind, Meta
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.flowstate import MARKS

from bundled import (
    ALLOW_ALL,
    Bundled,
    bundle_with_stages,
    bundle_without,
    bundled_addons,
    error_of,
    forwarded,
    rpc,
    sse,
    stage_name,
)
from bundled import (
    result as answer,
)
from bundled import (
    tool_call as call,
)

RULES = """\
version: 1
rules:
  - id: plumbing
    match: {methods: [initialize, tools/list, "http:GET"]}
    action: allow
  - id: no-drop
    match: {tools: [drop_table]}
    action: deny
    reason: irreversible
  - id: engineers
    match: {groups: [engineering], tools: [read_file, lookup]}
    action: allow
  - id: progress-ok
    match: {direction: server_to_client, methods: [notifications/progress]}
    action: allow
  - id: no-log
    match: {direction: server_to_client, methods: [notifications/message]}
    action: deny
    reason: too chatty
"""

ALICE = {"sub": "alice", "groups": ["engineering"], "iss": "https://idp"}
TOOLS = {"tools": [{"name": "read_file", "description": "reads"}, {"name": "drop_table", "description": "drops"},
                   {"name": "lookup", "description": "looks up"}]}
VISIBLE = ["read_file", "lookup"]






def events(out: bytes) -> list:
    return [json.loads(line[6:]) for line in out.decode().splitlines() if line.startswith("data: ")]


def names(result: dict) -> list[str]:
    return [t["name"] for t in result["tools"]]


@pytest.fixture
def ruleset(tmp_path) -> str:
    p = tmp_path / "rules.yaml"
    p.write_text(RULES)
    return str(p)


def drive(addons: list, ruleset: str, scenario):
    async def main():
        with bundled_addons(addons, ruleset=ruleset) as b:
            return await scenario(b)

    return asyncio.run(main())


class Seen:
    """A stage after the Policy that records every message it is handed (both directions)."""

    def __init__(self, name: str = "seen"):
        self.name = stage_name(name)
        self.seen: list[Message] = []

    def check(self, m: Message, cx: Context):
        self.seen.append(m)
        return Pass()

    def answers(self) -> list[Message]:
        return [m for m in self.seen if m.direction == Direction.S2C and m.kind == Kind.RESPONSE]


class Shout:
    """A replacing stage after the Policy: upper-cases the tool descriptions of a tools/list answer."""

    name = stage_name("shout")

    def check(self, m: Message, cx: Context):
        if m.direction != Direction.S2C or m.listing is None:
            return Pass()
        tools = [{**t, "description": t["description"].upper()} for t in m.params["tools"]]
        return Replace(m.replace({**m.raw, "result": {**m.params, "tools": tools}}),
                       (Verdict(self.name.response, Action.ALLOW, "shout"),))


class Boom:
    """A stage that raises on the messages of `direction`."""

    def __init__(self, direction: Direction, name: str = "boom"):
        self.name = stage_name(name)
        self.direction = direction
        self.calls = 0

    def check(self, m: Message, cx: Context):
        self.calls += 1
        if m.direction == self.direction:
            raise RuntimeError("stage exploded")
        return Pass()


# --- (a) a stage after the Policy reads the filtered list ------------------------------------------


def test_a_later_stage_sees_the_filtered_list_in_a_json_response(ruleset):
    seen = Seen()

    async def scenario(b: Bundled):
        f = b.flow("POST", rpc("tools/list", {}, id=4))
        await b.request(f, identity=ALICE)
        return f, await b.response(f, answer(4, TOOLS))

    f, out = drive(bundle_with_stages(seen), ruleset, scenario)
    (m,) = seen.answers()
    assert names(m.params) == VISIBLE  # never the upstream's three tools
    assert m.listing is not None and m.request is not None and m.request.method == "tools/list"
    assert names(json.loads(out)["result"]) == VISIBLE
    assert fs.response_body(f).messages == [m]  # what every later addon reads is what that stage saw
    assert fs.passed(f, "resp:seen") and fs.passed(f, "resp:policy")


def test_a_later_stage_sees_the_filtered_list_in_an_sse_event(ruleset):
    seen = Seen()

    async def scenario(b: Bundled):
        f = b.flow("POST", rpc("tools/list", {}, id=4))
        await b.request(f, identity=ALICE)
        return f, await b.response(f, sse(answer(4, TOOLS)), ctype="text/event-stream")

    f, out = drive(bundle_with_stages(seen), ruleset, scenario)
    (m,) = seen.answers()
    assert names(m.params) == VISIBLE
    (event,) = events(out)
    assert names(event["result"]) == VISIBLE


def test_a_later_stage_sees_the_filtered_list_on_a_get_stream(ruleset):
    seen = Seen()

    async def scenario(b: Bundled):
        f = b.flow("GET", headers={"accept": "text/event-stream"})
        await b.request(f, identity=ALICE)
        return await b.response(f, sse(answer(9, TOOLS)), ctype="text/event-stream")

    out = drive(bundle_with_stages(seen), ruleset, scenario)
    (m,) = seen.answers()
    assert names(m.params) == VISIBLE
    assert names(events(out)[0]["result"]) == VISIBLE


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "sse"])
def test_two_replacing_stages_both_reach_the_client(ruleset, streamed):
    """The Policy filters, the next stage rewrites what the Policy left: the client gets both."""
    seen = Seen()

    async def scenario(b: Bundled):
        f = b.flow("POST", rpc("tools/list", {}, id=4))
        await b.request(f, identity=ALICE)
        if streamed:
            return events(await b.response(f, sse(answer(4, TOOLS)), ctype="text/event-stream"))[0]
        return json.loads(await b.response(f, answer(4, TOOLS)))

    got = drive(bundle_with_stages(Shout(), seen), ruleset, scenario)
    assert got["result"]["tools"] == [{"name": "read_file", "description": "READS"},
                                      {"name": "lookup", "description": "LOOKS UP"}]
    (m,) = seen.answers()
    assert m.raw == got  # the third stage saw what the client got


def test_a_later_stage_sees_each_request_of_a_body(ruleset):
    seen = Seen()

    async def scenario(b: Bundled):
        f = b.flow("POST", [call("read_file", id=1), call("lookup", id=2)])
        await b.request(f, identity=ALICE)
        return f

    f = drive(bundle_with_stages(seen), ruleset, scenario)
    assert forwarded(f)
    assert [(m.direction, m.tool_name) for m in seen.seen] == [(Direction.C2S, "read_file"), (Direction.C2S, "lookup")]
    assert fs.passed(f, "seen")


def test_a_later_stage_never_sees_a_message_the_policy_stopped(ruleset):
    seen = Seen()

    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", id=1))
        await b.request(f, identity=ALICE)
        out = await b.response(f, sse(rpc("notifications/message", {"data": "x"}, id=None), answer(1, {})),
                               ctype="text/event-stream")
        g = b.flow("POST", call("drop_table", id=2))
        await b.request(g, identity=ALICE)
        return out

    out = drive(bundle_with_stages(seen), ruleset, scenario)
    assert [m.method or m.kind for m in seen.seen] == ["tools/call", "response"]
    assert events(out) == [answer(1, {})]


# --- (b) a streamed call is labelled with its own decision -------------------------------------------


def streamed_call(*side: dict):
    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", id=1, path="/x"))
        await b.request(f, identity=ALICE)
        out = await b.response(f, sse(*side, answer(1, {"content": []})), ctype="text/event-stream")
        return f, out

    return scenario


def test_a_progress_notification_allowed_by_another_rule_does_not_name_the_call(ruleset):
    f, out = drive(bundle(), ruleset, streamed_call(rpc("notifications/progress", {"progress": 1}, id=None)))
    assert [e.get("method", e.get("id")) for e in events(out)] == ["notifications/progress", 1]
    assert any(d.get("rule") == "progress-ok" for d in f.metadata[Meta.DECISIONS])  # recorded, not the headline
    assert f.comment == "alice: tools/call read_file -> allow [engineers]"
    assert "progress-ok" not in f.comment
    assert f.marked == ""


def test_a_dropped_side_notification_does_not_make_the_call_look_denied(ruleset):
    f, out = drive(bundle(), ruleset, streamed_call(rpc("notifications/message", {"data": "x"}, id=None)))
    assert events(out) == [answer(1, {"content": []})]
    assert [(d["method"], d["action"], d["rule"]) for d in f.metadata[Meta.DECISIONS]
            if d["stage"] == "resp:policy"] == [("notifications/message", "deny", "no-log")]
    assert f.comment == "alice: tools/call read_file -> allow [engineers] (1 server message filtered or dropped)"
    assert "no-log" not in f.comment and "deny" not in f.comment
    assert f.marked != MARKS[Action.DENY]
    assert f.marked == ""


def test_a_progress_notification_dropped_by_a_deny_rule_does_not_make_the_call_look_denied(tmp_path):
    rules = tmp_path / "no-progress.yaml"
    rules.write_text(RULES.replace("id: progress-ok", "id: no-progress").replace(
        "methods: [notifications/progress]}\n    action: allow",
        "methods: [notifications/progress]}\n    action: deny"))
    f, out = drive(bundle(), str(rules), streamed_call(rpc("notifications/progress", {"progress": 1}, id=None)))
    assert events(out) == [answer(1, {"content": []})]
    assert [(d["method"], d["action"], d["rule"]) for d in f.metadata[Meta.DECISIONS]
            if d["stage"] == "resp:policy"] == [("notifications/progress", "deny", "no-progress")]
    assert f.comment == "alice: tools/call read_file -> allow [engineers] (1 server message filtered or dropped)"
    assert f.marked == ""


def test_both_side_notifications_together(ruleset):
    f, _ = drive(bundle(), ruleset, streamed_call(rpc("notifications/progress", {"progress": 1}, id=None),
                                                   rpc("notifications/message", {"data": "x"}, id=None),
                                                   rpc("notifications/progress", {"progress": 2}, id=None)))
    assert f.comment == "alice: tools/call read_file -> allow [engineers] (1 server message filtered or dropped)"
    assert f.marked == ""


def test_a_dropped_notification_in_a_json_answer_does_not_make_the_call_look_denied(ruleset):
    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", id=1, path="/x"))
        await b.request(f, identity=ALICE)
        out = await b.response(f, [rpc("notifications/message", {"data": "x"}, id=None), answer(1, {})])
        return f, out

    f, out = drive(bundle(), ruleset, scenario)
    assert json.loads(out) == [answer(1, {})]
    assert f.comment == "alice: tools/call read_file -> allow [engineers] (1 server message filtered or dropped)"
    assert f.marked == ""


def test_a_denied_call_is_still_labelled_denied(ruleset):
    async def scenario(b: Bundled):
        f = b.flow("POST", call("drop_table", id=1))
        await b.request(f, identity=ALICE)
        return f

    f = drive(bundle(), ruleset, scenario)
    assert f.comment == "alice: tools/call drop_table -> deny [no-drop]: irreversible"
    assert f.marked == MARKS[Action.DENY]


# --- (c) an exception inside a stage fails closed, naming the stage --------------------------------


def test_an_exception_in_a_stage_refuses_the_request_naming_it(ruleset):
    boom = Boom(Direction.C2S)

    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", id=5, path="/x"))
        await b.request(f, identity=ALICE)
        return f

    f = drive(bundle_with_stages(boom), ruleset, scenario)
    assert boom.calls == 1
    assert not forwarded(f)  # the Policy allowed it; the failing stage still stops it
    assert f.response.status_code == 500
    assert f.response.headers["content-type"] == "application/json"
    body = json.loads(f.response.content)
    assert body["id"] == 5
    assert body["error"]["code"] == errors.GATEWAY_ERROR
    assert body["error"]["data"]["stage"] == "boom"
    assert "boom" in body["error"]["message"] and "not forwarded" in body["error"]["message"]
    assert f.metadata[Meta.ERROR].startswith("boom: ")
    assert not fs.passed(f, "boom") and not fs.passed(f, "policy")
    assert f.marked == MARKS[Action.ERROR]
    assert any(d["stage"] == "boom" and d["action"] == "error" for d in f.metadata[Meta.DECISIONS])


def test_an_exception_in_a_stage_before_the_policy_is_not_skipped(ruleset):
    """Whatever the place of the failing stage, nothing is forwarded."""
    boom = Boom(Direction.C2S)

    def addons():
        out = bundle_with_stages(boom)
        pipe = next(a for a in out if isinstance(a, Pipeline))
        out[out.index(pipe)] = Pipeline([boom, *[s for s in pipe.stages if s is not boom]])
        return out

    async def scenario(b: Bundled):
        f = b.flow("POST", [call("read_file", id=1), call("lookup", id=2)])
        await b.request(f, identity=ALICE)
        return f

    f = drive(addons(), ruleset, scenario)
    assert not forwarded(f) and f.response.status_code == 500
    assert boom.calls == 1  # the first message failed: nothing more was checked, nothing is forwarded
    body = json.loads(f.response.content)
    answers = body if isinstance(body, list) else [body]
    assert [a["id"] for a in answers] == [1, 2]  # a JSON-RPC error for each request of the batch
    assert all(a["error"]["code"] == errors.GATEWAY_ERROR for a in answers)
    assert all(a["error"]["data"]["stage"] == "boom" for a in answers)


def test_an_exception_in_a_stage_withholds_a_buffered_answer(ruleset):
    boom = Boom(Direction.S2C)

    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", id=5, path="/x"))
        await b.request(f, identity=ALICE)
        assert forwarded(f)
        out = await b.response(f, answer(5, {"content": [{"type": "text", "text": "secret"}]}))
        return f, out

    f, out = drive(bundle_with_stages(boom), ruleset, scenario)
    assert b"secret" not in out
    assert f.response.status_code == 502
    err = error_of(f)
    assert err["code"] == errors.GATEWAY_ERROR and err["data"]["stage"] == "resp:boom"
    assert f.metadata[Meta.ERROR].startswith("resp:boom: ")


def test_an_exception_in_a_stage_stops_an_event_stream(ruleset):
    boom = Boom(Direction.S2C)

    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", id=5, path="/x"))
        await b.request(f, identity=ALICE)
        out = await b.response(f, sse(answer(5, {"content": [{"type": "text", "text": "secret"}]})),
                               ctype="text/event-stream")
        return f, out

    f, out = drive(bundle_with_stages(boom), ruleset, scenario)
    assert b"secret" not in out
    (event,) = events(out)
    assert event["id"] == 5 and event["error"]["code"] == errors.GATEWAY_ERROR
    assert Meta.ERROR in f.metadata
    assert f.marked == MARKS[Action.ERROR]


# --- (d) the Gate refuses a flow whose stage mark is missing ------------------------------------------


def test_without_the_pipeline_the_gate_refuses_every_request(ruleset):
    addons = bundle_without(Pipeline)
    assert not any(isinstance(a, Pipeline) for a in addons)

    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", id=3, path="/x"))
        await b.request(f, identity=ALICE)
        get = b.flow("GET", headers={"accept": "text/event-stream"})
        await b.request(get, identity=ALICE)
        return f, get

    f, get = drive(addons, ruleset, scenario)
    for flow in (f, get):
        assert not forwarded(flow)
        assert flow.response.status_code == 500
        err = error_of(flow)
        assert err["code"] == errors.GATEWAY_ERROR
        assert err["data"] == {"missing": ["wire", "tasks", "policy", "pin", "mask", "approval"]}
        gate = [d for d in flow.metadata[Meta.DECISIONS] if d["stage"] == "gate"]
        assert [d["action"] for d in gate] == ["error"]
        assert flow.marked == MARKS[Action.ERROR]
    assert json.loads(f.response.content)["id"] == 3


def test_the_gate_refuses_a_request_missing_a_stage_it_requires(ruleset):
    addons = bundle()
    i = next(n for n, a in enumerate(addons) if isinstance(a, Gate))
    addons[i] = Gate(request=[*addons[i].request_stages, "ghost"], response=addons[i].response_stages)

    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", path="/x"))
        await b.request(f, identity=ALICE)
        return f

    f = drive(addons, ruleset, scenario)
    assert not forwarded(f) and fs.passed(f, "policy")
    assert error_of(f)["data"] == {"missing": ["ghost"]}


@pytest.mark.parametrize("streamed", [False, True], ids=["json", "sse"])
def test_a_pipeline_unloaded_mid_flow_lets_no_answer_through(ruleset, streamed):
    async def scenario(b: Bundled):
        f = b.flow("POST", rpc("tools/list", {}, id=4))
        await b.request(f, identity=ALICE)
        assert forwarded(f)
        b.dispatch.remove(b.addon(Pipeline))
        if streamed:
            out = await b.response(f, sse(answer(4, TOOLS)), ctype="text/event-stream")
        else:
            out = await b.response(f, answer(4, TOOLS))
        return f, out

    f, out = drive(bundle(), ruleset, scenario)
    assert b"drop_table" not in out  # neither filtered nor unfiltered: withheld
    assert not fs.passed(f, "resp:policy")
    if streamed:
        (event,) = events(out)
        assert event["id"] == 4 and event["error"]["code"] == errors.GATEWAY_ERROR
    else:
        assert f.response.status_code == 502
        assert error_of(f)["data"] == {
            "missing": ["resp:wire", "resp:tasks", "resp:policy", "resp:pin", "resp:mask", "resp:approval"]}


# --- what a stage's drop means on the client's side ----------------------------------------------


class DropAll:
    """A stage that drops every client message (as an outbound filter might)."""

    name = stage_name("dropper")

    def check(self, m: Message, cx: Context):
        if m.direction == Direction.S2C:
            return Pass()
        return Drop("not for this upstream", (Verdict(self.name, Action.DROP, "dropper", "not for this upstream"),))


def test_a_dropped_client_request_is_answered_not_left_waiting(ruleset):
    async def scenario(b: Bundled):
        f = b.flow("POST", [call("read_file", id=1), rpc("notifications/initialized", id=None)])
        await b.request(f, identity=ALICE)
        return f

    f = drive(bundle_with_stages(DropAll()), ruleset, scenario)
    assert not forwarded(f)
    (answer_,) = json.loads(f.response.content)
    assert answer_["id"] == 1 and answer_["error"]["code"] == errors.DENIED
    assert "not forwarded: not for this upstream" in answer_["error"]["message"]


def test_client_notifications_all_dropped_are_accepted_without_forwarding():
    async def scenario(b: Bundled):
        f = b.flow("POST", [rpc("notifications/initialized", id=None), rpc("notifications/cancelled", id=None)])
        await b.request(f, identity=ALICE)
        return f

    f = drive(bundle_with_stages(DropAll()), ALLOW_ALL, scenario)
    assert not forwarded(f)
    assert f.response.status_code == 202 and f.response.content == b""


def test_a_stream_without_stages_is_recorded_as_the_client_got_it(ruleset, monkeypatch):
    """The Gate does not replace an event stream already sent: the flow keeps the error event the client got."""
    monkeypatch.setattr(Pipeline, "responseheaders", lambda self, flow: None)  # stages never attached

    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", id=7))
        await b.request(f, identity=ALICE)
        out = await b.response(f, sse(answer(7, {"content": [{"type": "text", "text": "secret"}]})),
                               ctype="text/event-stream")
        return f, out

    f, out = drive(bundle(), ruleset, scenario)
    assert b"secret" not in out and b'"id":7' in out
    assert f.response.headers["content-type"] == "text/event-stream"
    assert f.response.content == out  # what mitmweb and the recording show is what was sent
    gate = [d for d in f.metadata[Meta.DECISIONS] if d["stage"] == "gate"]
    assert gate and gate[0]["action"] == Action.ERROR and "resp:policy" in gate[0]["reason"]


# --- a hold: the held request waits, every other flow goes on -------------------------------------


class HoldDeploys:
    """Holds each tools/call deploy until `release` is set; everything else passes."""

    name = stage_name("hold-probe")

    def __init__(self):
        self.release = asyncio.Event()
        self.held = 0

    def check(self, m: Message, cx: Context):
        if m.direction == Direction.S2C or m.tool_name != "deploy":
            return Pass()
        self.held += 1

        async def wait():
            await self.release.wait()
            return Pass((Verdict(self.name, Action.ALLOW, "approved-by-bob"),))

        return Hold(wait, "waiting for a second person", (Verdict(self.name, Action.HOLD, "needs-approval"),))


def test_a_held_request_waits_while_other_flows_go_on():
    holder = HoldDeploys()

    async def main():
        with bundled_addons(bundle_with_stages(holder), ruleset=ALLOW_ALL) as b:
            held = b.flow("POST", call("deploy", id=1, env="prod"))
            task = asyncio.create_task(b.request(held, identity=ALICE))
            await asyncio.sleep(0.05)
            assert holder.held == 1 and not task.done()
            assert held.response is None and not fs.passed(held, "hold-probe")  # not forwarded yet

            other = b.flow("POST", call("read_file", id=2, path="/x"))  # another flow, same caller
            await asyncio.wait_for(b.request(other, identity=ALICE), 5)
            assert forwarded(other) and fs.passed(other, "hold-probe")
            out = await b.response(other, answer(2, {"content": []}))
            assert json.loads(out)["id"] == 2

            holder.release.set()
            await asyncio.wait_for(task, 5)
            assert forwarded(held) and fs.passed(held, "hold-probe")
            rules = [d.get("rule") for d in held.metadata[Meta.DECISIONS] if d["stage"] == "hold-probe"]
            assert rules == ["needs-approval", "approved-by-bob"]

    asyncio.run(main())
