"""The masking stage in the shipped bundle: what is masked, where, for whom, and what is recorded."""

from __future__ import annotations

import json

import pytest
from mitmproxy import exceptions

from mcp_bastion.addons.masking import Masking
from mcp_bastion.core import audit
from mcp_bastion.core.vocab import Meta
from mcp_bastion.glue.recording.facts import flow_facts

from bundled import META, V2026, bundled, error_of, forwarded, rpc, sse
from bundled import result as answer
from bundled import tool_call as call

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


ALICE = {"sub": "alice", "groups": ["engineering"], "iss": "https://idp"}
CAROL = {"sub": "carol", "groups": ["contractors"], "iss": "https://idp"}

CARD = "4111 1111 1111 1111"
EMAIL = "jane.doe@example.com"
AWS = "AKIAIOSFODNN7EXAMPLE"

RULES = """\
version: 1
default: deny
masking:
  detectors:
    employee_id:
      pattern: 'EMP-[0-9]{6}'
  profiles:
    hr:
      detectors: [email, {employee_id: hash}]
      style: partial
rules:
  - id: contractors-pii
    match: {groups: [contractors], tools: [customers, lookup, slow]}
    action: mask
    profile: pii
  - id: contractors-hr
    match: {groups: [contractors], tools: [staff]}
    action: mask
    profile: hr
  - id: logs-scrubbed
    match: {direction: server_to_client, methods: [notifications/message]}
    action: mask
    profile: secrets
  - id: everyone
    match: {authenticated: true}
    action: allow
  - id: server
    match: {direction: server_to_client}
    action: allow
"""


@pytest.fixture
def rules(tmp_path, monkeypatch):
    monkeypatch.setenv("BASTION_MASK_KEY", "m" * 32)
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return str(path)


def customers() -> dict:
    return {"content": [{"type": "text", "text": f"Jane: card {CARD}, mail {EMAIL}"}],
            "structuredContent": {"customers": [{"name": "Jane", "card": CARD, "email": EMAIL, "id": 42}]}}


async def test_a_mask_rule_masks_the_answer_for_its_group_only(rules):
    with bundled(ruleset=rules) as b:
        for who, masked in ((CAROL, True), (ALICE, False)):
            f = b.flow("POST", call("customers", 7))
            await b.request(f, identity=who)
            assert forwarded(f)
            out = json.loads(await b.response(f, answer(7, customers())))
            text = json.dumps(out)
            assert out["id"] == 7 and out["jsonrpc"] == "2.0"
            assert (CARD in text, EMAIL in text) == (not masked, not masked), who
            if masked:
                row = out["result"]["structuredContent"]["customers"][0]
                assert row == {"name": "Jane", "card": "[MASKED:card]", "email": "[MASKED:email]", "id": 42}
                assert out["result"]["content"][0]["text"] == "Jane: card [MASKED:card], mail [MASKED:email]"


async def test_every_event_of_a_masked_calls_stream_is_masked(rules):
    with bundled(ruleset=rules) as b:
        f = b.flow("POST", call("slow", 3, _meta={"progressToken": "p"}))
        await b.request(f, identity=CAROL)
        progress = rpc("notifications/progress", {"progressToken": "p", "progress": 1, "message": f"mailing {EMAIL}"},
                       None)
        log = rpc("notifications/message", {"level": "info", "data": f"key {AWS}"}, None)
        out = await b.response(f, sse(progress, log, answer(3, customers())), ctype="text/event-stream")
        assert EMAIL.encode() not in out and CARD.encode() not in out and AWS.encode() not in out
        assert b"[MASKED:email]" in out and b"[MASKED:aws_access_key]" in out and b"[MASKED:card]" in out


async def test_errors_are_masked_message_and_data(rules):
    with bundled(ruleset=rules) as b:
        f = b.flow("POST", call("lookup", 4))
        await b.request(f, identity=CAROL)
        err = {"jsonrpc": "2.0", "id": 4, "error": {"code": -32000, "message": f"no customer {EMAIL}",
                                                    "data": {"card": CARD}}}
        out = json.loads(await b.response(f, err))
        assert out["error"] == {"code": -32000, "message": "no customer [MASKED:email]",
                                "data": {"card": "[MASKED:card]"}}


async def test_a_server_to_client_rule_masks_notifications_for_everyone(rules):
    with bundled(ruleset=rules) as b:
        f = b.flow("POST", call("anything", 5))
        await b.request(f, identity=ALICE)
        log = rpc("notifications/message", {"level": "error", "data": f"connect with {AWS}"}, None)
        out = await b.response(f, sse(log, answer(5, {"content": []})), ctype="text/event-stream")
        assert AWS.encode() not in out and b"[MASKED:aws_access_key]" in out


async def test_the_request_itself_is_masked_outbound(rules):
    with bundled(ruleset=rules) as b:
        f = b.flow("POST", call("lookup", 6, note=f"my card is {CARD}"))
        await b.request(f, identity=CAROL)
        assert forwarded(f)
        sent = json.loads(f.request.content)
        assert sent["params"]["arguments"]["note"] == "my card is [MASKED:card]"
        assert sent["id"] == 6 and sent["params"]["name"] == "lookup"


async def test_a_ruleset_profile_with_partial_and_hash_styles(rules):
    with bundled(ruleset=rules) as b:
        outs = []
        for _ in range(2):
            f = b.flow("POST", call("staff", 8))
            await b.request(f, identity=CAROL)
            outs.append(json.loads(await b.response(f, answer(8, {"content": [
                {"type": "text", "text": f"EMP-123456 <{EMAIL}> EMP-654321"}]}))))
        text = outs[0]["result"]["content"][0]["text"]
        assert "EMP-123456" not in text and EMAIL not in text
        assert "[MASKED:email …com]" not in text  # keep=0 for e-mail: partial shows nothing of it
        pseudonyms = [t for t in text.split() if t.startswith("[MASKED:employee_id#")]
        assert len(set(pseudonyms)) == 2  # two employees, two pseudonyms
        assert outs[1] == outs[0]  # the same value, the same pseudonym: an analyst can correlate


async def test_what_was_masked_is_on_the_flow_and_in_the_audit_record_never_the_value(rules):
    with bundled(ruleset=rules) as b:
        f = b.flow("POST", call("customers", 9))
        await b.request(f, identity=CAROL)
        await b.response(f, answer(9, customers()))
    masked = [d for d in f.metadata[Meta.DECISIONS] if d["stage"] == "resp:mask"]
    (d,) = masked
    assert d["action"] == "mask" and d["profiles"] == ["pii"]
    paths = {(x["detector"], x["path"]) for x in d["masked"]}
    assert ("card", "$.result.structuredContent.customers[0].card") in paths
    assert ("email", "$.result.content[0].text") in paths
    assert CARD not in json.dumps(f.metadata, default=str) and EMAIL not in json.dumps(f.metadata, default=str)
    (rec,) = audit.build_records(flow_facts(f))
    assert rec["action"] == "mask" and rec["masking"]["profile"] == "pii"
    assert any(x.get("masked") for x in rec["decisions"])
    assert CARD not in json.dumps(rec)


async def test_a_masked_2026_result_is_private_to_its_caller(rules):
    with bundled(ruleset=rules) as b:
        f = b.flow("POST", call("customers", 10, _meta=META), headers=V2026)
        await b.request(f, identity=CAROL)
        out = json.loads(await b.response(f, answer(10, {**customers(), "cacheScope": "public"})))
        assert out["result"]["cacheScope"] == "private"


def test_a_profile_defined_nowhere_stops_the_gateway_at_start(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("version: 1\nrules:\n  - id: m\n    match: {tools: [t]}\n    action: mask\n    profile: nope\n")
    with pytest.raises(exceptions.OptionsError, match="defined nowhere"):
        with bundled(ruleset=str(path)):
            pass


def test_a_hash_style_without_a_key_stops_the_gateway_at_start(tmp_path, monkeypatch):
    monkeypatch.delenv("BASTION_MASK_KEY", raising=False)
    path = tmp_path / "rules.yaml"
    path.write_text("version: 1\nmasking:\n  profiles:\n    p: {detectors: [email], style: hash}\nrules: []\n")
    with pytest.raises(exceptions.OptionsError, match="no mask key"):
        with bundled(ruleset=str(path)):
            pass


async def test_masking_that_fails_withholds_the_answer(rules):
    with bundled(ruleset=rules) as b:
        f = b.flow("POST", call("customers", 11))
        await b.request(f, identity=CAROL)

        def broken(*a, **kw):
            raise RuntimeError("detector engine broke")

        for profile in b.addon(Masking).profiles().values():
            profile.mask = broken
        out = await b.response(f, answer(11, customers()))
        assert CARD.encode() not in out and EMAIL.encode() not in out
        assert f.response.status_code >= 500 or error_of(f)["code"]


async def test_the_timeline_says_what_was_masked(rules):
    from mcp_bastion.cli import forensics

    with bundled(ruleset=rules) as b:
        f = b.flow("POST", call("customers", 12))
        await b.request(f, identity=CAROL)
        await b.response(f, answer(12, customers()))
    (row,) = forensics.timeline_rows([f])
    detail = forensics._detail(row)
    assert "masked card x2, email x2 (pii)" in detail and CARD not in detail


async def test_a_masked_argument_rewrites_its_mcp_param_header(rules):
    """2026-07-28: a header that copies an argument carries the masked value too, never the secret."""
    schema = {"type": "object", "properties": {"note": {"type": "string", "x-mcp-header": "Note"}}}
    with bundled(ruleset=rules) as b:
        listing = b.flow("POST", rpc("tools/list", {"_meta": META}, 1), headers=V2026)
        await b.request(listing, identity=CAROL)
        await b.response(listing, answer(1, {"tools": [{"name": "lookup", "inputSchema": schema}]}))
        f = b.flow("POST", call("lookup", 2, note=f"card {CARD}", _meta=META),
                   headers={**V2026, "mcp-name": "lookup", "mcp-param-note": f"card {CARD}"})
        await b.request(f, identity=CAROL)
    assert forwarded(f), f.response.content
    assert json.loads(f.request.content)["params"]["arguments"]["note"] == "card [MASKED:card]"
    assert f.request.headers["mcp-param-note"] == "card [MASKED:card]"
    assert CARD not in str(f.request.headers)
