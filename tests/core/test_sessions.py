"""Session bindings: a session id belongs to the identity it was handed to."""

from __future__ import annotations

from mcp_bastion.core.identity import ANONYMOUS, Identity
from mcp_bastion.core.sessions import SessionBindings, owner_of

ALICE = owner_of(Identity("alice", (), "https://idp"))
BOB = owner_of(Identity("bob", (), "https://idp"))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_owner_keys_name_issuer_and_subject():
    assert owner_of(Identity("alice", (), "https://a")) != owner_of(Identity("alice", (), "https://b"))
    assert owner_of(Identity(None, (), "https://a", client_id="ci")) == "https://a ci"
    assert owner_of(ANONYMOUS) == "anonymous"


def test_the_owner_passes_anyone_else_and_unknown_ids_do_not():
    s = SessionBindings()
    assert s.bind("s1", ALICE)
    assert s.check("s1", ALICE).ok
    assert s.check("s1", BOB).reason == "other_identity" and not s.check("s1", BOB).ok
    assert s.check("forged", ALICE).reason == "unknown"


def test_a_session_cannot_be_rebound_to_another_identity():
    s = SessionBindings()
    s.bind("s1", ALICE)
    assert not s.bind("s1", BOB)
    assert s.check("s1", ALICE).ok


def test_only_the_owner_ends_a_session():
    s = SessionBindings()
    s.bind("s1", ALICE)
    s.end("s1", BOB)
    assert s.check("s1", ALICE).ok
    s.end("s1", ALICE)
    assert s.check("s1", ALICE).reason == "unknown"


def test_bounded_least_recently_used_first():
    s = SessionBindings(max_sessions=2)
    s.bind("a", ALICE)
    s.bind("b", ALICE)
    s.check("a", ALICE)  # a used last
    s.bind("c", ALICE)
    assert len(s) == 2 and s.check("a", ALICE).ok and s.check("b", ALICE).reason == "unknown"


def test_an_idle_session_is_forgotten_and_use_keeps_it():
    clock = Clock()
    s = SessionBindings(idle_ttl=10, clock=clock)
    s.bind("s1", ALICE)
    clock.now = 9
    assert s.check("s1", ALICE).ok
    clock.now = 18
    assert s.check("s1", ALICE).ok  # used at 9: still within 10 s
    clock.now = 29
    assert s.check("s1", ALICE).reason == "unknown"
