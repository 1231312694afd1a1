"""
The audit log: JSON Lines, one record per MCP message and its decision, HMAC-chained.

Comes after the Gate and the Recorder, so it sees each flow's final state:
the decisions of every stage, the refusal the client got (including one
made because recording failed), the HTTP status, the latency. Records are
built by `core.audit.build_records` from `glue.recording.facts.flow_facts`,
sealed by a `core.audit.Chain` (key from `audit_key_env` or
`audit_key_file`) and appended with one write per flow by a
`glue.recording.audit_writer.AuditWriter`; then the head file
`<audit_log>.head` is rewritten in place (one `pwrite`), so records removed
at the end are detected by `scripts/audit verify`.

Starting refuses (OptionsError) when the key is missing or too short, when
the log ends with a damaged line, or when the head file shows that records
were removed or replaced: the chain must not silently restart over a
tampered log. A head file that is missing, unreadable or does not verify
(forged, another key, or an in-place rewrite cut short by a crash: they look
the same) cannot vouch for the end of the log; then the whole log is
verified, starting is refused if it does not verify, and otherwise the log
is continued with a sealed `recover` record that says so (see `core.audit`).

Before a request is forwarded (in `request`, the last addon after the
Gate), a `forward` record naming its messages is appended; the flow's
ordinary records follow when it ends. If that write fails, the request is
refused (503) and nothing reaches the upstream unaudited. A gateway killed
mid-call thus leaves a `forward` record with nothing after it: at the next
start, `core.audit.open_flows` finds those, they are logged, and an
`incomplete` record lists them in the chain. Each run begins with a `start`
record and, if it ends cleanly, a `stop` record.

With `audit_required` (the default) `health` (a `WriteHealth`) makes the
Admission addon, before the Gate, refuse new requests with 503 after a failed
write, until a write succeeds again. Records that could not be written are
kept (up to `MAX_PENDING` flows) and retried, in order, by the health's
probe, so none is lost once the disk is back. The exchange whose record
could not be written is not withheld: its answer is already recorded as sent
(the Recorder ran first), and refusing it now would make the recording lie.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from mcp_bastion.core import audit, errors
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.vocab import Action, Meta, StageName
from mcp_bastion.glue import decisions
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.failclosed import fail_closed
from mcp_bastion.glue.recording.audit_writer import DEFAULT_KEY_ENV, AuditWriter, HeadNotMoved
from mcp_bastion.glue.recording.facts import flow_facts
from mcp_bastion.glue.recording.sessions import session_key
from mcp_bastion.glue.replies import refuse
from mcp_bastion.glue.writes import WriteHealth

logger = logging.getLogger("mcp_bastion")

MAX_PENDING = 10_000  # flows whose records are kept for a retry while the log cannot be written


class AuditLog:
    """Appends the audit records of every finished MCP flow."""

    def __init__(self) -> None:
        self.writer: AuditWriter | None = None
        self.active: dict[str, http.HTTPFlow] = {}
        self.written: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self.health = WriteHealth("write its audit log", "audit")
        self.health.probe = self._probe
        self.pending: deque[list[dict]] = deque()  # records not yet written, oldest first
        self.lost = 0  # flows whose records were dropped because `pending` was full

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

    def configure(self, updated: set[str]) -> None:
        if {"audit_log", "audit_key_env", "audit_key_file"} & updated:
            self._open()
        self.health.required = self.writer is not None and ctx.options.audit_required

    def _open(self) -> None:
        if self.writer is not None:
            self._write([audit.lifecycle_record("stop", "audit log reconfigured")], keep=True)
            self.writer.close()
            self.writer = None
            self.pending.clear()
        if not ctx.options.audit_log:
            return
        path = Path(ctx.options.audit_log).expanduser()
        try:
            key, source = audit.load_key(ctx.options.audit_key_env, ctx.options.audit_key_file, create=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = AuditWriter(path, key)
        except (audit.AuditError, OSError) as e:
            self.health.required = False  # no log, nothing to hold traffic for
            raise exceptions.OptionsError(f"audit_log: {e}") from None
        self.writer.on_head_error = self._head_failed  # the head moves once per event-loop turn
        self.health.succeeded()
        logger.info("mcp-bastion: audit log %s (key from %s), continuing at seq %d",
                    path, source, self.writer.chain.seq)
        self._report_open_flows(path)

    def _report_open_flows(self, path: Path) -> None:
        """Say (in the log and the chain) which calls a gateway that died had forwarded and not ended."""
        assert self.writer is not None
        records = []
        try:
            opened = audit.open_flows(path)
        except OSError as e:
            opened = []
            logger.error("mcp-bastion: cannot read %s for calls left in flight: %s", path, e)
        if opened:
            logger.warning("mcp-bastion: AUDIT: %d call(s) were forwarded by a gateway that stopped before they "
                           "ended (flows %s); an `incomplete` record says so", len(opened), ", ".join(opened[:10]))
            records.append(audit.lifecycle_record(
                "incomplete", "forwarded by a gateway that stopped before these calls ended: no answer was "
                "recorded for them", opened))
        records.append(audit.lifecycle_record("start", "mcp-bastion started"))
        try:
            self.writer.append(records)
        except OSError as e:
            self.writer.close()
            self.writer = None
            raise exceptions.OptionsError(f"audit_log: cannot write {path}: {e}") from None

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Track the flow, so that `done` can write it if it is still in flight then."""
        if self._wanted(flow):
            self.active[flow.id] = flow

    def _wanted(self, flow: http.HTTPFlow) -> bool:
        if self.writer is None or flow.metadata.get(Meta.PASSTHROUGH):
            return False
        return fs.is_mcp(flow) or Meta.DECISIONS in flow.metadata

    @fail_closed(StageName.AUDIT)
    def request(self, flow: http.HTTPFlow) -> None:
        """The last step before the upstream: write what is about to be forwarded, or refuse it."""
        if not self._wanted(flow) or flow.response or flow.error or not flow.live:
            return
        written = not self.pending and self._write([audit.forward_record(flow_facts(flow))], keep=False)
        if not written and self.health.required:
            refuse(flow, Refusal(503, errors.GATEWAY_ERROR,
                                 "mcp-bastion cannot write its audit log right now; the request was not forwarded",
                                 {"reason": "audit"}, {"retry-after": "1"}),
                   stage=StageName.AUDIT, action=Action.ERROR)

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def done(self) -> None:
        for flow in list(self.active.values()):
            self._finish(flow, incomplete="incomplete: the gateway stopped before this exchange ended")
        if self.writer is not None:
            self._write([audit.lifecycle_record("stop", "mcp-bastion stopped")], keep=True)
            if self.pending or self.lost:
                logger.error("mcp-bastion: AUDIT: stopping with %d flow(s) of records unwritten and %d lost",
                             len(self.pending), self.lost)
            self.writer.close()
            self.writer = None
        self.health.required = False

    def _finish(self, flow: http.HTTPFlow, incomplete: str | None = None) -> None:
        if not self._wanted(flow) or flow in self.written:
            return
        self.written.add(flow)
        self.active.pop(flow.id, None)
        records = decisions.records(flow, incomplete)  # built once, shared with the decision log and traces
        if not self._write(records, keep=True):
            flow.metadata[Meta.ERROR] = f"audit: {self.health.failure}"
            logger.error("mcp-bastion: AUDIT LOG WRITE FAILED for %s (%s): %s; kept for a retry",
                         flow.request.pretty_url, session_key(flow), self.health.failure)

    def _write(self, records: list[dict], *, keep: bool) -> bool:
        """Append records after any still pending; True if they are in the log.

        With `keep`, records that cannot be written now are kept for the probe
        to retry (in order); without, they are dropped (a `forward` record of
        a request that is then refused).
        """
        if keep:
            if len(self.pending) >= MAX_PENDING:
                self.pending.popleft()
                self.lost += 1
            self.pending.append(records)
            try:
                self._flush()
            except Exception as e:
                self.health.failed(f"{type(e).__name__}: {e}")
                return False
        else:
            try:
                self._append(records)
            except HeadNotMoved as e:
                self.health.failed(f"{type(e).__name__}: {e}")
                return True  # the records are in the log; only the head file lags
            except Exception as e:
                self.health.failed(f"{type(e).__name__}: {e}")
                return False
        self.health.succeeded()
        return True

    def _append(self, records: list[dict]) -> None:
        assert self.writer is not None
        self.writer.append(records)

    def _flush(self) -> None:
        """Write the pending records, oldest first; raise at the first that cannot be written."""
        while self.pending:
            try:
                self._append(self.pending[0])
            except HeadNotMoved:
                self.pending.popleft()  # written; the head lags until the next append
                raise
            self.pending.popleft()

    def _head_failed(self, e: OSError) -> None:
        """The head file could not be moved after this loop turn's records: they are in the log; the
        probe moves the head again, and new requests wait (Admission) until it can."""
        self.health.failed(f"{type(e).__name__}: {e} (the head file)")
        logger.error("mcp-bastion: AUDIT: the head file could not be rewritten: %s", e)

    def _probe(self) -> None:
        """Retry what could not be written (and the head file); raises while the log still fails."""
        if self.writer is None:
            return
        self._flush()
        self.writer.move_head()
        if self.lost:
            lost, self.lost = self.lost, 0
            self._append([audit.lifecycle_record(
                "lost", f"the audit log could not be written for a while: the records of {lost} flow(s) "
                        "did not fit in memory and were dropped")])
