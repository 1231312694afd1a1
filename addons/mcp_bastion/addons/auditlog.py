"""
The audit log: JSON Lines, one record per MCP message and its decision, HMAC-chained.

Comes after the Gate and the Recorder, so it sees each flow's final state:
the decisions of every stage, the refusal the client got (including one
made because recording failed), the HTTP status, the latency. Records are
built by `core.audit.build_records`, sealed by a `core.audit.Chain` (key from
`audit_key_env` or `audit_key_file`) and appended with one write per flow;
then the head file `<audit_log>.head` is rewritten in place (one `pwrite`),
so records removed at the end are detected by `scripts/audit verify`.

Starting refuses (OptionsError) when the key is missing or too short, when
the log ends with a damaged line, or when the head file shows that records
were removed or replaced: the chain must not silently restart over a
tampered log. A head file that is missing, unreadable or does not verify
(forged, another key, or an in-place rewrite cut short by a crash: they look
the same) cannot vouch for the end of the log; then the whole log is
verified, starting is refused if it does not verify, and otherwise the log
is continued with a sealed `recover` record that says so (see `core.audit`).

With `audit_required` (the default) the AuditLog is an enforcement stage: it
marks `audit` on each request only while it can write; after a failed write,
new requests are refused with 503 until a write succeeds again. The exchange
whose record could not be written is not withheld: its answer is already
recorded as sent (the Recorder ran first), and refusing it now would make the
recording lie.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from mcp_bastion.glue import flowstate as fs
from mcp_bastion.core import audit
from mcp_bastion.addons.recorder import RETRY_AFTER_FAILURE, session_key

logger = logging.getLogger("mcp_bastion")

DEFAULT_KEY_ENV = "BASTION_AUDIT_KEY"


def flow_facts(flow: http.HTTPFlow, incomplete: str | None = None,
               latency_ms: float | None = None) -> audit.FlowFacts:
    """The plain facts of a flow that the audit records are built from."""
    error = incomplete or (flow.error.msg if flow.error else None)
    return audit.FlowFacts(
        flow_id=flow.id,
        started=flow.request.timestamp_start or time.time(),
        http_method=flow.request.method,
        metadata=flow.metadata,
        session=session_key(flow),
        status=flow.response.status_code if flow.response is not None else None,
        error=error,
        latency_ms=fs.elapsed_ms(flow) if latency_ms is None else latency_ms,
    )


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
        self.head.write(audit.make_head(self.key, self.chain.seq, self.chain.prev))

    def close(self) -> None:
        os.close(self.fd)
        self.head.close()


class AuditLog:
    """Appends the audit records of every finished MCP flow."""

    def __init__(self) -> None:
        self.writer: AuditWriter | None = None
        self.active: dict[str, http.HTTPFlow] = {}
        self.written: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self.failure: str | None = None
        self.failed_at = 0.0

    def load(self, loader) -> None:
        loader.add_option(
            "audit_log", str, "",
            "Audit log file (JSON Lines, HMAC-chained; verify with scripts/audit verify). Empty: no audit log.",
        )
        loader.add_option(
            "audit_key_env", str, DEFAULT_KEY_ENV,
            "Environment variable holding the audit log's HMAC key (at least 16 bytes). Read first.",
        )
        loader.add_option(
            "audit_key_file", str, "",
            """
            File holding the audit log's HMAC key, used when the environment variable is unset.
            Created with a random key (mode 0600) if missing; refused if group or others can read it.
            """,
        )
        loader.add_option(
            "audit_required", bool, True,
            "With the audit log on, refuse new requests (503) while audit records cannot be written.",
        )

    @property
    def request_stage(self) -> str | None:
        """Declared to the Gate only when the audit log is on and required."""
        return "audit" if self.writer is not None and ctx.options.audit_required else None

    def configure(self, updated: set[str]) -> None:
        if not {"audit_log", "audit_key_env", "audit_key_file"} & updated:
            return
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if not ctx.options.audit_log:
            return
        path = Path(ctx.options.audit_log).expanduser()
        try:
            key, source = audit.load_key(ctx.options.audit_key_env, ctx.options.audit_key_file, create=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = AuditWriter(path, key)
        except (audit.AuditError, OSError) as e:
            raise exceptions.OptionsError(f"audit_log: {e}") from None
        self.failure = None
        logger.info("mcp-bastion: audit log %s (key from %s), continuing at seq %d", path, source, self.writer.chain.seq)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self._wanted(flow):
            return
        self.active[flow.id] = flow
        if flow.response or flow.error or not flow.live or not ctx.options.audit_required:
            return
        failing = bool(self.failure) and time.monotonic() - self.failed_at < RETRY_AFTER_FAILURE
        fs.admit_unless_failing(flow, stage="audit", failing=failing, hold=RETRY_AFTER_FAILURE,
                                what="write its audit log", reason="audit")

    def _wanted(self, flow: http.HTTPFlow) -> bool:
        if self.writer is None or flow.metadata.get("bastion.passthrough"):
            return False
        return fs.is_mcp(flow) or fs.DECISIONS in flow.metadata

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def done(self) -> None:
        for flow in list(self.active.values()):
            self._finish(flow, incomplete="incomplete: the gateway stopped before this exchange ended")
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _finish(self, flow: http.HTTPFlow, incomplete: str | None = None) -> None:
        if not self._wanted(flow) or flow in self.written:
            return
        self.written.add(flow)
        self.active.pop(flow.id, None)
        assert self.writer is not None
        try:
            self.writer.append(audit.build_records(flow_facts(flow, incomplete)))
        except Exception as e:
            self.failure, self.failed_at = f"{type(e).__name__}: {e}", time.monotonic()
            flow.metadata[fs.ERROR] = f"audit: {self.failure}"
            logger.error("mcp-bastion: AUDIT LOG WRITE FAILED for %s (%s): %s", flow.request.pretty_url,
                         session_key(flow), e, exc_info=e)
        else:
            self.failure = None
