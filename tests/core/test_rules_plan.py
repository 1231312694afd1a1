"""The rule pre-filter (`Ruleset._plan`): the same decision as testing every condition of every rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_bastion.core import rules
from mcp_bastion.core.identity import Identity
from mcp_bastion.core.message import classify
from mcp_bastion.core.rules import Ruleset
from mcp_bastion.core.vocab import Direction

ROOT = Path(__file__).resolve().parents[2]
RULESETS = sorted([ROOT / "rulesets" / "default.yaml", *(ROOT / "rulesets" / "examples").glob("*.yaml")])

identities = st.builds(
    Identity,
    sub=st.sampled_from([None, "alice", "bob", "ci-bot", "ALICE"]),
    groups=st.lists(st.sampled_from(["engineering", "sre", "admins", "ci", "support", "security", "x"]),
                    max_size=3).map(tuple),
    iss=st.sampled_from([None, "https://idp.example.com", "https://other"]),
)
methods = st.sampled_from(["tools/call", "tools/list", "resources/read", "prompts/get", "initialize",
                           "TOOLS/CALL", "sampling/createMessage", "notifications/progress", "ping"])
tools = st.sampled_from(["search_code", "get_file", "deploy", "delete_everything", "run_query", "read_logs",
                         "Deploy", "add", "shell_exec", "create_issue"])
arguments = st.dictionaries(st.sampled_from(["path", "query", "env", "text"]),
                            st.sampled_from(["prod", "/etc/passwd", "SELECT 1", "DROP TABLE x", "hi", "secret"]),
                            max_size=2)


@pytest.fixture(scope="module", params=RULESETS, ids=[p.name for p in RULESETS])
def ruleset(request):
    return Ruleset.load(request.param)


@settings(max_examples=300, deadline=None)
@given(who=identities, method=methods, tool=tools, args=arguments,
       direction=st.sampled_from([Direction.C2S.value, Direction.S2C.value]),
       upstream=st.sampled_from([None, "127.0.0.1:9000", "github.internal:443", "PROD-DB:5432"]))
def test_the_plan_decides_what_every_condition_decides(ruleset, who, method, tool, args, direction, upstream):
    params = {"name": tool, "arguments": args} if method.lower() in ("tools/call", "prompts/get") else (
        {"uri": f"file:///{tool}"} if method == "resources/read" else {})
    m = classify({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    twice = [ruleset.evaluate(who, m, direction, upstream) for _ in range(2)]  # planned, then remembered
    _, slow = ruleset.explain(who, m, direction, upstream)
    assert twice[0] == twice[1] == slow


def test_the_plans_a_ruleset_remembers_are_bounded(monkeypatch):
    monkeypatch.setattr(rules, "PLANS", 8)
    rs = Ruleset.load(RULESETS[0])
    m = classify({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x", "arguments": {}}})
    for i in range(50):
        rs.evaluate(Identity(sub=f"user{i}", groups=(), iss=None), m)
    assert len(rs._plans) <= 8


def test_a_client_spelling_long_methods_cannot_fill_the_plans(monkeypatch):
    """Method names are the client's: long ones are planned each time, never remembered."""
    rs = Ruleset.load(RULESETS[0])
    who = Identity(sub="alice", groups=("engineering",), iss="https://idp.example.com")
    for i in range(200):
        m = classify({"jsonrpc": "2.0", "id": 1, "method": f"x/{i}" + "y" * 5000, "params": {}})
        assert rs.evaluate(who, m) == rs.explain(who, m)[1]
    assert len(rs._plans) == 0
    short = classify({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}})
    rs.evaluate(who, short)
    assert len(rs._plans) == 1
