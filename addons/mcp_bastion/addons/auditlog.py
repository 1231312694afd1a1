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

With `audit_required` (the default) `health` (a `WriteHealth`) makes the
Admission addon, before the Gate, refuse new requests with 503 after a failed
write, until a write succeeds again. The exchange whose record could not be
written is not withheld: its answer is already recorded as sent (the
Recorder ran first), and refusing it now would make the recording lie.
"""

from __future__ import annotations

import logging
import weakref
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from mcp_bastion.core import audit
from mcp_bastion.core.vocab import Meta
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.recording.audit_writer import DEFAULT_KEY_ENV, AuditWriter
from mcp_bastion.glue.recording.facts import flow_facts
from mcp_bastion.glue.recording.sessions import session_key
from mcp_bastion.glue.writes import WriteHealth

logger = logging.getLogger("mcp_bastion")


class AuditLog:
    """Appends the audit records of every finished MCP flow."""

    def __init__(self) -> None:
        self.writer: AuditWriter | None = None
        self.active: dict[str, http.HTTPFlow] = {}
        self.written: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self.health = WriteHealth("write its audit log", "audit")

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
            self.health.required = False  # no log, nothing to hold traffic for
            raise exceptions.OptionsError(f"audit_log: {e}") from None
        self.health.succeeded()
        logger.info("mcp-bastion: audit log %s (key from %s), continuing at seq %d",
                    path, source, self.writer.chain.seq)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Track the flow, so that `done` can write it if it is still in flight then."""
        if self._wanted(flow):
            self.active[flow.id] = flow

    def _wanted(self, flow: http.HTTPFlow) -> bool:
        if self.writer is None or flow.metadata.get(Meta.PASSTHROUGH):
            return False
        return fs.is_mcp(flow) or Meta.DECISIONS in flow.metadata

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
        self.health.required = False

    def _finish(self, flow: http.HTTPFlow, incomplete: str | None = None) -> None:
        if not self._wanted(flow) or flow in self.written:
            return
        self.written.add(flow)
        self.active.pop(flow.id, None)
        assert self.writer is not None
        try:
            self.writer.append(audit.build_records(flow_facts(flow, incomplete)))
        except Exception as e:
            failure = f"{type(e).__name__}: {e}"
            self.health.failed(failure)
            flow.metadata[Meta.ERROR] = f"audit: {failure}"
            logger.error("mcp-bastion: AUDIT LOG WRITE FAILED for %s (%s): %s", flow.request.pretty_url,
                         session_key(flow), e, exc_info=e)
        else:
            self.health.succeeded()
