"""
Session recordings: every MCP session in its own mitmproxy flow file.

The Recorder comes after the Gate, so in `response`/`error` it sees what the
client got (after masking, including the gateway's own refusals). It writes a
*copy* of each finished flow, with secrets scrubbed, to
`<record_dir>/<start time>_<subject>_<session>.mitm`, appended and flushed to
the operating system at once: a gateway killed with SIGKILL leaves every
finished flow readable by `mitmweb -r` and `mitmdump -nr`; on SIGTERM
(`done`) the flows still in flight are written too, marked incomplete.

Event streams: mitmproxy keeps no body for a streamed response, so the bytes
the client received are collected through the gateway's `mcp_stream_output`
into a `Spool` (memory up to 1 MiB, then an unlinked temp file in the record
directory) and written from disk into the flow file, so a 100 MB stream never
sits in memory. Beyond `record_stream_limit` the bytes are counted and hashed
but not stored; `bastion.record.stream` on the flow says so.

When recording is required (`record_required`, the default) the Recorder is
an enforcement stage: it marks `record` on each request only while it can
write, a write failure withholds the (buffered) response with a 502, and new
requests are refused with 503 until a write succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from mitmproxy import ctx, exceptions, http
from mitmproxy.io import tnetstring
from mitmproxy.utils import asyncio_utils, human

from . import flowstate as fs
from .core import errors
from .core.audit import parse_duration
from .core.errors import Refusal

logger = logging.getLogger("mcp_bastion")

RECORD = "bastion.record"  # on the recorded copy: {"session", "subject", "latency_ms", "stream", "incomplete", "redacted"}
SECRET_HEADERS = fs.SECRET_HEADERS  # set by the Auth addon: header names that carry credentials
LEGACY_SESSION = "bastion.legacy_session"  # session id announced in an HTTP+SSE `endpoint` event

ALWAYS_SECRET = ("authorization", "proxy-authorization", "cookie", "set-cookie")
SECRET_PARAMS = ("access_token",)
REDACTED = "[redacted by mcp-bastion]"

SPOOL_MEMORY = 1 << 20  # event-stream bytes kept in memory before spooling to disk
MAX_OPEN = 64  # session files kept open at once (least recently used are closed)
IDLE_CLOSE = 300.0  # seconds without a flow after which a session file is closed
MAINTENANCE_EVERY = 30.0  # seconds between idle-close checks
SWEEP_EVERY = 3600.0  # seconds between retention sweeps
RETRY_AFTER_FAILURE = 5.0  # seconds during which new requests are refused after a failed write
FILE_SUFFIX = ".mitm"
_FILE_NAME = re.compile(r"^\d{8}T\d{6}Z_.+\.mitm$")
_UNSAFE = re.compile(r"[^A-Za-z0-9.@-]+")


# --- who and which session ----------------------------------------------------------


def subject_of(flow: http.HTTPFlow) -> str | None:
    ident = flow.metadata.get(fs.IDENTITY)
    sub = ident.get("sub") if isinstance(ident, dict) else None
    return sub if isinstance(sub, str) and sub else None


def session_of(flow: http.HTTPFlow) -> str | None:
    """The MCP session a flow belongs to, if the transport has one.

    `Mcp-Session-Id` from the request, or from the response (the initialize
    POST learns it there); for the older HTTP+SSE transport the `session_id`
    query parameter of the message URL, or the one announced in the stream's
    `endpoint` event.
    """
    sid = flow.request.headers.get("mcp-session-id")
    if not sid and flow.response is not None:
        sid = flow.response.headers.get("mcp-session-id")
    if not sid:
        sid = flow.request.query.get("session_id")
    if not sid:
        sid = flow.metadata.get(LEGACY_SESSION)
    return sid or None


def session_key(flow: http.HTTPFlow) -> str:
    """The session id, or `conn-<client connection id>` for a stateless server."""
    return session_of(flow) or f"conn-{flow.client_conn.id}"


def _safe(text: str, limit: int = 64) -> str:
    return _UNSAFE.sub("-", text).strip("-.")[:limit] or "x"


# --- scrubbing ------------------------------------------------------------------------


def scrub(flow: http.HTTPFlow) -> list[str]:
    """Replace credentials in a flow (a copy!) with a marker; return what was redacted.

    Headers: Authorization, Proxy-Authorization, Cookie, Set-Cookie and every
    name listed in `flow.metadata["bastion.secret_headers"]` (the upstream
    credential the Auth addon injected); query: `access_token`.
    """
    names = set(ALWAYS_SECRET)
    extra = flow.metadata.get(SECRET_HEADERS) or ()
    names.update(n.lower() for n in extra if isinstance(n, str))
    redacted = []
    for where, msg in (("request", flow.request), ("response", flow.response)):
        if msg is None:
            continue
        for name in {k.lower() for k in msg.headers.keys()} & names:
            count = len(msg.headers.get_all(name))
            msg.headers.set_all(name, [REDACTED] * count)
            redacted.append(f"{where} header {name}")
        if msg.trailers:
            for name in {k.lower() for k in msg.trailers.keys()} & names:
                msg.trailers.set_all(name, [REDACTED])
                redacted.append(f"{where} trailer {name}")
    query = flow.request.query
    for param in SECRET_PARAMS:
        if param in query:
            query.set_all(param, [REDACTED] * len(query.get_all(param)))
            redacted.append(f"query {param}")
    return redacted


# --- event-stream bodies ------------------------------------------------------------


class Spool:
    """The bytes a client received on one event stream.

    In memory up to `SPOOL_MEMORY`, then in an unlinked temp file. At most
    `limit` bytes are stored; all bytes are counted and hashed (SHA-256).
    """

    def __init__(self, directory: Path, limit: int):
        self.directory = directory
        self.limit = limit
        self.size = 0
        self.stored = 0
        self._sha = hashlib.sha256()
        self._mem = bytearray()
        self._file: Any = None

    def write(self, data: bytes) -> None:
        self._sha.update(data)
        self.size += len(data)
        keep = data[: max(0, self.limit - self.stored)]
        if not keep:
            return
        self.stored += len(keep)
        if self._file is None and len(self._mem) + len(keep) <= SPOOL_MEMORY:
            self._mem += keep
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self.directory, prefix=".spool-")
            self._file.write(self._mem)
            self._mem = bytearray()
        self._file.write(keep)

    @property
    def in_memory(self) -> bool:
        return self._file is None

    @property
    def truncated(self) -> bool:
        return self.stored < self.size

    def getvalue(self) -> bytes:
        assert self._file is None
        return bytes(self._mem)

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes]:
        if self._file is None:
            yield bytes(self._mem)
            return
        self._file.flush()
        self._file.seek(0)
        while chunk := self._file.read(size):
            yield chunk

    def summary(self) -> dict[str, Any]:
        out = {"bytes": self.size, "sha256": self._sha.hexdigest()}
        if self.truncated:
            out["stored_bytes"] = self.stored
            out["truncated"] = True
        return out

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem = bytearray()


class _Blob:
    """A body written from a spool: the tnetstring needs only its length up front."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self.size = spool.stored


def _has_blob(value: Any) -> bool:
    if isinstance(value, _Blob):
        return True
    if isinstance(value, dict):
        return any(_has_blob(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_blob(v) for v in value)
    return False


def tnet_parts(value: Any) -> tuple[list[bytes | _Blob], int]:
    """Encode `value` as tnetstring pieces; a `_Blob` stays a placeholder to stream from disk."""
    if isinstance(value, _Blob):
        head = b"%d:" % value.size
        return [head, value, b","], len(head) + value.size + 1
    if isinstance(value, (dict, list, tuple)) and _has_blob(value):
        items = [x for kv in value.items() for x in kv] if isinstance(value, dict) else list(value)
        parts: list[bytes | _Blob] = []
        n = 0
        for item in items:
            p, size = tnet_parts(item)
            parts += p
            n += size
        head = b"%d:" % n
        return [head, *parts, b"}" if isinstance(value, dict) else b"]"], len(head) + n + 1
    data = tnetstring.dumps(value)
    return [data], len(data)


# --- files --------------------------------------------------------------------------


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class SessionFile:
    """One append-only flow file. A failed write is rolled back, so the file stays readable."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.last_used = time.monotonic()

    def append(self, parts: list[bytes | _Blob]) -> None:
        start = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            if not any(isinstance(p, _Blob) for p in parts):
                _write_all(self.fd, b"".join(parts))  # type: ignore[arg-type]
            else:
                for p in parts:
                    if isinstance(p, _Blob):
                        for chunk in p.spool.chunks():
                            _write_all(self.fd, chunk)
                    else:
                        _write_all(self.fd, p)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, start)
            raise
        self.last_used = time.monotonic()

    def close(self) -> None:
        os.close(self.fd)


class SessionFiles:
    """The open session files, one per (subject, session), least recently used closed first."""

    def __init__(self, directory: Path, max_open: int = MAX_OPEN):
        self.directory = directory
        self.max_open = max_open
        self.open: OrderedDict[tuple[str, str], SessionFile] = OrderedDict()

    def get(self, subject: str, session: str, started: float) -> SessionFile:
        key = (subject, session)
        f = self.open.get(key)
        if f is not None:
            self.open.move_to_end(key)
            return f
        suffix = f"_{_safe(subject)}_{_safe(session)}{FILE_SUFFIX}"
        earlier = sorted(self.directory.glob(f"*{suffix}"))
        if earlier:
            path = earlier[-1]  # a session resumed after its file was closed
        else:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
            path = self.directory / f"{stamp}{suffix}"
        f = SessionFile(path)
        self.open[key] = f
        while len(self.open) > self.max_open:
            _, oldest = self.open.popitem(last=False)
            oldest.close()
        return f

    def close_idle(self, idle: float, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        stale = [k for k, f in self.open.items() if now - f.last_used >= idle]
        for k in stale:
            self.open.pop(k).close()
        return len(stale)

    def close_all(self) -> None:
        while self.open:
            _, f = self.open.popitem()
            with contextlib.suppress(OSError):
                f.close()

    def sweep(self, max_age: float, now: float | None = None) -> list[Path]:
        """Remove recordings not modified for `max_age` seconds (never an open one)."""
        now = time.time() if now is None else now
        busy = {f.path for f in self.open.values()}
        removed = []
        for path in self.directory.iterdir():
            if not _FILE_NAME.match(path.name) or path in busy:
                continue
            try:
                if now - path.stat().st_mtime > max_age:
                    path.unlink()
                    removed.append(path)
            except FileNotFoundError:
                continue
        return removed


# --- the addon ----------------------------------------------------------------------


class Recorder:
    """Writes every MCP flow the client saw to its session's flow file."""

    def __init__(self) -> None:
        self.files: SessionFiles | None = None
        self.retention: float | None = None
        self.stream_limit = 256 * 1024 * 1024
        self.active: dict[str, http.HTTPFlow] = {}
        self.spools: dict[str, Spool] = {}
        self.written: weakref.WeakSet[http.HTTPFlow] = weakref.WeakSet()
        self.failure: str | None = None
        self.failed_at = 0.0
        self._task: asyncio.Task | None = None
        self._last_sweep = 0.0

    def load(self, loader) -> None:
        loader.add_option(
            "record_dir", str, "",
            """
            Directory for session recordings: one mitmproxy flow file per MCP session,
            named <UTC start>_<subject>_<session>.mitm (open with mitmweb -r). Empty: no recording.
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

    @property
    def request_stage(self) -> str | None:
        """Declared to the Gate only when recording is on and required."""
        return "record" if self.files is not None and ctx.options.record_required else None

    def configure(self, updated: set[str]) -> None:
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
                self.files.close_all()
                self.files = None
            if ctx.options.record_dir:
                directory = Path(ctx.options.record_dir).expanduser()
                try:
                    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                    probe = tempfile.TemporaryFile(dir=directory, prefix=".probe-")
                    probe.close()
                except OSError as e:
                    raise exceptions.OptionsError(f"record_dir {directory} is not writable: {e}") from None
                self.files = SessionFiles(directory)
                self.failure = None
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
                logger.info("mcp-bastion: removed recording %s (older than %s)", path.name, ctx.options.record_retention)
        except OSError as e:
            logger.error("mcp-bastion: retention sweep of %s failed: %s", self.files.directory, e)

    # --- which flows ---------------------------------------------------------

    def _wanted(self, flow: http.HTTPFlow) -> bool:
        if self.files is None or flow.metadata.get("bastion.passthrough"):
            return False
        return fs.is_mcp(flow) or fs.DECISIONS in flow.metadata

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not self._wanted(flow):
            return
        self.active[flow.id] = flow
        if flow.response or flow.error or not flow.live or not ctx.options.record_required:
            return
        if self.failure and time.monotonic() - self.failed_at < RETRY_AFTER_FAILURE:
            fs.refuse(
                flow,
                Refusal(503, errors.GATEWAY_ERROR,
                        "mcp-bastion cannot record this session right now; the request was not forwarded",
                        {"reason": "recording"}, {"retry-after": str(int(RETRY_AFTER_FAILURE))}),
                stage="record",
                action="error",
            )
            return
        fs.mark_stage(flow, "record")

    # --- event streams -------------------------------------------------------

    def mcp_stream_event(self, ev: fs.StreamEvent) -> None:
        """Learn the session of an HTTP+SSE stream from its `endpoint` event."""
        if ev.event.event == "endpoint" and self.files is not None and LEGACY_SESSION not in ev.flow.metadata:
            sid = parse_qs(urlsplit(ev.event.data.strip()).query).get("session_id")
            if sid:
                ev.flow.metadata[LEGACY_SESSION] = sid[0]

    def mcp_stream_output(self, flow: http.HTTPFlow, data: bytes) -> None:
        if self.files is None or not data:
            return
        spool = self.spools.get(flow.id)
        if spool is None:
            spool = self.spools[flow.id] = Spool(self.files.directory, self.stream_limit)
        spool.write(data)

    # --- writing -------------------------------------------------------------

    @fs.fail_closed("resp:record")
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
            self.files.close_all()

    def _finish(self, flow: http.HTTPFlow, incomplete: str | None = None) -> None:
        if not self._wanted(flow):
            return
        if flow in self.written:
            return  # an error after the response (client gone at the end of a stream)
        self.written.add(flow)
        self.active.pop(flow.id, None)
        spool = self.spools.pop(flow.id, None)
        try:
            self.write(flow, spool, incomplete)
        except Exception as e:
            self.failure, self.failed_at = f"{type(e).__name__}: {e}", time.monotonic()
            logger.error("mcp-bastion: RECORDING FAILED for %s (%s): %s", flow.request.pretty_url, session_key(flow), e,
                         exc_info=e)
            if ctx.options.record_required:
                raise
        else:
            self.failure = None
        finally:
            if spool is not None:
                spool.close()

    def write(self, flow: http.HTTPFlow, spool: Spool | None = None, incomplete: str | None = None) -> Path:
        """Append a scrubbed copy of `flow` to its session file; return the file's path."""
        assert self.files is not None
        copy = flow.copy()
        subject = subject_of(flow) or "anonymous"
        session = session_key(flow)
        note: dict[str, Any] = {"session": session, "subject": subject, "latency_ms": fs.elapsed_ms(flow)}
        redacted = scrub(copy)
        if redacted:
            note["redacted"] = redacted
        if incomplete:
            note["incomplete"] = incomplete
        blob = None
        if spool is None and copy.response is not None and flow.response is not None and callable(flow.response.stream):
            spool = Spool(self.files.directory, 0)  # a stream that sent nothing: record an empty body
        if spool is not None and copy.response is not None:
            note["stream"] = spool.summary()
            if spool.in_memory:
                copy.response.raw_content = spool.getvalue()
            else:
                blob = _Blob(spool)
        copy.metadata[RECORD] = note
        state = copy.get_state()
        if blob is not None:
            state["response"]["content"] = blob
        parts, _ = tnet_parts(state)
        target = self.files.get(subject, session, flow.request.timestamp_start or time.time())
        target.append(parts)
        return target.path
