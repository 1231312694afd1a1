"""
The Policy stage: its decisions as stage tests (`Policy().check(message, Context)`,
plain `Message` values, no flow), and what they become end to end through the
shipped bundle (tests/bundled.py): answers, batches, filtered lists, server
requests answered upstream, dropped notifications, reloads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from mcp_bastion.addons.masking import Masking
from mcp_bastion.addons.policy import Policy
from mcp_bastion.core import errors
from mcp_bastion.core.identity import ANONYMOUS, Identity
from mcp_bastion.core.message import Carrier, Message, classify, http_request
from mcp_bastion.core.pipeline import Context, Drop, Pass, Refuse, Replace, Verdict
from mcp_bastion.core.rules import ReloadingRuleset
from mcp_bastion.core.vocab import DEFAULT_RULE, MALFORMED_RULE, NO_RULESET_RULE, Action, Direction, Meta, StageName
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.flowstate import MARKS

from bundled import (
    Bundled,
    bundle_with_stages,
    bundled,
    bundled_addons,
    error_of,
    forwarded,
    open_session,
    rpc,
    sse,
    stage_name,
)
from bundled import result as answer
from bundled import tool_call as call

RULES = """\
version: 1
rules:
  - id: plumbing
    match: {methods: [initialize, "notifications/initialized", tools/list, "http:GET"]}
    action: allow
  - id: no-drop
    match: {tools: [drop_table]}
    action: deny
    reason: irreversible
  - id: oncall-deploy
    match: {groups: [oncall], tools: [deploy]}
    action: approve
    reason: a second person must agree
  - id: contractors-mask
    match: {groups: [contractors], tools: [lookup]}
    action: mask
    profile: pii
  - id: engineers
    match: {groups: [engineering], tools: [read_file, lookup]}
    action: allow
  - id: server-log
    match: {direction: server_to_client, methods: [notifications/message]}
    action: allow
  - id: no-sampling
    match: {direction: server_to_client, methods: [sampling/createMessage]}
    action: deny
    reason: no model here
"""

ALICE = {"sub": "alice", "groups": ["engineering"], "iss": "https://idp"}
OSCAR = {"sub": "oscar", "groups": ["oncall"], "iss": "https://idp"}
CAROL = {"sub": "carol", "groups": ["contractors"], "iss": "https://idp"}
OSCAR_ENG = {"sub": "oscar", "groups": ["oncall", "engineering"], "iss": "https://idp"}

UPSTREAM = "127.0.0.1:9"
TOOLS = {"tools": [{"name": "read_file"}, {"name": "drop_table"}, {"name": "deploy"}, {"name": "lookup"}]}




def c2s(raw) -> Message:
    return classify(raw).placed(direction=Direction.C2S)


def s2c(raw, asked: dict | None = None, carrier: Carrier = Carrier.BODY) -> Message:
    m = classify(raw)
    request = c2s(asked) if asked is not None else None
    return m.placed(direction=Direction.S2C, carrier=carrier, request=request)


def cx(claims=None, profiles=()) -> Context:
    return Context(identity=Identity.from_claims(claims), upstream=UPSTREAM, masking_profiles=frozenset(profiles))


@pytest.fixture
def ruleset_file(tmp_path):
    p = tmp_path / "rules.yaml"
    p.write_text(RULES)
    return p


@pytest.fixture
def policy(ruleset_file):
    """A Policy configured through its option, as mitmproxy does (a test context with just the Policy)."""
    p = Policy()
    with taddons.context(p) as tctx:
        tctx.configure(p, ruleset=str(ruleset_file))
        yield p
        p.done()


def run(scenario, ruleset_file, **options):
    """`await scenario(b)` with the shipped bundle over this module's ruleset."""

    async def main():
        with bundled(ruleset=str(ruleset_file), **options) as b:
            return await scenario(b)

    return asyncio.run(main())


def decisions(f, stage="policy"):
    return [d for d in f.metadata.get(Meta.DECISIONS, []) if d["stage"] == stage]


# --- options -----------------------------------------------------------------------------------


def test_without_a_ruleset_everything_is_denied_and_said_at_start(caplog):
    caplog.set_level(logging.WARNING)
    p = Policy()
    with taddons.context(p) as tctx:
        tctx.configure(p, ruleset=None)
        assert "no ruleset configured" in caplog.text
        out = p.check(c2s(rpc("initialize", {})), cx(ALICE))
    assert isinstance(out, Refuse)
    assert out.refusal.code == errors.DENIED and out.refusal.data["rule"] == NO_RULESET_RULE
    assert "option 'ruleset' is unset" in out.refusal.message
    assert Policy().ruleset().default_decision.rule == NO_RULESET_RULE  # never configured: the same


def test_without_a_ruleset_the_bundle_denies_every_call():
    async def scenario(b: Bundled):
        f = b.flow("POST", rpc("initialize", {}))
        await b.request(f, identity=ALICE)
        return f

    async def main():
        with bundled(ruleset=None) as b:
            return await scenario(b)

    f = asyncio.run(main())
    assert not forwarded(f)
    err = error_of(f)
    assert err["code"] == errors.DENIED and err["data"]["rule"] == NO_RULESET_RULE


def test_an_invalid_ruleset_is_refused_at_start_naming_file_line_and_rule(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - id: oops\n    action: permit\n")
    p = Policy()
    with taddons.context(p) as tctx:
        with pytest.raises(exceptions.OptionsError, match=r"bad\.yaml:4: rule 'oops': action must be one of"):
            tctx.configure(p, ruleset=str(bad))
        p.done()


def test_the_policy_is_a_stage_named_policy():
    assert Policy.name is StageName.POLICY and Policy.name.response is StageName.RESP_POLICY


# --- the stage: client to server ---------------------------------------------------------------


def test_allow_passes_with_the_deciding_rule(policy):
    m = c2s(call("read_file", path="/x"))
    out = policy.check(m, cx(ALICE))
    assert out == Pass((Verdict(StageName.POLICY, Action.ALLOW, "engineers", None, {}),))
    assert out.decisions[0].record(m).items() >= {"stage": "policy", "direction": "client_to_server", "id": 1,
                                                  "method": "tools/call", "target": "read_file", "action": "allow",
                                                  "rule": "engineers"}.items()


def test_deny_refuses_naming_rule_and_reason(policy):
    out = policy.check(c2s(call("drop_table", id="abc", table="t")), cx(ALICE))
    assert isinstance(out, Refuse) and out.action == Action.DENY
    r = out.refusal
    assert (r.status, r.code) == (403, errors.DENIED)
    assert r.message == "tools/call drop_table denied by rule 'no-drop': irreversible"
    assert r.data == {"rule": "no-drop", "reason": "irreversible"}
    (v,) = out.decisions
    assert (v.stage, v.action, v.rule, v.reason) == (StageName.POLICY, Action.DENY, "no-drop", "irreversible")


def test_names_are_normalised_before_matching(policy):
    for name in ("DROP_TABLE", "dr\u200bop_table", "\uff44\uff52\uff4f\uff50\uff3f\uff54\uff41\uff42\uff4c\uff45"):
        out = policy.check(c2s(call(name)), cx(ALICE))
        assert isinstance(out, Refuse) and out.refusal.data["rule"] == "no-drop", name


def test_default_deny_names_the_default_rule(policy):
    out = policy.check(c2s(call("read_file", path="/x")), cx(CAROL))
    assert isinstance(out, Refuse) and out.refusal.data["rule"] == DEFAULT_RULE


def test_a_call_naming_no_tool_is_malformed(policy):
    out = policy.check(c2s(rpc("tools/call", {"arguments": {}})), cx(ALICE))
    assert isinstance(out, Refuse) and out.refusal.data["rule"] == MALFORMED_RULE


def test_approve_refuses_with_approval_required(policy):
    out = policy.check(c2s(call("deploy", id=7, env="prod")), cx(OSCAR))
    assert isinstance(out, Refuse) and out.action == Action.APPROVE
    assert (out.refusal.status, out.refusal.code) == (403, errors.APPROVAL_REQUIRED)
    assert out.refusal.message == "tools/call deploy needs approval (rule 'oncall-deploy'): a second person must agree"
    assert out.refusal.data == {"rule": "oncall-deploy", "reason": "a second person must agree"}
    (v,) = out.decisions
    assert (v.action, v.rule) == (Action.APPROVE, "oncall-deploy")


def test_mask_passes_naming_its_profile_when_a_masking_stage_applies_it(policy):
    m = c2s(call("lookup", q="c-1"))
    out = policy.check(m, cx(CAROL, profiles={"pii"}))
    assert isinstance(out, Replace) and out.message.masks == ("pii",)  # for the masking stage
    assert out.message.raw is m.raw  # the content is the masking stage's to change
    (v,) = out.decisions
    assert (v.action, v.rule, v.extra) == (Action.MASK, "contractors-mask", {"profile": "pii"})


def test_mask_without_a_masking_stage_is_a_denial_that_keeps_what_the_rule_said(policy):
    for profiles in ((), ("secrets",)):
        out = policy.check(c2s(call("lookup", q="c-1")), cx(CAROL, profiles=profiles))
        assert isinstance(out, Refuse) and out.action == Action.DENY
        assert out.refusal.code == errors.DENIED and out.refusal.data["rule"] == "contractors-mask"
        assert "masking profile 'pii' is not available" in out.refusal.message
        (v,) = out.decisions
        assert (v.action, v.rule) == (Action.DENY, "contractors-mask")
        assert v.extra == {"profile": "pii", "ruled": "mask"}


def test_bodyless_requests_are_evaluated_as_pseudo_methods(policy):
    out = policy.check(http_request("GET"), cx(ALICE))
    assert isinstance(out, Pass) and out.decisions[0].rule == "plumbing"
    out = policy.check(http_request("DELETE"), cx(ALICE))
    assert isinstance(out, Refuse)
    assert out.refusal.message.startswith("http:DELETE denied by rule 'bastion:default'")


def test_anonymous_gets_only_what_needs_no_identity(policy):
    assert isinstance(policy.check(c2s(call("read_file", path="/x")), Context(identity=ANONYMOUS)), Refuse)
    assert isinstance(policy.check(c2s(rpc("initialize", {})), Context(identity=ANONYMOUS)), Pass)


def test_a_denied_client_notification_is_refused(policy):
    out = policy.check(c2s(rpc("notifications/cancelled", {"requestId": 1}, id=None)), cx(ALICE))
    assert isinstance(out, Refuse) and out.refusal.status == 403


# --- the stage: server to client ---------------------------------------------------------------


def test_a_list_result_is_replaced_by_the_filtered_one(policy):
    m = s2c(answer(4, TOOLS), asked=rpc("tools/list", {}, id=4), carrier=Carrier.EVENT)
    out = policy.check(m, cx(ALICE))
    assert isinstance(out, Replace)
    new = out.message
    assert [t["name"] for t in new.params["tools"]] == ["read_file", "lookup"]
    assert new.raw == {"jsonrpc": "2.0", "id": 4, "result": {"tools": [{"name": "read_file"}, {"name": "lookup"}]}}
    assert (new.direction, new.carrier, new.request) == (Direction.S2C, Carrier.EVENT, m.request)
    assert m.params == TOOLS  # the original is untouched
    (v,) = out.decisions
    assert (v.stage, v.action) == (StageName.RESP_POLICY, Action.FILTER)
    assert v.extra == {"hidden": ["drop_table", "deploy"], "method": "tools/list"}
    assert v.reason == "2 item(s) hidden from this caller"

    out = policy.check(m, cx(OSCAR))
    assert [t["name"] for t in out.message.params["tools"]] == ["deploy"]


def test_a_list_result_is_filtered_by_shape_when_the_request_is_unknown(policy):
    out = policy.check(s2c(answer(9, TOOLS)), cx(ALICE))  # e.g. on a GET stream
    assert isinstance(out, Replace) and [t["name"] for t in out.message.params["tools"]] == ["read_file", "lookup"]


def test_a_list_hides_what_only_an_unavailable_masking_profile_would_allow(policy):
    m = s2c(answer(4, TOOLS), asked=rpc("tools/list", {}, id=4))
    assert [t["name"] for t in policy.check(m, cx(CAROL)).message.params["tools"]] == []
    assert [t["name"] for t in policy.check(m, cx(CAROL, profiles={"pii"})).message.params["tools"]] == ["lookup"]


def test_answers_that_hide_nothing_pass_without_a_decision(policy):
    assert policy.check(s2c(answer(1, {"content": [], "tools": []}), asked=call("read_file")), cx(ALICE)) == Pass()
    all_visible = {"tools": [{"name": "read_file"}]}
    assert policy.check(s2c(answer(4, all_visible), asked=rpc("tools/list", {}, id=4)), cx(ALICE)) == Pass()
    err = {"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "upstream failed"}}
    assert policy.check(s2c(err, asked=call("read_file")), cx(ALICE)) == Pass()


def test_a_denied_server_request_is_refused_to_be_answered_upstream(policy):
    out = policy.check(s2c(rpc("sampling/createMessage", {"messages": []}, id=77)), cx(ALICE))
    assert isinstance(out, Refuse) and out.action == Action.DENY
    assert out.refusal.message == "sampling/createMessage denied by rule 'no-sampling': no model here"
    assert out.refusal.data == {"rule": "no-sampling", "reason": "no model here"}
    (v,) = out.decisions
    assert (v.stage, v.action, v.rule) == (StageName.RESP_POLICY, Action.DENY, "no-sampling")
    assert v.extra == {"answered": "error sent to upstream"}


def test_server_notifications_are_allowed_or_dropped(policy):
    out = policy.check(s2c(rpc("notifications/message", {"level": "info"}, id=None)), cx(ALICE))
    assert isinstance(out, Pass) and out.decisions[0].rule == "server-log"
    assert out.decisions[0].stage == StageName.RESP_POLICY
    out = policy.check(s2c(rpc("notifications/progress", {"progress": 1}, id=None)), cx(ALICE))
    assert isinstance(out, Drop) and out.reason == "denied by rule 'bastion:default'"
    (v,) = out.decisions
    assert (v.stage, v.action, v.rule) == (StageName.RESP_POLICY, Action.DENY, DEFAULT_RULE)


# --- hot reload --------------------------------------------------------------------------------


def test_edits_take_effect_and_invalid_edits_keep_the_previous_ruleset(policy, ruleset_file, caplog):
    policy.source.interval = 0  # check on every message
    drop = c2s(call("drop_table"))
    assert isinstance(policy.check(drop, cx(ALICE)), Refuse)
    ruleset_file.write_text(RULES.replace("action: deny\n    reason: irreversible", "action: allow"))
    assert isinstance(policy.check(drop, cx(ALICE)), Pass)
    caplog.set_level(logging.ERROR)
    ruleset_file.write_text(RULES + "  - id: broken\n    action: sometimes\n")
    assert isinstance(policy.check(drop, cx(ALICE)), Pass)  # the last good ruleset
    assert "edit refused, the previous ruleset stays in force" in caplog.text
    assert "rules.yaml:" in caplog.text and "rule 'broken'" in caplog.text


def test_source_can_be_set_directly(ruleset_file):
    p = Policy()
    p.source = ReloadingRuleset(str(ruleset_file), 0)
    assert isinstance(p.check(c2s(call("drop_table")), cx(ALICE)), Refuse)


def test_the_watcher_task_reloads_without_traffic(ruleset_file, caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        p = Policy()
        with taddons.context(p) as tctx:
            tctx.configure(p, ruleset=str(ruleset_file))
            p.running()
            ruleset_file.write_text("version: 1\ndefault: allow\nrules: []\n")
            for _ in range(60):
                await asyncio.sleep(0.1)
                if p.source.ruleset.default == "allow":
                    break
            p.done()
            return p.source.ruleset.default

    assert asyncio.run(scenario()) == "allow"
    assert "reloaded" in caplog.text


def test_reload_through_the_bundle(ruleset_file):
    async def scenario(b: Bundled):
        b.addon(Policy).source.interval = 0
        first = b.flow("POST", call("drop_table"))
        await b.request(first, identity=ALICE)
        ruleset_file.write_text(RULES.replace("action: deny\n    reason: irreversible", "action: allow"))
        os.utime(ruleset_file, ns=(time.time_ns(), time.time_ns() + 1_000_000))
        second = b.flow("POST", call("drop_table"))
        await b.request(second, identity=ALICE)
        return first, second

    first, second = run(scenario, ruleset_file)
    assert not forwarded(first) and forwarded(second)
    assert decisions(second)[-1]["action"] == "allow"


# --- end to end: client to server ----------------------------------------------------------------


def test_allowed_request_is_forwarded_and_recorded(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", path="/x"))
        await b.request(f, identity=ALICE)
        return f

    f = run(scenario, ruleset_file)
    assert forwarded(f) and fs.passed(f, "policy")
    (d,) = decisions(f)
    assert d.items() >= {"stage": "policy", "direction": "client_to_server", "id": 1, "method": "tools/call",
                         "target": "read_file", "action": "allow", "rule": "engineers"}.items()
    assert "reason" not in d  # an allow carries no reason
    assert f.comment == "alice: tools/call read_file -> allow [engineers]" and f.marked == ""


def test_denied_request_is_answered_with_its_id_and_never_forwarded(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("POST", call("drop_table", id="abc", table="t"))
        await b.request(f, identity=ALICE)
        return f

    f = run(scenario, ruleset_file)
    assert not forwarded(f)
    assert f.response.status_code == 200 and f.metadata[Meta.REFUSED]
    assert not fs.passed(f, "policy")
    body = json.loads(f.response.content)
    assert body["id"] == "abc"
    assert body["error"] == {
        "code": errors.DENIED,
        "message": "tools/call drop_table denied by rule 'no-drop': irreversible",
        "data": {"rule": "no-drop", "reason": "irreversible"},
    }
    assert decisions(f)[0]["action"] == "deny"
    assert f.comment.endswith("-> deny [no-drop]: irreversible")
    assert f.marked == MARKS[Action.DENY]


def test_a_batch_with_one_denied_member_is_not_forwarded_at_all(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("POST", [call("read_file", id=1, path="/a"), rpc("notifications/initialized", id=None),
                            call("DROP_TABLE", id=2), call("lookup", id=3, q="x")])
        await b.request(f, identity=ALICE)
        return f

    f = run(scenario, ruleset_file)
    assert not forwarded(f) and f.response.status_code == 200
    answers = json.loads(f.response.content)
    assert [a["id"] for a in answers] == [1, 2, 3]
    assert all(a["error"]["code"] == errors.DENIED for a in answers)
    assert answers[1]["error"]["data"] == {"rule": "no-drop", "reason": "irreversible"}
    assert answers[0]["error"]["data"] == {"rule": "no-drop", "reason": "batch"}
    assert "in the same batch was denied by rule 'no-drop'" in answers[0]["error"]["message"]
    assert [d["action"] for d in decisions(f)] == ["allow", "allow", "deny", "allow", "deny", "deny"]
    assert [(d["id"], d["batch"]) for d in decisions(f) if d.get("batch")] == [(1, True), (3, True)]


def test_an_allowed_batch_is_forwarded_whole_and_unchanged(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("POST", [call("read_file", id=1, path="/a"), call("lookup", id=2, q="x")])
        raw = f.request.content
        await b.request(f, identity=ALICE)
        return f, raw

    f, raw = run(scenario, ruleset_file)
    assert forwarded(f) and f.request.content == raw


def test_a_denied_notification_gets_an_http_error_without_id(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("POST", rpc("notifications/cancelled", {"requestId": 1}, id=None))
        await b.request(f, identity=ALICE)
        return f

    f = run(scenario, ruleset_file)
    assert f.response.status_code == 403
    body = json.loads(f.response.content)
    assert body["id"] is None and body["error"]["code"] == errors.DENIED


def test_approve_is_answered_approval_required(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("POST", call("deploy", id=7, env="prod"))
        await b.request(f, identity=OSCAR)
        return f

    f = run(scenario, ruleset_file)
    assert not forwarded(f)
    body = json.loads(f.response.content)
    assert body["id"] == 7
    assert body["error"]["code"] == errors.APPROVAL_REQUIRED
    assert body["error"]["message"] == ("tools/call deploy needs approval (rule 'oncall-deploy'): "
                                        "a second person must agree")
    (d,) = decisions(f)
    assert (d["action"], d["rule"], d["id"]) == ("approve", "oncall-deploy", 7)
    assert f.marked == MARKS[Action.APPROVE]
    # `bastion.approval` ({"rule", "status", "ids"}) is no longer written by anyone: not asserted here.


def test_approve_in_a_batch_holds_the_others(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("POST", [call("read_file", id=1), call("deploy", id=2)])
        await b.request(f, identity=OSCAR_ENG)
        return f

    f = run(scenario, ruleset_file)
    answers = json.loads(f.response.content)
    assert [a["error"]["code"] for a in answers] == [errors.APPROVAL_REQUIRED] * 2
    assert answers[0]["error"]["data"] == {"rule": "oncall-deploy", "reason": "batch"}
    assert "held for approval by rule 'oncall-deploy'" in answers[0]["error"]["message"]


def test_deny_beats_approve_in_one_batch(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("POST", [call("read_file", id=1), call("deploy", id=2), call("drop_table", id=3)])
        await b.request(f, identity=OSCAR_ENG)
        return f

    f = run(scenario, ruleset_file)
    answers = json.loads(f.response.content)
    assert [a["error"]["code"] for a in answers] == [errors.DENIED] * 3
    assert [a["error"]["data"]["reason"] for a in answers] == ["batch", "batch", "irreversible"]
    assert "in the same batch was denied by rule 'no-drop'" in answers[0]["error"]["message"]


def test_mask_selects_the_profile_and_forwards(ruleset_file):
    class PiiMasker:
        """Stands for a masking stage: only its declared profiles matter to the Policy."""

        name = stage_name("masking")
        masking_profiles = ("pii",)

        def check(self, m, cx):
            return Pass()

    async def main():
        with bundled_addons(bundle_with_stages(PiiMasker()), ruleset=str(ruleset_file)) as b:
            f = b.flow("POST", call("lookup", q="c-1"))
            await b.request(f, identity=CAROL)
            return f

    f = asyncio.run(main())
    assert forwarded(f) and fs.passed(f, "policy")
    assert f.metadata[Meta.MASK] == {"profile": "pii", "rule": "contractors-mask", "profiles": ["pii"]}
    assert f.marked == MARKS[Action.MASK]


def test_mask_without_a_masking_stage_is_refused_not_forwarded_unmasked(ruleset_file):
    async def scenario(b: Bundled):
        b.addon(Masking).profiles = dict  # the stage can apply no profile (as if it were not loaded)
        f = b.flow("POST", call("lookup", q="c-1"))
        await b.request(f, identity=CAROL)
        return f

    f = run(scenario, ruleset_file)
    assert not forwarded(f)
    assert Meta.MASK not in f.metadata and not fs.passed(f, "policy")
    err = error_of(f)
    assert err["code"] == errors.DENIED and err["data"]["rule"] == "contractors-mask"
    assert "masking profile 'pii' is not available" in err["message"]
    (d,) = decisions(f)
    assert (d["action"], d["ruled"], d["profile"]) == ("deny", "mask", "pii")


def test_get_and_delete_are_evaluated_as_pseudo_methods(ruleset_file):
    async def scenario(b: Bundled):
        get = b.flow("GET", headers={"accept": "text/event-stream"})
        await b.request(get, identity=ALICE)
        delete = b.flow("DELETE", headers={"mcp-session-id": open_session(b, "s", ALICE)})
        await b.request(delete, identity=ALICE)
        return get, delete

    get, delete = run(scenario, ruleset_file)
    assert forwarded(get) and decisions(get)[0]["method"] == "http:GET"
    assert delete.response.status_code == 403
    assert error_of(delete)["message"].startswith("http:DELETE denied by rule 'bastion:default'")


def test_identity_off_is_anonymous(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", path="/x"))
        await b.request(f)  # no identity on the flow
        init = b.flow("POST", rpc("initialize", {}))
        await b.request(init)
        return f, init

    f, init = run(scenario, ruleset_file)
    assert error_of(f)["data"]["rule"] == DEFAULT_RULE
    assert forwarded(init)


def test_an_exception_in_evaluation_fails_closed(ruleset_file, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("evaluator exploded")

    async def scenario(b: Bundled):
        monkeypatch.setattr(b.addon(Policy).source.ruleset, "evaluate", boom)
        f = b.flow("POST", call("read_file", path="/x"))
        await b.request(f, identity=ALICE)
        return f

    f = run(scenario, ruleset_file)
    assert not forwarded(f) and f.response.status_code == 500
    err = error_of(f)
    assert err["code"] == errors.GATEWAY_ERROR and err["data"]["stage"] == "policy"
    assert "the request was not forwarded" in err["message"]
    assert f.metadata[Meta.ERROR].startswith("policy: ") and "RuntimeError" in f.metadata[Meta.ERROR]
    assert f.marked == MARKS[Action.ERROR]


def test_a_failed_evaluation_names_the_exception_itself(ruleset_file, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("evaluator exploded")

    async def scenario(b: Bundled):
        monkeypatch.setattr(b.addon(Policy).source.ruleset, "evaluate", boom)
        f = b.flow("POST", call("read_file", path="/x"))
        await b.request(f, identity=ALICE)
        return f

    f = run(scenario, ruleset_file)
    assert error_of(f)["data"] == {"stage": "policy", "error": "RuntimeError"}
    assert f.metadata[Meta.ERROR].startswith("policy: RuntimeError")


def test_unparseable_input_never_reaches_the_policy(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("POST", b'{"jsonrpc":"2.0","id":1,"id":2,"method":"tools/call"}')
        await b.request(f, identity=ALICE)
        return f

    f = run(scenario, ruleset_file)
    assert f.response.status_code == 400 and decisions(f) == []


# --- end to end: server to client, buffered JSON ----------------------------------------------------


def test_list_results_are_filtered_per_identity(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("POST", rpc("tools/list", {}, id=4))
        await b.request(f, identity=ALICE)
        content = await b.response(f, answer(4, TOOLS))
        g = b.flow("POST", rpc("tools/list", {}, id=5))
        await b.request(g, identity=OSCAR)
        other = await b.response(g, answer(5, TOOLS))
        return f, content, other

    f, content, other = run(scenario, ruleset_file)
    assert [t["name"] for t in json.loads(content)["result"]["tools"]] == ["read_file", "lookup"]
    assert [m.raw["result"]["tools"] for m in fs.response_body(f).messages] == [
        [{"name": "read_file"}, {"name": "lookup"}]]
    (d,) = decisions(f, "resp:policy")
    assert d["action"] == "filter" and d["hidden"] == ["drop_table", "deploy"]
    assert fs.passed(f, "resp:policy") and f.response.status_code == 200
    assert f.comment == "alice: tools/list -> allow [plumbing] (1 server message filtered or dropped)"
    assert f.marked == ""
    assert [t["name"] for t in json.loads(other)["result"]["tools"]] == ["deploy"]


def test_unfiltered_responses_pass_byte_for_byte(ruleset_file):
    raw = b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hi"}],  "tools":[]}}'

    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", path="/x"))
        await b.request(f, identity=ALICE)
        return f, await b.response(f, raw)

    f, out = run(scenario, ruleset_file)
    assert out == raw and fs.passed(f, "resp:policy")


# --- end to end: server to client, event streams ------------------------------------------------------


class Capture(BaseHTTPRequestHandler):
    """A stand-in upstream endpoint that records what the gateway POSTs to it."""

    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        Capture.received.append((self.path, {k.lower(): v for k, v in self.headers.items()}, json.loads(body)))
        self.send_response(202)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    Capture.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()




def events(out: bytes) -> list:
    return [json.loads(line[6:]) for line in out.decode().splitlines() if line.startswith("data: ")]


def received(timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while not Capture.received and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # anything else on its way
    return list(Capture.received)


SERVER_STREAM = sse(
    rpc("notifications/message", {"level": "info", "data": "hello"}, id=None),
    rpc("sampling/createMessage", {"messages": []}, id=77),
    rpc("notifications/progress", {"progress": 1}, id=None),
    answer(1, {"content": []}),
)


def stream_scenario(url: str):
    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", id=1, path="/x"), url=url, mode=f"reverse:{url}", path="/mcp?x=1",
                   headers={"mcp-session-id": open_session(b, "sess-1", ALICE), "authorization": "Bearer client-token"})
        await b.request(f, identity=ALICE)
        assert forwarded(f)
        out = await b.response(f, SERVER_STREAM, ctype="text/event-stream")
        return f, out

    return scenario


def test_stream_events_are_filtered_screened_and_denied_requests_answered_upstream(ruleset_file, upstream):
    f, out = run(stream_scenario(upstream), ruleset_file)
    assert [e.get("method", e.get("id")) for e in events(out)] == ["notifications/message", 1]
    assert fs.passed(f, "resp:policy") and not f.metadata.get(Meta.REFUSED)

    ((path, headers, body),) = received()
    assert path == "/mcp?x=1"
    assert headers["mcp-session-id"] == "sess-1"
    assert headers["content-type"] == "application/json"
    assert headers.get("authorization") != "Bearer client-token"  # the client's token never goes upstream
    assert body == {"jsonrpc": "2.0", "id": 77, "error": {
        "code": errors.DENIED, "message": "sampling/createMessage denied by rule 'no-sampling': no model here",
        "data": {"rule": "no-sampling", "reason": "no model here"}}}
    s2c_decisions = decisions(f, "resp:policy")
    assert [(d["method"], d["action"]) for d in s2c_decisions] == [
        ("notifications/message", "allow"), ("sampling/createMessage", "deny"), ("notifications/progress", "deny")]
    assert s2c_decisions[1]["answered"] == "error sent to upstream"
    # the call itself was allowed: side messages dropped from its stream do not make it look denied
    assert f.comment == "alice: tools/call read_file -> allow [engineers] (2 server messages filtered or dropped)"
    assert f.marked == ""


def test_the_answer_to_a_denied_server_request_carries_the_upstream_credential(ruleset_file, upstream, monkeypatch):
    monkeypatch.setenv("BASTION_TEST_UPSTREAM_TOKEN", "upstream-secret")
    run(stream_scenario(upstream), ruleset_file, upstream_token_env="BASTION_TEST_UPSTREAM_TOKEN")
    ((_, headers, _),) = received()
    assert headers.get("authorization") == "Bearer upstream-secret"


def test_list_results_inside_a_get_stream_are_filtered_by_shape(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("GET", headers={"accept": "text/event-stream"})
        await b.request(f, identity=ALICE)
        return await b.response(f, sse(answer(9, TOOLS)), ctype="text/event-stream")

    (event,) = events(run(scenario, ruleset_file))
    assert [t["name"] for t in event["result"]["tools"]] == ["read_file", "lookup"]


def test_list_results_inside_a_post_stream_are_filtered(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("POST", rpc("tools/list", {}, id=4))
        await b.request(f, identity=OSCAR)
        return f, await b.response(f, sse(answer(4, TOOLS)), ctype="text/event-stream")

    f, out = run(scenario, ruleset_file)
    (event,) = events(out)
    assert [t["name"] for t in event["result"]["tools"]] == ["deploy"]
    (d,) = decisions(f, "resp:policy")
    assert d["action"] == "filter" and d["hidden"] == ["read_file", "drop_table", "lookup"]


def test_a_denied_notification_in_a_stream_is_dropped(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", id=1, path="/x"))
        await b.request(f, identity=ALICE)
        return f, await b.response(f, sse(rpc("notifications/progress", {"progress": 1}, id=None), answer(1, {})),
                                   ctype="text/event-stream")

    f, out = run(scenario, ruleset_file)
    assert events(out) == [answer(1, {})]
    assert b"notifications/progress" not in out
    (d,) = decisions(f, "resp:policy")
    assert (d["method"], d["action"], d["rule"]) == ("notifications/progress", "deny", DEFAULT_RULE)


def test_a_denied_notification_in_a_json_body_is_dropped(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", id=1, path="/x"))
        await b.request(f, identity=ALICE)
        out = await b.response(f, [rpc("notifications/progress", {"progress": 1}, id=None), answer(1, {})])
        g = b.flow("POST", call("read_file", id=2, path="/x"))
        await b.request(g, identity=ALICE)
        await b.response(g, rpc("notifications/progress", {"progress": 1}, id=None))
        return out, g

    out, g = run(scenario, ruleset_file)
    assert json.loads(out) == [answer(1, {})]
    assert g.response.status_code == 202 and g.response.content == b""  # nothing left for the client


def test_streamed_responses_pass_the_gate(ruleset_file):
    async def scenario(b: Bundled):
        f = b.flow("POST", call("read_file", path="/x"))
        await b.request(f, identity=ALICE)
        await b.response(f, sse(answer(1, {})), ctype="text/event-stream")
        return f

    f = run(scenario, ruleset_file)
    assert fs.passed(f, "resp:policy")
    assert not any(d["stage"] == "gate" for d in f.metadata.get(Meta.DECISIONS, []))


# --- names that differ only in case or Unicode form ---------------------------------------------------


CLASH_RULES = """\
version: 1
default: deny
rules:
  - id: lists
    match: {methods: [tools/list, initialize]}
    action: allow
  - id: readers
    match: {tools: [read_file]}
    action: allow
"""


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("twin", ["Read_File", "READ_FILE", "ｒｅａｄ＿ｆｉｌｅ", "read\u200b_file", "read_\ufb01le"])
async def test_tools_whose_names_read_the_same_to_rules_are_hidden_and_refused(tmp_path, twin):
    rules = tmp_path / "rules.yaml"
    rules.write_text(CLASH_RULES)
    with bundled(ruleset=str(rules)) as b:
        f = b.flow("POST", rpc("tools/list", {}, 1))
        await b.request(f)
        await b.response(f, answer(1, {"tools": [{"name": "read_file", "inputSchema": {}},
                                                 {"name": twin, "inputSchema": {}},
                                                 {"name": "other", "inputSchema": {}}]}))
        listed = json.loads(f.response.content)["result"]["tools"]
        assert [t["name"] for t in listed] == []  # both twins hidden; `other` by the default deny
        for name in ("read_file", twin):
            g = b.flow("POST", call(name, 2))
            await b.request(g)
            assert not forwarded(g), name
            assert error_of(g)["data"]["reason"] == "name_clash"


@pytest.mark.anyio
async def test_a_single_spelling_is_not_a_clash(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(CLASH_RULES)
    with bundled(ruleset=str(rules)) as b:
        f = b.flow("POST", rpc("tools/list", {}, 1))
        await b.request(f)
        await b.response(f, answer(1, {"tools": [{"name": "read_file", "inputSchema": {}}]}))
        assert [t["name"] for t in json.loads(f.response.content)["result"]["tools"]] == ["read_file"]
        g = b.flow("POST", call("READ_FILE", 2))  # one tool: every spelling of it is that tool
        await b.request(g)
        assert forwarded(g)
