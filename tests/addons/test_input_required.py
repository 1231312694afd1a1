"""Multi-round-trip requests (2026-07-28): what a server asks inside a result, and what the client answers,
meet the same rules as the same requests and answers of the 2025 era."""

from __future__ import annotations

import json

import pytest

from mcp_bastion.core import errors
from mcp_bastion.core.message import Carrier, Message
from mcp_bastion.core.pipeline import Context, Pass, Replace
from mcp_bastion.core.vocab import Direction, Meta

from bundled import (
    META,
    V2026,
    bundle_with_stages,
    bundled,
    bundled_addons,
    call,
    error_of,
    forwarded,
    result,
    stage_name,
)

pytestmark = pytest.mark.anyio

ALICE = {"sub": "alice", "groups": ["engineering"], "iss": "https://idp"}
BOB = {"sub": "bob", "groups": ["engineering"], "iss": "https://idp"}
RULES = """\
version: 1
default: allow
rules:
  - id: no-sampling
    match: {direction: server_to_client, methods: [sampling/createMessage]}
    action: deny
    reason: no model here
  - id: no-secret-answers
    match: {direction: client_to_server, kinds: [response], keywords: [hunter2]}
    action: deny
    reason: that looks like a password
"""
ELICIT = {"method": "elicitation/create", "params": {"mode": "form", "message": "Your name?",
                                                     "requestedSchema": {"type": "object"}}}
SAMPLE = {"method": "sampling/createMessage", "params": {"messages": [], "maxTokens": 10}}


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def ruleset(tmp_path):
    p = tmp_path / "rules.yaml"
    p.write_text(RULES)
    return str(p)


def input_required(*requests, state="s-1"):
    value = {"resultType": "input_required", "inputRequests": {f"q{i}": r for i, r in enumerate(requests)}}
    if state is not None:
        value["requestState"] = state
    return result(1, value)


async def first_round(b, answer, identity=ALICE, ctype="application/json"):
    f = b.flow("POST", call("tools/call", 1, name="deploy", arguments={}, _meta=META), headers=V2026)
    await b.request(f, identity=identity)
    assert forwarded(f)
    payload = answer if ctype == "application/json" else f"event: message\ndata: {json.dumps(answer)}\n\n"
    out = await b.response(f, payload, ctype=ctype)
    text = out.decode()
    return f, json.loads(text if ctype == "application/json" else text.split("data: ", 1)[1])


@pytest.mark.parametrize("ctype", ["application/json", "text/event-stream"])
async def test_an_allowed_input_request_reaches_the_client(ruleset, ctype):
    with bundled(ruleset=ruleset) as b:
        f, got = await first_round(b, input_required(ELICIT), ctype=ctype)
    assert got["result"]["inputRequests"] == {"q0": ELICIT}
    inner = [d for d in f.metadata[Meta.DECISIONS] if d.get("method") == "elicitation/create"]
    assert inner and inner[0]["direction"] == "server_to_client" and inner[0]["ref"].endswith("/inputRequests/q0")


@pytest.mark.parametrize("ctype", ["application/json", "text/event-stream"])
async def test_a_denied_input_request_ends_the_call_with_an_error_naming_the_rule(ruleset, ctype):
    """The 2025 form (a sampling request on the stream) is denied: so is the same request inside a result."""
    with bundled(ruleset=ruleset) as b:
        f, got = await first_round(b, input_required(ELICIT, SAMPLE), ctype=ctype)
    assert "result" not in got and got["id"] == 1
    assert got["error"]["code"] == errors.DENIED and got["error"]["data"]["rule"] == "no-sampling"
    assert "sampling/createMessage" in got["error"]["message"]
    assert "answered" not in json.dumps(f.metadata[Meta.DECISIONS])  # nothing was sent to the upstream for it


async def retry(b, identity, state="s-1", responses=None):
    params = {"name": "deploy", "arguments": {}, "_meta": META,
              "inputResponses": responses or {"q0": {"action": "accept", "content": {"name": "alice"}}}}
    if state is not None:
        params["requestState"] = state
    f = b.flow("POST", {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": params}, headers=V2026)
    await b.request(f, identity=identity)
    return f


async def test_the_retry_from_the_caller_the_state_was_issued_to_goes_through(ruleset):
    with bundled(ruleset=ruleset) as b:
        await first_round(b, input_required(ELICIT))
        f = await retry(b, ALICE)
    assert forwarded(f)


@pytest.mark.parametrize(("who", "state"), [(BOB, "s-1"), (ALICE, "never-issued"), (None, "s-1")],
                         ids=["other-identity", "unknown-state", "anonymous"])
async def test_a_request_state_is_honoured_only_from_its_caller(ruleset, who, state):
    with bundled(ruleset=ruleset) as b:
        await first_round(b, input_required(ELICIT))
        f = await retry(b, who, state)
    assert not forwarded(f)
    assert error_of(f)["code"] == errors.FORBIDDEN and error_of(f)["data"] == {"reason": "request_state"}


async def test_the_clients_answers_in_a_retry_meet_the_rules_for_client_answers(ruleset):
    with bundled(ruleset=ruleset) as b:
        await first_round(b, input_required(ELICIT))
        f = await retry(b, ALICE, responses={"q0": {"action": "accept", "content": {"password": "hunter2"}}})
    assert not forwarded(f)
    err = error_of(f)
    assert err["code"] == errors.DENIED and err["data"]["rule"] == "no-secret-answers"


class Redact:
    """A stage after the Policy that rewrites what an elicitation asks (as a masking stage would)."""

    name = stage_name("redact")

    def check(self, m: Message, cx: Context):
        if m.carrier is Carrier.INPUT_REQUIRED and m.direction == Direction.S2C and m.method == "elicitation/create":
            return Replace(m.replace({**m.raw, "params": {**m.params, "message": "[MASKED]"}}))
        return Pass()


async def test_a_stage_that_replaces_a_carried_request_changes_what_the_client_gets(ruleset):
    with bundled_addons(bundle_with_stages(Redact()), ruleset=ruleset) as b:
        _, got = await first_round(b, input_required(ELICIT))
    assert got["result"]["inputRequests"]["q0"]["params"]["message"] == "[MASKED]"
    assert got["result"]["requestState"] == "s-1"


@pytest.mark.parametrize("inner", [["a", "list"], {"q0": {"params": {}}}, {"q0": {"method": 7}}, {"q0": "x"}],
                         ids=["not-a-map", "no-method", "method-not-text", "not-an-object"])
async def test_an_unreadable_input_request_ends_the_call(ruleset, inner):
    answer = result(1, {"resultType": "input_required", "inputRequests": inner})
    with bundled(ruleset=ruleset) as b:
        _, got = await first_round(b, answer)
    assert "result" not in got and got["error"]["code"] == errors.INVALID_REQUEST


# --- subscriptions/listen: resources and tasks it subscribes to meet the same rules ----------------

LISTEN_RULES = """\
version: 1
default: allow
rules:
  - id: no-secrets
    match: {resources: ["file:///secret/**"]}
    action: deny
    reason: secrets stay put
"""


def listen(**notifications):
    return call("subscriptions/listen", 5, notifications=notifications, _meta=META)


@pytest.mark.parametrize(("uris", "ok"), [
    (["file:///project/a.json"], True), (["file:///project/a.json", "file:///secret/key"], False),
    (["file:///project/../secret/key"], False), ([], True), ([7], False),
], ids=["allowed", "one-denied", "dot-dot", "none", "not-a-uri"])
async def test_a_listen_subscription_meets_the_resource_rules(tmp_path, uris, ok):
    rules = tmp_path / "r.yaml"
    rules.write_text(LISTEN_RULES)
    with bundled(ruleset=str(rules)) as b:
        f = b.flow("POST", listen(toolsListChanged=True, resourceSubscriptions=uris), headers=V2026)
        await b.request(f, identity=ALICE)
    assert forwarded(f) is ok
    if not ok:
        assert error_of(f)["code"] in (errors.DENIED, errors.INVALID_REQUEST)


async def test_a_resource_update_notification_meets_the_resource_rules(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text(LISTEN_RULES)
    with bundled(ruleset=str(rules)) as b:
        f = b.flow("POST", listen(resourceSubscriptions=["file:///project/a.json"]), headers=V2026)
        await b.request(f, identity=ALICE)
        events = [{"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": u}}
                  for u in ("file:///project/a.json", "file:///secret/key")]
        out = await b.response(f, "".join(f"event: message\ndata: {json.dumps(e)}\n\n" for e in events),
                               ctype="text/event-stream")
    assert b"file:///project/a.json" in out and b"secret" not in out


async def test_a_listen_subscription_to_another_callers_task_is_refused(tmp_path):
    rules = tmp_path / "r.yaml"
    rules.write_text("version: 1\ndefault: allow\nrules: []\n")
    with bundled(ruleset=str(rules)) as b:
        t = b.flow("POST", call("tools/call", 1, name="export", arguments={}))
        await b.request(t, identity=ALICE)
        await b.response(t, result(1, {"resultType": "task", "taskId": "t-9", "status": "working"}))
        mine = b.flow("POST", listen(taskIds=["t-9"]), headers=V2026)
        await b.request(mine, identity=ALICE)
        theirs = b.flow("POST", listen(taskIds=["t-9"]), headers=V2026)
        await b.request(theirs, identity=BOB)
    assert forwarded(mine) and not forwarded(theirs)
    assert error_of(theirs)["data"] == {"reason": "task"}
