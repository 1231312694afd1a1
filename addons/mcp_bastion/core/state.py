"""
What a replica remembers about callers, behind one interface, so replicas can share it.

Everything the gateway remembers about a caller between requests goes through a
`Backend`: session-to-identity bindings, the caller each `requestState` was
issued to, task ownership, the approval a multi-round-trip call continues (all
`Table`s: a key bound to a string value, bounded, forgotten after a period without
use), the approvals themselves (a `core.approvals.Store`) and, when shared, the
tool pins (a `core.pins.PinStore`). Two backends:

- `MemoryBackend`, the embedded default: one process, nothing to run, exact;
- `glue.sharedstate.RedisBackend` (`state_url=redis://...`): shared by every
  replica, so a caller gets the same answer whichever replica they reach.

A backend that cannot reach its store raises `Unavailable`: what needs shared
state is refused (the flow fails closed with a 503 naming the reason), and nothing
is decided from a stale local copy.

Addons do not keep a backend: they hand `Hub.watch` a function that builds their
state objects from one, called at once with the embedded backend and again when
the State addon switches to a shared one at start.

Pure: no mitmproxy import.
"""

from __future__ import annotations

import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .approvals import MemoryStore

DEFAULT_MAX = 100_000


class Unavailable(RuntimeError):
    """The shared state cannot be reached: whatever needs it is refused, never decided from a local copy."""


class Table:
    """One namespace of what a replica remembers: key -> string value, forgotten `idle_ttl` seconds
    after its last use. Implementations are atomic per call (`claim` is compare-and-set)."""

    name: str
    idle_ttl: float

    def claim(self, key: str, value: str) -> str:
        """Bind `key` to `value` if it is free (or already bound to `value`); return the value it is bound to
        afterwards: `value` when it was taken, the other value when someone else holds it. Refreshes its use."""
        raise NotImplementedError

    def get(self, key: str) -> str | None:
        """The value bound to `key` (refreshing its use), or None."""
        raise NotImplementedError

    def put(self, key: str, value: str) -> None:
        """Bind `key` to `value`, whatever it was bound to."""
        raise NotImplementedError

    def drop(self, key: str, value: str | None = None) -> None:
        """Forget `key` (only while it is bound to `value`, when given)."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError


class MemoryTable(Table):
    """A table in this process: least recently used entries go first beyond `max_items`."""

    def __init__(self, name: str, idle_ttl: float, max_items: int = DEFAULT_MAX,
                 clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.idle_ttl = idle_ttl
        self.max_items = max_items
        self._clock = clock
        self._items: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def claim(self, key: str, value: str) -> str:
        known = self._live(key)
        if known is not None and known != value:
            self._touch(key, known)
            return known
        self._touch(key, value)
        return value

    def get(self, key: str) -> str | None:
        known = self._live(key)
        if known is not None:
            self._touch(key, known)
        return known

    def put(self, key: str, value: str) -> None:
        self._touch(key, value)

    def drop(self, key: str, value: str | None = None) -> None:
        known = self._live(key)
        if known is not None and (value is None or known == value):
            del self._items[key]

    def _touch(self, key: str, value: str) -> None:
        self._items[key] = (value, self._clock())
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def _live(self, key: str) -> str | None:
        entry = self._items.get(key)
        if entry is None:
            return None
        value, used = entry
        if self._clock() - used > self.idle_ttl:
            del self._items[key]
            return None
        return value


class Backend:
    """Where a gateway keeps what it remembers about callers."""

    kind = "memory"
    shared = False  # True when other replicas see the same state

    def table(self, name: str, *, idle_ttl: float, max_items: int = DEFAULT_MAX) -> Table:
        raise NotImplementedError

    def approvals(self, on_change: Callable[[Any, str], None] | None = None) -> Any:
        """A `core.approvals.Store`."""
        raise NotImplementedError

    def pins(self) -> Any:
        """A shared `core.pins.PinStore`, or None: the Pinning stage keeps its own (`pin_store`)."""
        return None

    def status(self) -> tuple[bool, str]:
        """(ready, why): whether the store answers now, and what to show on the readiness probe."""
        return True, self.kind

    def close(self) -> None:
        pass


class MemoryBackend(Backend):
    """The embedded default: one process, nothing to run. A restart forgets it all."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock

    def table(self, name: str, *, idle_ttl: float, max_items: int = DEFAULT_MAX) -> Table:
        return MemoryTable(name, idle_ttl, max_items, self._clock)

    def approvals(self, on_change: Callable[[Any, str], None] | None = None) -> Any:
        return MemoryStore(on_change=on_change)


class Hub:
    """The backend in force, and who builds state from it. One per bundle."""

    def __init__(self, backend: Backend | None = None, replica: str | None = None):
        self.backend: Backend = backend or MemoryBackend()
        # Who this gateway is among replicas: `replica_id`, else host name and process id.
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}"
        self._builders: list[Callable[[Backend], None]] = []

    def watch(self, build: Callable[[Backend], None]) -> None:
        """Call `build(backend)` now and whenever the backend changes."""
        self._builders.append(build)
        build(self.backend)

    def switch(self, backend: Backend) -> None:
        """Use `backend` from now on: every watcher rebuilds its state from it (at start, before any flow)."""
        old, self.backend = self.backend, backend
        for build in self._builders:
            build(backend)
        if old is not backend:
            old.close()

    def status(self) -> tuple[bool, str]:
        return self.backend.status()
