"""
Fuzzing the rule evaluator (core/rules.py) with hypothesis.

Rulesets are built from the documented grammar (every key of `match`, every
`arguments` operator, upstream names, every action, both defaults), dumped to YAML
and loaded as a file would be; messages are JSON-RPC shaped values in both
directions, linked answers, body-less HTTP requests, with hostile strings
(full-width, zero-width, case, URIs with dot segments).

- Loading a generated ruleset succeeds, and loading any edit of one gives a ruleset
  or a `RulesetError`, nothing else.
- Evaluation never raises, decides with one of the file's rules (or the default, or
  `bastion:malformed`), is deterministic (twice, on a fresh load, and `explain`
  agrees), and follows the first-match semantics: the decision is the one of the
  first rule that matches on its own.
- A deny-all ruleset (whatever follows its first rule) denies every message and
  hides every listed item; a deny rule put first wins over everything below it.

Inputs that hit a known finding are kept out of the strategies (each says where); the
findings are the `test_finding_*` tests at the end (each failed until its fix), with a minimal reproduction.

BASTION_FUZZ_EXAMPLES=N raises the number of examples (and explores new inputs) for a
longer local run; without it every run tries the same inputs (`derandomize`).
"""

from __future__ import annotations

import os
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcp_bastion.core import normalize
from mcp_bastion.core.identity import ANONYMOUS, Identity
from mcp_bastion.core.message import LISTS, TARGETS, Message, classify, http_request
from mcp_bastion.core.rules import ACTIONS, ReloadingRuleset, Ruleset, RulesetError
from mcp_bastion.core.vocab import DEFAULT_RULE, MALFORMED_RULE, Direction, Kind

EXTRA = int(os.environ.get("BASTION_FUZZ_EXAMPLES") or 0)
DERANDOMIZE = not EXTRA
SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def examples(n: int) -> int:
    """`n` in CI; BASTION_FUZZ_EXAMPLES raises it for a longer local run."""
    return max(n, EXTRA)


# Integers stay within a float's range: a larger one is a finding of its own (see the end of this file).
FLOAT_SAFE = 10**300

# --- strings, names and URIs in many spellings ---------------------------------------------------------

NAMES = ["read_file", "drop_table", "DROP_TABLE", "ｄｒｏｐ＿ｔａｂｌｅ", "dr\u200bop_table", " drop_table ", "deploy",
         "ﬁle", "a", ""]
METHODS = ["tools/call", "TOOLS/CALL", "tools/\uff43all", "prompts/get", "resources/read", "resources/subscribe",
           "resources/unsubscribe", "tasks/get", "tasks/result", "tools/list", "prompts/list", "resources/list",
           "resources/templates/list", "initialize", "ping", "notifications/initialized", "notifications/progress",
           "notifications/resources/updated", "sampling/createMessage", "elicitation/create", "roots/list",
           "server/discover", "subscriptions/listen", "secrets/get", "x"]
URIS = ["file:///etc/passwd", "file:///srv/app/../../etc/passwd", "file:///%2e%2e/etc/%70asswd", "FILE:///ETC/PASSWD",
        "file://localhost//etc//passwd", "file:/etc/passwd", "file:///srv/app/readme.md", "acme://runbooks/oncall",
        "https://Example.com/a/./b?x=../y#frag", "urn:a/b/../c", "c:\\windows\\..\\x", "", "/etc/passwd", "a%zz"]
TEXT_BITS = ["", "a", "secret", "Ｓｅｃｒｅｔ", "pass word", "\u200b", "é", "e\u0301", "ß", "İ", "/", "..", "*", "?",
             "[", "1", "1e3", "１e3", "-0", "NaN", "inf", " ", "\t", "\n", "%2f", "\\"]
texts = st.one_of(
    st.sampled_from(NAMES + METHODS + URIS + TEXT_BITS),
    st.lists(st.sampled_from(TEXT_BITS + NAMES), max_size=4).map("".join),
    st.text(st.characters(exclude_categories=["Cs"]), max_size=8),
)
numbers = st.one_of(st.integers(-FLOAT_SAFE, FLOAT_SAFE), st.integers(-10, 10),
                    st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    st.none() | st.booleans() | numbers | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=12,
)

# --- rulesets from the grammar -----------------------------------------------------------------------------

GLOB_PARTS = ["*", "?", "[a-d]", "[!x]", "[", "drop_", "table", "read_file", "tools/", "call", "notifications/",
              "ｄｒｏｐ", "DROP", "file:///etc/", "file:///srv/app/", "passwd", "acme://", "engineering", "alice",
              "https://idp", "http:GET", "http:DELETE", "..", "/", "é", "secrets/"]
globs = st.lists(st.sampled_from(GLOB_PARTS), min_size=1, max_size=3).map("".join)


def one_or_many(s: st.SearchStrategy) -> st.SearchStrategy:
    """A key's value: one item, or a non-empty list of them."""
    return st.one_of(s, st.lists(s, min_size=1, max_size=3))


REGEXES = [r"drop_\w+", r"^tools/", r"secret", r"(?i)pass\s*word", r"\d{3,}", r"^$", r".", r"[a-z]+_table$", r"ｄ"]
regexes = st.one_of(st.sampled_from(REGEXES), texts.map(re.escape))
keywords = texts.filter(lambda w: bool(normalize.spaced(w, False).strip()) and bool(normalize.spaced(w, True).strip()))
SEGMENTS = ["a", "b", "0", "1", "*", "path", "n", "table", "x.y", "é"]


@st.composite
def argument_entries(draw) -> dict:
    segments = draw(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3))
    if any("." in s for s in segments) or draw(st.booleans()):
        path: object = segments
    else:
        path = ".".join(segments)
    ops = draw(st.lists(st.sampled_from(["equals", "glob", "regex", "lt", "le", "gt", "ge"]),
                        min_size=1, max_size=3, unique=True))
    entry: dict = {"path": path}
    scalar = st.one_of(st.none(), st.booleans(), numbers, texts)
    for op in ops:
        if op == "equals":
            entry[op] = draw(st.one_of(scalar, st.lists(scalar, min_size=1, max_size=3)))
        elif op == "glob":
            entry[op] = draw(one_or_many(st.one_of(globs, st.sampled_from(URIS))))
        elif op == "regex":
            entry[op] = draw(one_or_many(regexes))
        else:
            entry[op] = draw(numbers)
    return entry


UPSTREAM_NAMES = {"acme": ["127.0.0.1:9000", "localhost:*"], "other": ["10.0.0.*:443"]}
match_keys = {
    "groups": one_or_many(globs),
    "subjects": one_or_many(globs),
    "issuers": one_or_many(globs),
    "authenticated": st.booleans(),
    "upstreams": one_or_many(st.sampled_from(["acme", "other", "127.0.0.1:*", "*:9000", "[::1]:*"])),
    "direction": st.sampled_from([d.value for d in Direction]),
    "kinds": st.lists(st.sampled_from(["request", "notification", "response"]), min_size=1, max_size=3, unique=True),
    "methods": one_or_many(st.one_of(globs, st.sampled_from(METHODS))),
    "tools": one_or_many(st.one_of(globs, st.sampled_from(NAMES[:-1]))),
    "prompts": one_or_many(globs),
    "resources": one_or_many(st.one_of(globs, st.sampled_from(URIS[:-1]))),
    "arguments": st.lists(argument_entries(), min_size=1, max_size=2),
    "keywords": one_or_many(keywords),
    "patterns": one_or_many(regexes),
    "case_insensitive": st.booleans(),
}
matches = st.fixed_dictionaries({}, optional=match_keys)


@st.composite
def rule_docs(draw, i: int, action: str | None = None) -> dict:
    action = action or draw(st.sampled_from(ACTIONS))
    rule: dict = {"id": f"r{i}"}
    if draw(st.booleans()):
        rule["match"] = draw(matches)
    rule["action"] = action
    if action == "mask":
        rule["profile"] = draw(st.sampled_from(["pii", "secrets"]))  # (built in)
    if draw(st.booleans()):
        rule["reason"] = draw(texts.filter(lambda t: t.strip() != "" and "#" not in t))
    return rule


ANY_ACTION = st.sampled_from(ACTIONS)
ANY_DEFAULT = st.sampled_from(["deny", "allow"])


@st.composite
def ruleset_docs(draw, actions: st.SearchStrategy[str] = ANY_ACTION, defaults: st.SearchStrategy[str] = ANY_DEFAULT
                 ) -> dict:
    n = draw(st.integers(0, 4))
    doc: dict = {"version": 1, "default": draw(defaults)}
    if draw(st.booleans()):
        doc["upstreams"] = UPSTREAM_NAMES
    doc["rules"] = [draw(rule_docs(i, draw(actions))) for i in range(n)]
    if "upstreams" not in doc:  # names are only known when declared
        for r in doc["rules"]:
            m = r.get("match", {})
            if "upstreams" in m:
                values = m["upstreams"] if isinstance(m["upstreams"], list) else [m["upstreams"]]
                m["upstreams"] = [v for v in values if ":" in v] or ["127.0.0.1:*"]
    return doc


def dump(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=10_000)


def load(doc: dict) -> Ruleset:
    return Ruleset.parse(dump(doc), "fuzz.yaml")


# --- messages ---------------------------------------------------------------------------------------------

ids = st.one_of(st.integers(-(2**63), 2**63), st.text(max_size=4), st.none(), st.booleans(), st.floats())


@st.composite
def params(draw) -> object:
    shape = draw(st.sampled_from(["target", "target", "list", "scalar", "none", "any"]))
    if shape == "list":
        return draw(st.lists(json_values, max_size=3))
    if shape == "scalar":
        return draw(st.one_of(numbers, texts, st.booleans()))
    if shape == "none":
        return None
    if shape == "any":
        return draw(st.dictionaries(texts, json_values, max_size=3))
    out: dict = {}
    for key, values in (("name", st.sampled_from(NAMES)), ("uri", st.sampled_from(URIS)),
                        ("taskId", st.text(max_size=4)), ("arguments", json_values), ("_meta", json_values)):
        if draw(st.booleans()):
            out[key] = draw(st.one_of(values, json_values) if draw(st.integers(0, 5)) == 0 else values)
    return out


@st.composite
def raw_messages(draw) -> object:
    """A JSON-RPC shaped value: mostly well formed, sometimes not."""
    kind = draw(st.sampled_from(["request", "request", "notification", "response", "error", "junk"]))
    if kind == "junk":
        return draw(json_values)
    m: dict = {"jsonrpc": draw(st.sampled_from(["2.0", "2.0", "2.0", "1.0", 2.0]))}
    if kind in ("request", "response", "error"):
        m["id"] = draw(ids)
    if kind in ("request", "notification"):
        m["method"] = draw(st.one_of(st.sampled_from(METHODS), texts))
        p = draw(params())
        if p is not None:
            m["params"] = p
    elif kind == "response":
        m["result"] = draw(st.one_of(json_values, list_results()))
    else:
        m["error"] = {"code": draw(numbers), "message": draw(texts)}
    return m


@st.composite
def list_results(draw) -> dict:
    listing = draw(st.sampled_from(list(LISTS.values())))
    items = draw(st.lists(st.one_of(
        st.builds(lambda n: {listing.field: n}, st.one_of(st.sampled_from(NAMES + URIS), texts)),
        json_values), max_size=4))
    return {listing.key: items}


@st.composite
def messages(draw) -> Message:
    if draw(st.integers(0, 9)) == 0:
        return http_request(draw(st.sampled_from(["GET", "DELETE", "HEAD", "get"])))
    m = classify(draw(raw_messages()))
    request = None
    if m.kind in (Kind.RESPONSE, Kind.ERROR) and draw(st.booleans()):
        request = classify({"jsonrpc": "2.0", "id": 1, "method": draw(st.sampled_from(METHODS)),
                            "params": draw(params()) or {}})
    return m.placed(direction=draw(st.sampled_from(list(Direction))), request=request)


identities = st.one_of(
    st.just(ANONYMOUS), st.just(None),
    st.builds(Identity, st.one_of(st.none(), st.sampled_from(["alice", "carol", "ｂob"]), texts),
              st.lists(st.sampled_from(["engineering", "contractors", "ci", "oncall", "Engineering", ""]),
                       max_size=3).map(tuple),
              st.one_of(st.none(), st.sampled_from(["https://idp", "https://idp.example"]))),
)
upstreams = st.one_of(st.none(), st.sampled_from(["127.0.0.1:9000", "LOCALHOST:9000", "10.0.0.7:443", "[::1]:8000",
                                                  "example.com:80"]))


def first_match(rs: Ruleset, identity, m: Message, direction, upstream):
    """The decision by the first rule that matches on its own (each rule in a ruleset of its own), or the default."""
    for rule in rs.rules:
        alone = Ruleset([rule], "allow", default_rule="fuzz:nothing")
        if alone.evaluate(identity, m, direction, upstream).rule == rule.id:
            return rule.decision
    return rs.default_decision


# --- loading ---------------------------------------------------------------------------------------------------


@settings(max_examples=examples(50), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(ruleset_docs())
def test_every_ruleset_of_the_grammar_loads(doc):
    rs = load(doc)
    assert [r.id for r in rs.rules] == [r["id"] for r in doc["rules"]]
    assert rs.default == doc["default"]


# Values an edit may put anywhere (but the ones of the findings below).
EDITS = ["", "~", "null", "yes", "[]", "{}", "[a, [b]]", "{a: 1}", "- x", "'quoted'", '"\\u00e9"', "1", "-1", "0x1f",
         "1.5", ".inf", "-.nan", "2026-02-03", "12:30:00", "&a x", "*a", "? x", "|\n  block", ">-\n  folded", "%",
         "@x", "`x", "a: b: c", "x #c", "\t", "\u00e9", "<<: {a: 1}"]


@settings(max_examples=examples(60), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(ruleset_docs(), st.data())
def test_any_edit_of_a_ruleset_loads_or_is_refused_with_ruleset_error(doc, data):
    """The gateway keeps the ruleset in force when an edit is refused (RulesetError); any other exception
    escapes the hot reload."""
    lines = dump(doc).splitlines()
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(lines) - 1))
        key, sep, _value = lines[i].partition(": ")
        lines[i] = (key + sep if sep else lines[i] + " ") + data.draw(st.sampled_from(EDITS))
    try:
        Ruleset.parse("\n".join(lines) + "\n", "fuzz.yaml")
    except RulesetError:
        pass


# --- evaluation -------------------------------------------------------------------------------------------------


@settings(max_examples=examples(100), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(ruleset_docs(), st.lists(st.tuples(messages(), identities, upstreams), min_size=1, max_size=4))
def test_evaluation_never_raises_is_deterministic_and_first_match(doc, cases):
    rs, again = load(doc), load(doc)
    known = {r.id for r in rs.rules} | {DEFAULT_RULE, MALFORMED_RULE}
    for m, identity, upstream in cases:
        direction = m.direction or Direction.C2S
        d = rs.evaluate(identity, m, direction, upstream)
        assert d.action in ACTIONS and d.rule in known
        assert rs.evaluate(identity, m, direction, upstream) == d
        assert again.evaluate(identity, m, direction, upstream) == d
        steps, explained = rs.explain(identity, m, direction, upstream)
        assert explained == d and steps[-1].matched and not any(s.matched for s in steps[:-1])
        if d.rule == MALFORMED_RULE:
            assert d.action == "deny" and m.kind == Kind.REQUEST and normalize.name(m.method) in TARGETS
        else:
            assert d == first_match(rs, identity, m, direction, upstream)


@settings(max_examples=examples(50), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(ruleset_docs(), identities, upstreams, st.lists(list_results(), min_size=1, max_size=3),
       st.sampled_from([None, *LISTS]), st.sampled_from([None, frozenset(), frozenset({"pii"})]))
def test_list_filtering_never_raises_and_only_removes(doc, identity, upstream, results, method, profiles):
    rs = load(doc)
    for result in results:
        out, hidden = rs.filter_list(identity, upstream, method, result, profiles)
        assert out.keys() == result.keys()
        for key, items in result.items():
            kept = out[key]
            assert [x for x in items if x in kept] == kept  # a subsequence: nothing added, nothing reordered
            assert len(items) - len(kept) == len(hidden)
        assert rs.filter_list(identity, upstream, method, result, profiles) == (out, hidden)


# --- deny all, deny first ------------------------------------------------------------------------------------------


@st.composite
def deny_all_rulesets(draw) -> Ruleset:
    shape = draw(st.sampled_from(["none", "empty", "deny-first", "only-denials"]))
    if shape == "none":
        return Ruleset.deny_all("no ruleset")
    if shape == "empty":
        return load({"version": 1, "default": "deny", "rules": []})
    if shape == "deny-first":
        doc = draw(ruleset_docs())
        doc["rules"].insert(0, {"id": "deny-everything", "action": "deny", "reason": "closed"})
        return load(doc)
    return load(draw(ruleset_docs(actions=st.just("deny"), defaults=st.just("deny"))))


@settings(max_examples=examples(80), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(deny_all_rulesets(), st.lists(st.tuples(messages(), identities, upstreams), min_size=1, max_size=4),
       st.lists(list_results(), min_size=1, max_size=2))
def test_a_deny_all_ruleset_denies_every_message_and_hides_every_item(rs, cases, results):
    for m, identity, upstream in cases:
        d = rs.evaluate(identity, m, m.direction or Direction.C2S, upstream)
        assert d.action == "deny" and d.blocks
        for result in results:
            out, hidden = rs.filter_list(identity, upstream, None, result)
            assert all(out[key] == [] for key in result)
            assert len(hidden) == sum(len(items) for items in result.values())


@settings(max_examples=examples(80), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(ruleset_docs(), matches, st.lists(st.tuples(messages(), identities, upstreams), min_size=1, max_size=4))
def test_a_deny_rule_put_first_wins(doc, match, cases):
    doc["upstreams"] = UPSTREAM_NAMES
    doc["rules"].insert(0, {"id": "first", "match": match, "action": "deny"})
    rs = load(doc)
    alone = Ruleset(rs.rules[:1], "allow", default_rule="fuzz:nothing")
    for m, identity, upstream in cases:
        direction = m.direction or Direction.C2S
        if alone.evaluate(identity, m, direction, upstream).rule == "first":
            assert rs.evaluate(identity, m, direction, upstream).action == "deny"


# --- findings -------------------------------------------------------------------------------------------------------

HUGE = "1" + "0" * 400  # a JSON or YAML integer beyond a float's range


@pytest.mark.parametrize("op", ["lt: 5", "ge: 5", "equals: 5"])
def test_finding_a_huge_integer_argument_breaks_evaluation(op):
    rs = Ruleset.parse(f"version: 1\ndefault: allow\nrules:\n  - id: small\n    match: {{tools: [pay], "
                       f"arguments: [{{path: n, {op}}}]}}\n    action: deny\n")
    m = classify({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                  "params": {"name": "pay", "arguments": {"n": int(HUGE)}}}).placed(direction=Direction.C2S)
    assert rs.evaluate(None, m).action in ACTIONS


LOADER_FINDINGS = {
    "huge-bound": f"version: 1\nrules:\n  - id: a\n    match: {{arguments: [{{path: n, lt: {HUGE}}}]}}\n"
                  "    action: deny\n",
    "date-typo": "version: 1\nrules:\n  - id: a\n    action: deny\n    reason: 2026-02-30\n",
    "bad-int-tag": "version: !!int x\nrules: []\n",
    "bad-float-tag": "version: 1\nrules:\n  - id: !!float abc\n    action: deny\n",
    "unknown-tag": "version: 1\nrules:\n  - id: !!python/name:os.system x\n    action: deny\n",
    "bad-binary": "version: 1\nrules:\n  - id: a\n    action: deny\n    reason: !!binary 'not base64!'\n",
}


@pytest.mark.parametrize("text", LOADER_FINDINGS.values(), ids=LOADER_FINDINGS.keys())
def test_finding_some_invalid_rulesets_raise_something_else_than_ruleset_error(text):
    with pytest.raises(RulesetError):
        Ruleset.parse(text, "bad.yaml")


@pytest.mark.parametrize("text", [LOADER_FINDINGS["date-typo"], LOADER_FINDINGS["huge-bound"]],
                         ids=["date-typo", "huge-bound"])
def test_finding_an_invalid_edit_escapes_the_hot_reload(tmp_path, text):
    path = tmp_path / "rules.yaml"
    path.write_text("version: 1\nrules:\n  - id: all\n    action: allow\n")

    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    source = ReloadingRuleset(str(path), interval=1.0, clock=clock)
    good = source.current()
    path.write_text(text)
    os.utime(path, ns=(1, 1))
    clock.now = 2.0
    assert source.current() is good  # the edit is refused, the ruleset in force stays
