"""The ruleset language: loading with located errors, evaluation, normalisation, listing, reload."""

from __future__ import annotations

import json
import logging
import os
import textwrap
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_bastion.core import normalize
from mcp_bastion.core.identity import ANONYMOUS, Identity
from mcp_bastion.core.jsonrpc import parse_body
from mcp_bastion.core.message import Message, http_request
from mcp_bastion.core.rules import ReloadingRuleset, Ruleset, RulesetError
from mcp_bastion.core.vocab import DEFAULT_RULE, MALFORMED_RULE, NO_RULESET_RULE

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "rulesets" / "examples"

ALICE = Identity("alice", ("engineering",), "https://idp.example")
CAROL = Identity("carol", ("contractors",), "https://idp.example")
CI = Identity("ci-bot", ("ci",), "https://idp.example")
OSCAR = Identity("oscar", ("oncall", "engineering"), "https://idp.example")
ACME = "127.0.0.1:9000"


def rs(text: str) -> Ruleset:
    return Ruleset.parse(textwrap.dedent(text), "test.yaml")


def msg(method: str, params: dict | None = None, id: int | None = 1) -> Message:
    raw = {"jsonrpc": "2.0", "method": method}
    if id is not None:
        raw["id"] = id
    if params is not None:
        raw["params"] = params
    (m,) = parse_body(json.dumps(raw)).messages
    return m


def call(tool: str, **arguments) -> Message:
    return msg("tools/call", {"name": tool, "arguments": arguments})


# --- loading -----------------------------------------------------------------


BAD = [
    ("version: 1\nrules:\n  - id: a\n     action: x\n", 4, None, "YAML: mapping values"),
    ("rules: []\n", 1, None, "missing 'version: 1'"),
    ("version: 2\nrules: []\n", 1, None, "version must be 1"),
    ("version: 1\n", 1, None, "missing 'rules'"),
    ("version: 1\ndefault: maybe\nrules: []\n", 2, None, "default must be one of deny, allow"),
    ("version: 1\nrules: []\nrulez: []\n", 3, None, "unknown key 'rulez' (did you mean 'rules'?)"),
    ("version: 1\nrules:\n  - action: allow\n", 3, "#1", "missing 'id'"),
    ("version: 1\nrules:\n  - id: a\n    action: permit\n", 4, "a", "action must be one of allow, deny, approve, mask"),
    ("version: 1\nrules:\n  - id: a\n    action: allow\n  - id: a\n    action: deny\n",
     5, "a", "duplicate id (first used at line 3)"),
    ("version: 1\nrules:\n  - id: a\n    action: mask\n", 3, "a", "needs a 'profile'"),
    ("version: 1\nrules:\n  - id: a\n    action: deny\n    profile: pii\n", 5, "a", "profile is only for action: mask"),
    ("version: 1\nrules:\n  - id: a\n    match:\n      tool: x\n    action: deny\n",
     5, "a", "unknown key 'tool' (did you mean 'tools'?)"),
    ("version: 1\nrules:\n  - id: a\n    match:\n      tools: []\n    action: deny\n",
     5, "a", "empty list matches nothing"),
    ("version: 1\nrules:\n  - id: a\n    match:\n      patterns: ['(']\n    action: deny\n",
     5, "a", "linear-time engine (RE2)"),
    ("version: 1\nrules:\n  - id: a\n    match:\n      patterns: ['(a+)+\\1']\n    action: deny\n",
     5, "a", "linear-time engine (RE2)"),  # a back-reference: backtracking, refused
    ("version: 1\nrules:\n  - id: a\n    match:\n      patterns: ['(?=x)y']\n    action: deny\n",
     5, "a", "linear-time engine (RE2)"),  # a look-ahead
    ("version: 1\nrules:\n  - id: a\n    match: {tools: [t]}\n    action: mask\n    profile: nowhere\n",
     6, "a", "masking profile 'nowhere' is defined nowhere"),
    ("version: 1\nmasking:\n  detectors:\n    emp: {pattern: '(x'}\nrules: []\n",
     4, None, "masking.detectors.emp.pattern"),
    ("version: 1\nmasking:\n  profiles:\n    hr: {detectors: [email, nosuch]}\nrules: []\n",
     4, None, "unknown detector 'nosuch'"),
    ("version: 1\nmasking:\n  profiles:\n    hr: {detectors: [email], style: blur}\nrules: []\n",
     4, None, "style must be one of redact, partial, hash"),
    ("version: 1\nrules:\n  - id: a\n    match:\n      upstreams: [github]\n    action: deny\n",
     5, "a", "neither a name from 'upstreams'"),
    ("version: 1\nrules:\n  - id: a\n    match:\n      direction: inbound\n    action: deny\n",
     5, "a", "direction must be one of"),
    ("version: 1\nrules:\n  - id: a\n    match:\n      kinds: [reply]\n    action: deny\n",
     5, "a", "kinds: 'reply' is not one of"),
    ("version: 1\nrules:\n  - id: a\n    match:\n      arguments:\n        - {path: x}\n    action: deny\n",
     6, "a", "needs one of equals"),
    ("version: 1\nrules:\n  - id: a\n    match:\n      arguments:\n        - {path: x, gt: lots}\n    action: deny\n",
     6, "a", "gt must be a number"),
    ("version: 1\nrules:\n  - id: a\n    match:\n      arguments:\n"
     "        - {path: 'a..b', equals: 1}\n    action: deny\n",
     6, "a", "empty segment"),
    ("version: 1\nrules:\n  - id: a\n    match:\n      keywords: ['  ']\n    action: deny\n", 5, "a", "empty keyword"),
    ("version: 1\nrules:\n  - id: a\n    match:\n      authenticated: yes please\n    action: deny\n",
     5, "a", "authenticated must be true or false"),
    ("version: 1\nrules:\n  - id: a\n    action: deny\n    action: allow\n", 5, "a", "duplicate key 'action'"),
    ("version: 1\nrules:\n  - id: 'bastion:x'\n    action: deny\n", 3, "bastion:x", "id must start with"),
    ("version: 1\nupstreams: {gh: github.com}\nrules: []\n", 2, None, "must be host:port"),
    ("version: 1\nrules: []\n---\nversion: 1\nrules: []\n", None, None, "exactly one YAML document"),
]


@pytest.mark.parametrize("text,line,rule,fragment", BAD, ids=[b[3][:30] for b in BAD])
def test_invalid_rulesets_are_refused_with_file_line_and_rule(text, line, rule, fragment):
    with pytest.raises(RulesetError) as info:
        Ruleset.parse(text, "bad.yaml")
    problem = next(p for p in info.value.problems if fragment in p.message)
    assert problem.file == "bad.yaml"
    assert problem.line == line
    assert problem.rule == rule
    assert str(problem).startswith(f"bad.yaml:{line}:" if line else "bad.yaml:")


def test_every_problem_is_reported_not_just_the_first():
    with pytest.raises(RulesetError) as info:
        rs("""\
            version: 1
            rules:
              - id: a
                action: alow
              - id: b
                match: {tool: x}
                action: deny
            """)
    assert [(p.line, p.rule) for p in info.value.problems] == [(4, "a"), (6, "b")]


def test_load_reports_unreadable_and_non_utf8_files(tmp_path):
    with pytest.raises(RulesetError, match="cannot read"):
        Ruleset.load(tmp_path / "missing.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"version: 1\nrules: []\n# caf\xe9\n")
    with pytest.raises(RulesetError) as info:
        Ruleset.load(bad)
    assert info.value.problems[0].line == 3


def test_shadowed_rules_are_warned_about():
    r = rs("""\
        version: 1
        rules:
          - id: everything
            action: allow
          - id: never
            match: {tools: [x]}
            action: deny
        """)
    (w,) = r.warnings
    assert (w.line, w.rule, w.warning) == (5, "never", True) and "never reached" in w.message


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "rulesets").rglob("*.yaml")))
def test_shipped_rulesets_load_without_warnings(path):
    r = Ruleset.load(ROOT / path)
    assert r.rules and not r.warnings and r.default == "deny"


# --- semantics: order, default, actions ----------------------------------------------


ORDERED = """\
    version: 1
    rules:
      - id: first
        match: {tools: [deploy]}
        action: deny
        reason: no deploys
      - id: second
        match: {tools: ["*"]}
        action: allow
    """


def test_first_matching_rule_wins_and_default_denies():
    r = rs(ORDERED)
    d = r.evaluate(ALICE, call("deploy"))
    assert (d.action, d.rule, d.reason) == ("deny", "first", "no deploys")
    assert r.evaluate(ALICE, call("read_file")).rule == "second"
    d = r.evaluate(ALICE, msg("prompts/get", {"name": "x"}))
    assert (d.action, d.rule) == ("deny", DEFAULT_RULE)


def test_default_allow_and_custom_default_reason():
    r = rs("version: 1\ndefault: allow\nrules: []\n")
    assert r.evaluate(None, call("x")).action == "allow"
    r = rs("version: 1\ndefault_reason: ask the platform team\nrules: []\n")
    assert r.evaluate(None, call("x")).reason == "ask the platform team"


def test_deny_all_is_the_no_ruleset_fallback():
    d = Ruleset.deny_all("no ruleset").evaluate(ALICE, msg("initialize", {}))
    assert (d.action, d.rule, d.reason) == ("deny", NO_RULESET_RULE, "no ruleset")


def test_mask_and_approve_carry_profile_and_reason():
    r = rs("""\
        version: 1
        rules:
          - id: m
            match: {tools: [lookup]}
            action: mask
            profile: pii
          - id: a
            match: {tools: [drop]}
            action: approve
        """)
    d = r.evaluate(CAROL, call("lookup"))
    assert (d.action, d.profile, d.blocks) == ("mask", "pii", False)
    d = r.evaluate(CAROL, call("drop"))
    assert (d.action, d.blocks, d.reason) == ("approve", True, "needs a person's approval")


# --- the table: example rulesets x identities x messages ----------------------------

TABLE = [
    # file, identity, message, direction, upstream, expected action, expected rule
    ("read-only-engineers", ALICE, msg("initialize", {}),
     "client_to_server", ACME, "allow", "session-lifecycle"),
    ("read-only-engineers", ANONYMOUS, msg("initialize", {}),
     "client_to_server", ACME, "deny", DEFAULT_RULE),
    ("read-only-engineers", ALICE, http_request("GET"),
     "client_to_server", ACME, "allow", "session-lifecycle"),
    ("read-only-engineers", ALICE, call("read_file", path="/srv/app/README.md"),
     "client_to_server", ACME, "allow", "engineers-read-tools"),
    ("read-only-engineers", ALICE, call("read_file", path="/srv/app/.env"),
     "client_to_server", ACME, "deny", "engineers-no-secret-files"),
    ("read-only-engineers", ALICE, call("read_file", path="/srv/app/../../etc/ssl/private/deploy.pem"),
     "client_to_server", ACME, "deny", "engineers-no-secret-files"),
    ("read-only-engineers", ALICE, call("read_file", path="/ETC/SSL/PRIVATE/x"),
     "client_to_server", ACME, "deny", "engineers-no-secret-files"),
    ("read-only-engineers", ALICE, call("deploy", service="billing", env="staging"),
     "client_to_server", ACME, "deny", "engineers-no-writes"),
    ("read-only-engineers", ALICE, call("search_logs", query="x; DROP   TABLE users"),
     "client_to_server", ACME, "deny", "prohibited-keywords"),
    ("read-only-engineers", ALICE, msg("resources/read", {"uri": "acme://runbooks/oncall"}),
     "client_to_server", ACME, "allow", "engineers-runbooks"),
    ("read-only-engineers", ALICE, msg("resources/read", {"uri": "acme://secrets/db"}),
     "client_to_server", ACME, "deny", DEFAULT_RULE),
    ("read-only-engineers", CAROL, call("read_file", path="/srv/app/README.md"),
     "client_to_server", ACME, "deny", DEFAULT_RULE),
    ("read-only-engineers", ALICE, msg("sampling/createMessage", {"messages": []}),
     "server_to_client", ACME, "deny", DEFAULT_RULE),
    ("read-only-engineers", ALICE, msg("notifications/tools/list_changed", id=None),
     "server_to_client", ACME, "allow", "server-plumbing"),
    ("read-only-engineers", ALICE, msg("notifications/tools/list_changed", id=None),
     "client_to_server", ACME, "deny", DEFAULT_RULE),
    ("ci-service-accounts", CI, call("deploy", service="billing-api", env="staging"),
     "client_to_server", ACME, "allow", "ci-deploy-nonprod"),
    ("ci-service-accounts", CI, call("deploy", service="billing-api", env="prod"),
     "client_to_server", ACME, "deny", "ci-no-prod"),
    ("ci-service-accounts", CI, call("deploy", service="billing-api", env="staging"),
     "client_to_server", "127.0.0.1:9999", "deny", "ci-no-prod"),
    ("ci-service-accounts", CI, call("deploy", service="Billing API!", env="staging"),
     "client_to_server", ACME, "deny", "ci-no-prod"),
    ("ci-service-accounts", CI, call("search_logs", query="card"),
     "client_to_server", "LOCALHOST:9000", "allow", "ci-read-logs"),
    ("ci-service-accounts", CI, msg("elicitation/create", {}),
     "server_to_client", ACME, "deny", "ci-no-server-requests"),
    ("ci-service-accounts", ALICE, call("search_logs", query="card"),
     "client_to_server", ACME, "deny", DEFAULT_RULE),
    ("oncall-approval", OSCAR, call("deploy", service="billing", env="staging"),
     "client_to_server", ACME, "allow", "oncall-deploy-nonprod"),
    ("oncall-approval", OSCAR, call("deploy", service="billing", env="Production"),
     "client_to_server", ACME, "approve", "oncall-destructive"),
    ("oncall-approval", OSCAR, call("drop_table", table="invoices"),
     "client_to_server", ACME, "approve", "oncall-destructive"),
    ("oncall-approval", OSCAR, call("read_file", path="/srv/app/.env"),
     "client_to_server", ACME, "allow", "oncall-everything-else"),
    ("oncall-approval", OSCAR, msg("sampling/createMessage", {"messages": []}),
     "server_to_client", ACME, "allow", "oncall-server-requests"),
    ("oncall-approval", ALICE, call("drop_table", table="invoices"),
     "client_to_server", ACME, "deny", "others-nothing-destructive"),
    ("contractors-masked-pii", CAROL, call("lookup_customer", query="c-1001"),
     "client_to_server", ACME, "mask", "contractors-customer-data"),
    ("contractors-masked-pii", CAROL, http_request("GET"),
     "client_to_server", ACME, "mask", "contractors-stream"),
    ("contractors-masked-pii", CAROL, http_request("DELETE"),
     "client_to_server", ACME, "allow", "session-lifecycle"),
    ("contractors-masked-pii", CAROL, call("read_file", path="/srv/app/README.md"),
     "client_to_server", ACME, "mask", "contractors-docs"),
    ("contractors-masked-pii", CAROL, call("read_file", path="/srv/app/.env"),
     "client_to_server", ACME, "deny", DEFAULT_RULE),
    ("contractors-masked-pii", CAROL, call("read_file", path="/srv/app/../../etc/ssl/private/x.md"),
     "client_to_server", ACME, "deny", DEFAULT_RULE),
    ("contractors-masked-pii", CAROL, call("drop_table", table="x"),
     "client_to_server", ACME, "deny", "contractors-no-destructive"),
    ("contractors-masked-pii", CAROL, msg("notifications/message", {"level": "info", "data": "x"}, id=None),
     "server_to_client", ACME, "mask", "contractors-log-messages"),
]


@pytest.mark.parametrize("name,identity,message,direction,upstream,action,rule", TABLE,
                         ids=[f"{t[0]}:{t[1].sub}:{t[2].label()}:{t[3][:1]}" for t in TABLE])
def test_example_rulesets_decide_as_documented(name, identity, message, direction, upstream, action, rule):
    d = Ruleset.load(EXAMPLES / f"{name}.yaml").evaluate(identity, message, direction, upstream)
    assert (d.action, d.rule) == (action, rule)


def test_default_ruleset_allows_only_plumbing():
    r = Ruleset.load(ROOT / "rulesets" / "default.yaml")
    assert r.evaluate(ALICE, msg("initialize", {})).action == "allow"
    assert r.evaluate(ALICE, msg("tools/list", {})).action == "allow"
    response = Message(kind="response", raw={"jsonrpc": "2.0", "id": 3, "result": {}}, id=3)
    assert r.evaluate(ALICE, response).action == "allow"
    assert r.evaluate(ALICE, call("read_file", path="x")).rule == DEFAULT_RULE
    assert r.evaluate(ALICE, msg("roots/list", {}), "server_to_client").rule == DEFAULT_RULE
    assert r.evaluate(None, msg("initialize", {})).action == "deny"
    assert not r.visible(ALICE, ACME, "tool", "read_file")


# --- matching details ---------------------------------------------------------------


def one_rule(match: str, action: str = "deny") -> Ruleset:
    return rs(f"version: 1\ndefault: allow\nrules:\n  - id: r\n    match: {match}\n    action: {action}\n")


@pytest.mark.parametrize("match,message,hit", [
    ("{arguments: [{path: n, gt: 10}]}", call("t", n=11), True),
    ("{arguments: [{path: n, gt: 10}]}", call("t", n=10), False),
    ("{arguments: [{path: n, gt: 10}]}", call("t", n="1e3"), True),
    ("{arguments: [{path: n, gt: 10}]}", call("t", n="\uff11\uff10\uff10"), True),
    ("{arguments: [{path: n, gt: 10}]}", call("t", n="NaN"), False),
    ("{arguments: [{path: n, gt: 10}]}", call("t", n=True), False),
    ("{arguments: [{path: n, ge: 1, le: 5}]}", call("t", n=5), True),
    ("{arguments: [{path: n, ge: 1, le: 5}]}", call("t", n=6), False),
    ("{arguments: [{path: n, lt: 0}]}", call("t"), False),
    ("{arguments: [{path: env, equals: prod}]}", call("t", env="prod"), True),
    ("{arguments: [{path: env, equals: prod}]}", call("t", env="PROD"), False),
    ("{arguments: [{path: env, equals: prod}], case_insensitive: true}", call("t", env="ＰＲＯＤ"), True),
    ("{arguments: [{path: env, equals: [dev, prod]}]}", call("t", env="dev"), True),
    ("{arguments: [{path: force, equals: true}]}", call("t", force=True), True),
    ("{arguments: [{path: force, equals: true}]}", call("t", force=1), False),
    ("{arguments: [{path: n, equals: 3}]}", call("t", n="3"), True),
    ("{arguments: [{path: a.b.0, equals: x}]}", call("t", a={"b": ["x"]}), True),
    ("{arguments: [{path: 'files.*.path', glob: '/etc/*'}]}",
     call("t", files=[{"path": "/tmp/a"}, {"path": "/etc/shadow"}]), True),
    ("{arguments: [{path: [a.b], equals: 1}]}", call("t", **{"a.b": 1}), True),
    ("{arguments: [{path: q, regex: '^select\\b'}]}", call("t", q="select 1"), True),
    ("{arguments: [{path: q, regex: '^select\\b'}], case_insensitive: true}", call("t", q="SELECT 1"), True),
    ("{arguments: [{path: p, glob: '/srv/*'}]}", call("t", p="/srv/../etc/passwd"), False),
    ("{arguments: [{path: a, equals: 1}, {path: b, equals: 2}]}", call("t", a=1, b=2), True),
    ("{arguments: [{path: a, equals: 1}, {path: b, equals: 2}]}", call("t", a=1, b=3), False),
    ("{keywords: ['drop table'], case_insensitive: true}", call("t", q="DROP\n\tTABLE x"), True),
    ("{keywords: ['drop table']}", call("t", q="DROP TABLE x"), False),
    ("{keywords: ['secret']}", call("t", **{"secret": 1}), True),
    ("{keywords: [secret]}", call("t", q="se\u200bcret"), True),
    ("{patterns: ['AKIA[0-9A-Z]{16}']}", call("t", q="key AKIAABCDEFGHIJKLMNOP"), True),
    ("{methods: ['notifications/*']}", msg("notifications/progress", {}, id=None), True),
    ("{methods: ['http:GET']}", http_request("get"), True),
    ("{kinds: [notification]}", msg("notifications/progress", {}, id=None), True),
    ("{kinds: [notification]}", msg("ping"), False),
    ("{resources: ['file:///etc/*']}", msg("resources/read", {"uri": "file:///srv/../etc/passwd"}), True),
    ("{resources: ['file:///etc/*']}", msg("resources/read", {"uri": "file:///%65tc/passwd"}), True),
    ("{resources: ['file:///etc/*']}", msg("resources/read", {"uri": "FILE:///ETC/passwd"}), False),
    ("{resources: ['file:///etc/*'], case_insensitive: true}",
     msg("resources/read", {"uri": "FILE:///ETC/passwd"}), True),
    ("{prompts: [secret_*]}", msg("prompts/get", {"name": "SECRET_plan"}), True),
    ("{groups: ['eng*']}", call("t"), True),
    ("{subjects: [bob]}", call("t"), False),
    ("{issuers: ['https://idp.example']}", call("t"), True),
    ("{authenticated: false}", call("t"), False),
])
def test_conditions(match, message, hit):
    d = one_rule(match).evaluate(ALICE, message)
    assert (d.rule == "r") is hit


def test_direction_and_upstream_names():
    r = rs("""\
        version: 1
        default: allow
        upstreams: {github: ["127.0.0.1:9000", "gh.internal:*"]}
        rules:
          - id: r
            match: {upstreams: [github], direction: server_to_client}
            action: deny
        """)
    sampling = msg("sampling/createMessage", {})
    assert r.evaluate(ALICE, sampling, "server_to_client", "127.0.0.1:9000").rule == "r"
    assert r.evaluate(ALICE, sampling, "server_to_client", "GH.internal:443").rule == "r"
    assert r.evaluate(ALICE, sampling, "client_to_server", "127.0.0.1:9000").rule == DEFAULT_RULE
    assert r.evaluate(ALICE, sampling, "server_to_client", "127.0.0.1:9001").rule == DEFAULT_RULE


def test_requests_that_do_not_name_their_target_are_refused_as_malformed():
    r = rs("version: 1\ndefault: allow\nrules: []\n")
    for m in (msg("tools/call", {"arguments": {}}), msg("tools/call", {"name": 7}),
              msg("prompts/get", {}), msg("resources/read", {"uri": ["x"]}), msg("TOOLS/CALL")):
        d = r.evaluate(ALICE, m)
        assert (d.action, d.rule) == ("deny", MALFORMED_RULE), m.raw


def test_identity_from_claims():
    assert Identity.from_claims(None) is ANONYMOUS and not ANONYMOUS.authenticated
    i = Identity.from_claims({"sub": "alice", "groups": ["a", 3, "b"], "iss": "https://x"})
    assert (i.sub, i.groups, i.iss, i.authenticated) == ("alice", ("a", "b"), "https://x", True)
    assert Identity.from_claims({"sub": "x", "groups": "solo"}).groups == ("solo",)


def test_explain_lists_each_rule_tried_and_why_it_did_not_match():
    steps, d = rs(ORDERED).explain(ALICE, call("read_file"))
    assert [(s.rule, s.matched) for s in steps] == [("first", False), ("second", True)]
    assert "'read_file' matches none of ['deploy']" in steps[0].detail
    steps, d = rs(ORDERED).explain(ALICE, msg("ping"))
    assert steps[-1].rule == DEFAULT_RULE and d.action == "deny"


# --- normalisation: a denied tool stays denied -------------------------------------


DENY_DROP = rs("""\
    version: 1
    rules:
      - id: no-drop
        match: {tools: [drop_table]}
        action: deny
      - id: rest
        match: {methods: ["tools/*"]}
        action: allow
    """)


def variants_of(name: str) -> st.SearchStrategy[str]:
    """Spellings of `name` a server might still resolve: case, full-width, zero-width, padding."""
    def spell(ch: str, mode: int) -> str:
        if mode == 1:
            return ch.upper()
        if mode == 2 and "!" <= ch <= "~":
            return chr(ord(ch) + 0xFEE0)  # full-width form, NFKC folds it back
        if mode == 3:
            return ch + "\u200b"
        if mode == 4:
            return unicodedata.normalize("NFD", ch)
        return ch

    return st.lists(st.integers(0, 4), min_size=len(name), max_size=len(name)).map(
        lambda modes: "".join(spell(c, m) for c, m in zip(name, modes, strict=True))
    ).flatmap(lambda s: st.sampled_from([s, f" {s}", f"{s}\t"]))


def json_escaped(s: str, mask: list[bool]) -> str:
    """A JSON string literal of `s` with the characters selected by `mask` written as \\uXXXX."""
    out = []
    for ch, esc in zip(s, mask + [False] * len(s), strict=False):  # the padded mask may be longer than `s`
        if esc or ord(ch) > 0xFFFF:
            out.append("".join(f"\\u{u:04x}" for u in _utf16(ch)))
        else:
            out.append(json.dumps(ch)[1:-1])
    return '"' + "".join(out) + '"'


def _utf16(ch: str) -> list[int]:
    data = ch.encode("utf-16-be")
    return [int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2)]


@settings(max_examples=300, deadline=None)
@given(
    spelling=variants_of("drop_table"),
    escapes=st.lists(st.booleans(), max_size=12),
    method=st.sampled_from(["tools/call", "TOOLS/CALL", "tools/\uff43all"]),
    before=st.integers(0, 3),
    after=st.integers(0, 3),
    as_batch=st.booleans(),
)
def test_denied_tool_stays_denied_under_escaping_case_normalisation_and_batching(
        spelling, escapes, method, before, after, as_batch):
    filler = '{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"read_file","arguments":{}}}'
    target = ('{"jsonrpc":"2.0","id":100,"method":' + json.dumps(method)
              + ',"params":{"name":' + json_escaped(spelling, escapes) + ',"arguments":{"table":"x"}}}')
    members = [filler % i for i in range(before)] + [target] + [filler % (10 + i) for i in range(after)]
    text = "[" + ",".join(members) + "]" if as_batch or len(members) > 1 else target
    body = parse_body(text)
    decisions = [DENY_DROP.evaluate(ALICE, m) for m in body.messages]
    (hit,) = [d for m, d in zip(body.messages, decisions, strict=True) if m.id == 100]
    assert (hit.action, hit.rule) == ("deny", "no-drop")
    assert [d.action for d in decisions].count("allow") == before + after


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=20))
def test_normalisation_is_idempotent(s):
    for fold in (False, True):
        once = normalize.text(s, fold)
        assert normalize.text(once, fold) == once
    assert normalize.name(normalize.name(s)) == normalize.name(s)


# Spellings of /etc/passwd that a file system or a WHATWG URL parser resolves to it.
PASSWD_URIS = [
    "file:///etc/passwd", "file://localhost/etc/passwd", "file://LOCALHOST/etc/passwd", "file:/etc/passwd",
    "file:etc/passwd", "file:////etc/passwd", "file:///etc//passwd", "file:///etc///passwd",
    "file:///srv/app/../../etc/passwd", "file:///srv/app/%2e%2e/%2E%2E/etc/passwd", "file:///etc/./passwd",
    "file:///etc%2fpasswd", "file:%2f%2f%2fetc/passwd", "FILE:///etc/passwd", "File://localhost//etc/passwd",
    "file:///srv/x%3f/../../etc/passwd", "file:\\\\\\etc\\passwd", "file://localhost\\etc\\passwd",
    " file:///etc/passwd", "file:///etc/pa\nss\twd", "file:///etc/passwd#fragment",
    "ｆｉｌｅ:///etc/passwd", "file:///etc/passwd?x", "\x00file:///etc/passwd",
]


@pytest.mark.parametrize("uri", PASSWD_URIS)
def test_every_spelling_of_a_denied_file_is_denied(uri):
    deny = one_rule("{resources: ['file:///etc/*']}")
    assert deny.evaluate(ALICE, msg("resources/read", {"uri": uri})).rule == "r", normalize.uri(uri)
    allow_srv = one_rule("{resources: ['file:///srv/*']}")
    assert allow_srv.evaluate(ALICE, msg("resources/read", {"uri": uri})).rule != "r", normalize.uri(uri)


@pytest.mark.parametrize("path", [
    "/etc/passwd", "//etc/passwd", "/etc//passwd", "/srv/app/../../etc/passwd", "/srv/./../etc/passwd",
    "/srv/x?/../../etc/passwd", "file:///etc/passwd", "file://localhost//etc/passwd",
])
def test_every_spelling_of_a_denied_path_argument_is_denied(path):
    deny = one_rule("{arguments: [{path: p, glob: '/etc/*'}]}")
    hit = deny.evaluate(ALICE, call("t", p=path)).rule == "r"
    deny_uri = one_rule("{arguments: [{path: p, glob: 'file:///etc/*'}]}")
    assert hit or deny_uri.evaluate(ALICE, call("t", p=path)).rule == "r", normalize.pathlike(path)
    allow_srv = one_rule("{arguments: [{path: p, glob: '/srv/*'}]}")
    assert allow_srv.evaluate(ALICE, call("t", p=path)).rule != "r", normalize.pathlike(path)


def test_what_is_not_the_path_stays_out_of_it():
    # A query or fragment is not part of the file read; an escaped `?` is.
    assert normalize.uri("file:///srv/x?/../../etc/passwd") == "file:///srv/x?/../../etc/passwd"
    assert normalize.uri("file:///srv/x#/../../etc/passwd") == "file:///srv/x"
    assert normalize.uri("https://Api.Example.com//v1/./a/../b?q=../c") == "https://api.example.com/v1/b?q=../c"
    assert normalize.uri("file://fileserver/share//x") == "file://fileserver/share/x"  # another host stays
    assert normalize.pathlike("https://x/a?b=../c") == "https://x/a?b=../c"
    assert normalize.pathlike("a?b/../c") == "c"  # in a POSIX path `?` is a character


def test_uri_normalisation():
    assert normalize.uri("file:///srv/app/../../etc/passwd") == "file:///etc/passwd"
    assert normalize.uri("file:///%2e%2e/etc/%70asswd") == "file:///etc/passwd"
    assert normalize.uri("acme://runbooks/./oncall?x=../y") == "acme://runbooks/oncall?x=../y"
    assert normalize.uri("FILE:///A", fold=True) == "file:///a"
    assert normalize.uri("urn:a/b/../c") == "urn:a/c"


# --- list filtering ---------------------------------------------------------------


LISTING = rs("""\
    version: 1
    rules:
      - id: no-secret-files
        match: {tools: [read_file], arguments: [{path: path, glob: '*.env'}]}
        action: deny
      - id: keyword-drop
        match: {keywords: [drop_]}
        action: deny
      - id: write-tmp-only
        match: {tools: [write_file], arguments: [{path: path, glob: '/tmp/*'}]}
        action: allow
      - id: lookup-masked
        match: {tools: [lookup]}
        action: mask
        profile: pii
      - id: reads
        match: {tools: [read_file, lookup]}
        action: allow
      - id: summary
        match: {prompts: [summary]}
        action: allow
      - id: oncall-drop
        match: {groups: [oncall], tools: [drop_table]}
        action: approve
      - id: runbooks
        match: {resources: ['acme://runbooks/*']}
        action: allow
    """)


def test_visibility_follows_what_could_be_allowed():
    assert not LISTING.warnings
    v = LISTING.visible
    assert v(ALICE, ACME, "tool", "read_file")          # only some calls denied: shown
    assert v(ALICE, ACME, "tool", "write_file")         # some calls allowed: shown
    assert not v(ALICE, ACME, "tool", "drop_table")     # the keyword matches every call to it
    assert not v(OSCAR, ACME, "tool", "drop_table")     # ... even for on-call (first match)
    assert not v(ALICE, ACME, "tool", "deploy")         # default deny
    assert v(ALICE, ACME, "prompt", "summary")
    assert not v(ALICE, ACME, "prompt", "other")
    assert v(ALICE, ACME, "resource", "acme://runbooks/oncall")
    assert not v(ALICE, ACME, "resource", "acme://secrets/x")
    assert v(ALICE, ACME, "template", "acme://runbooks/{name}")


def test_filter_list_by_method_and_by_shape():
    result = {"tools": [{"name": "read_file"}, {"name": "deploy"}, {"nome": "x"}, "junk"], "nextCursor": "c"}
    out, hidden = LISTING.filter_list(ALICE, ACME, "tools/list", result)
    assert out == {"tools": [{"name": "read_file"}], "nextCursor": "c"}
    assert hidden == ["deploy", "<unnamed>", "<unnamed>"]
    assert result["tools"][1] == {"name": "deploy"}  # the input is not modified
    out, hidden = LISTING.filter_list(ALICE, ACME, None, {"prompts": [{"name": "summary"}, {"name": "x"}],
                                                          "resourceTemplates": [{"uriTemplate": "acme://runbooks/{n}"}]})
    assert out["prompts"] == [{"name": "summary"}] and hidden == ["x"]
    assert LISTING.filter_list(ALICE, ACME, "tools/call", result) == (result, [])


# --- hot reload -----------------------------------------------------------------


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_reload_swaps_valid_edits_and_keeps_the_old_ruleset_on_invalid_ones(tmp_path, caplog):
    path = tmp_path / "r.yaml"
    path.write_text(ORDERED)
    clock = Clock()
    src = ReloadingRuleset(str(path), interval=1.0, clock=clock)
    assert src.current().evaluate(ALICE, call("deploy")).action == "deny"

    path.write_text(ORDERED.replace("action: deny", "action: allow"))
    os.utime(path, ns=(1, 1))
    clock.now = 0.5
    assert src.current().evaluate(ALICE, call("deploy")).action == "deny"  # not checked yet
    clock.now = 1.5
    assert src.current().evaluate(ALICE, call("deploy")).action == "allow"

    good = src.current()
    caplog.set_level(logging.ERROR, logger="mcp_bastion")
    path.write_text("version: 1\nrules:\n  - id: x\n    action: nope\n")
    clock.now = 3
    assert src.current() is good
    assert "edit refused" in caplog.text and "r.yaml:4: rule 'x'" in caplog.text
    caplog.clear()
    clock.now = 5
    assert src.current() is good and caplog.text == ""  # the same bad file is reported once

    path.unlink()
    clock.now = 7
    assert src.current() is good and "cannot be read" in caplog.text


def test_a_listing_hides_what_only_an_unavailable_masking_profile_would_allow():
    """At call time such a mask is a denial (the Policy refuses rather than send unmasked data)."""
    rs = Ruleset.parse(
        "version: 1\n"
        "rules:\n"
        "  - id: masked\n"
        "    match: {groups: [contractors], tools: [lookup]}\n"
        "    action: mask\n"
        "    profile: pii\n"
        "  - id: logs\n"
        "    match: {groups: [contractors], tools: [logs]}\n"
        "    action: allow\n",
        "t.yaml",
    )
    carol = Identity(sub="carol", groups=("contractors",))
    listing = {"tools": [{"name": "lookup"}, {"name": "logs"}]}
    kept, hidden = rs.filter_list(carol, None, "tools/list", listing, masking_profiles=())
    assert [t["name"] for t in kept["tools"]] == ["logs"] and hidden == ["lookup"]
    kept, hidden = rs.filter_list(carol, None, "tools/list", listing, masking_profiles=("pii",))
    assert hidden == []
    kept, hidden = rs.filter_list(carol, None, "tools/list", listing)  # profiles unknown (policy CLI)
    assert hidden == []


@pytest.mark.parametrize("line", ["reason: ask #platform", "reason: ask    # platform", "description: x #y"])
def test_a_reason_cut_by_a_yaml_comment_is_said(line):
    key = line.split(":")[0]
    text = f"version: 1\nrules:\n  - id: r\n    match: {{tools: [t]}}\n    action: deny\n    {line}\n"
    rs = Ruleset.parse(text)
    (w,) = [w for w in rs.warnings if "YAML comment" in w.message]
    assert w.line == 6 and w.rule == "r" and key in w.message and "quote the value" in w.message


@pytest.mark.parametrize("line", ['reason: "ask #platform"', "reason: ask#platform", "reason: ask   ",
                                  "reason: 'ask #platform' # a real comment"])
def test_quoted_or_unspaced_hashes_are_kept_quietly(line):
    text = f"version: 1\nrules:\n  - id: r\n    match: {{tools: [t]}}\n    action: deny\n    {line}\n"
    rs = Ruleset.parse(text)
    assert not [w for w in rs.warnings if "YAML comment" in w.message]
    if "#platform" in line:
        assert rs.rules[0].decision.reason in ("ask #platform", "ask#platform")


@pytest.mark.parametrize("ch", ["\ufdfa", "\ufdfb", "\u3300", "\u2474"])
def test_text_that_grows_too_much_under_normalisation_is_refused_not_normalised(ch):
    """U+FDFA is 18 characters in NFKC: a few MB of it took seconds of the event loop."""
    r = one_rule("{keywords: [secret]}")
    d = r.evaluate(ALICE, call("t", q=ch * 500_000))
    if ch in ("\ufdfa", "\ufdfb"):
        assert d.rule == MALFORMED_RULE and "normalisation" in d.reason
    else:  # 3 to 5 characters each: within the allowed growth
        assert d.rule == DEFAULT_RULE
    steps, explained = r.explain(ALICE, call("t", q=ch * 500_000))
    assert explained.rule == d.rule


def test_a_few_expanding_characters_are_normalised_as_usual():
    assert normalize.text("ﬁle \ufdfa", fold=True).startswith("file ")
    r = one_rule("{keywords: ['file']}")
    assert r.evaluate(ALICE, call("t", q="ﬁle")).rule == "r"


def test_text_already_in_normal_form_is_not_rewritten():
    s = "é" * 1000 + "日本語"
    assert normalize.text(s) is s
