"""
"Refuse new requests while writes fail": the one base the Recorder and the
AuditLog share.

A writer that must write before traffic may go on (a recording, an audit
record) owns a `WriteHealth`. It reports each write (`succeeded()` /
`failed(error)`) and says whether it is `required` (on, and configured to
hold traffic). The Admission addon, which sits before the Gate, asks each
health of the bundle for its `refusal()`.

A failure lasts until a write succeeds again, however long that takes: there
is no time after which traffic flows unwritten. What makes a write succeed
again is the writer's `probe`: it retries what could not be written (so
nothing is lost once the disk is back) and raises while it still fails.
`refusal()` runs it at most once per `probe_every` seconds; in between,
requests are refused without touching the disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from mcp_bastion.core import errors
from mcp_bastion.core.errors import Refusal

logger = logging.getLogger("mcp_bastion")

PROBE_EVERY = 1.0  # least seconds between two retries of a failing writer


class WriteHealth:
    """Whether one writer may admit new requests."""

    def __init__(self, what: str, reason: str, probe_every: float = PROBE_EVERY,
                 clock: Callable[[], float] = time.monotonic):
        self.what = what  # "record this session", "write its audit log"
        self.reason = reason  # the stable slug in the refusal's data ("record", "audit")
        self.probe_every = probe_every
        self.required = False  # set by the writer's addon from its options
        self.failures = 0
        self.failure: str | None = None
        self.failed_at = 0.0
        self.probe: Callable[[], None] | None = None  # retries the failed writes; raises while they fail
        self._probed_at = 0.0
        self._clock = clock

    def succeeded(self) -> None:
        if self.failure is not None:
            logger.warning("mcp-bastion: can %s again; new requests are admitted", self.what)
        self.failure = None

    def failed(self, error: str) -> None:
        self.failure, self.failed_at = error, self._clock()
        self.failures += 1  # every failed write, for the metrics

    def failing(self) -> bool:
        """A write failed and none has succeeded since."""
        return self.failure is not None

    def _retry(self) -> None:
        now = self._clock()
        if self.probe is None or now - self._probed_at < self.probe_every:
            return
        self._probed_at = now
        try:
            self.probe()
        except Exception as e:
            self.failed(f"{type(e).__name__}: {e}")
        else:
            self.succeeded()

    def refusal(self) -> Refusal | None:
        """The 503 new requests get while this writer is required and failing, else None."""
        if not (self.required and self.failing()):
            return None
        self._retry()
        if not self.failing():
            return None
        return Refusal(503, errors.GATEWAY_ERROR,
                       f"mcp-bastion cannot {self.what} right now; the request was not forwarded",
                       {"reason": self.reason}, {"retry-after": str(max(1, int(self.probe_every)))})
