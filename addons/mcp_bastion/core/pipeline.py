"""
The stage contract and the pipeline that runs it.

A stage looks at one `Message` with its `Context` and returns an `Outcome`:

    Pass()                 the message goes on unchanged
    Replace(message)       the message goes on as `message` (a new value)
    Drop(reason)           the message goes no further (a server notification nobody must see)
    Refuse(refusal)        the message is refused: the gateway answers for it (see `glue.replies`)
    Hold(wait, reason)     the message waits: `await wait` gives the outcome (other flows go on)

Each outcome may carry `decisions`: what the stage decided and why (rule, reason),
recorded on the flow for mitmweb and the audit log.

Stages never change a message in place. The pipeline hands each stage the
current message (after every earlier replacement), stops at the first drop or
refusal, and says whether anything changed, so the caller serialises once.

Precedence within one message: the first stage that drops or refuses ends the
run; a Hold is awaited and its outcome taken as the stage's own. Across the
messages of one body, `Run.refused` lists every refusal; the caller decides what
that means for the body (a request batch is forwarded whole or not at all).

Pure: no mitmproxy import.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .errors import APPROVAL_REQUIRED, DENIED, INVALID_REQUEST, Refusal
from .message import Message, embedded, with_embedded
from .timing import STAGES, now
from .vocab import Action, Direction, Kind, StageName


@dataclass(frozen=True, slots=True)
class Verdict:
    """One decision a stage made about one message, as recorded on the flow."""

    stage: StageName | str
    action: Action | str
    rule: str | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self, m: Message) -> dict[str, Any]:
        """The flow-metadata form: plain JSON-like values."""
        out: dict[str, Any] = {"stage": str(self.stage), "direction": str(m.direction) if m.direction else None,
                               "kind": str(m.kind), "id": m.id, "method": m.method,
                               "target": m.target.name if m.target is not None else None,
                               "action": str(self.action), "rule": self.rule, "reason": self.reason,
                               "ref": m.ref}
        out.update(self.extra)
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True, slots=True)
class Pass:
    decisions: tuple[Verdict, ...] = ()


@dataclass(frozen=True, slots=True)
class Replace:
    message: Message
    decisions: tuple[Verdict, ...] = ()


@dataclass(frozen=True, slots=True)
class Drop:
    reason: str
    decisions: tuple[Verdict, ...] = ()


@dataclass(frozen=True, slots=True)
class Refuse:
    refusal: Refusal
    decisions: tuple[Verdict, ...] = ()
    action: Action = Action.DENY  # what a batch member refused along with this one is recorded as


@dataclass(frozen=True, slots=True)
class Hold:
    wait: Callable[[], Awaitable[Outcome]]
    reason: str
    decisions: tuple[Verdict, ...] = ()


Outcome = Pass | Replace | Drop | Refuse | Hold


@dataclass(frozen=True, slots=True)
class Context:
    """What a stage knows besides the message: who asks, through which upstream, on which flow."""

    identity: Any  # core.identity.Identity
    upstream: str | None = None
    session: str | None = None
    flow_id: str | None = None
    http_method: str = "POST"
    protocol_version: str | None = None  # the MCP-Protocol-Version request header
    masking_profiles: frozenset[str] = frozenset()  # what the loaded masking stages can apply
    mask_profiles: tuple[str, ...] = ()  # profiles rules chose for this flow's requests: their answers are masked
    approvals: bool = False  # an approval stage is loaded: an approve rule with approvers holds, not refuses


@runtime_checkable
class Stage(Protocol):
    """A message stage. `name` is its request-side StageName; the response side is `name.response`."""

    name: StageName

    def check(self, message: Message, cx: Context) -> Outcome: ...


@dataclass(slots=True)
class Result:
    """One message after the stages: what goes on (None if dropped or refused) and what happened."""

    original: Message
    message: Message | None
    outcome: Outcome  # the last one: Pass, Replace, Drop or Refuse
    decisions: list[Verdict] = field(default_factory=list)
    inner: list[Result] = field(default_factory=list)  # the messages it carries (see message.embedded)

    @property
    def changed(self) -> bool:
        """The content changed (a message only linked to something, e.g. `placed(request=...)`, is not)."""
        return self.message is None or self.message.raw is not self.original.raw

    @property
    def refusal(self) -> Refusal | None:
        return self.outcome.refusal if isinstance(self.outcome, Refuse) else None


@dataclass(slots=True)
class Run:
    """The stages over the messages of one body or one event."""

    results: list[Result]

    @property
    def changed(self) -> bool:
        return any(r.changed for r in self.results)

    @property
    def messages(self) -> list[Message]:
        """What goes on, in order."""
        return [r.message for r in self.results if r.message is not None]

    @property
    def refused(self) -> list[Result]:
        return [r for r in self.results if isinstance(r.outcome, Refuse)]


class StageError(Exception):
    """A stage failed (raised, or its hold did): `stage` names it, so the refusal says which."""

    def __init__(self, stage: StageName | str, message: str):
        super().__init__(message)
        self.stage = str(stage)


class ContractError(StageError, TypeError):
    """A stage broke the contract: it returned no Outcome, or a Replace that changes what the message is."""


def _named(stage: Stage, m: Message) -> str:
    """The stage's name on the side `m` travels (`policy` / `resp:policy`)."""
    name = stage.name
    return str(name.response if m.direction == Direction.S2C and hasattr(name, "response") else name)


def _same_message(before: Message, after: Message) -> str | None:
    """Why `after` may not stand in for `before`, or None.

    A replacement may change content (mask a value, hide list items), never what the
    message is: its kind, id, method and target were checked by the stages before.
    """
    if not isinstance(after, Message):
        return f"Replace carries {type(after).__name__}, not a Message"
    for what in ("kind", "id", "method", "target", "direction"):
        old, new = getattr(before, what), getattr(after, what)
        if old != new or type(old) is not type(new):
            return f"Replace changes the message's {what} ({old!r} -> {new!r})"
    return None


def _fold(result: Result, out: Outcome, stage: Stage) -> bool:
    """Apply a stage's (non-Hold) outcome to `result`; True when the run for this message ends."""
    assert result.message is not None
    if not isinstance(out, (Pass, Replace, Drop, Refuse)):
        raise ContractError(_named(stage, result.message),
                            f"a stage returned {type(out).__name__}, not an Outcome")
    if isinstance(out, Replace):
        why = _same_message(result.message, out.message)
        if why is not None:
            raise ContractError(_named(stage, result.message), why)
    result.decisions.extend(out.decisions)
    result.outcome = out
    if isinstance(out, Replace):
        result.message = out.message
        return False
    if isinstance(out, (Drop, Refuse)):
        result.message = None
        return True
    return False


def _runner(stages: Sequence[Stage], messages: Sequence[Message], cx: Context
            ) -> Generator[tuple[Stage, Message, Hold], Outcome, Run]:
    """Every message through every stage, in order. Yields each Hold (with the stage and the
    message it holds) and takes the outcome it resolved to; returns the Run."""
    results = []
    for m in messages:
        results.append((yield from _one(stages, m, cx)))
    return Run(results)


def _one(stages: Sequence[Stage], m: Message, cx: Context
         ) -> Generator[tuple[Stage, Message, Hold], Outcome, Result]:
    """One message through every stage, then each message it carries inside it.

    A carried message (an input request inside an `input_required` result, a client's
    input response in a retry) meets the same stages as if it travelled on its own. If
    one is refused or dropped, the message carrying it is refused with that refusal
    (the call ends with an error naming the rule: a server must not get half the answers
    it asked for); if one is replaced, the carrier carries the new one.
    """
    result = Result(m, m, Pass())
    for stage in stages:
        assert result.message is not None
        if STAGES.enabled:
            t0 = now()
            out = stage.check(result.message, cx)
            STAGES.add(_named(stage, result.message), now() - t0)
        else:
            out = stage.check(result.message, cx)
        while isinstance(out, Hold):
            result.decisions.extend(out.decisions)
            out = yield stage, result.message, out
        if _fold(result, out, stage):
            return result
    assert result.message is not None
    carried = embedded(result.message)
    if not carried:
        return result
    for e in carried:
        if e.kind == Kind.INVALID:  # unreadable inside a readable message: refused, never passed over
            bad = Refusal(400, INVALID_REQUEST, f"an unreadable message inside {result.message.what()}",
                          {"reason": "invalid_request"})
            result.inner.append(Result(e, None, Refuse(bad)))
            continue
        result.inner.append((yield from _one(stages, e, cx)))
    stopped = next((r for r in result.inner if r.message is None), None)
    if stopped is not None:
        inner = stopped.outcome
        why = inner.refusal if isinstance(inner, Refuse) else Refusal(
            403, DENIED, f"{stopped.original.what()} was dropped ({inner.reason})", {"reason": "dropped"})
        refusal = Refusal(why.status, why.code, f"{result.message.what()} carries {why.message}", why.data,
                          why.headers)
        result.outcome, result.message = Refuse(refusal, (), inner.action if isinstance(inner, Refuse)
                                                else Action.DENY), None
    elif any(r.changed for r in result.inner):
        result.message = with_embedded(result.message, [r.message for r in result.inner if r.message is not None])
    return result


async def run(stages: Sequence[Stage], messages: Sequence[Message], cx: Context,
              on_hold: Callable[[Message, Hold], None] | None = None) -> Run:
    """Every message through every stage, in order; a Hold is awaited (other flows go on meanwhile).

    `on_hold` hears of each hold as it begins (its decisions are the Run's only once it ends).
    """
    steps = _runner(stages, messages, cx)
    try:
        stage, m, hold = next(steps)
        while True:
            if on_hold is not None:
                on_hold(m, hold)
            try:
                out = await hold.wait()
            except Exception as exc:  # the hold failed: it names the stage that held
                raise StageError(_named(stage, m), f"{type(exc).__name__}: {exc}") from exc
            stage, m, hold = steps.send(out)
    except StopIteration as done:
        return done.value


def run_now(stages: Sequence[Stage], messages: Sequence[Message], cx: Context) -> Run:
    """`run` where nothing may wait (an event stream): a Hold is refused, never skipped."""
    steps = _runner(stages, messages, cx)
    try:
        stage, m, hold = next(steps)
        while True:
            refusal = Refusal(403, APPROVAL_REQUIRED, f"{m.label()} was held by {stage.name} ({hold.reason}), "
                              "but nothing can wait inside an event stream, so it is refused")
            stage, m, hold = steps.send(Refuse(refusal, (), Action.APPROVE))
    except StopIteration as done:
        return done.value


def direction_of(stage_name: StageName, direction: Direction) -> StageName:
    """The name a stage's decisions are recorded under for `direction`."""
    return stage_name.response if direction is Direction.S2C else stage_name
