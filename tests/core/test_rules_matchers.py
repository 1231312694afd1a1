"""The table of `match` keys: every key it holds is accepted, can match and can fail; no other key is."""

from __future__ import annotations

import pytest

from mcp_bastion.core.identity import ANONYMOUS, Identity
from mcp_bastion.core.message import Message, classify, http_request
from mcp_bastion.core.rules import MATCHERS, Ruleset, RulesetError
from mcp_bastion.core.vocab import DEFAULT_RULE

ALICE = Identity("alice", ("engineering",), "https://idp.example")
ACME = "127.0.0.1:9000"
C2S, S2C = "client_to_server", "server_to_client"


def request(method: str, params: dict | None = None, id: int | None = 1) -> Message:
    raw: dict = {"jsonrpc": "2.0", "method": method}
    if id is not None:
        raw["id"] = id
    if params is not None:
        raw["params"] = params
    return classify(raw)


def call(tool: str, **arguments) -> Message:
    return request("tools/call", {"name": tool, "arguments": arguments})


# key -> (the rule's match, a case it matches, a case it does not); a case is (identity, message, direction, upstream)
EXAMPLES = {
    "groups": ("{groups: ['eng*']}", (ALICE, call("t"), C2S, ACME), (ANONYMOUS, call("t"), C2S, ACME)),
    "subjects": ("{subjects: [alice]}", (ALICE, call("t"), C2S, ACME), (Identity("bob"), call("t"), C2S, ACME)),
    "issuers": ("{issuers: ['https://idp.*']}", (ALICE, call("t"), C2S, ACME),
                (Identity("a", iss="https://other"), call("t"), C2S, ACME)),
    "authenticated": ("{authenticated: true}", (ALICE, call("t"), C2S, ACME), (ANONYMOUS, call("t"), C2S, ACME)),
    "upstreams": ("{upstreams: [acme]}", (ALICE, call("t"), C2S, ACME), (ALICE, call("t"), C2S, "127.0.0.1:9001")),
    "direction": ("{direction: server_to_client}", (ALICE, request("sampling/createMessage", {}), S2C, ACME),
                  (ALICE, request("sampling/createMessage", {}), C2S, ACME)),
    "kinds": ("{kinds: [notification]}", (ALICE, request("notifications/progress", {}, id=None), C2S, ACME),
              (ALICE, request("ping"), C2S, ACME)),
    "methods": ("{methods: ['http:GET', 'ping']}", (ALICE, http_request("get"), C2S, ACME),
                (ALICE, http_request("DELETE"), C2S, ACME)),
    "tools": ("{tools: [drop_*]}", (ALICE, call("DROP_table"), C2S, ACME), (ALICE, call("read_file"), C2S, ACME)),
    "prompts": ("{prompts: [summary]}", (ALICE, request("prompts/get", {"name": "summary"}), C2S, ACME),
                (ALICE, request("prompts/get", {"name": "other"}), C2S, ACME)),
    "resources": ("{resources: ['file:///etc/*']}",
                  (ALICE, request("resources/read", {"uri": "file:///srv/../etc/passwd"}), C2S, ACME),
                  (ALICE, request("resources/read", {"uri": "file:///srv/app"}), C2S, ACME)),
    "arguments": ("{arguments: [{path: env, equals: prod}]}", (ALICE, call("deploy", env="prod"), C2S, ACME),
                  (ALICE, call("deploy", env="dev"), C2S, ACME)),
    "keywords": ("{keywords: ['drop table']}", (ALICE, call("q", sql="x; drop   table t"), C2S, ACME),
                 (ALICE, call("q", sql="select 1"), C2S, ACME)),
    "patterns": ("{patterns: ['AKIA[0-9A-Z]{16}']}", (ALICE, call("q", k="AKIAABCDEFGHIJKLMNOP"), C2S, ACME),
                 (ALICE, call("q", k="akiaabcdefghijklmnop"), C2S, ACME)),
    "case_insensitive": ("{keywords: [SECRET], case_insensitive: true}", (ALICE, call("q", a="a secret"), C2S, ACME),
                         (ALICE, call("q", a="public"), C2S, ACME)),
}


def one_rule(match: str) -> Ruleset:
    text = (f"version: 1\ndefault: allow\nupstreams: {{acme: \"{ACME}\"}}\n"
            f"rules:\n  - id: r\n    match: {match}\n    action: deny\n")
    return Ruleset.parse(text, "table.yaml")


def test_every_key_of_the_table_has_an_example():
    assert list(EXAMPLES) == list(MATCHERS)


@pytest.mark.parametrize("key", list(MATCHERS))
def test_every_key_of_the_table_is_accepted_and_can_match_and_not_match(key):
    match, hit, miss = EXAMPLES[key]
    r = one_rule(match)
    assert not r.warnings
    assert len(r.rules) == 1
    assert r.evaluate(*hit).rule == "r"
    d = r.evaluate(*miss)
    assert d.rule == DEFAULT_RULE
    steps, _ = r.explain(*miss)
    assert steps[0].rule == "r" and not steps[0].matched and steps[0].detail


def test_case_insensitive_changes_how_the_others_compare():
    match, hit, _ = EXAMPLES["case_insensitive"]
    assert one_rule(match.replace("true", "false")).evaluate(*hit).rule == DEFAULT_RULE


@pytest.mark.parametrize("key,hint", [
    ("tool", "(did you mean 'tools'?)"),
    ("group", "(did you mean 'groups'?)"),
    ("case_insensitiv", "(did you mean 'case_insensitive'?)"),
    ("zzzzzzzz", f"(known: {', '.join(MATCHERS)})"),
])
def test_a_key_not_in_the_table_is_refused_with_a_hint(key, hint):
    with pytest.raises(RulesetError) as info:
        one_rule(f"{{{key}: x}}")
    (problem,) = info.value.problems
    assert (problem.line, problem.rule) == (6, "r")
    assert problem.message == f"match: unknown key {key!r} {hint}"


def test_keys_naming_a_target_together_are_warned_about():
    r = one_rule("{tools: [a], resources: ['x://*']}")
    (w,) = r.warnings
    assert w.message == "tools and resources together never match (a message names one target)"


def test_task_requests_are_not_malformed_and_match_no_target_key():
    r = one_rule("{tools: ['*']}")
    for m in (request("tasks/get", {"taskId": "t1"}), request("tasks/cancel", {})):
        d = r.evaluate(ALICE, m)
        assert (d.action, d.rule) == ("allow", DEFAULT_RULE)
