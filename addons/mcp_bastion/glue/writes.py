"""
"Refuse new requests while writes fail": the one base the Recorder and the
AuditLog share.

A writer that must write before traffic may go on (a recording, an audit
record) owns a `WriteHealth`. It reports each write (`succeeded()` /
`failed(error)`) and says whether it is `required` (on, and configured to
hold traffic). The Admission addon, which sits before the Gate, asks each
health of the bundle for its `refusal()`, so no addon after the Gate ever
refuses a request.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from mcp_bastion.core import errors
from mcp_bastion.core.errors import Refusal

RETRY_AFTER_FAILURE = 5.0  # seconds during which new requests are refused after a failed write


class WriteHealth:
    """Whether one writer may admit new requests."""

    def __init__(self, what: str, reason: str, hold: float = RETRY_AFTER_FAILURE,
                 clock: Callable[[], float] = time.monotonic):
        self.what = what  # "record this session", "write its audit log"
        self.reason = reason  # the stable slug in the refusal's data ("record", "audit")
        self.hold = hold
        self.required = False  # set by the writer's addon from its options
        self.failure: str | None = None
        self.failed_at = 0.0
        self._clock = clock

    def succeeded(self) -> None:
        self.failure = None

    def failed(self, error: str) -> None:
        self.failure, self.failed_at = error, self._clock()

    def failing(self) -> bool:
        """A write failed less than `hold` seconds ago (and none has succeeded since)."""
        return self.failure is not None and self._clock() - self.failed_at < self.hold

    def refusal(self) -> Refusal | None:
        """The 503 new requests get while this writer is required and failing, else None."""
        if not (self.required and self.failing()):
            return None
        return Refusal(503, errors.GATEWAY_ERROR,
                       f"mcp-bastion cannot {self.what} right now; the request was not forwarded",
                       {"reason": self.reason}, {"retry-after": str(int(self.hold))})
