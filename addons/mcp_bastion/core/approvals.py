"""
Just-in-time approval: calls held for a second person, and what they decided.

Pure: no mitmproxy import. An `ApprovalSpec` is what a rule's `approval:`
block says (approver groups, timeout, mode, grant window). An `Approval` is
one held call, bound to the exact call (`binding`: identity, upstream,
method, tool and canonical arguments). The `Store` interface keeps them;
`MemoryStore` is the embedded default of a single gateway (it survives
nothing, and is exact); `glue.sharedstate.RedisStore` is shared by replicas.

Rules of deciding (`Store.decide`): only a member of one of the approver
groups may decide; never the requester; only a pending, unexpired request;
every decision carries both identities. A `grant` window lets the same
identity make calls matching the same rule and tool without asking again
until it ends.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .audit import canonical, iso_time

WAIT, RETRY = "wait", "retry"
MODES = (WAIT, RETRY)
PENDING, APPROVED, DENIED, EXPIRED, USED, CANCELLED = "pending", "approved", "denied", "expired", "used", "cancelled"
DEFAULT_TIMEOUT = 300.0
MAX_PENDING = 10_000  # held calls kept at once (beyond: new ones are refused, never forwarded)


@dataclass(frozen=True)
class ApprovalSpec:
    """A rule's `approval:` block."""

    approvers: tuple[str, ...]
    timeout: float = DEFAULT_TIMEOUT
    mode: str = WAIT
    grant: float | None = None


@dataclass(frozen=True)
class Person:
    """Who asked, or who decided: enough to tell people apart and to show them."""

    sub: str | None
    iss: str | None
    groups: tuple[str, ...] = ()
    name: str | None = None

    @property
    def key(self) -> tuple[str | None, str | None]:
        return self.sub, self.iss

    def shown(self) -> str:
        return self.name or self.sub or "anonymous"

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in (("sub", self.sub), ("iss", self.iss), ("name", self.name)) if v}


LOCAL_OPERATOR = Person("local-operator", None, (), "the gateway's local operator (mitmweb)")


class Refused(ValueError):
    """A decision that may not be made (not an approver, own request, already decided, expired, unknown)."""


def binding(requester: Person, upstream: str | None, method: str | None, tool: str | None, arguments: Any) -> str:
    """The digest a decision binds to: this identity, this upstream, this method and tool, these arguments."""
    return hashlib.sha256(canonical({"who": [requester.sub, requester.iss], "upstream": upstream,
                                     "method": method, "tool": tool, "arguments": arguments})).hexdigest()


@dataclass
class Approval:
    """One held call and its fate."""

    id: str
    rule: str
    reason: str
    spec: ApprovalSpec
    requester: Person
    upstream: str | None
    method: str | None
    tool: str | None
    arguments: Any
    binding: str
    created: float
    expires: float
    status: str = PENDING
    decided_by: Person | None = None
    decision_reason: str | None = None
    decided_at: float | None = None
    waiting: bool = False  # a client's request is open on it (wait mode)
    events: list[dict[str, Any]] = field(default_factory=list)
    holder: str | None = None  # the replica whose client waits on it (a shared store)

    def view(self, now: float | None = None) -> dict[str, Any]:
        """What a reviewer is shown (`scripts/approvals list --json`)."""
        now = time.time() if now is None else now
        out = {
            "id": self.id, "status": self.status, "rule": self.rule, "reason": self.reason,
            "requester": self.requester.shown(), "requester_id": self.requester.record(),
            "upstream": self.upstream, "method": self.method, "tool": self.tool, "arguments": self.arguments,
            "mode": self.spec.mode, "approvers": list(self.spec.approvers),
            "created": iso_time(self.created), "expires": iso_time(self.expires),
            "expires_in_s": max(0, round(self.expires - now)), "waiting": self.waiting,
        }
        if self.spec.grant:
            out["grant_s"] = self.spec.grant
        if self.decided_by is not None:
            out["decided_by"] = self.decided_by.shown()
            out["decided_by_id"] = self.decided_by.record()
            out["decision_reason"] = self.decision_reason
            out["decided"] = iso_time(self.decided_at or now)
        elif self.decision_reason:  # cancelled or ended without a person: why
            out["decision_reason"] = self.decision_reason
        return out


def to_record(a: Approval) -> dict[str, Any]:
    """An approval as JSON-ready data, for a shared store (`from_record` reads it back)."""
    def who(p: Person | None) -> dict[str, Any] | None:
        return None if p is None else {"sub": p.sub, "iss": p.iss, "groups": list(p.groups), "name": p.name}
    return {"id": a.id, "rule": a.rule, "reason": a.reason,
            "spec": {"approvers": list(a.spec.approvers), "timeout": a.spec.timeout, "mode": a.spec.mode,
                     "grant": a.spec.grant},
            "requester": who(a.requester), "upstream": a.upstream, "method": a.method, "tool": a.tool,
            "arguments": a.arguments, "binding": a.binding, "created": a.created, "expires": a.expires,
            "status": a.status, "decided_by": who(a.decided_by), "decision_reason": a.decision_reason,
            "decided_at": a.decided_at, "waiting": a.waiting, "events": a.events, "holder": a.holder}


def from_record(d: dict[str, Any]) -> Approval:
    def who(p: dict[str, Any] | None) -> Person | None:
        return None if p is None else Person(p.get("sub"), p.get("iss"), tuple(p.get("groups") or ()), p.get("name"))
    spec = d["spec"]
    return Approval(id=d["id"], rule=d["rule"], reason=d["reason"],
                    spec=ApprovalSpec(tuple(spec["approvers"]), spec["timeout"], spec["mode"], spec.get("grant")),
                    requester=who(d["requester"]) or Person(None, None), upstream=d.get("upstream"),
                    method=d.get("method"), tool=d.get("tool"), arguments=d.get("arguments"), binding=d["binding"],
                    created=d["created"], expires=d["expires"], status=d["status"], decided_by=who(d.get("decided_by")),
                    decision_reason=d.get("decision_reason"), decided_at=d.get("decided_at"),
                    waiting=bool(d.get("waiting")), events=list(d.get("events") or []), holder=d.get("holder"))


def check_decision(a: Approval | None, approval_id: str, reviewer: Person, approve: bool, reason: str | None) -> None:
    """Raise `Refused` unless `reviewer` may decide `a` now: the rules of deciding, one place for every store."""
    if a is None:
        raise Refused(f"no approval request {approval_id}")
    if reviewer.key == a.requester.key and reviewer.sub is not None:
        raise Refused("you cannot decide your own request")
    if not set(reviewer.groups) & set(a.spec.approvers):
        raise Refused(f"only members of {', '.join(a.spec.approvers)} may decide this request")
    if a.status == EXPIRED:
        raise Refused(f"{a.id} expired at {iso_time(a.expires)}")
    if a.status != PENDING:
        raise Refused(f"{a.id} was already decided: {a.status}")
    if not approve and not (reason or "").strip():
        raise Refused("a denial needs a reason")


@dataclass(frozen=True)
class Grant:
    who: tuple[str | None, str | None]
    rule: str
    tool: str | None
    until: float
    approval: str


class Store:
    """Where approvals live: the embedded `MemoryStore` for one gateway, or a shared one
    (`glue.sharedstate.RedisStore`) for replicas. Every change of status is atomic: an approval is decided
    once, and `use` lets exactly one caller run an approved call."""

    def create(self, approval: Approval) -> Approval: ...
    def get(self, approval_id: str) -> Approval | None: ...
    def all(self) -> list[Approval]: ...
    def decide(self, approval_id: str, reviewer: Person, approve: bool, reason: str | None) -> Approval: ...
    def decide_locally(self, approval_id: str, approve: bool, reason: str) -> Approval | None: ...
    def cancel(self, approval_id: str, why: str) -> None: ...
    def use(self, approval_id: str) -> bool: ...
    async def wait(self, approval_id: str, timeout: float) -> Approval: ...
    def approved_for(self, binding_: str) -> Approval | None: ...
    def pending_for(self, binding_: str) -> Approval | None: ...
    def grant_for(self, who: Person, rule: str, tool: str | None) -> Grant | None: ...
    def pending(self) -> Iterable[Approval]: ...


class MemoryStore(Store):
    """Approvals of one gateway process, in memory."""

    def __init__(self, clock: Callable[[], float] = time.time,
                 on_change: Callable[[Approval, str], None] | None = None):
        self._clock = clock
        self._items: dict[str, Approval] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._grants: list[Grant] = []
        self.on_change = on_change  # (approval, what happened): the audit and the webhook hear of it

    @staticmethod
    def new_id() -> str:
        return "apr-" + secrets.token_hex(6)

    def _changed(self, a: Approval, what: str) -> None:
        a.events.append({"at": iso_time(self._clock()), "event": what})
        event = self._events.get(a.id)
        if event is not None and a.status != PENDING:
            event.set()
        if self.on_change is not None:
            self.on_change(a, what)

    def _expire(self, now: float | None = None) -> None:
        now = self._clock() if now is None else now
        for a in list(self._items.values()):
            if a.status == PENDING and now >= a.expires:
                a.status = EXPIRED
                self._changed(a, "expired")
        self._grants = [g for g in self._grants if g.until > now]
        if len(self._items) > MAX_PENDING:  # forget the oldest decided ones
            for a in sorted(self._items.values(), key=lambda x: x.created):
                if len(self._items) <= MAX_PENDING // 2:
                    break
                if a.status != PENDING:
                    self._items.pop(a.id, None)
                    self._events.pop(a.id, None)

    def create(self, approval: Approval) -> Approval:
        self._expire()
        if sum(1 for a in self._items.values() if a.status == PENDING) >= MAX_PENDING:
            raise Refused("too many calls are waiting for approval")
        self._items[approval.id] = approval
        self._events[approval.id] = asyncio.Event()
        self._changed(approval, "requested")
        return approval

    def get(self, approval_id: str) -> Approval | None:
        self._expire()
        return self._items.get(approval_id)

    def all(self) -> list[Approval]:
        self._expire()
        return sorted(self._items.values(), key=lambda a: a.created)

    def decide(self, approval_id: str, reviewer: Person, approve: bool, reason: str | None) -> Approval:
        self._expire()
        a = self._items.get(approval_id)
        check_decision(a, approval_id, reviewer, approve, reason)
        now = self._clock()
        a.status = APPROVED if approve else DENIED
        a.decided_by, a.decision_reason, a.decided_at = reviewer, (reason or "").strip() or None, now
        if approve and a.spec.grant:
            self._grants.append(Grant(a.requester.key, a.rule, a.tool, now + a.spec.grant, a.id))
        self._changed(a, "approved" if approve else "denied")
        return a

    def decide_locally(self, approval_id: str, approve: bool, reason: str) -> Approval | None:
        """The gateway's own operator decided (mitmweb: resume = approve, kill = deny): no group applies."""
        a = self._items.get(approval_id)
        if a is None or a.status != PENDING:
            return a
        a.status = APPROVED if approve else DENIED
        a.decided_by, a.decision_reason, a.decided_at = LOCAL_OPERATOR, reason, self._clock()
        self._changed(a, "approved" if approve else "denied")
        return a

    def cancel(self, approval_id: str, why: str) -> None:
        a = self._items.get(approval_id)
        if a is not None and a.status == PENDING:
            a.status, a.decision_reason, a.decided_at = CANCELLED, why, self._clock()
            self._changed(a, "cancelled")

    def use(self, approval_id: str) -> bool:
        """An approved call runs: True for the one caller that turns it from approved into used."""
        a = self._items.get(approval_id)
        if a is None or a.status != APPROVED:
            return False
        a.status = USED
        self._changed(a, "used")
        return True

    async def wait(self, approval_id: str, timeout: float) -> Approval:
        """Until the request is decided or expires (then EXPIRED); other calls go on meanwhile."""
        a = self._items[approval_id]
        event = self._events[approval_id]
        try:
            await asyncio.wait_for(event.wait(), max(0.0, min(timeout, a.expires - self._clock())))
        except TimeoutError:
            pass
        self._expire()
        if a.status == PENDING:  # the clock may lag the timer by a hair
            a.status = EXPIRED
            self._changed(a, "expired")
        return a

    def approved_for(self, binding_: str) -> Approval | None:
        self._expire()
        return next((a for a in self._items.values() if a.binding == binding_ and a.status == APPROVED), None)

    def pending_for(self, binding_: str) -> Approval | None:
        self._expire()
        return next((a for a in self._items.values() if a.binding == binding_ and a.status == PENDING), None)

    def grant_for(self, who: Person, rule: str, tool: str | None) -> Grant | None:
        self._expire()
        return next((g for g in self._grants if g.who == who.key and g.rule == rule and g.tool == tool), None)

    def pending(self) -> Iterable[Approval]:
        return [a for a in self.all() if a.status == PENDING]
