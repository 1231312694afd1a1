"""
Session recordings: every MCP session in its own mitmproxy flow file.

The Recorder comes after the Gate, so in `response`/`error` it sees what the
client got (after masking, including the gateway's own refusals). It writes
each finished flow, with secrets scrubbed (in its serialised state: the live
flow is left as it is) and under its own id (the `flow` of its audit records), to
`<record_dir>/<start time>_<subject>_<session>.mitm`, appended and flushed to
the operating system at once: a gateway killed with SIGKILL leaves every
finished flow readable by `mitmweb -r` and `mitmdump -nr`; on SIGTERM
(`done`) the flows still in flight are written too, marked incomplete.

Event streams: mitmproxy keeps no body for a streamed response, so the bytes
the client received are collected through `mcp_stream_output`, the sink this
addon attaches to the SSEStream in `responseheaders` into a `Spool` (memory up
to 1 MiB, then an unlinked temp file in the record directory) and written from
disk into the flow file, so a 100 MB stream never sits in memory. Beyond
`record_stream_limit` the bytes are counted and hashed but not stored;
`stream` in the flow's `Meta.RECORD` note says so.

Before a request is forwarded (`request`, after the Gate) the flow is
appended to the in-flight journal (`glue.recording.journal`); a gateway
killed mid-call leaves it there, and the next start moves it into its
session file marked incomplete and says so. A request that cannot be
journalled is refused (503) when recording is required.

When recording is required (`record_required`, the default) a write failure
withholds the (buffered) response with a 502, and `health` (a `WriteHealth`)
makes the Admission addon, before the Gate, refuse new requests with 503
until a write succeeds again. Flows that could not be written are kept (up
to `MAX_PENDING`) and retried in order by the health's probe, so nothing is
lost once the disk is back (and a kill in between leaves them in the
journal). The pieces (naming, scrubbing, spooling, encoding, files,
journal) are in `glue.recording`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import tempfile
import time
import weakref
from collections import deque
from pathlib import Path

from mitmproxy import ctx, exceptions, http
from mitmproxy.utils import asyncio_utils, human

from mcp_bastion.core import errors
from mcp_bastion.core.audit import parse_duration
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.vocab import Action, Meta, StageName
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.failclosed import fail_closed
from mcp_bastion.glue.recording import journal
from mcp_bastion.glue.recording.files import SessionFiles
from mcp_bastion.glue.recording.flowfile import append_flow, authenticated, encode_flow
from mcp_bastion.glue.recording.sessions import session_key
from mcp_bastion.glue.recording.spool import Spool
from mcp_bastion.glue.recording.tnet import ConnectionStates
from mcp_bastion.glue.replies import refuse
from mcp_bastion.glue.stream import SSEStream
from mcp_bastion.glue.writes import WriteHealth

logger = logging.getLogger("mcp_bastion")

IDLE_CLOSE = 300.0  # seconds without a flow after which a session file is closed
MAINTENANCE_EVERY = 30.0  # seconds between idle-close checks
SWEEP_EVERY = 3600.0  # seconds between retention sweeps
MAX_PENDING = 256  # finished flows kept for a retry while their session file cannot be written
IN_FLIGHT = "in flight: forwarded, no answer yet"
_REPLICA = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,39}")
UNKNOWN_CALLERS_PER_MINUTE = 60  # refusals of unidentified callers recorded per client address and minute


class Recorder:
    """Writes every MCP flow the client saw to its session's flow file."""

    def __init__(self) -> None:
        self.files: SessionFiles | None = None
        self.retention: float | None = None
        self.stream_limit = 256 * 1024 * 1024
        self.active: dict[str, http.HTTPFlow] = {}
        self.spools: dict[str, Spool] = {}
        self.written: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self.health = WriteHealth("record this session", "record")
        self.health.probe = self._probe
        self.journal: journal.Journal | None = None
        self.journal_broken = False  # the last journal write failed: a new journal is needed
        self.pending: deque[tuple[http.HTTPFlow, Spool | None, str | None]] = deque()
        self.directory_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the record directory
        self.unknown: dict[str, list[float]] = {}  # client address -> [minute, recorded, skipped]
        self._task: asyncio.Task | None = None
        self._last_sweep = 0.0
        self.conns = ConnectionStates()
        self.replica = ""  # replica_id

    def load(self, loader) -> None:
        loader.add_option(
            "record_dir", str, "",
            """
            Directory for session recordings: one mitmproxy flow file per MCP session,
            named <UTC start>_<subject>_<session>.mitm (open with mitmweb -r). Empty: no recording.
            """,
        )
        loader.add_option(
            "replica_id", str, "",
            """
            This gateway's name among replicas that share a record directory (e.g. the pod name):
            recording file names carry it (<UTC start>_<replica>_<subject>_<session>.mitm), so no two
            replicas ever write one file, and each recorded flow says which replica served it.
            Letters, digits, '.' and '-', at most 40. Empty: a single gateway.
            """,
        )
        loader.add_option(
            "record_required", bool, True,
            """
            With recording on, refuse traffic that cannot be recorded: a failed write withholds
            the response (502) and new requests get 503 until writing works again.
            """,
        )
        loader.add_option(
            "record_retention", str, "30d",
            "Remove recordings older than this (e.g. 12h, 30d, 2w); 0 keeps them forever.",
        )
        loader.add_option(
            "record_stream_limit", str, "256m",
            """
            Most bytes of one event-stream response stored in a recording; beyond it the stream
            is counted and hashed (SHA-256) but not stored, and the flow says so.
            """,
        )

    # --- configuration ---------------------------------------------------------

    def configure(self, updated: set[str]) -> None:
        if "replica_id" in updated:
            replica = ctx.options.replica_id
            if replica and not _REPLICA.fullmatch(replica):
                raise exceptions.OptionsError(f"replica_id {replica!r}: use letters, digits, '.' and '-' "
                                              "(at most 40, not starting with '.' or '-')")
            if replica != self.replica and self.files is not None:
                updated = updated | {"record_dir"}  # the files take the new name: reopen them
            self.replica = replica
        if "record_retention" in updated:
            text = ctx.options.record_retention.strip()
            try:
                self.retention = None if text in ("", "0") else parse_duration(text)
            except ValueError as e:
                raise exceptions.OptionsError(f"record_retention: {e}") from None
        if "record_stream_limit" in updated:
            try:
                limit = human.parse_size(ctx.options.record_stream_limit)
            except ValueError as e:
                raise exceptions.OptionsError(f"record_stream_limit: {e}") from None
            if limit is None or limit < 0:
                raise exceptions.OptionsError("record_stream_limit must be a size like 256m")
            self.stream_limit = limit
        if "record_dir" in updated:
            if self.files is not None:
                self._close(clean=not self.pending)
                self.files = None
            if ctx.options.record_dir:
                directory = Path(ctx.options.record_dir).expanduser()
                try:
                    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                    with tempfile.TemporaryFile(dir=directory, prefix=".probe-"):
                        pass
                    files = SessionFiles(directory, replica=self.replica)
                    recovered = journal.recover(directory, files)
                    self.journal = journal.Journal(directory)
                    self.directory_id = _identity(directory)
                except OSError as e:
                    raise exceptions.OptionsError(f"record_dir {directory} is not writable: {e}") from None
                self.files = files
                if recovered:
                    logger.warning("mcp-bastion: RECORDING: %d call(s) were forwarded by a gateway that stopped before "
                                   "they ended; recovered from its in-flight journal and marked incomplete (flows %s)",
                                   len(recovered), ", ".join(recovered[:10]))
                self.health.succeeded()
        self.health.required = self.files is not None and ctx.options.record_required
        if self.files is not None and ({"record_dir", "record_retention"} & updated):
            self._sweep()

    def running(self) -> None:
        if self._task is None:
            self._task = asyncio_utils.create_task(self._maintain(), name="mcp-bastion recorder", keep_ref=True)

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_EVERY)
            if self.files is None:
                continue
            self.files.close_idle(IDLE_CLOSE)
            if time.monotonic() - self._last_sweep >= SWEEP_EVERY:
                self._sweep()

    def _sweep(self) -> None:
        self._last_sweep = time.monotonic()
        if self.files is None or self.retention is None:
            return
        try:
            for path in self.files.sweep(self.retention):
                logger.info("mcp-bastion: removed recording %s (older than %s)",
                            path.name, ctx.options.record_retention)
        except OSError as e:
            logger.error("mcp-bastion: retention sweep of %s failed: %s", self.files.directory, e)

    # --- which flows ---------------------------------------------------------

    def _wanted(self, flow: http.HTTPFlow) -> bool:
        if self.files is None or flow.metadata.get(Meta.PASSTHROUGH):
            return False
        return fs.is_mcp(flow) or Meta.DECISIONS in flow.metadata

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Track the flow, so that `done` can write it if it is still in flight then."""
        if self._wanted(flow):
            self.active[flow.id] = flow

    # --- event streams -------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """An event stream: collect the bytes the client receives, event by event."""
        if self._wanted(flow) and flow.response is not None and isinstance(flow.response.stream, SSEStream):
            flow.response.stream.outputs.append(self.mcp_stream_output)

    def mcp_stream_output(self, flow: http.HTTPFlow, data: bytes) -> None:
        """The bytes the client received on an event stream (the SSEStream's output sink)."""
        if self.files is None or not data:
            return
        spool = self.spools.get(flow.id)
        if spool is None:
            spool = self.spools[flow.id] = Spool(self.files.directory, self.stream_limit)
        spool.write(data)

    # --- writing -------------------------------------------------------------

    @fail_closed(StageName.RECORD)
    def request(self, flow: http.HTTPFlow) -> None:
        """Just before the upstream: journal what is about to be forwarded, or refuse it."""
        if not self._wanted(flow) or flow.response or flow.error or not flow.live:
            return
        try:
            self._begin(flow)
        except Exception as e:
            self.health.failed(f"{type(e).__name__}: {e}")
            logger.error("mcp-bastion: RECORDING FAILED (in-flight journal) for %s: %s", flow.request.pretty_url, e)
            if ctx.options.record_required:
                refuse(flow, Refusal(503, errors.GATEWAY_ERROR,
                                     "mcp-bastion cannot record this session right now; the request was not forwarded",
                                     {"reason": "record"}, {"retry-after": "1"}),
                       stage=StageName.RECORD, action=Action.ERROR)

    def _check_directory(self) -> None:
        """Make sure writes land in the record directory, not in files of one removed or replaced.

        An open file of a removed directory still takes writes, which are then
        lost: if the directory is gone (or another stands in its place), it is
        recreated and every file reopened there; the flows in flight are
        journalled again in the new journal.
        """
        assert self.files is not None
        directory = self.files.directory
        try:
            if _identity(directory) == self.directory_id:
                return
        except FileNotFoundError:
            pass
        logger.error("mcp-bastion: RECORDING: the record directory %s was removed or replaced; recreating it "
                     "(flows written there before are in the old one, if it still exists)", directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.files.close_all()
        if self.journal is not None:
            self.journal.close(remove=False)
            self.journal = None
        self.directory_id = _identity(directory)
        self._new_journal()

    def _begin(self, flow: http.HTTPFlow) -> None:
        assert self.files is not None
        self._check_directory()
        if self.journal is None or self.journal_broken or self.journal.full():
            self._new_journal(exclude=flow)
        assert self.journal is not None
        pieces, _, _ = encode_flow(self.files.directory, self.conns, flow, None, IN_FLIGHT, self.files.replica)
        try:
            self.journal.begin(pieces)
        except BaseException:
            self.journal_broken = True
            raise

    def _new_journal(self, exclude: http.HTTPFlow | None = None) -> None:
        """Start a new journal holding the flows still in flight; then drop the old one."""
        assert self.files is not None
        fresh = journal.Journal(self.files.directory)
        files = self.files
        try:
            for other in self.active.values():
                if other is not exclude and other not in self.written:
                    fresh.begin(encode_flow(files.directory, self.conns, other, None, IN_FLIGHT, files.replica)[0])
            for other, _, _ in self.pending:
                fresh.begin(encode_flow(files.directory, self.conns, other, None, IN_FLIGHT, files.replica)[0])
        except BaseException:
            fresh.close(remove=True)
            raise
        old, self.journal, self.journal_broken = self.journal, fresh, False
        if old is not None:
            old.close(remove=True)

    def _probe(self) -> None:
        """Retry what could not be written (and the journal); raises while recording still fails."""
        if self.files is None:
            return
        if self.journal_broken or self.journal is None:
            self._new_journal()
        self._flush()

    @fail_closed(StageName.RESP_RECORD)
    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        with contextlib.suppress(Exception):  # logged in _finish; no response left to withhold
            self._finish(flow)

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for flow in list(self.active.values()):
            with contextlib.suppress(Exception):  # logged in _finish
                self._finish(flow, incomplete="the gateway stopped before this exchange ended")
        if self.files is not None:
            self._close(clean=not self.pending)

    def _close(self, clean: bool) -> None:
        """Close the files; the journal is removed only if every flow it holds is in its session file."""
        if self.pending:
            logger.error("mcp-bastion: RECORDING: stopping with %d flow(s) unwritten; they stay in the in-flight "
                         "journal for the next start", len(self.pending))
        for _, spool, _ in self.pending:
            if spool is not None:
                spool.close()
        self.pending.clear()
        if self.journal is not None:
            self.journal.close(remove=clean and not self.journal_broken)
            self.journal = None
        if self.files is not None:
            self.files.close_all()

    def _finish(self, flow: http.HTTPFlow, incomplete: str | None = None) -> None:
        if not self._wanted(flow):
            return
        if flow in self.written:
            return  # an error after the response (client gone at the end of a stream)
        self.written.add(flow)
        self.active.pop(flow.id, None)
        spool = self.spools.pop(flow.id, None)
        if not authenticated(flow) and not self._may_record_unknown(flow):
            if spool is not None:
                spool.close()
            return
        if len(self.pending) >= MAX_PENDING:
            dropped, old_spool, _ = self.pending.popleft()
            logger.error("mcp-bastion: RECORDING: dropped flow %s: too many flows wait for the disk", dropped.id)
            if old_spool is not None:
                old_spool.close()
        self.pending.append((flow, spool, incomplete))
        try:
            self._flush()
        except Exception as e:
            self.health.failed(f"{type(e).__name__}: {e}")
            logger.error("mcp-bastion: RECORDING FAILED for %s (%s): %s; kept for a retry", flow.request.pretty_url,
                         session_key(flow), e, exc_info=e)
            # Withhold an upstream's answer that cannot be recorded; the gateway's own refusal (nothing
            # was forwarded, e.g. Admission's 503 while writes fail) stays what the client gets.
            if ctx.options.record_required and not fs.refused(flow):
                raise
        else:
            self.health.succeeded()

    def _may_record_unknown(self, flow: http.HTTPFlow) -> bool:
        """A refusal of a caller the gateway could not identify is recorded at most
        UNKNOWN_CALLERS_PER_MINUTE times a minute per client address (its audit record is always
        written): anyone who can connect must not be able to fill the disk with refusals."""
        address = flow.client_conn.peername[0] if flow.client_conn.peername else "?"
        minute = time.time() // 60
        entry = self.unknown.get(address)
        if entry is None or entry[0] != minute:
            if entry is not None and entry[2]:
                logger.warning("mcp-bastion: RECORDING: %d refusal(s) of unidentified callers from %s were not "
                               "recorded (over %d a minute); their audit records were written",
                               int(entry[2]), address, UNKNOWN_CALLERS_PER_MINUTE)
            if len(self.unknown) > 10_000:
                self.unknown.clear()
            entry = self.unknown[address] = [minute, 0, 0]
        if entry[1] >= UNKNOWN_CALLERS_PER_MINUTE:
            entry[2] += 1
            return False
        entry[1] += 1
        return True

    def _flush(self) -> None:
        """Write the flows waiting for their session file, oldest first; raise at the first that fails."""
        if self.pending:
            self._check_directory()
        while self.pending:
            flow, spool, incomplete = self.pending[0]
            self.write(flow, spool, incomplete)
            self.pending.popleft()
            if spool is not None:
                spool.close()
            if self.journal is not None and not self.journal_broken:
                try:
                    self.journal.end(flow.id)
                except OSError:
                    self.journal_broken = True  # the flow is recorded; the next journal will not list it

    def write(self, flow: http.HTTPFlow, spool: Spool | None = None, incomplete: str | None = None) -> Path:
        """Append `flow`, secrets scrubbed, to its session file; return the file's path."""
        assert self.files is not None
        return append_flow(self.files, self.conns, flow, spool, incomplete)


def _identity(directory: Path) -> tuple[int, int]:
    st = directory.stat()
    return st.st_dev, st.st_ino
