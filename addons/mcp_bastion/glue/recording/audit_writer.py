"""
The open audit log: HMAC-chained JSON Lines and the head file that vouches for its end.

Opening checks the head file against the log's last record and refuses
(`AuditError`) a log whose records were removed or replaced; a head that
cannot vouch for the end (missing, unreadable, forged, another key, a rewrite
cut short) makes the whole log be verified, and the log is then continued
with a sealed `recover` record that says so (see `core.audit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from mcp_bastion.core import audit

logger = logging.getLogger("mcp_bastion")

DEFAULT_KEY_ENV = "BASTION_AUDIT_KEY"  # environment variable holding the audit key, unless configured otherwise


class HeadNotMoved(OSError):
    """The records were appended but the head file could not be rewritten (they must not be written again)."""


class AuditWriter:
    """An open, chained audit log file and its head file."""

    def __init__(self, path: Path, key: bytes):
        self.path = path
        self.key = key
        seq, last = audit.resume_point(path)
        doubt = self._check_head(seq, last)
        self.chain = audit.Chain(key, seq, last)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.head = audit.HeadFile(path)
        # Set (by the AuditLog) to move the head once per event-loop turn and hear when that fails.
        self.on_head_error: Callable[[OSError], None] | None = None
        self._head_due = False
        if doubt:
            logger.warning("mcp-bastion: audit log %s: %s; the log itself verifies up to seq %d, continuing it "
                           "(a recovery record says so)", path, doubt, seq)
            try:
                self.append([audit.recovery_record(doubt, seq)])
            except BaseException:
                self.close()
                raise

    def _check_head(self, seq: int, last: str) -> str | None:
        """Check the head file against the log's last record (seq, hash).

        Raises AuditError if the head shows records removed or replaced, or
        if it cannot vouch for the end of the log and the log itself does not
        verify. Returns why it cannot vouch (no head file, or one that does
        not parse or verify: forged, another key, or a rewrite cut short by a
        crash), or None when it matches.
        """
        problem = None
        try:
            head = audit.read_head(self.path)
        except audit.AuditError as e:
            head, problem = None, str(e)
        if head is not None:
            if not audit.check_head(self.key, head):
                problem = f"{audit.head_path(self.path)} does not verify with this key"
            elif not isinstance(head.get("seq"), int) or head["seq"] > seq:
                raise audit.AuditError(f"{self.path} ends at seq {seq} but its head file records seq "
                                       f"{head.get('seq')}: records were removed; run scripts/audit verify")
            elif head["seq"] == seq and head.get("hash") != last:
                raise audit.AuditError(f"{self.path}: the last record is not the one the head file records; "
                                       "run scripts/audit verify")
            else:
                return None
        elif problem is None:
            if not seq:
                return None  # a new log
            problem = f"no head file {audit.head_path(self.path)}"
        if seq:
            with open(self.path, "rb") as f:
                verdict = audit.verify_lines(f, self.key)
            if not verdict.ok:
                raise audit.AuditError(f"{problem}, and the log does not verify either (line {verdict.bad_line}: "
                                       f"{verdict.reason}); run scripts/audit verify")
        return problem

    def append(self, records: list[dict]) -> None:
        """Seal and append records with one write, then move the head. Rolled back on failure."""
        seq, prev = self.chain.seq, self.chain.prev
        data = b"".join(audit.line_of(self.chain.seal(r)) for r in records)
        start = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except BaseException:
            self.chain.seq, self.chain.prev = seq, prev
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, start)
            raise
        if self.on_head_error is not None and self._defer_head():
            return
        try:
            self.move_head()
        except OSError as e:
            raise HeadNotMoved(e) from e

    def _defer_head(self) -> bool:
        """With a running event loop, move the head once at the end of this loop turn, for every record
        appended in it (the head may lag the log by that much after a crash: a lagging head is read as
        such, never as tampering). False when there is no loop: move it now."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if not self._head_due:
            self._head_due = True
            loop.call_soon(self._move_head_due)
        return True

    def _move_head_due(self) -> None:
        if not self._head_due or self.fd < 0:
            return
        self._head_due = False
        try:
            self.move_head()
        except OSError as e:
            assert self.on_head_error is not None
            self.on_head_error(e)

    def move_head(self) -> None:
        """Rewrite the head file for the chain's last record."""
        self._head_due = False
        self.head.write(audit.make_head(self.key, self.chain.seq, self.chain.prev))

    def close(self) -> None:
        if self._head_due:
            self._head_due = False
            with contextlib.suppress(OSError):
                self.move_head()
        os.close(self.fd)
        self.fd = -1
        self.head.close()
