"""
Attacks on the one message pipeline, through the shipped bundle (tests/bundled.py).

Each test asserts the secure behaviour: a red-team pass over the pipeline found
the inputs, and each one that got past was fixed at its root.

- answers linked to the wrong request (repeated ids, 1 vs "1", a list result to a
  tools/call, a GET stream, an id nobody asked);
- bodies and events mixing answers, server requests and notifications, and bodies
  re-serialised after a stage changed them;
- drops, refusals, replacements and holds by a stage in each direction;
- flows that bypass the Gate's marks (passthrough by another name, a WebSocket
  upgrade, a replayed flow that was refused before);
- labels, marks and audit records for mixed outcomes.
"""

from __future__ import annotations

import json

import pytest

from mcp_bastion.core import audit, errors
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.message import Message
from mcp_bastion.core.pipeline import Context, Drop, Hold, Pass, Refuse, Replace, Verdict
from mcp_bastion.core.vocab import Action, Direction, Kind, Meta
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue import replies
from mcp_bastion.glue.flowstate import MARKS
from mcp_bastion.glue.recording.facts import flow_facts

from bundled import (
    bundle_with_stages,
    bundled,
    bundled_addons,
    forwarded,
    rpc,
    sse,
    stage_name,
)
from bundled import result as answer
from bundled import tool_call as call

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


RULES = """\
version: 1
rules:
  - id: no-sampling
    match: {direction: server_to_client, methods: [sampling/createMessage, notifications/message]}
    action: deny
    reason: not for clients
  - id: plumbing
    match: {methods: [initialize, ping, tools/list, "notifications/*", "http:GET", "http:DELETE"]}
    action: allow
  - id: no-drop
    match: {tools: [drop_table]}
    action: deny
    reason: irreversible
  - id: engineers
    match: {groups: [engineering], tools: [read_file]}
    action: allow
  - id: client-answers
    match: {direction: client_to_server, kinds: [response]}
    action: allow
  - id: roots
    match: {direction: server_to_client, methods: [roots/list]}
    action: allow
"""

ALICE = {"sub": "alice", "groups": ["engineering"], "iss": "https://idp"}
TOOLS = {"tools": [{"name": "read_file"}, {"name": "drop_table"}, {"name": "secret_tool"}]}
HIDDEN = (b"drop_table", b"secret_tool")
SSE = "text/event-stream"
JSON = "application/json"
SECRET = {"content": [{"type": "text", "text": "s3cret"}]}


@pytest.fixture
def ruleset(tmp_path) -> str:
    p = tmp_path / "rules.yaml"
    p.write_text(RULES)
    return str(p)


@pytest.fixture
def upstream_answers(monkeypatch) -> list[dict]:
    """What the gateway answers the upstream on the client's behalf (captured instead of posted)."""
    sent: list[dict] = []
    monkeypatch.setattr(replies.UpstreamAnswers, "send",
                        lambda self, flow, answers, verify=True: sent.extend(answers))
    return sent


def messages_of(out: bytes, ctype: str) -> list:
    """Every JSON-RPC message the client got (batches flattened)."""
    if ctype == SSE:
        values = [json.loads(line[5:]) for line in out.decode().splitlines() if line.startswith("data:")]
    else:
        values = [json.loads(out)] if out else []
    flat: list = []
    for v in values:
        flat.extend(v if isinstance(v, list) else [v])
    return flat


def payload(ctype: str, *msgs: dict, one_event: bool = False):
    """The upstream's body: a JSON batch (or single message), or SSE events (or one event with a batch)."""
    if ctype == SSE:
        return sse(list(msgs)) if one_event and len(msgs) > 1 else sse(*msgs)
    return list(msgs) if len(msgs) > 1 else msgs[0]


def leaked(out: bytes) -> list[bytes]:
    return [n for n in HIDDEN if n in out]


def records(f) -> list[dict]:
    return audit.build_records(flow_facts(f))


# --- probe stages (placed after the Policy with bundle(extra_stages=...)) ------------------------------


class DropServerMessages:
    """Drops the server's answers and requests (as a misbehaving outbound filter might)."""

    name = stage_name("drop-s2c")

    def check(self, m: Message, cx: Context):
        if m.direction == Direction.S2C and m.kind in (Kind.RESPONSE, Kind.REQUEST):
            return Drop("not for this client", (Verdict(self.name.response, Action.DROP, "drop-s2c", "dropped"),))
        return Pass()


class DropClientNotifications:
    name = stage_name("drop-notes")

    def check(self, m: Message, cx: Context):
        if m.direction == Direction.C2S and m.kind == Kind.NOTIFICATION:
            return Drop("not for this upstream", (Verdict(self.name, Action.DROP, "drop-notes", "dropped"),))
        return Pass()


class WithholdAnswers:
    """A data-loss check on the server's answers: it refuses every result."""

    name = stage_name("dlp")

    def check(self, m: Message, cx: Context):
        if m.direction == Direction.S2C and m.kind == Kind.RESPONSE:
            return Refuse(Refusal(403, errors.DENIED, "answer withheld: it carries a secret", {"rule": "dlp"}),
                          (Verdict(self.name.response, Action.DENY, "dlp", "carries a secret"),))
        return Pass()


class Rewrite:
    """Replaces every message of `direction` and `kind` with `new(raw)` (through `Message.replace`)."""

    name = stage_name("rewrite")

    def __init__(self, new, direction: Direction, kind: Kind):
        self.new, self.direction, self.kind = new, direction, kind

    def check(self, m: Message, cx: Context):
        if m.direction == self.direction and m.kind == self.kind:
            return Replace(m.replace(self.new(m.raw)))
        return Pass()


class Approval:
    """Holds every request and answer; `outcome` is what the wait gives (an exception is raised)."""

    name = stage_name("hold-probe")

    def __init__(self, outcome):
        self.outcome = outcome

    def check(self, m: Message, cx: Context):
        if m.kind not in (Kind.REQUEST, Kind.RESPONSE):
            return Pass()

        async def wait():
            if isinstance(self.outcome, Exception):
                raise self.outcome
            return self.outcome

        return Hold(wait, "waiting for a person", (Verdict(self.name, "hold", "approval", "waiting"),))


DENIED = Refuse(Refusal(403, errors.APPROVAL_REQUIRED, "a person said no", {"rule": "approval"}),
                (Verdict(stage_name("hold-probe"), Action.DENY, "approval", "a person said no"),))


# --- list results linked to the wrong request --------------------------------------------------


@pytest.mark.parametrize("other_id", [1, "1"], ids=["repeated-id", "same-id-other-type"])
async def test_a_list_answer_linked_through_a_repeated_request_id_is_still_filtered(ruleset, other_id):
    """The client asks tools/list #1 and ping #1 (or #"1", which a client that normalises ids reads as 1)."""
    with bundled(ruleset=ruleset) as b:
        f = b.flow("POST", [rpc("tools/list", {}, id=1), rpc("ping", id=other_id)])
        await b.request(f, identity=ALICE)
        if not forwarded(f):
            return  # refusing repeated ids outright is secure too
        out = await b.response(f, [answer(other_id, TOOLS), answer(1, {})])
        assert leaked(out) == []


@pytest.mark.parametrize("ctype", [JSON, SSE])
async def test_a_list_shaped_answer_to_a_tools_call_is_still_filtered(ruleset, ctype):
    with bundled(ruleset=ruleset) as b:
        f = b.flow("POST", call("read_file", id=1, path="/x"))
        await b.request(f, identity=ALICE)
        assert forwarded(f)
        out = await b.response(f, payload(ctype, answer(1, TOOLS)), ctype=ctype)
        assert leaked(out) == []


@pytest.mark.parametrize("ctype", [JSON, SSE])
async def test_a_list_answer_nobody_asked_or_answered_twice_is_filtered_by_shape(ruleset, ctype):
    with bundled(ruleset=ruleset) as b:
        f = b.flow("POST", rpc("tools/list", {}, id=1))
        await b.request(f, identity=ALICE)
        out = await b.response(f, payload(ctype, answer(2, TOOLS), answer(1, TOOLS), answer(1, TOOLS)), ctype=ctype)
        got = messages_of(out, ctype)
        assert [m["id"] for m in got] == [2, 1, 1]
        assert all([t["name"] for t in m["result"]["tools"]] == ["read_file"] for m in got)


async def test_a_list_answer_on_a_get_stream_is_filtered_by_shape(ruleset):
    with bundled(ruleset=ruleset) as b:
        f = b.flow("GET", headers={"accept": SSE})
        await b.request(f, identity=ALICE)
        assert forwarded(f)
        out = await b.response(f, sse(answer(1, TOOLS), {**answer(2, TOOLS), "id": "x"}), ctype=SSE)
        assert leaked(out) == [] and len(messages_of(out, SSE)) == 2


# --- mixed bodies and events, re-serialised bodies ---------------------------------------------


@pytest.mark.parametrize("ctype", [JSON, SSE])
async def test_one_body_mixing_a_server_request_notifications_and_the_answer(ruleset, upstream_answers, ctype):
    """A denied sampling request is answered upstream, a denied log notification dropped, the list filtered,
    progress passes; the label names the call and counts the side messages."""
    with bundled(ruleset=ruleset) as b:
        f = b.flow("POST", rpc("tools/list", {}, id=1))
        await b.request(f, identity=ALICE)
        msgs = [rpc("sampling/createMessage", {"messages": []}, id=1), rpc("notifications/message", {"d": 1}, id=None),
                answer(1, TOOLS), rpc("notifications/progress", {"progress": 1}, id=None)]
        out = await b.response(f, payload(ctype, *msgs, one_event=True), ctype=ctype)
    got = messages_of(out, ctype)
    assert got == [answer(1, {"tools": [{"name": "read_file"}]}), msgs[3]]
    assert [(a["id"], a["error"]["code"]) for a in upstream_answers] == [(1, errors.DENIED)]
    assert f.comment == "alice: tools/list -> allow [plumbing] (3 server messages filtered or dropped)"
    sampling = [r for r in records(f) if r["direction"] == "server_to_client" and r["kind"] == "request"]
    assert [(r["method"], r["action"]) for r in sampling] == [("sampling/createMessage", "deny")]


async def test_a_rewritten_request_batch_keeps_every_id_and_its_type(ruleset):
    """A dropped notification makes the Pipeline re-serialise the batch: each id keeps its value and type."""
    with bundled_addons(bundle_with_stages(DropClientNotifications()), ruleset=ruleset) as b:
        body = [rpc("notifications/initialized", id=None), call("read_file", id=1, path="/x"), rpc("ping", id="2")]
        f = b.flow("POST", body)
        await b.request(f, identity=ALICE)
        assert forwarded(f)
        assert json.loads(f.request.content) == body[1:]
        assert [m.id for m in fs.request_body(f).messages] == [1, "2"]


async def test_a_filtered_answer_is_rewritten_as_valid_json(ruleset):
    with bundled(ruleset=ruleset) as b:
        f = b.flow("POST", rpc("tools/list", {}, id=1))
        await b.request(f, identity=ALICE)
        body = json.dumps(answer(1, TOOLS)).replace('"name": "read_file"', '"name": "read_file", "maximum": 1e400')
        out = await b.response(f, body)
        assert not leaked(out)
        json.loads(out, parse_constant=lambda c: pytest.fail(f"the client got non-JSON {c}"))


# --- drops, refusals, replacements and holds by a stage ----------------------------------------


@pytest.mark.parametrize("ctype", [JSON, SSE])
async def test_an_answer_a_stage_drops_still_answers_the_client(ruleset, ctype):
    with bundled_addons(bundle_with_stages(DropServerMessages()), ruleset=ruleset) as b:
        f = b.flow("POST", call("read_file", id=1, path="/x"))
        await b.request(f, identity=ALICE)
        progress = rpc("notifications/progress", {"progress": 1}, id=None)
        out = await b.response(f, payload(ctype, progress, answer(1, SECRET), one_event=True), ctype=ctype)
    assert b"s3cret" not in out
    assert [m.get("id") for m in messages_of(out, ctype) if "id" in m] == [1]  # an error for the call


async def test_a_server_request_a_stage_drops_is_answered_upstream(ruleset, upstream_answers):
    with bundled_addons(bundle_with_stages(DropServerMessages()), ruleset=ruleset) as b:
        f = b.flow("GET", headers={"accept": SSE})
        await b.request(f, identity=ALICE)
        out = await b.response(f, sse(rpc("roots/list", {}, id=9)), ctype=SSE)
    assert out == b""
    assert [a["id"] for a in upstream_answers] == [9]


@pytest.mark.parametrize("new", [
    lambda raw: {**raw, "id": 2},
    lambda raw: {k: v for k, v in raw.items() if k != "id"},
    lambda raw: {**raw, "params": {"name": "drop_table", "arguments": {}}},
], ids=["other-id", "notification", "denied-tool"])
async def test_a_replace_that_changes_what_a_request_is_fails_closed(ruleset, new):
    with bundled_addons(bundle_with_stages(Rewrite(new, Direction.C2S, Kind.REQUEST)), ruleset=ruleset) as b:
        f = b.flow("POST", call("read_file", id=1, path="/x"))
        await b.request(f, identity=ALICE)
    assert not forwarded(f)
    assert json.loads(f.response.content)["id"] == 1


@pytest.mark.parametrize("new", [
    lambda raw: {**raw, "id": 99},
    lambda raw: {"jsonrpc": "2.0", "method": "notifications/message", "params": raw["result"]},
], ids=["other-id", "notification"])
async def test_a_replace_that_changes_what_an_answer_is_fails_closed(ruleset, new):
    with bundled_addons(bundle_with_stages(Rewrite(new, Direction.S2C, Kind.RESPONSE)), ruleset=ruleset) as b:
        f = b.flow("POST", call("read_file", id=1, path="/x"))
        await b.request(f, identity=ALICE)
        out = await b.response(f, sse(answer(1, SECRET)), ctype=SSE)
    got = messages_of(out, SSE)
    assert [m.get("id") for m in got] == [1] and "error" in got[0]


async def test_a_hold_is_awaited_on_requests_and_refused_inside_an_event_stream(ruleset, upstream_answers):
    approval = Approval(DENIED)
    with bundled_addons(bundle_with_stages(approval), ruleset=ruleset) as b:
        f = b.flow("POST", [call("read_file", id=1, path="/x"), rpc("ping", id=2)])
        await b.request(f, identity=ALICE)
        assert not forwarded(f)
        assert [(a["id"], a["error"]["code"]) for a in json.loads(f.response.content)] == \
            [(1, errors.APPROVAL_REQUIRED), (2, errors.APPROVAL_REQUIRED)]
        g = b.flow("GET", headers={"accept": SSE})
        approval.outcome = Pass()  # the GET itself is approved
        await b.request(g, identity=ALICE)
        assert forwarded(g)
        out = await b.response(g, sse(rpc("roots/list", {}, id=9), answer(3, SECRET)), ctype=SSE)
    # nothing can wait inside a stream: the server request is refused upstream, the answer becomes an error
    assert [(a["id"], a["error"]["code"]) for a in upstream_answers] == [(9, errors.APPROVAL_REQUIRED)]
    assert b"s3cret" not in out
    assert [(m["id"], m["error"]["code"]) for m in messages_of(out, SSE)] == [(3, errors.APPROVAL_REQUIRED)]


async def test_a_hold_on_a_buffered_answer_gives_its_outcome(ruleset):
    approval = Approval(Pass())
    with bundled_addons(bundle_with_stages(approval), ruleset=ruleset) as b:
        f = b.flow("POST", call("read_file", id=1, path="/x"))
        await b.request(f, identity=ALICE)
        assert forwarded(f)
        approval.outcome = DENIED  # the person says no once the answer is there
        out = await b.response(f, answer(1, SECRET))
    assert b"s3cret" not in out
    assert json.loads(out)["error"]["code"] == errors.APPROVAL_REQUIRED


async def test_an_exception_in_a_holds_wait_names_its_stage(ruleset):
    with bundled_addons(bundle_with_stages(Approval(RuntimeError("approval service down"))), ruleset=ruleset) as b:
        f = b.flow("POST", call("read_file", id=1, path="/x"))
        await b.request(f, identity=ALICE)
    assert not forwarded(f) and f.response.status_code == 500
    assert json.loads(f.response.content)["error"]["data"]["stage"] == "hold-probe"


@pytest.mark.parametrize("ids", [pytest.param((1, 1), id="same"), pytest.param((1, "1"), id="same-as-text"),
                                 pytest.param(("a", "a"), id="same-string")])
async def test_a_batch_with_a_repeated_request_id_is_refused_before_any_rule(ruleset, ids):
    """Which answer belongs to which request would be ambiguous: the batch is refused whole, nothing forwarded."""
    with bundled(ruleset=ruleset) as b:
        f = b.flow("POST", [call("read_file", id=ids[0], path="/x"), call("drop_table", id=ids[1])])
        await b.request(f, identity=ALICE)
    assert not forwarded(f) and f.response.status_code == 400
    got = json.loads(f.response.content)
    assert {a["error"]["data"]["reason"] for a in got} == {"duplicate_id"}
    assert {a["error"]["code"] for a in got} == {errors.INVALID_REQUEST}
    assert f.marked == MARKS[Action.DENY]


# --- labels and audit records for mixed outcomes -----------------------------------------------


async def test_a_refused_answer_labels_and_marks_the_call(ruleset):
    with bundled_addons(bundle_with_stages(WithholdAnswers()), ruleset=ruleset) as b:
        f = b.flow("POST", call("read_file", id=1, path="/x"))
        await b.request(f, identity=ALICE)
        out = await b.response(f, answer(1, SECRET))
    assert b"s3cret" not in out and json.loads(out)["error"]["message"].startswith("answer withheld")
    assert "-> deny [dlp]" in f.comment
    assert f.marked == MARKS[Action.DENY]


async def test_an_answers_decision_is_audited_on_the_request_it_answers(ruleset):
    with bundled_addons(bundle_with_stages(WithholdAnswers()), ruleset=ruleset) as b:
        # the client answers the server's roots/list #1 and calls a tool as #1 (separate id spaces)
        f = b.flow("POST", [answer(1, {"roots": []}), call("read_file", id=1, path="/x")])
        await b.request(f, identity=ALICE)
        await b.response(f, sse(answer(1, SECRET)), ctype=SSE)
    by_kind = {r["kind"]: r for r in records(f)}
    assert by_kind["request"]["tool"] == "read_file" and by_kind["request"]["action"] == "deny"
    assert by_kind["response"]["action"] == "allow"


async def test_the_audit_records_the_error_the_client_got_for_a_refused_answer(ruleset):
    with bundled_addons(bundle_with_stages(WithholdAnswers()), ruleset=ruleset) as b:
        f = b.flow("POST", call("read_file", id=1, path="/x"))
        await b.request(f, identity=ALICE)
        await b.response(f, answer(1, SECRET))
    (rec,) = records(f)
    assert rec["action"] == "deny" and rec["rpc"] == "error"


async def test_a_call_past_the_summary_limit_still_has_its_own_audit_record(ruleset):
    filler = [rpc("notifications/initialized", id=None)] * 199
    with bundled(ruleset=ruleset) as b:
        f = b.flow("POST", [rpc("ping", id=1), *filler, call("read_file", id=2, path="/etc/shadow")])
        await b.request(f, identity=ALICE)
        assert forwarded(f)
    calls = [r for r in records(f) if r.get("method") == "tools/call"]
    assert [(r.get("tool") or r.get("target"), r["action"]) for r in calls] == [("read_file", "allow")]


# --- flows around the Gate ---------------------------------------------------------------------


@pytest.mark.parametrize(("url", "host"), [
    pytest.param("http://MCP.Internal", None, id="upper-case"),
    pytest.param("http://mcp.internal.", None, id="trailing-dot"),
    pytest.param("http://other.example", "mcp.internal", id="host-header"),
])
async def test_passthrough_cannot_reach_an_mcp_host_by_another_name(ruleset, url, host):
    with bundled(ruleset=ruleset, mcp_hosts=["mcp.internal"], mcp_passthrough_other=True) as b:
        f = b.flow("POST", call("drop_table", id=1), mode="regular", url=url, host=host)
        await b.request(f, identity=ALICE)
    assert not forwarded(f)  # enforced (and denied), or refused


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "DELETE"])
async def test_body_less_methods_meet_the_policy(ruleset, method):
    with bundled(ruleset=ruleset) as b:
        f = b.flow(method)
        await b.request(f, identity=ALICE)
    policy = [d for d in f.metadata[Meta.DECISIONS] if d["stage"] == "policy"]
    assert [d["method"] for d in policy] == [f"http:{method}"]
    assert forwarded(f) == (method == "DELETE")


async def test_a_websocket_upgrade_is_not_let_through(ruleset):
    with bundled(ruleset=ruleset) as b:
        f = b.flow("GET", headers={"upgrade": "websocket", "connection": "Upgrade",
                                   "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==", "sec-websocket-version": "13"})
        await b.request(f, identity=ALICE)
        was_forwarded = forwarded(f)
        if was_forwarded:
            await b.response(f, b"", status=101, ctype="", headers={"upgrade": "websocket", "connection": "Upgrade"})
    assert not was_forwarded or f.response.status_code != 101


async def test_a_replayed_flow_that_was_refused_is_enforced_again(ruleset, tmp_path):
    deny_all = tmp_path / "deny.yaml"
    deny_all.write_text("version: 1\nrules: []\n")
    with bundled(ruleset=str(deny_all)) as b:
        f = b.flow("POST", rpc("tools/list", {}, id=1))
        await b.request(f, identity=ALICE)
        assert not forwarded(f)
        b.tctx.options.update(ruleset=ruleset)
        f.response, f.error, f.is_replay = None, None, "request"  # what ClientPlayback.start_replay does
        await b.request(f, identity=ALICE)
        assert forwarded(f)
        out = await b.response(f, answer(1, TOOLS))
    assert leaked(out) == []


# --- what one request can cost ----------------------------------------------------------------------


@pytest.mark.parametrize("members", [10, 1000])
async def test_a_batch_costs_audit_records_linear_in_its_size(tmp_path, monkeypatch, members):
    """A batch of N denied notifications once wrote N records that each repeated all N decisions."""
    monkeypatch.setenv("BASTION_AUDIT_KEY", "k" * 32)
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\ndefault: allow\nrules:\n"
                     "  - id: no-progress\n    match: {methods: [notifications/progress]}\n    action: deny\n")
    log = tmp_path / "audit.jsonl"
    with bundled(ruleset=str(rules), audit_log=str(log)) as b:
        body = [{"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": i, "progress": 1}}
                for i in range(members)]
        f = b.flow("POST", body)
        await b.request(f)
        assert f.response is not None and not forwarded(f)
        await b.response(f)
    records = [r for r in map(json.loads, log.read_bytes().splitlines()) if r.get("method") == "notifications/progress"
               and r["kind"] != "forward"]
    assert len(records) == members  # one each (beyond the summaries kept on the flow, from its decision alone)
    assert all(r["action"] == "deny" and r["rule"] == "no-progress" for r in records)
    assert max(len(r["decisions"]) for r in records) <= 3
    per_record = log.stat().st_size / members
    assert per_record < 2048, per_record
