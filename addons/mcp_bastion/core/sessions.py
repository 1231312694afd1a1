"""
Which identity each MCP session belongs to.

A 2025-era server hands out a session id (`Mcp-Session-Id`, or the `session_id`
of an HTTP+SSE endpoint) to whoever initialised the session; the id is all a
later request shows. Bound here to the identity that created it, a session id
presented by anyone else is refused, and one the gateway never saw created is
unknown (the client starts a new session).

An embedded store: bounded (least recently used sessions go first) and expiring
after a period without use. Pure: no mitmproxy import.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .identity import Identity

MAX_SESSIONS = 100_000
IDLE_TTL = 24 * 3600.0  # seconds a session may go unused before its binding is forgotten


def owner_of(identity: Identity) -> str:
    """The key a session is bound to: issuer and subject (or OAuth client), or `anonymous`."""
    who = identity.who
    if who is None:
        return "anonymous"
    return f"{identity.iss or ''} {who}"


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a presented session id means for this caller."""

    ok: bool
    reason: str  # "owner", "unknown", "other_identity"


class SessionBindings:
    def __init__(self, max_sessions: int = MAX_SESSIONS, idle_ttl: float = IDLE_TTL,
                 clock: Callable[[], float] = time.monotonic):
        self.max_sessions = max_sessions
        self.idle_ttl = idle_ttl
        self._clock = clock
        self._owners: OrderedDict[str, tuple[str, float]] = OrderedDict()  # session id -> (owner, last use)

    def __len__(self) -> int:
        return len(self._owners)

    def bind(self, session: str, owner: str) -> bool:
        """Bind a new session to `owner`; False (and no change) if it is already bound to someone else."""
        known = self._get(session)
        if known is not None and known != owner:
            return False
        self._owners[session] = (owner, self._clock())
        self._owners.move_to_end(session)
        while len(self._owners) > self.max_sessions:
            self._owners.popitem(last=False)
        return True

    def check(self, session: str, owner: str) -> Verdict:
        known = self._get(session)
        if known is None:
            return Verdict(False, "unknown")
        if known != owner:
            return Verdict(False, "other_identity")
        self._owners[session] = (owner, self._clock())
        self._owners.move_to_end(session)
        return Verdict(True, "owner")

    def end(self, session: str, owner: str) -> None:
        """The owner ended the session (DELETE): forget it."""
        if self._get(session) == owner:
            del self._owners[session]

    def _get(self, session: str) -> str | None:
        entry = self._owners.get(session)
        if entry is None:
            return None
        owner, used = entry
        if self._clock() - used > self.idle_ttl:
            del self._owners[session]
            return None
        return owner
