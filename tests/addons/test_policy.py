"""The Policy addon in a mitmproxy test context, with the real Gateway and Gate around it."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mitmproxy import exceptions, hooks, http
from mitmproxy.test import taddons, tflow

from mcp_bastion.glue import flowstate as fs
from mcp_bastion.core import errors
from mcp_bastion.core.rules import DEFAULT_RULE, NO_RULESET_RULE
from mcp_bastion.addons.gate import Gate
from mcp_bastion.addons.gateway import Gateway
from mcp_bastion.addons.policy import APPROVAL, MASK, Policy

ROOT = Path(__file__).resolve().parents[2]

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


class Bundle:
    """Gateway, Policy and Gate in a test context, driving a flow through their hooks in order."""

    def __init__(self, tctx, gateway: Gateway, policy: Policy, gate: Gate):
        self.tctx, self.gateway, self.policy, self.gate = tctx, gateway, policy, gate

    def request(self, body, identity=None, method="POST", url="http://127.0.0.1:9/mcp", headers=None):
        content = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
        hdrs = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        hdrs.update(headers or {})
        if method != "POST":
            hdrs.pop("content-type")
        f = tflow.tflow(req=http.Request.make(method, url, content, hdrs))
        self.gateway.requestheaders(f)
        if identity is not None:
            f.metadata[fs.IDENTITY] = identity
        for hook in (self.gateway.request, self.policy.request, self.gate.request):
            hook(f)
        return f

    def respond(self, f, payload, content_type="application/json"):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        f.response = http.Response.make(200, b"" if content_type == "text/event-stream" else data,
                                        {"content-type": content_type})
        for hook in (self.gateway.responseheaders, self.policy.responseheaders):
            hook(f)
        if content_type == "text/event-stream":
            out = b"".join(f.response.stream(data)) + b"".join(f.response.stream(b""))
            for hook in (self.gateway.response, self.policy.response, self.gate.response):
                hook(f)
            return out
        for hook in (self.gateway.response, self.policy.response, self.gate.response):
            hook(f)
        return f.response.content


@pytest.fixture
def ruleset_file(tmp_path):
    p = tmp_path / "rules.yaml"
    p.write_text(RULES)
    return p


@pytest.fixture
def bundle(ruleset_file):
    gateway, policy, gate = Gateway(), Policy(), Gate()
    with taddons.context(gateway, policy, gate) as tctx:
        tctx.configure(policy, ruleset=str(ruleset_file))
        yield Bundle(tctx, gateway, policy, gate)
        policy.done()


def rpc(method, params=None, id=1):
    m = {"jsonrpc": "2.0", "method": method}
    if id is not None:
        m["id"] = id
    if params is not None:
        m["params"] = params
    return m


def call(tool, id=1, **args):
    return rpc("tools/call", {"name": tool, "arguments": args}, id)


def policy_decisions(f, stage="policy"):
    return [d for d in f.metadata.get(fs.DECISIONS, []) if d["stage"] == stage]


# --- options -----------------------------------------------------------------


def test_without_a_ruleset_everything_is_denied_and_said_at_start(caplog):
    caplog.set_level(logging.WARNING)
    gateway, policy, gate = Gateway(), Policy(), Gate()
    with taddons.context(gateway, policy, gate) as tctx:
        tctx.master.addons.invoke_addon_sync(policy, hooks.ConfigureHook(set(tctx.options.keys())))  # as at start
        assert "no ruleset configured" in caplog.text
        f = Bundle(None, gateway, policy, gate).request(rpc("initialize", {}), ALICE)
        err = json.loads(f.response.content)["error"]
        assert err["code"] == errors.DENIED and err["data"]["rule"] == NO_RULESET_RULE
        assert "option 'ruleset' is unset" in err["message"]
        policy.done()


def test_an_invalid_ruleset_is_refused_at_start_naming_file_line_and_rule(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - id: oops\n    action: permit\n")
    policy = Policy()
    with taddons.context(policy) as tctx:
        with pytest.raises(exceptions.OptionsError, match=r"bad\.yaml:4: rule 'oops': action must be one of"):
            tctx.configure(policy, ruleset=str(bad))
        policy.done()


# --- client to server ----------------------------------------------------------


def test_allowed_request_is_forwarded_and_recorded(bundle):
    f = bundle.request(call("read_file", path="/x"), ALICE)
    assert f.response is None and fs.passed(f, "policy")
    (d,) = policy_decisions(f)
    assert d == {"stage": "policy", "direction": "client_to_server", "id": 1, "method": "tools/call",
                 "target": "read_file", "action": "allow", "rule": "engineers"}


def test_denied_request_is_answered_with_its_id_and_never_forwarded(bundle):
    f = bundle.request(call("drop_table", id="abc", table="t"), ALICE)
    assert f.response.status_code == 200 and f.metadata["bastion.refused"]
    assert not fs.passed(f, "policy")
    answer = json.loads(f.response.content)
    assert answer["id"] == "abc"
    assert answer["error"] == {
        "code": errors.DENIED,
        "message": "tools/call drop_table denied by rule 'no-drop': irreversible",
        "data": {"rule": "no-drop", "reason": "irreversible"},
    }
    assert policy_decisions(f)[0]["action"] == "deny"
    assert f.comment.endswith("-> deny [no-drop]: irreversible")


def test_default_deny_names_the_default_rule(bundle):
    f = bundle.request(call("read_file", path="/x"), CAROL)
    assert json.loads(f.response.content)["error"]["data"]["rule"] == DEFAULT_RULE


def test_a_batch_with_one_denied_member_is_not_forwarded_at_all(bundle):
    batch = [call("read_file", id=1, path="/a"), rpc("notifications/initialized", id=None),
             call("DROP_TABLE", id=2), call("lookup", id=3, q="x")]
    f = bundle.request(batch, ALICE)
    answers = json.loads(f.response.content)
    assert [a["id"] for a in answers] == [1, 2, 3]
    assert all(a["error"]["code"] == errors.DENIED for a in answers)
    assert answers[1]["error"]["data"] == {"rule": "no-drop", "reason": "irreversible"}
    assert answers[0]["error"]["data"] == {"rule": "no-drop", "reason": "batch"}
    assert "in the same batch was denied by rule 'no-drop'" in answers[0]["error"]["message"]
    assert [d["action"] for d in policy_decisions(f)] == ["allow", "allow", "deny", "allow", "deny", "deny"]
    assert [(d["id"], d["batch"]) for d in policy_decisions(f) if d.get("batch")] == [(1, True), (3, True)]


def test_a_denied_notification_gets_an_http_error_without_id(bundle):
    f = bundle.request(rpc("notifications/cancelled", {"requestId": 1}, id=None), ALICE)
    assert f.response.status_code == 403
    body = json.loads(f.response.content)
    assert body["id"] is None and body["error"]["code"] == errors.DENIED


def test_approve_is_routed_to_the_approval_point(bundle):
    f = bundle.request(call("deploy", id=7, env="prod"), OSCAR)
    err = json.loads(f.response.content)["error"]
    assert err["code"] == errors.APPROVAL_REQUIRED
    assert err["message"] == "tools/call deploy needs approval (rule 'oncall-deploy'): a second person must agree"
    assert f.metadata[APPROVAL] == {"rule": "oncall-deploy", "status": "pending-workflow", "ids": [7]}


def test_deny_beats_approve_in_one_batch(bundle):
    f = bundle.request([call("deploy", id=1), call("drop_table", id=2)], OSCAR)
    answers = json.loads(f.response.content)
    assert [a["error"]["data"]["reason"] for a in answers] == ["batch", "irreversible"]
    assert APPROVAL not in f.metadata


class PiiMasker:
    """Stands for a masking addon: only its declaration matters to the Policy."""

    masking_profiles = ("pii",)


def test_mask_selects_the_profile_and_forwards(ruleset_file):
    gateway, policy, masker, gate = Gateway(), Policy(), PiiMasker(), Gate()
    with taddons.context(gateway, policy, masker, gate) as tctx:
        tctx.configure(policy, ruleset=str(ruleset_file))
        f = Bundle(tctx, gateway, policy, gate).request(call("lookup", q="c-1"), CAROL)
        policy.done()
    assert f.response is None and fs.passed(f, "policy")
    assert f.metadata[MASK] == {"profile": "pii", "rule": "contractors-mask", "profiles": ["pii"]}


def test_mask_without_a_masking_addon_is_refused_not_forwarded_unmasked(bundle):
    f = bundle.request(call("lookup", q="c-1"), CAROL)
    assert MASK not in f.metadata and not fs.passed(f, "policy")
    err = json.loads(f.response.content)["error"]
    assert err["code"] == errors.DENIED and err["data"]["rule"] == "contractors-mask"
    assert "masking profile 'pii' is not available" in err["message"]


def test_get_and_delete_are_evaluated_as_pseudo_methods(bundle):
    f = bundle.request(None, ALICE, method="GET", headers={"accept": "text/event-stream"})
    assert f.response is None and policy_decisions(f)[0]["method"] == "http:GET"
    f = bundle.request(None, ALICE, method="DELETE", headers={"mcp-session-id": "s"})
    assert f.response.status_code == 403
    assert json.loads(f.response.content)["error"]["message"].startswith("http:DELETE denied by rule 'bastion:default'")


def test_identity_off_is_anonymous(bundle):
    f = bundle.request(call("read_file", path="/x"))  # no identity on the flow
    assert json.loads(f.response.content)["error"]["data"]["rule"] == DEFAULT_RULE
    assert bundle.request(rpc("initialize", {})).response is None


def test_an_exception_in_evaluation_fails_closed(bundle, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("evaluator exploded")

    monkeypatch.setattr(bundle.policy.source.ruleset, "evaluate", boom)
    f = bundle.request(call("read_file", path="/x"), ALICE)
    assert f.response.status_code == 500
    assert json.loads(f.response.content)["error"]["code"] == errors.GATEWAY_ERROR
    assert f.metadata[fs.ERROR].startswith("policy: RuntimeError")


def test_unparseable_input_never_reaches_the_policy(bundle):
    f = bundle.request(b'{"jsonrpc":"2.0","id":1,"id":2,"method":"tools/call"}', ALICE)
    assert f.response.status_code == 400 and policy_decisions(f) == []


# --- hot reload ------------------------------------------------------------------


def test_edits_take_effect_and_invalid_edits_keep_the_previous_ruleset(bundle, ruleset_file, caplog):
    bundle.policy.source.interval = 0  # check on every message
    assert bundle.request(call("drop_table"), ALICE).response is not None
    ruleset_file.write_text(RULES.replace("action: deny\n    reason: irreversible", "action: allow"))
    assert bundle.request(call("drop_table"), ALICE).response is None
    caplog.set_level(logging.ERROR)
    ruleset_file.write_text(RULES + "  - id: broken\n    action: sometimes\n")
    assert bundle.request(call("drop_table"), ALICE).response is None  # the last good ruleset
    assert "edit refused, the previous ruleset stays in force" in caplog.text
    assert "rules.yaml:" in caplog.text and "rule 'broken'" in caplog.text


def test_the_watcher_task_reloads_without_traffic(ruleset_file, caplog):
    caplog.set_level(logging.INFO)

    async def scenario():
        policy = Policy()
        with taddons.context(policy) as tctx:
            tctx.configure(policy, ruleset=str(ruleset_file))
            policy.running()
            ruleset_file.write_text("version: 1\ndefault: allow\nrules: []\n")
            for _ in range(60):
                await asyncio.sleep(0.1)
                if policy.source.ruleset.default == "allow":
                    break
            policy.done()
            return policy.source.ruleset.default

    assert asyncio.run(scenario()) == "allow"
    assert "reloaded" in caplog.text


# --- server to client: buffered JSON ------------------------------------------------


TOOLS = {"tools": [{"name": "read_file"}, {"name": "drop_table"}, {"name": "deploy"}, {"name": "lookup"}]}


def test_list_results_are_filtered_per_identity(bundle):
    f = bundle.request(rpc("tools/list", {}, id=4), ALICE)
    content = bundle.respond(f, {"jsonrpc": "2.0", "id": 4, "result": TOOLS})
    assert [t["name"] for t in json.loads(content)["result"]["tools"]] == ["read_file", "lookup"]
    assert [m.raw["result"]["tools"] for m in fs.response_body(f).messages] == [[{"name": "read_file"}, {"name": "lookup"}]]
    (d,) = policy_decisions(f, "resp:policy")
    assert d["action"] == "filter" and d["hidden"] == ["drop_table", "deploy"]
    assert fs.passed(f, "resp:policy") and f.response.status_code == 200

    f = bundle.request(rpc("tools/list", {}, id=5), OSCAR)
    content = bundle.respond(f, {"jsonrpc": "2.0", "id": 5, "result": TOOLS})
    assert [t["name"] for t in json.loads(content)["result"]["tools"]] == ["deploy"]


def test_unfiltered_responses_pass_byte_for_byte(bundle):
    f = bundle.request(call("read_file", path="/x"), ALICE)
    raw = b'{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"hi"}],  "tools":[]}}'
    assert bundle.respond(f, raw) == raw


# --- server to client: event streams ----------------------------------------------


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
    yield server
    server.shutdown()
    server.server_close()


def sse(*messages) -> bytes:
    return b"".join(b"event: message\ndata: " + json.dumps(m).encode() + b"\n\n" for m in messages)


def test_stream_events_are_filtered_screened_and_denied_requests_answered_upstream(bundle, upstream):
    port = upstream.server_address[1]
    f = bundle.request(call("read_file", id=1, path="/x"), ALICE, url=f"http://127.0.0.1:{port}/mcp?x=1",
                       headers={"mcp-session-id": "sess-1", "authorization": "Bearer upstream-secret"})
    assert f.response is None
    out = bundle.respond(f, sse(
        rpc("notifications/message", {"level": "info", "data": "hello"}, id=None),
        rpc("sampling/createMessage", {"messages": []}, id=77),
        rpc("notifications/progress", {"progress": 1}, id=None),
        {"jsonrpc": "2.0", "id": 1, "result": {"content": []}},
    ), "text/event-stream")
    events = [json.loads(line[6:]) for line in out.decode().splitlines() if line.startswith("data: ")]
    assert [e.get("method", e.get("id")) for e in events] == ["notifications/message", 1]
    assert fs.passed(f, "resp:policy") and not f.metadata.get("bastion.refused")

    deadline = time.monotonic() + 10
    while not Capture.received and time.monotonic() < deadline:
        time.sleep(0.02)
    ((path, headers, answer),) = Capture.received
    assert path == "/mcp?x=1"
    assert headers["mcp-session-id"] == "sess-1" and headers["authorization"] == "Bearer upstream-secret"
    assert headers["content-type"] == "application/json"
    assert answer == {"jsonrpc": "2.0", "id": 77, "error": {
        "code": errors.DENIED, "message": "sampling/createMessage denied by rule 'no-sampling': no model here",
        "data": {"rule": "no-sampling", "reason": "no model here"}}}
    s2c = policy_decisions(f, "resp:policy")
    assert [(d["method"], d["action"]) for d in s2c] == [
        ("notifications/message", "allow"), ("sampling/createMessage", "deny"), ("notifications/progress", "deny")]
    assert s2c[1]["answered"] == "error sent to upstream"


def test_list_results_inside_a_get_stream_are_filtered_by_shape(bundle, upstream):
    f = bundle.request(None, ALICE, method="GET", headers={"accept": "text/event-stream"})
    out = bundle.respond(f, sse({"jsonrpc": "2.0", "id": 9, "result": TOOLS}), "text/event-stream")
    (event,) = [json.loads(line[6:]) for line in out.decode().splitlines() if line.startswith("data: ")]
    assert [t["name"] for t in event["result"]["tools"]] == ["read_file", "lookup"]


def test_streamed_responses_pass_the_gate(bundle):
    f = bundle.request(call("read_file", path="/x"), ALICE)
    bundle.respond(f, sse({"jsonrpc": "2.0", "id": 1, "result": {}}), "text/event-stream")
    assert fs.passed(f, "resp:policy")
    assert not any(d["stage"] == "gate" for d in f.metadata.get(fs.DECISIONS, []))
