"""
Rulesets: load, validate and compile a YAML ruleset, then evaluate messages.

Pure: no mitmproxy import. The language (documented in the README):

    version: 1
    default: deny                  # when no rule matches (deny unless set to allow)
    upstreams:                     # optional names for upstream servers ("host:port" globs)
      acme: "127.0.0.1:9000"
    rules:                         # evaluated top to bottom: the FIRST matching rule decides
      - id: no-drop
        match: {tools: [drop_*]}   # every condition given must hold; a list means "any of"
        action: deny               # allow | deny | approve | mask
        reason: irreversible

Matching is done on decoded JSON after normalisation (see `normalize`): names
of methods, tools and prompts are always compared NFKC + case-folded; resource
URIs, argument values, keywords and patterns are case-folded only where the
rule says `case_insensitive: true`.

The keys `match` accepts, and what each compiles to, are the table `MATCHERS`.
`Ruleset.load(path)` validates against the schema below and raises
`RulesetError` whose problems name the file, line and rule. Globs and regular
expressions are compiled once at load; `Ruleset.evaluate()` does no parsing.
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import math
import os
import re
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import normalize
from .approvals import DEFAULT_TIMEOUT, MODES, WAIT, ApprovalSpec
from .audit import parse_duration
from .detectors import (
    BUILTIN,
    BUILTIN_PROFILES,
    STYLES,
    Detector,
    PatternError,
    card_number,
    compile_pattern,
    iban,
    luhn,
    us_ssn,
)
from .identity import ANONYMOUS, Identity
from .message import (
    LISTS,
    TARGETS,
    WITH_ARGUMENTS,
    Message,
    TargetKind,
    classify,
    target_of,
)
from .toolscan import (
    CHECKS,
    DECEPTIVE_NAME,
    DESCRIPTION_LIMIT,
    INSTRUCTIONS,
    INVISIBLE,
    OVERSIZED,
    SHADOWING,
    UNSCANNED,
)
from .vocab import (
    DEFAULT_RULE,
    MALFORMED_RULE,
    NO_RULESET_RULE,
    Action,
    Direction,
    Kind,
)

logger = logging.getLogger("mcp_bastion")

ACTIONS = tuple(a.value for a in (Action.ALLOW, Action.DENY, Action.APPROVE, Action.MASK))
DIRECTIONS = tuple(d.value for d in Direction)
KINDS = tuple(k.value for k in (Kind.REQUEST, Kind.NOTIFICATION, Kind.RESPONSE))  # an error is a response

# What rules match on among the targets of `TARGETS` (not tasks, yet: a tasks/* request is never malformed).
_RULE_TARGETS = frozenset({TargetKind.TOOL, TargetKind.PROMPT, TargetKind.RESOURCE})

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


# --- values -----------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """The outcome for one message: which rule decided, and what it said."""

    action: str
    rule: str
    reason: str
    profile: str | None = None
    approval: ApprovalSpec | None = None  # an approve rule's `approval:` block

    @property
    def blocks(self) -> bool:
        """True when the message must not travel on (deny, or approve without an approval)."""
        return self.action in (Action.DENY, Action.APPROVE)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a ruleset file, located for the person who wrote it."""

    file: str
    line: int | None
    rule: str | None
    message: str
    warning: bool = False

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        what = f"rule '{self.rule}': " if self.rule else ""
        kind = "warning: " if self.warning else ""
        return f"{where}: {kind}{what}{self.message}"


@dataclass(frozen=True)
class MaskingSpec:
    """A ruleset's `masking:` section: its own detectors and profiles (names of detectors and styles)."""

    detectors: dict[str, Detector] = field(default_factory=dict)
    profiles: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)

    def profile_entries(self) -> dict[str, tuple[tuple[str, str], ...]]:
        """Every profile this ruleset can apply: the built-in ones (unless redefined) and its own."""
        out = {name: tuple((d, "redact") for d in dets) for name, dets in BUILTIN_PROFILES.items()}
        out.update(self.profiles)
        return out


FINDING_ACTIONS = ("hide", "refuse", "warn")  # hide: off lists and calls refused; refuse: calls refused; warn


@dataclass(frozen=True)
class PinningSpec:
    """A ruleset's `pinning:` section: what a finding in a tool, prompt or template definition does."""

    findings: dict[str, str] = field(default_factory=lambda: {
        INSTRUCTIONS: "hide", INVISIBLE: "hide", DECEPTIVE_NAME: "hide", SHADOWING: "hide", OVERSIZED: "warn",
        UNSCANNED: "hide"})
    description_limit: int = DESCRIPTION_LIMIT


class RulesetError(ValueError):
    """A ruleset that cannot be used; `problems` lists every error found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# --- what a rule sees of a message -----------------------------------------


class View:
    """One message as rules see it: normalised once, lazily, per evaluation."""

    __slots__ = ("_cache", "_needs", "_uri", "arguments", "direction", "identity", "kind", "message",
                 "method", "prompt", "tool", "upstream")

    def __init__(self, identity: Identity, message: Message, direction: str, upstream: str | None):
        self.identity = identity
        self.direction = str(direction)
        self.upstream = upstream.lower() if upstream else None
        self.message = message
        self.kind = Kind.RESPONSE.value if message.kind in (Kind.RESPONSE, Kind.ERROR) else str(message.kind)
        self.method = normalize.name(message.method) if isinstance(message.method, str) else None
        params = message.params if isinstance(message.params, dict) else None
        self.tool = self.prompt = self._uri = self.arguments = None
        # The target in `TARGETS` vocabulary, looked up by the normalised method (`TOOLS/CALL` is tools/call).
        spec = TARGETS.get(self.method) if self.method is not None else None
        self._needs = spec[1] if spec is not None and spec[0] in _RULE_TARGETS else None
        target = target_of(self.method, params) if self._needs is not None else None
        if target is not None:
            if target.kind is TargetKind.TOOL:
                self.tool = normalize.name(target.name)
            elif target.kind is TargetKind.PROMPT:
                self.prompt = normalize.name(target.name)
            else:
                self._uri = target.name
        if params is not None and self.method in WITH_ARGUMENTS:
            self.arguments = params.get("arguments")
        self._cache: dict[Any, Any] = {}

    def malformed(self) -> str | None:
        """Why a request naming a tool, prompt or resource does not name it readably, if it does not."""
        if self.kind != Kind.REQUEST or self._needs is None:
            return None
        if self.tool is None and self.prompt is None and self._uri is None:
            return f"{self.method} needs params.{self._needs} as a string"
        return None

    def uri(self, fold: bool) -> str | None:
        if self._uri is None:
            return None
        key = ("uri", fold)
        if key not in self._cache:
            self._cache[key] = normalize.uri(self._uri, fold)
        return self._cache[key]

    def strings(self, fold: bool, spaced: bool) -> list[str]:
        """Every string of the message (keys included), normalised."""
        key = ("strings", fold, spaced)
        if key not in self._cache:
            norm = normalize.spaced if spaced else normalize.text
            self._cache[key] = [norm(s, fold) for s in normalize.strings(self.message.raw)]
        return self._cache[key]


# --- conditions ---------------------------------------------------------------


class Condition:
    """One key of a rule's `match`. `content` conditions look at arguments or strings."""

    key: str
    content = False

    def test(self, v: View) -> bool:
        raise NotImplementedError

    def why_not(self, v: View) -> str:
        raise NotImplementedError


def _glob_regex(patterns: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class GlobCondition(Condition):
    """Some value of the message (or its identity) matches one of a list of globs."""

    def __init__(self, key: str, patterns: list[str], values: Callable[[View], Iterable[str | None]],
                 prepare: Callable[[str], str] = lambda s: s):
        self.key = key
        self.patterns = patterns
        self.values = values
        self.regex = _glob_regex(prepare(p) for p in patterns)

    def test(self, v: View) -> bool:
        return any(x is not None and self.regex.match(x) for x in self.values(v))

    def why_not(self, v: View) -> str:
        got = [x for x in self.values(v) if x is not None]
        return f"{self.key}: {', '.join(map(repr, got)) or 'none'} matches none of {self.patterns}"


class ValueCondition(Condition):
    """A property of the message equals one of the allowed values."""

    def __init__(self, key: str, allowed: tuple[Any, ...], value: Callable[[View], Any]):
        self.key = key
        self.allowed = allowed
        self.value = value

    def test(self, v: View) -> bool:
        return self.value(v) in self.allowed

    def why_not(self, v: View) -> str:
        want = self.allowed[0] if len(self.allowed) == 1 else list(self.allowed)
        return f"{self.key}: {self.value(v)!r} is not {want!r}"


class ResourceCondition(Condition):
    """The resource URI a message names matches one of a list of globs."""

    def __init__(self, key: str, patterns: list[str], fold: bool):
        self.key = key
        self.patterns = patterns
        self.fold = fold
        self.regex = _glob_regex(normalize.uri(p, fold) for p in patterns)

    def test(self, v: View) -> bool:
        uri = v.uri(self.fold)
        return uri is not None and bool(self.regex.match(uri))

    def why_not(self, v: View) -> str:
        uri = v.uri(self.fold)
        if uri is None:
            return f"{self.key}: the message names no resource"
        return f"{self.key}: {uri!r} matches none of {self.patterns}"


class KeywordCondition(Condition):
    """A keyword occurs in (or a pattern is found in) any string of the message, keys included."""

    content = True

    def __init__(self, key: str, shown: list[str], regexes: list[re.Pattern[str]], fold: bool):
        self.key = key
        self.shown = shown
        self.regexes = regexes
        self.fold = fold
        self.spaced = key == "keywords"

    def test(self, v: View) -> bool:
        strings = v.strings(self.fold, self.spaced)
        return any(r.search(s) for r in self.regexes for s in strings)

    def why_not(self, v: View) -> str:
        return f"{self.key}: none of {self.shown} occurs in the message"


Path = tuple[str | None, ...]  # None is the wildcard segment `*`


def _resolve(value: Any, path: Path) -> Iterator[Any]:
    """Every value at `path` under `value` (a wildcard segment fans out)."""
    level = [value]
    for seg in path:
        nxt: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                if seg is None:
                    nxt.extend(item.values())
                elif seg in item:
                    nxt.append(item[seg])
            elif isinstance(item, list):
                if seg is None:
                    nxt.extend(item)
                elif seg.isdigit() and int(seg) < len(item):
                    nxt.append(item[int(seg)])
        level = nxt
    return iter(level)


def _number(value: Any) -> float | None:
    """A JSON number, or a string that reads as one (`"100"`, `"１e3"`); never a bool or NaN."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        try:
            num = float(value)
        except OverflowError:  # beyond a float's range: infinitely large, for every comparison
            num = math.inf if value > 0 else -math.inf
    elif isinstance(value, float):
        num = value
    elif isinstance(value, str):
        try:
            num = float(normalize.text(value).strip())
        except (ValueError, OverflowError):
            return None
    else:
        return None
    return None if math.isnan(num) else num


def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    return None


_COMPARE = {
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
}


class ArgumentCondition(Condition):
    """A value at a path of `params.arguments` satisfies every operator given."""

    key = "arguments"
    content = True

    def __init__(self, shown_path: str, path: Path, ops: dict[str, Any], fold: bool):
        self.shown_path = shown_path
        self.path = path
        self.shown_ops = ops
        self.fold = fold
        self.checks: list[Callable[[Any], bool]] = []
        for op, operand in ops.items():
            self.checks.append(self._compile(op, operand))

    def _compile(self, op: str, operand: Any) -> Callable[[Any], bool]:
        fold = self.fold
        operands = operand if isinstance(operand, list) else [operand]
        if op == "equals":
            wanted = [normalize.text(o, fold) if isinstance(o, str) else o for o in operands]
            return lambda value: any(_equal(value, w, fold) for w in wanted)
        if op == "glob":
            # Paths and URLs compare as they resolve (see normalize.pathlike), patterns included.
            regex = _glob_regex(normalize.pathlike(p, fold) for p in operands)

            def glob(value: Any) -> bool:
                text = _as_text(value)
                if text is None:
                    return False
                return bool(regex.match(normalize.pathlike(text, fold)))

            return glob
        if op == "regex":
            regexes = [compile_pattern(p, ignore_case=fold) for p in operands]

            def search(value: Any) -> bool:
                text = _as_text(value)
                if text is None:
                    return False
                text = normalize.text(text, fold)
                return any(r.search(text) for r in regexes)

            return search
        compare, bound = _COMPARE[op], float(operand)

        def numeric(value: Any) -> bool:
            num = _number(value)
            return num is not None and compare(num, bound)

        return numeric

    def test(self, v: View) -> bool:
        if v.arguments is None:
            return False
        return any(all(c(x) for c in self.checks) for x in _resolve(v.arguments, self.path))

    def why_not(self, v: View) -> str:
        if v.arguments is None:
            return "arguments: the message has no arguments"
        found = list(_resolve(v.arguments, self.path))
        if not found:
            return f"arguments: nothing at {self.shown_path}"
        return (f"arguments: {self.shown_path} = {found[0] if len(found) == 1 else found!r} "
                f"does not satisfy {self.shown_ops}")


def _equal(value: Any, wanted: Any, fold: bool) -> bool:
    if isinstance(wanted, str):
        return isinstance(value, str) and normalize.text(value, fold) == wanted
    if isinstance(wanted, bool) or wanted is None:
        return value is wanted
    num = _number(value)
    return num is not None and num == wanted


class _AllOf(Condition):
    """Several `arguments` entries: each must hold."""

    key = "arguments"
    content = True

    def __init__(self, parts: list[ArgumentCondition]):
        self.parts = parts

    def test(self, v: View) -> bool:
        return all(p.test(v) for p in self.parts)

    def why_not(self, v: View) -> str:
        return next(p.why_not(v) for p in self.parts if not p.test(v))


# --- the match keys: one table ------------------------------------------------

_BAD = object()

# (compiler, node, rule, key, fold) -> the key's value, or _BAD once the compiler has said why not.
Reader = Callable[["_Compiler", yaml.Node, str, str, bool], Any]
# (key, value, fold) -> the condition.
Builder = Callable[[str, Any, bool], Condition]


@dataclass(frozen=True)
class Matcher:
    """One key of a rule's `match`: how its YAML value is read and the Condition it becomes.

    `build` is None for a key that only changes how the others compare
    (`case_insensitive`); `target` marks the keys naming what a message acts on.
    """

    read: Reader
    build: Builder | None = None
    target: TargetKind | None = None


def _read_strings(c: _Compiler, node: yaml.Node, rule: str, key: str, fold: bool) -> Any:
    values = c.strings(node, rule, key)
    return _BAD if values is None else values


def _read_flag(c: _Compiler, node: yaml.Node, rule: str, key: str, fold: bool) -> Any:
    return c.scalar(node, rule, key, (bool,))


def _read_choice(allowed: tuple[str, ...]) -> Reader:
    return lambda c, node, rule, key, fold: c.choice(node, rule, key, allowed)


def _read_kinds(c: _Compiler, node: yaml.Node, rule: str, key: str, fold: bool) -> Any:
    values = _read_strings(c, node, rule, key, fold)
    if values is _BAD:
        return _BAD
    bad = [x for x in values if x not in KINDS]
    if bad:
        c.error(node, rule, f"kinds: {bad[0]!r} is not one of {', '.join(KINDS)}")
        return _BAD
    return values


def _read_upstreams(c: _Compiler, node: yaml.Node, rule: str, key: str, fold: bool) -> Any:
    """Upstream names and host:port globs, as host:port globs."""
    values = _read_strings(c, node, rule, key, fold)
    if values is _BAD:
        return _BAD
    patterns = c.upstream_patterns(node, rule, values)
    return _BAD if patterns is None else patterns


def _read_keywords(c: _Compiler, node: yaml.Node, rule: str, key: str, fold: bool) -> Any:
    values = _read_strings(c, node, rule, key, fold)
    if values is _BAD:
        return _BAD
    if any(not normalize.spaced(w, fold).strip() for w in values):
        c.error(node, rule, "keywords: an empty keyword would match everything")
        return _BAD
    return values


def _read_patterns(c: _Compiler, node: yaml.Node, rule: str, key: str, fold: bool) -> Any:
    values = _read_strings(c, node, rule, key, fold)
    if values is _BAD:
        return _BAD
    for p in values:
        try:
            compile_pattern(p, ignore_case=fold)
        except PatternError as e:
            c.error(node, rule, f"patterns: {p!r}: {e}")
            return _BAD
    return values


def _read_arguments(c: _Compiler, node: yaml.Node, rule: str, key: str, fold: bool) -> Any:
    return c.arguments(node, rule) or _BAD  # none left: each was in error


def _glob(values: Callable[[View], Iterable[str | None]], prepare: Callable[[str], str] = lambda s: s) -> Builder:
    """Some value `values` reads off the View matches one of the globs."""
    return lambda key, patterns, fold: GlobCondition(key, patterns, values, prepare)


def _is(value: Callable[[View], Any]) -> Builder:
    """What `value` reads off the View is the one value given."""
    return lambda key, wanted, fold: ValueCondition(key, (wanted,), value)


def _one_of(value: Callable[[View], Any]) -> Builder:
    """What `value` reads off the View is one of the values given."""
    return lambda key, allowed, fold: ValueCondition(key, tuple(allowed), value)


def _resources(key: str, patterns: list[str], fold: bool) -> Condition:
    return ResourceCondition(key, patterns, fold)


def _arguments(key: str, entries: list[tuple[str, Path, dict[str, Any]]], fold: bool) -> Condition:
    conds = [ArgumentCondition(shown, path, ops, fold) for shown, path, ops in entries]
    return conds[0] if len(conds) == 1 else _AllOf(conds)


def _keywords(key: str, values: list[str], fold: bool) -> Condition:
    words = [normalize.spaced(w, fold) for w in values]
    return KeywordCondition(key, values, [re.compile("|".join(re.escape(w) for w in words))], fold)


def _patterns(key: str, values: list[str], fold: bool) -> Condition:
    return KeywordCondition(key, values, [compile_pattern(p, ignore_case=fold) for p in values], fold)


# Every key `match` accepts, in the order its conditions are tested: cheap identity
# checks first, content scans last. A key not in this table is refused.
MATCHERS: dict[str, Matcher] = {
    "groups": Matcher(_read_strings, _glob(lambda v: v.identity.groups)),
    "subjects": Matcher(_read_strings, _glob(lambda v: (v.identity.sub,))),
    "issuers": Matcher(_read_strings, _glob(lambda v: (v.identity.iss,))),
    "authenticated": Matcher(_read_flag, _is(lambda v: v.identity.authenticated)),
    "upstreams": Matcher(_read_upstreams, _glob(lambda v: (v.upstream,))),
    "direction": Matcher(_read_choice(DIRECTIONS), _is(lambda v: v.direction)),
    "kinds": Matcher(_read_kinds, _one_of(lambda v: v.kind)),
    "methods": Matcher(_read_strings, _glob(lambda v: (v.method,), normalize.name)),
    "tools": Matcher(_read_strings, _glob(lambda v: (v.tool,), normalize.name), TargetKind.TOOL),
    "prompts": Matcher(_read_strings, _glob(lambda v: (v.prompt,), normalize.name), TargetKind.PROMPT),
    "resources": Matcher(_read_strings, _resources, TargetKind.RESOURCE),
    "arguments": Matcher(_read_arguments, _arguments),
    "keywords": Matcher(_read_keywords, _keywords),
    "patterns": Matcher(_read_patterns, _patterns),
    "case_insensitive": Matcher(_read_flag),  # no condition of its own: how resources and content compare
}
_FOLD = "case_insensitive"
# The keys whose conditions read only the caller, the upstream, the direction, the kind and the method
# (`Ruleset._plan` tests them once per such combination).
_PER_CALLER = frozenset({"groups", "subjects", "issuers", "authenticated", "upstreams", "direction", "kinds",
                         "methods"})
PLANS = 4096  # combinations of caller, upstream, direction, kind and method a ruleset remembers
PLAN_METHOD_MAX = 128  # longest method name a remembered plan is keyed by


# --- rules and rulesets -------------------------------------------------------


@dataclass
class Rule:
    id: str
    line: int
    action: str
    reason: str
    profile: str | None
    conditions: tuple[Condition, ...]
    description: str = ""
    approval: ApprovalSpec | None = None
    decision: Decision = field(init=False)

    def __post_init__(self) -> None:
        self.decision = Decision(self.action, self.id, self.reason, self.profile, self.approval)

    def matches(self, v: View) -> bool:
        for c in self.conditions:
            if not c.test(v):
                return False
        return True

    def first_failure(self, v: View) -> Condition | None:
        return next((c for c in self.conditions if not c.test(v)), None)


@dataclass
class Step:
    """One line of an explanation: a rule, whether it matched, and why not."""

    rule: str
    line: int | None
    matched: bool
    detail: str


def _probe(kind: TargetKind) -> tuple[str, str]:
    """The call a listed item stands for: the first method of `TARGETS` acting on its kind, and its param."""
    return next((method, param) for method, (k, param) in TARGETS.items() if k is kind)


class Ruleset:
    """A compiled ruleset: an ordered list of rules and a default."""

    def __init__(self, rules: list[Rule], default: str = Action.DENY.value, default_reason: str | None = None,
                 source: str = "<ruleset>", warnings: list[Problem] | None = None,
                 default_rule: str = DEFAULT_RULE, masking: MaskingSpec | None = None,
                 pinning: PinningSpec | None = None):
        self.rules = rules
        self.masking = masking or MaskingSpec()
        self.pinning = pinning or PinningSpec()
        self.default = default
        self.source = source
        self.warnings = warnings or []
        if default_reason is None:
            default_reason = ("no rule allows this message" if default == Action.DENY
                              else "no rule matched; the default is allow")
        self.default_decision = Decision(default, default_rule, default_reason)
        self._plans: dict[tuple, tuple[tuple[Rule, tuple[Condition, ...]], ...]] = {}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Ruleset:
        """Read, validate and compile a ruleset file; RulesetError names file, line and rule."""
        name = os.fspath(path)
        try:
            with open(name, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise RulesetError([Problem(name, None, None, f"cannot read: {e.strerror or e}")]) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise RulesetError([Problem(name, line, None, "not valid UTF-8")]) from None
        return cls.parse(text, name)

    @classmethod
    def parse(cls, text: str, source: str = "<ruleset>") -> Ruleset:
        try:
            return _Compiler(source).compile(text)
        except RulesetError:
            raise
        except (yaml.YAMLError, ValueError, OverflowError, TypeError, RecursionError) as e:
            # A YAML tag or value the loader cannot construct (`!!python/name:`, a date that does not
            # exist, a number out of range): the ruleset is refused, like any other error in it.
            mark = getattr(e, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            raise RulesetError([Problem(source, line, None, f"cannot be read: {type(e).__name__}: "
                                                            f"{getattr(e, 'problem', None) or e}")]) from None

    @classmethod
    def deny_all(cls, reason: str) -> Ruleset:
        """The ruleset in force when none is configured: every message is denied."""
        return cls([], Action.DENY.value, reason, source="(none)", default_rule=NO_RULESET_RULE)

    # --- evaluation ---

    def evaluate(self, identity: Identity | None, message: Message,
                 direction: str = Direction.C2S.value, upstream: str | None = None) -> Decision:
        """The decision for one message: the first matching rule's, or the default.

        A message whose text would cost far more than its size to normalise is
        refused as malformed (`normalize.TooCostly`), never evaluated at that cost.
        """
        try:
            v = View(identity or ANONYMOUS, message, direction, upstream)
            why = v.malformed()
            if why:
                return Decision(Action.DENY.value, MALFORMED_RULE, why)
            for rule, rest in self._plan(v):
                for c in rest:
                    if not c.test(v):
                        break
                else:
                    return rule.decision
        except normalize.TooCostly as e:
            return Decision(Action.DENY.value, MALFORMED_RULE, str(e))
        return self.default_decision

    def _plan(self, v: View) -> tuple[tuple[Rule, tuple[Condition, ...]], ...]:
        """The rules that can still match a message with `v`'s caller, upstream, direction, kind and method,
        in order, each with the conditions left to test on the message itself.

        Who asks, where, and with which method decide most conditions; those are tested once per
        such combination (remembered, at most PLANS of them) rather than once per message.
        """
        key = (v.identity, v.upstream, v.direction, v.kind, v.method)
        plan = self._plans.get(key)
        if plan is None:
            plan = tuple((rule, tuple(c for c in rule.conditions if c.key not in _PER_CALLER))
                         for rule in self.rules
                         if all(c.test(v) for c in rule.conditions if c.key in _PER_CALLER))
            # A method name is the client's to choose: a long one is planned but not remembered, so the
            # plans never hold more than PLANS short keys however a client spells its methods.
            if v.method is None or len(v.method) <= PLAN_METHOD_MAX:
                if len(self._plans) >= PLANS:
                    self._plans.clear()
                self._plans[key] = plan
        return plan

    def explain(self, identity: Identity | None, message: Message,
                direction: str = Direction.C2S.value, upstream: str | None = None) -> tuple[list[Step], Decision]:
        """`evaluate()`, showing each rule tried until one matched and why the others did not."""
        try:
            return self._explain(identity, message, direction, upstream)
        except normalize.TooCostly as e:
            return [Step(MALFORMED_RULE, None, True, str(e))], Decision(Action.DENY.value, MALFORMED_RULE, str(e))

    def _explain(self, identity: Identity | None, message: Message,
                 direction: str, upstream: str | None) -> tuple[list[Step], Decision]:
        v = View(identity or ANONYMOUS, message, direction, upstream)
        why = v.malformed()
        if why:
            return [Step(MALFORMED_RULE, None, True, why)], Decision(Action.DENY.value, MALFORMED_RULE, why)
        steps = []
        for rule in self.rules:
            failed = rule.first_failure(v)
            if failed is None:
                steps.append(Step(rule.id, rule.line, True, "every condition holds"))
                return steps, rule.decision
            steps.append(Step(rule.id, rule.line, False, failed.why_not(v)))
        steps.append(Step(self.default_decision.rule, None, True, f"no rule matched: default {self.default}"))
        return steps, self.default_decision

    def visible(self, identity: Identity | None, upstream: str | None, item: str, name: str,
                masking_profiles: Collection[str] | None = None) -> bool:
        """Whether a listed tool/prompt/resource/template is shown: could some call to it be let through?

        `item` is a target kind (`tool`, `prompt`, `resource`) or `template` (a resource template).
        With `masking_profiles` (the profiles the gateway can apply), a `mask`
        rule whose profile is not among them counts as a denial, as it does at call time.

        Conditions on arguments, keywords or patterns (and, for a template, on
        the resource URI) are unknown at listing time: an allowing rule with
        such conditions shows the item; a denying one hides it only if its
        keywords/patterns already match the bare call (they then match every call).
        """
        template = item == "template"
        method, param = _probe(TargetKind.RESOURCE if template else TargetKind(item))
        msg = classify({"jsonrpc": "2.0", "id": 0, "method": method, "params": {param: name}})
        try:
            return self._visible(identity, upstream, msg, template, masking_profiles)
        except normalize.TooCostly:
            return False  # a name that cannot be checked at the cost of its size is not shown

    def _visible(self, identity: Identity | None, upstream: str | None, msg: Message, template: bool,
                 masking_profiles: Collection[str] | None) -> bool:
        v = View(identity or ANONYMOUS, msg, Direction.C2S, upstream)
        if v.malformed():
            return False
        for rule in self.rules:
            unknown: list[Condition] = []
            applies = True
            for c in rule.conditions:
                if c.content or (template and isinstance(c, ResourceCondition)):
                    unknown.append(c)
                elif not c.test(v):
                    applies = False
                    break
            if not applies:
                continue
            refuses = rule.action == Action.DENY or (
                rule.action == Action.MASK and masking_profiles is not None and rule.profile not in masking_profiles)
            if not unknown or not refuses:
                return not refuses
            if not template and all(isinstance(c, KeywordCondition) and c.test(v) for c in unknown):
                return False
        return self.default != Action.DENY

    def filter_list(self, identity: Identity | None, upstream: str | None, method: str | None,
                    result: Any, masking_profiles: Collection[str] | None = None) -> tuple[Any, list[str]]:
        """Remove from a list result what the identity may not use; returns (result, hidden names).

        `method` is the request's method; when unknown (None) the result's shape decides.
        Items without a readable name are hidden.
        """
        if not isinstance(result, dict):
            return result, []
        if method is None:
            listings = [lst for lst in LISTS.values() if isinstance(result.get(lst.key), list)]
        else:
            listings = [LISTS[method]] if method in LISTS else []
        hidden: list[str] = []
        out = result
        clashes = {name for _, name in name_clashes(result, method)}
        for listing in listings:
            items = result.get(listing.key)
            if not isinstance(items, list):
                continue
            item = "template" if listing.template else listing.kind
            kept = []
            for entry in items:
                target = entry.get(listing.field) if isinstance(entry, dict) else None
                if (isinstance(target, str) and not (clashes and listing.kind in _NAMED and _folded(target) in clashes)
                        and self.visible(identity, upstream, item, target, masking_profiles)):
                    kept.append(entry)
                else:
                    hidden.append(target if isinstance(target, str) else "<unnamed>")
            if len(kept) != len(items):
                out = dict(out)
                out[listing.key] = kept
        return out, hidden


_NAMED = (TargetKind.TOOL, TargetKind.PROMPT)  # compared by `normalize.name`: case and Unicode forms folded


def _folded(name: str) -> str | None:
    try:
        return normalize.name(name)
    except normalize.TooCostly:
        return None


def name_clashes(result: Any, method: str | None = None) -> set[tuple[TargetKind, str]]:
    """Tools or prompts of one list result whose names differ but read the same to rules.

    Rules compare tool and prompt names case-folded and in Unicode normal
    form, so `read_file` and `Read_File` (or a full-width spelling) are one
    name to a rule: a rule allowing one would allow both. Returns the
    (kind, folded name) of every such clash; the gateway hides those items and
    refuses calls to them, since no rule can say which one it means.
    """
    if not isinstance(result, dict):
        return set()
    listings = [LISTS[method]] if method in LISTS else [lst for lst in LISTS.values() if method is None]
    out: set[tuple[TargetKind, str]] = set()
    for listing in listings:
        items = result.get(listing.key)
        if listing.kind not in _NAMED or listing.template or not isinstance(items, list):
            continue
        spellings: dict[str, set[str]] = {}
        for entry in items:
            name = entry.get(listing.field) if isinstance(entry, dict) else None
            if isinstance(name, str):
                spellings.setdefault(_folded(name) or name, set()).add(name)
        out.update((listing.kind, folded) for folded, names in spellings.items() if len(names) > 1)
    return out


# --- loading: YAML nodes -> compiled rules ---------------------------------------

_TOP_KEYS = ("version", "description", "default", "default_reason", "upstreams", "masking", "pinning", "rules")
_PINNING_KEYS = ("findings", "description_limit")
_MASKING_KEYS = ("detectors", "profiles")
_DETECTOR_KEYS = ("pattern", "validate", "keep", "case_insensitive", "description")
_PROFILE_KEYS = ("detectors", "style", "description")
_VALIDATORS = {"luhn": luhn, "card": card_number, "iban": iban, "us_ssn": us_ssn}
_RULE_KEYS = ("id", "description", "match", "action", "reason", "profile", "approval")
_APPROVAL_KEYS = ("approvers", "timeout", "mode", "grant")
_ARG_KEYS = ("path", "equals", "glob", "regex", "lt", "le", "gt", "ge")
_DEFAULT_REASONS = {Action.DENY: "denied by policy", Action.APPROVE: "needs a person's approval"}
_TYPE_NAMES = {str: "a string", int: "a number", float: "a number", bool: "true or false", type(None): "null"}


class _Compiler:
    """Walks the YAML node tree (which knows line numbers), validating and compiling."""

    def __init__(self, source: str):
        self.source = source
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.scalars = yaml.constructor.SafeConstructor()
        self.upstream_names: dict[str, list[str]] = {}
        self.text: str | None = None  # the source, to see what YAML comments cut
        self.detectors: dict[str, Detector] = {}  # masking.detectors
        self.profiles: dict[str, tuple[tuple[str, str], ...]] = {}  # masking.profiles: (detector, style)

    def error(self, node: yaml.Node | None, rule: str | None, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else None
        self.problems.append(Problem(self.source, line, rule, message))

    def warn(self, node: yaml.Node, rule: str | None, message: str) -> None:
        self.warnings.append(Problem(self.source, node.start_mark.line + 1, rule, message, warning=True))

    # --- generic shapes ---

    def mapping(self, node: yaml.Node, rule: str | None, what: str,
                keys: tuple[str, ...]) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        if not isinstance(node, yaml.MappingNode):
            self.error(node, rule, f"{what} must be a mapping")
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for k, v in node.value:
            key = self.scalars.construct_object(k) if isinstance(k, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.error(k, rule, f"{what}: keys must be strings")
                continue
            if key in out:
                self.error(k, rule, f"{what}: duplicate key {key!r} (first at line {out[key][0].start_mark.line + 1})")
                continue
            if key not in keys:
                near = difflib.get_close_matches(key, keys, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else f" (known: {', '.join(keys)})"
                self.error(k, rule, f"{what}: unknown key {key!r}{hint}")
                continue
            out[key] = (k, v)
        return out

    def scalar(self, node: yaml.Node, rule: str | None, what: str, types: tuple[type, ...]) -> Any:
        if isinstance(node, yaml.ScalarNode):
            value = self.scalars.construct_object(node)
            if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
                return value
        names = " or ".join(dict.fromkeys(_TYPE_NAMES[t] for t in types))
        self.error(node, rule, f"{what} must be {names}")
        return _BAD

    def strings(self, node: yaml.Node, rule: str | None, what: str) -> list[str] | None:
        """A string or a non-empty list of strings."""
        if isinstance(node, yaml.SequenceNode):
            if not node.value:
                self.error(node, rule, f"{what}: an empty list matches nothing; remove the key instead")
                return None
            values = [self.scalar(n, rule, f"{what} entries", (str,)) for n in node.value]
            return None if _BAD in values else values
        value = self.scalar(node, rule, what, (str,))
        return None if value is _BAD else [value]

    def choice(self, node: yaml.Node, rule: str | None, what: str, allowed: tuple[str, ...]) -> Any:
        value = self.scalar(node, rule, what, (str,))
        if value is not _BAD and value not in allowed:
            self.error(node, rule, f"{what} must be one of {', '.join(allowed)} (got {value!r})")
            return _BAD
        return value

    # --- the document ---

    def prose(self, node: yaml.Node, rule: str | None, what: str) -> Any:
        """A free-text value (reason, description): a string, and one that a `#` did not cut short.

        In YAML, ` #` after an unquoted value starts a comment, so `reason: ask #platform`
        reads as "ask": say so (a warning), so the text the client sees is the one meant.
        """
        value = self.scalar(node, rule, what, (str,))
        if isinstance(node, yaml.ScalarNode) and node.style is None and self.text is not None:
            end = node.end_mark.index
            line_end = self.text.find("\n", end)
            rest = self.text[end: len(self.text) if line_end < 0 else line_end]
            if re.match(r"[ \t]+#", rest):
                self.warn(node, rule, f"{what}: the text after ' #' is a YAML comment, so {what} is only "
                          f"{value!r}; quote the value to keep all of it")
        return value

    def compile(self, text: str) -> Ruleset:
        self.text = text
        try:
            docs = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark else None
            raise RulesetError([Problem(self.source, line, None, f"YAML: {e.problem or e.context}")]) from None
        except yaml.YAMLError as e:
            raise RulesetError([Problem(self.source, None, None, f"YAML: {e}")]) from None
        if len(docs) != 1 or docs[0] is None:
            raise RulesetError([Problem(self.source, None, None, "expected exactly one YAML document")])
        root = docs[0]
        top = self.mapping(root, None, "ruleset", _TOP_KEYS)
        if top is None:
            raise RulesetError(self.problems)
        if "version" not in top:
            self.error(root, None, "missing 'version: 1'")
        elif self.scalar(top["version"][1], None, "version", (int,)) not in (1, _BAD):
            self.error(top["version"][1], None, "version must be 1")
        default = Action.DENY.value
        if "default" in top:
            default = self.choice(top["default"][1], None, "default", (Action.DENY.value, Action.ALLOW.value))
        default_reason = None
        if "default_reason" in top:
            default_reason = self.prose(top["default_reason"][1], None, "default_reason")
        if "description" in top:
            self.scalar(top["description"][1], None, "description", (str,))
        if "upstreams" in top:
            self.read_upstreams(top["upstreams"][1])
        if "masking" in top:
            self.read_masking(top["masking"][1])
        pinning = PinningSpec()
        if "pinning" in top:
            pinning = self.read_pinning(top["pinning"][1])
        rules: list[Rule] = []
        if "rules" not in top:
            self.error(root, None, "missing 'rules' (a list; it may be empty)")
        elif not isinstance(top["rules"][1], yaml.SequenceNode):
            self.error(top["rules"][1], None, "rules must be a list")
        else:
            seen: dict[str, int] = {}
            for i, node in enumerate(top["rules"][1].value):
                rule = self.rule(node, i, seen)
                if rule is not None:
                    rules.append(rule)
        if self.problems:
            raise RulesetError(sorted(self.problems, key=lambda p: p.line or 0))
        self.check_shadowing(rules)
        return Ruleset(rules, default, default_reason, self.source, self.warnings,
                       masking=MaskingSpec(self.detectors, self.profiles), pinning=pinning)

    def read_pinning(self, node: yaml.Node) -> PinningSpec:
        """`pinning:` what each kind of finding in a tool definition does (hide, refuse, warn)."""
        keys = self.mapping(node, None, "pinning", _PINNING_KEYS)
        spec = PinningSpec()
        if keys is None:
            return spec
        findings = dict(spec.findings)
        if "findings" in keys:
            fnode = keys["findings"][1]
            if not isinstance(fnode, yaml.MappingNode):
                self.error(fnode, None, f"pinning.findings must be a mapping of check: action ({', '.join(CHECKS)})")
            else:
                for k, v in fnode.value:
                    check = self.scalar(k, None, "pinning.findings keys", (str,))
                    if check is _BAD:
                        continue
                    if check not in CHECKS:
                        self.error(k, None, f"pinning.findings: unknown check {check!r} (known: {', '.join(CHECKS)})")
                        continue
                    action = self.choice(v, None, f"pinning.findings.{check}", FINDING_ACTIONS)
                    if action is not _BAD:
                        findings[check] = action
        limit = spec.description_limit
        if "description_limit" in keys:
            value = self.scalar(keys["description_limit"][1], None, "pinning.description_limit", (int,))
            if value is not _BAD:
                if value < 100:
                    self.error(keys["description_limit"][1], None, "pinning.description_limit must be at least 100")
                else:
                    limit = value
        return PinningSpec(findings, limit)

    def read_masking(self, node: yaml.Node) -> None:
        """`masking:` custom detectors (RE2 patterns) and profiles (which detectors, which style)."""
        keys = self.mapping(node, None, "masking", _MASKING_KEYS)
        if keys is None:
            return
        if "detectors" in keys:
            dnode = keys["detectors"][1]
            if not isinstance(dnode, yaml.MappingNode):
                self.error(dnode, None, "masking.detectors must be a mapping of name: {pattern: ...}")
            else:
                for k, v in dnode.value:
                    self.read_detector(k, v)
        if "profiles" in keys:
            pnode = keys["profiles"][1]
            if not isinstance(pnode, yaml.MappingNode):
                self.error(pnode, None, "masking.profiles must be a mapping of name: {detectors: [...]}")
            else:
                for k, v in pnode.value:
                    self.read_profile(k, v)

    def read_detector(self, knode: yaml.Node, node: yaml.Node) -> None:
        name = self.scalar(knode, None, "detector names", (str,))
        if name is _BAD:
            return
        where = f"masking.detectors.{name}"
        if not _NAME_RE.match(name):
            self.error(knode, None, f"{where}: a name is letters, digits, '.', '_' or '-'")
            return
        keys = self.mapping(node, None, where, _DETECTOR_KEYS)
        if keys is None:
            return
        if "pattern" not in keys:
            self.error(node, None, f"{where}: missing 'pattern'")
            return
        pattern = self.scalar(keys["pattern"][1], None, f"{where}.pattern", (str,))
        fold = False
        if "case_insensitive" in keys:
            fold = self.scalar(keys["case_insensitive"][1], None, f"{where}.case_insensitive", (bool,)) is True
        validate = None
        if "validate" in keys:
            which = self.choice(keys["validate"][1], None, f"{where}.validate", tuple(_VALIDATORS))
            validate = _VALIDATORS.get(which) if which is not _BAD else None
        keep = 4
        if "keep" in keys:
            keep = self.scalar(keys["keep"][1], None, f"{where}.keep", (int,))
            if keep is not _BAD and not 0 <= keep <= 16:
                self.error(keys["keep"][1], None, f"{where}.keep must be 0 to 16")
        description = ""
        if "description" in keys:
            description = self.prose(keys["description"][1], None, f"{where}.description")
        if pattern is _BAD or keep is _BAD:
            return
        try:
            compile_pattern(pattern, ignore_case=fold)
        except PatternError as e:
            self.error(keys["pattern"][1], None, f"{where}.pattern {pattern!r}: {e}")
            return
        if not pattern.strip():
            self.error(keys["pattern"][1], None, f"{where}.pattern is empty")
            return
        if name in self.detectors:
            self.error(knode, None, f"{where}: defined twice")
            return
        self.detectors[name] = Detector(name, pattern, validate, keep, fold, description or "")

    def read_profile(self, knode: yaml.Node, node: yaml.Node) -> None:
        name = self.scalar(knode, None, "profile names", (str,))
        if name is _BAD:
            return
        where = f"masking.profiles.{name}"
        if not _NAME_RE.match(name):
            self.error(knode, None, f"{where}: a name is letters, digits, '.', '_' or '-'")
            return
        keys = self.mapping(node, None, where, _PROFILE_KEYS)
        if keys is None:
            return
        style = "redact"
        if "style" in keys:
            style = self.choice(keys["style"][1], None, f"{where}.style", STYLES)
        if "description" in keys:
            self.prose(keys["description"][1], None, f"{where}.description")
        if "detectors" not in keys or not isinstance(keys["detectors"][1], yaml.SequenceNode) \
                or not keys["detectors"][1].value:
            self.error(node, None, f"{where}: 'detectors' must be a non-empty list (names, or name: style)")
            return
        entries: list[tuple[str, str]] = []
        for item in keys["detectors"][1].value:
            if isinstance(item, yaml.MappingNode) and len(item.value) == 1:
                det = self.scalar(item.value[0][0], None, f"{where}.detectors", (str,))
                det_style = self.choice(item.value[0][1], None, f"{where}.detectors.{det}", STYLES)
            else:
                det = self.scalar(item, None, f"{where}.detectors entries", (str,))
                det_style = style
            if det is _BAD or det_style is _BAD:
                continue
            if det in BUILTIN_PROFILES:  # a profile's detectors, e.g. [pii, employee_id]
                entries.extend((d, det_style) for d in BUILTIN_PROFILES[det])
            elif det not in self.detectors and det not in BUILTIN:
                known = sorted(set(BUILTIN) | set(self.detectors))
                self.error(item, None, f"{where}: unknown detector {det!r} (known: {', '.join(known)})")
            else:
                entries.append((det, det_style))
        if style is _BAD:
            return
        if name in self.profiles:
            self.error(knode, None, f"{where}: defined twice")
            return
        self.profiles[name] = tuple(dict((d, (d, st)) for d, st in entries).values())

    def read_upstreams(self, node: yaml.Node) -> None:
        if not isinstance(node, yaml.MappingNode):
            self.error(node, None, "upstreams must be a mapping of name: \"host:port\"")
            return
        for k, v in node.value:
            name = self.scalar(k, None, "upstream names", (str,))
            if name is _BAD:
                continue
            if not _NAME_RE.match(name):
                self.error(k, None, f"upstream name {name!r} must be letters, digits, '.', '_' or '-'")
                continue
            if name in self.upstream_names:
                self.error(k, None, f"upstreams: duplicate name {name!r}")
                continue
            targets = self.strings(v, None, f"upstreams.{name}")
            if targets is not None:
                for t in targets:
                    if ":" not in t:
                        self.error(v, None,
                                   f"upstreams.{name}: {t!r} must be host:port (globs allowed, e.g. \"127.0.0.1:*\")")
                self.upstream_names[name] = [t.lower() for t in targets]

    def rule(self, node: yaml.Node, index: int, seen: dict[str, int]) -> Rule | None:
        label = f"#{index + 1}"
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == "id" and isinstance(v, yaml.ScalarNode) and v.value:
                    label = v.value
        keys = self.mapping(node, label, "rule", _RULE_KEYS)
        if keys is None:
            return None
        before = len(self.problems)
        rule_id = None
        if "id" not in keys:
            self.error(node, label, "missing 'id'")
        else:
            rule_id = self.scalar(keys["id"][1], label, "id", (str,))
            if rule_id is not _BAD:
                if not _ID_RE.match(rule_id):
                    self.error(keys["id"][1], label,
                               "id must start with a letter or digit and use only letters, digits, '.', '_' or '-'")
                elif rule_id in seen:
                    self.error(keys["id"][1], label, f"duplicate id (first used at line {seen[rule_id]})")
                else:
                    seen[rule_id] = keys["id"][1].start_mark.line + 1
        action = None
        if "action" not in keys:
            self.error(node, label, f"missing 'action' (one of {', '.join(ACTIONS)})")
        else:
            action = self.choice(keys["action"][1], label, "action", ACTIONS)
        profile = None
        if "profile" in keys:
            profile = self.scalar(keys["profile"][1], label, "profile", (str,))
            if action not in (Action.MASK, _BAD, None):
                self.error(keys["profile"][0], label, "profile is only for action: mask")
            elif profile is not _BAD and profile not in self.profiles and profile not in BUILTIN_PROFILES:
                known = ", ".join(sorted(set(BUILTIN_PROFILES) | set(self.profiles)))
                self.error(keys["profile"][1], label,
                           f"masking profile {profile!r} is defined nowhere (known: {known}); define it under "
                           "masking.profiles")
        elif action == Action.MASK:
            self.error(node, label, "action mask needs a 'profile' (the masking profile to apply)")
        approval = None
        if "approval" in keys:
            if action not in (Action.APPROVE, _BAD, None):
                self.error(keys["approval"][0], label, "approval is only for action: approve")
            else:
                approval = self.read_approval(keys["approval"][1], label)
        reason = None
        if "reason" in keys:
            reason = self.prose(keys["reason"][1], label, "reason")
        description = ""
        if "description" in keys:
            description = self.prose(keys["description"][1], label, "description")
        conditions: tuple[Condition, ...] = ()
        if "match" in keys:
            conditions = self.match(keys["match"][1], label)
        if len(self.problems) > before:
            return None
        return Rule(
            id=rule_id,
            line=node.start_mark.line + 1,
            action=action,
            reason=reason or _DEFAULT_REASONS.get(action, ""),
            profile=profile,
            conditions=conditions,
            description=description,
            approval=approval,
        )

    def read_approval(self, node: yaml.Node, rule: str) -> ApprovalSpec | None:
        keys = self.mapping(node, rule, "approval", _APPROVAL_KEYS)
        if keys is None:
            return None
        if "approvers" not in keys:
            self.error(node, rule, "approval: missing 'approvers' (the groups whose members may decide)")
            return None
        approvers = self.strings(keys["approvers"][1], rule, "approval.approvers")
        durations: dict[str, float | None] = {"timeout": DEFAULT_TIMEOUT, "grant": None}
        for name in durations:
            if name in keys:
                text = self.scalar(keys[name][1], rule, f"approval.{name}", (str, int))
                if text is _BAD:
                    continue
                try:
                    seconds = parse_duration(str(text)) if isinstance(text, str) else float(text)
                except ValueError as e:
                    self.error(keys[name][1], rule, f"approval.{name}: {e}")
                    continue
                if not 0 < seconds <= 7 * 86400:
                    self.error(keys[name][1], rule, f"approval.{name} must be more than 0 and at most 7d")
                    continue
                durations[name] = seconds
        mode = WAIT
        if "mode" in keys:
            mode = self.choice(keys["mode"][1], rule, "approval.mode", MODES)
        if approvers is None or mode is _BAD:
            return None
        return ApprovalSpec(tuple(approvers), float(durations["timeout"] or DEFAULT_TIMEOUT), mode,
                            durations["grant"])

    def match(self, node: yaml.Node, rule: str) -> tuple[Condition, ...]:
        keys = self.mapping(node, rule, "match", tuple(MATCHERS))
        if keys is None:
            return ()
        fold = False
        if _FOLD in keys:
            fold = MATCHERS[_FOLD].read(self, keys[_FOLD][1], rule, _FOLD, False) is True
        out: list[Condition] = []
        for key, matcher in MATCHERS.items():  # the table's order: cheap identity checks first
            if key not in keys or matcher.build is None:
                continue
            value = matcher.read(self, keys[key][1], rule, key, fold)
            if value is not _BAD:
                out.append(matcher.build(key, value, fold))
        named = [k for k, matcher in MATCHERS.items() if matcher.target is not None and k in keys]
        if len(named) > 1:
            self.warn(node, rule, f"{' and '.join(named)} together never match (a message names one target)")
        return tuple(out)

    def upstream_patterns(self, node: yaml.Node, rule: str, values: list[str]) -> list[str] | None:
        out: list[str] = []
        for value in values:
            if value in self.upstream_names:
                out.extend(self.upstream_names[value])
            elif ":" in value:
                out.append(value.lower())
            else:
                known = ", ".join(self.upstream_names) or "none defined"
                self.error(node, rule,
                           f"upstreams: {value!r} is neither a name from 'upstreams' ({known}) nor host:port")
                return None
        return out

    def arguments(self, node: yaml.Node, rule: str) -> list[tuple[str, Path, dict[str, Any]]]:
        """The `arguments` entries as (shown path, path, operators); those in error are left out."""
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            self.error(node, rule, "arguments must be a non-empty list of {path: ..., <operator>: ...}")
            return []
        entries: list[tuple[str, Path, dict[str, Any]]] = []
        for entry in node.value:
            keys = self.mapping(entry, rule, "arguments entry", _ARG_KEYS)
            if keys is None:
                continue
            if "path" not in keys:
                self.error(entry, rule, "arguments entry: missing 'path'")
                continue
            path = self.arg_path(keys["path"][1], rule)
            ops: dict[str, Any] = {}
            for op in _ARG_KEYS[1:]:
                if op not in keys:
                    continue
                value = self.operand(op, keys[op][1], rule)
                if value is not _BAD:
                    ops[op] = value
            if not any(op in keys for op in _ARG_KEYS[1:]):
                self.error(entry, rule, f"arguments entry: needs one of {', '.join(_ARG_KEYS[1:])}")
                continue
            if path is not None and len(ops) == len([op for op in _ARG_KEYS[1:] if op in keys]):
                shown = ".".join("*" if s is None else s for s in path)
                entries.append((shown, path, ops))
        return entries

    def arg_path(self, node: yaml.Node, rule: str) -> Path | None:
        if isinstance(node, yaml.SequenceNode):
            parts = [self.scalar(n, rule, "path segments", (str, int)) for n in node.value]
            if _BAD in parts or not parts:
                if not parts:
                    self.error(node, rule, "path must not be empty")
                return None
            return tuple(None if p == "*" else str(p) for p in parts)
        text = self.scalar(node, rule, "path", (str,))
        if text is _BAD:
            return None
        if not text or any(not seg for seg in text.split(".")):
            self.error(node, rule, f"path {text!r}: empty segment (write a.b.c; use a list for keys containing dots)")
            return None
        return tuple(None if seg == "*" else seg for seg in text.split("."))

    def operand(self, op: str, node: yaml.Node, rule: str) -> Any:
        if op in _COMPARE:
            return self.scalar(node, rule, op, (int, float))
        if op == "equals":
            nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
            values = [self.scalar(n, rule, "equals", (str, int, float, bool, type(None))) for n in nodes]
            return _BAD if _BAD in values else (values if isinstance(node, yaml.SequenceNode) else values[0])
        values = self.strings(node, rule, op)
        if values is None:
            return _BAD
        if op == "regex":
            for p in values:
                try:
                    compile_pattern(p)
                except PatternError as e:
                    self.error(node, rule, f"regex {p!r}: {e}")
                    return _BAD
        return values

    def check_shadowing(self, rules: list[Rule]) -> None:
        """Warn about rules that can never decide because an unconditional rule comes first."""
        for i, rule in enumerate(rules):
            if not rule.conditions and i + 1 < len(rules):
                for later in rules[i + 1:]:
                    self.warnings.append(Problem(
                        self.source, later.line, later.id,
                        f"never reached: rule '{rule.id}' (line {rule.line}) matches every message",
                        warning=True))
                return


# --- hot reload -------------------------------------------------------------


class ReloadingRuleset:
    """A ruleset file that is re-read when it changes, at most once per `interval` seconds.

    A changed file is loaded and validated in full before it replaces the
    current ruleset (a single reference swap); a file that fails validation is
    logged once and the previous ruleset stays in force.
    """

    def __init__(self, path: str, interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.interval = interval
        self.clock = clock
        self._stamp = self._stat()
        self.ruleset = Ruleset.load(path)
        self._checked = clock()
        self._refused: tuple | None = None

    def _stat(self) -> tuple:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def current(self) -> Ruleset:
        """The ruleset in force, reloading first if the file changed since the last look."""
        now = self.clock()
        if now - self._checked >= self.interval:
            self._checked = now
            self.check()
        return self.ruleset

    def check(self) -> bool:
        """Reload now if the file changed; True if a new ruleset took effect."""
        try:
            stamp = self._stat()
        except OSError as e:
            if self._refused != ("missing",):
                self._refused = ("missing",)
                logger.error("mcp-bastion: ruleset %s cannot be read (%s); the previous ruleset stays in force",
                             self.path, e.strerror or e)
            return False
        if stamp == self._stamp or stamp == self._refused:
            return False
        try:
            new = Ruleset.load(self.path)
        except RulesetError as e:
            self._refused = stamp
            logger.error("mcp-bastion: ruleset edit refused, the previous ruleset stays in force:\n%s", e)
            return False
        self.ruleset, self._stamp, self._refused = new, stamp, None
        logger.info("mcp-bastion: ruleset %s reloaded (%d rules, default %s)", self.path, len(new.rules), new.default)
        for w in new.warnings:
            logger.warning("mcp-bastion: %s", w)
        return True
