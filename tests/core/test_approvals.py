"""The approval store: who may decide, expiry, grants, and what a decision binds to."""

from __future__ import annotations

import asyncio

import pytest

from mcp_bastion.core.approvals import (
    APPROVED,
    EXPIRED,
    Approval,
    ApprovalSpec,
    MemoryStore,
    Person,
    Refused,
    binding,
)

ALICE = Person("alice", "https://idp", ("engineering",), "Alice")
BOB = Person("bob", "https://idp", ("sre",), "Bob")
MALLORY = Person("alice", "https://other-idp", ("sre",), "Mallory")  # the same sub from another issuer


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


SPEC = ApprovalSpec(("sre",), 60.0, "wait", 900.0)


def held(store: MemoryStore, clock: Clock, args=None, spec=SPEC) -> Approval:
    args = {"env": "prod"} if args is None else args
    return store.create(Approval(MemoryStore.new_id(), "prod", "why", spec, ALICE, "up:1", "tools/call", "deploy",
                                 args, binding(ALICE, "up:1", "tools/call", "deploy", args), clock.now,
                                 clock.now + spec.timeout))


def test_only_an_approver_other_than_the_requester_decides_once():
    clock = Clock()
    store = MemoryStore(clock)
    a = held(store, clock)
    with pytest.raises(Refused, match="only members of sre"):
        store.decide(a.id, Person("carol", "https://idp", ("contractors",)), True, None)
    with pytest.raises(Refused, match="a denial needs a reason"):
        store.decide(a.id, BOB, False, " ")
    assert store.decide(a.id, MALLORY, True, None).status == APPROVED  # another issuer: another person
    with pytest.raises(Refused, match="already decided"):
        store.decide(a.id, BOB, True, None)
    with pytest.raises(Refused, match="no approval request"):
        store.decide("apr-nope", BOB, True, None)


def test_a_requester_in_the_approver_group_still_cannot_approve_their_own_call():
    clock = Clock()
    store = MemoryStore(clock)
    own = Person("alice", "https://idp", ("sre",))
    a = held(store, clock)
    with pytest.raises(Refused, match="your own request"):
        store.decide(a.id, own, True, None)


def test_an_unanswered_request_expires_and_cannot_be_decided_after():
    clock = Clock()
    store = MemoryStore(clock)
    a = held(store, clock)
    clock.now += 61
    assert store.get(a.id).status == EXPIRED
    with pytest.raises(Refused, match="expired"):
        store.decide(a.id, BOB, True, None)


def test_a_grant_window_covers_the_same_rule_tool_and_identity_until_it_ends():
    clock = Clock()
    store = MemoryStore(clock)
    a = held(store, clock)
    store.decide(a.id, BOB, True, "ok")
    assert store.grant_for(ALICE, "prod", "deploy") is not None
    assert store.grant_for(ALICE, "prod", "rollback") is None
    assert store.grant_for(MALLORY, "prod", "deploy") is None
    clock.now += 901
    assert store.grant_for(ALICE, "prod", "deploy") is None


def test_a_decision_binds_to_the_exact_call():
    base = binding(ALICE, "up:1", "tools/call", "deploy", {"env": "prod", "n": 1})
    assert base == binding(ALICE, "up:1", "tools/call", "deploy", {"n": 1, "env": "prod"})  # canonical
    for other in (binding(BOB, "up:1", "tools/call", "deploy", {"env": "prod", "n": 1}),
                  binding(ALICE, "up:2", "tools/call", "deploy", {"env": "prod", "n": 1}),
                  binding(ALICE, "up:1", "tools/call", "rollback", {"env": "prod", "n": 1}),
                  binding(ALICE, "up:1", "tools/call", "deploy", {"env": "prod", "n": 2}),
                  binding(ALICE, "up:1", "tools/call", "deploy", {"env": "prod", "n": 1.5})):
        assert other != base


def test_waiting_ends_with_the_decision_or_the_timeout():
    async def main():
        clock = Clock()
        store = MemoryStore(clock)
        a = held(store, clock)
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, lambda: store.decide(a.id, BOB, True, None))
        assert (await store.wait(a.id, 5)).status == APPROVED
        b = held(store, clock, {"env": "other"})
        assert (await store.wait(b.id, 0.05)).status == EXPIRED  # the timer ran out: never approved later
        with pytest.raises(Refused):
            store.decide(b.id, BOB, True, None)

    asyncio.run(main())
