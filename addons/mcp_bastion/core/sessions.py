"""
Which identity each MCP session belongs to.

A 2025-era server hands out a session id (`Mcp-Session-Id`, or the `session_id`
of an HTTP+SSE endpoint) to whoever initialised the session; the id is all a
later request shows. Bound here to the identity that created it, a session id
presented by anyone else is refused, and one the gateway never saw created is
unknown (the client starts a new session).

Kept in a `core.state.Table`: the embedded one (bounded, least recently used
sessions go first) or one shared by replicas; either forgets a session after a
period without use. Pure: no mitmproxy import.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .identity import Identity
from .state import MemoryTable, Table

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
    """Key -> owning identity, over a `core.state.Table` (the embedded one unless given a shared one)."""

    def __init__(self, max_sessions: int = MAX_SESSIONS, idle_ttl: float = IDLE_TTL,
                 clock: Callable[[], float] = time.monotonic, table: Table | None = None):
        self.table = table if table is not None else MemoryTable("sessions", idle_ttl, max_sessions, clock)

    def __len__(self) -> int:
        return len(self.table)

    def bind(self, session: str, owner: str) -> bool:
        """Bind a new session to `owner`; False (and no change) if it is already bound to someone else."""
        return self.table.claim(session, owner) == owner

    def check(self, session: str, owner: str) -> Verdict:
        known = self.table.get(session)
        if known is None:
            return Verdict(False, "unknown")
        if known != owner:
            return Verdict(False, "other_identity")
        return Verdict(True, "owner")

    def end(self, session: str, owner: str) -> None:
        """The owner ended the session (DELETE): forget it."""
        self.table.drop(session, owner)
