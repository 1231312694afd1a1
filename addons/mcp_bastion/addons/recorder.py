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
import dataclasses
import functools
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

from mitmproxy import connection, ctx, exceptions, http, version
from mitmproxy.io import tnetstring
from mitmproxy.utils import asyncio_utils, human

from mcp_bastion.glue import flowstate as fs
from mcp_bastion.core.audit import parse_duration

logger = logging.getLogger("mcp_bastion")

RECORD = "bastion.record"  # on the recorded flow: {"session", "subject", "latency_ms", "stream", "incomplete", "redacted"}
SECRET_HEADERS = fs.SECRET_HEADERS  # set by the Auth addon: header names that carry credentials
LEGACY_SESSION = "bastion.legacy_session"  # session id announced in an HTTP+SSE `endpoint` event

ALWAYS_SECRET = ("authorization", "proxy-authorization", "cookie", "set-cookie")
SECRET_PARAMS = ("access_token",)
REDACTED = "[redacted by mcp-bastion]"
_REDACTED_BYTES = REDACTED.encode()
_SECRET_PARAMS_BYTES = tuple(p.encode() for p in SECRET_PARAMS)

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


def scrub(state: dict[str, Any], secret_headers: Any = None) -> list[str]:
    """Replace credentials in a flow's state (from `get_state()`) with a marker; return what was redacted.

    Headers and trailers: Authorization, Proxy-Authorization, Cookie,
    Set-Cookie and every name in `secret_headers` (the flow's
    `bastion.secret_headers`: the upstream credential the Auth addon
    injected), compared case-insensitively like mitmproxy's `Headers`;
    every value of such a field is replaced. Query: `access_token`.

    Only the state's own `request`/`response` dicts are changed (their header
    tuples and path are replaced, not mutated), so the live flow is untouched.
    """
    names = set(ALWAYS_SECRET)
    if isinstance(secret_headers, str):
        secret_headers = [secret_headers]
    names.update(n.lower() for n in secret_headers or () if isinstance(n, str))
    redacted = []
    for where in ("request", "response"):
        msg = state.get(where)
        if msg is None:
            continue
        for part, label in (("headers", "header"), ("trailers", "trailer")):
            fields = msg.get(part)
            if not fields:
                continue
            hits: list[str] = []
            out = []
            for key, value in fields:
                name = key.decode("utf-8", "surrogateescape").lower()
                if name in names:
                    value = _REDACTED_BYTES
                    if name not in hits:
                        hits.append(name)
                out.append((key, value))
            if hits:
                msg[part] = tuple(out)
                redacted += [f"{where} {label} {name}" for name in hits]
    redacted += _scrub_query(state["request"])
    return redacted


def _scrub_query(request: dict[str, Any]) -> list[str]:
    """Redact SECRET_PARAMS in a request state's path, exactly as `Request.query` sees them."""
    path = request["path"]
    if b"?" not in path or (b"%" not in path and not any(p in path for p in _SECRET_PARAMS_BYTES)):
        return []  # no query, or none that could decode to a secret parameter's name
    req = http.Request.from_state(dict(request))
    query = req.query
    found = [p for p in SECRET_PARAMS if p in query]
    for param in found:
        query.set_all(param, [REDACTED] * len(query.get_all(param)))
    if found:
        request["path"] = req.data.path
    return [f"query {p}" for p in found]


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


_LARGE = 4096  # bytes at least this long are passed on as their own piece rather than copied into one


_KEY_PIECES: dict[str, bytes] = {}  # encoded dict keys: a flow's state uses the same few dozen names again and again
_KEY_PIECES_MAX = 1024  # bounded: keys that come from data cannot fill memory
_KEY_PIECE_BYTES = 64


def _key_piece(key: Any) -> bytes:
    out: list = []
    _encode(key, out)
    piece = b"".join(out)
    if type(key) is str and len(piece) <= _KEY_PIECE_BYTES and len(_KEY_PIECES) < _KEY_PIECES_MAX:
        _KEY_PIECES[key] = piece
    return piece


def tnet_parts(value: Any) -> tuple[list[bytes | _Blob], int]:
    """Encode `value` as tnetstring pieces and their total size; a `_Blob` stays a placeholder.

    The pieces joined are byte for byte `mitmproxy.io.tnetstring.dumps(value)`
    (which writes a dict's items in reverse order); a `_Blob` in their place is
    its spool's bytes. About twice as fast as `dumps` on a flow's state, and a
    large body is passed on as it is rather than copied into a piece.
    """
    out: list[bytes | _Blob] = []
    size = _encode(value, out)
    return out, size


def _encode(value: Any, out: list) -> int:
    kind = type(value)
    if kind is str:
        data = value.encode("utf8")
        piece = b"%d:%s;" % (len(data), data)
    elif kind is bytes:
        if len(value) >= _LARGE:
            head = b"%d:" % len(value)
            out += (head, value, b",")
            return len(head) + len(value) + 1
        piece = b"%d:%s," % (len(value), value)
    elif kind is dict:
        at = len(out)
        out.append(b"")
        n = 0
        for k, v in reversed(value.items()):
            key = _KEY_PIECES.get(k) or _key_piece(k)
            out.append(key)
            n += len(key) + _encode(v, out)
        out[at] = head = b"%d:" % n
        out.append(b"}")
        return len(head) + n + 1
    elif kind is tuple or kind is list:
        at = len(out)
        out.append(b"")
        n = 0
        for v in value:
            n += _encode(v, out)
        out[at] = head = b"%d:" % n
        out.append(b"]")
        return len(head) + n + 1
    elif value is None:
        piece = b"0:~"
    elif value is True:
        piece = b"4:true!"
    elif value is False:
        piece = b"5:false!"
    elif kind is int:
        data = b"%d" % value
        piece = b"%d:%s#" % (len(data), data)
    elif kind is float:
        data = repr(value).encode()
        piece = b"%d:%s^" % (len(data), data)
    elif kind is _Raw:
        out.append(value.data)
        return len(value.data)
    elif kind is _Blob:
        head = b"%d:" % value.size
        out += (head, value, b",")
        return len(head) + value.size + 1
    else:
        piece = tnetstring.dumps(value)  # subclasses of the types above: mitmproxy's own rules (or its error)
    out.append(piece)
    return len(piece)


# --- flow state ---------------------------------------------------------------------


class _Raw:
    """A value already encoded as a tnetstring."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


@functools.cache
def _serialised_fields(cls: type) -> tuple[str, ...]:
    """The fields a connection class's `get_state()` writes (mitmproxy skips `serialize=False`)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("serialize", True))


class ConnectionStates:
    """Each connection's state, encoded once and reused while none of its fields changed.

    The flows of a keep-alive connection share their client and server
    connection, and rebuilding both states (`Connection.get_state()`) for
    every flow is most of what `flow.get_state()` costs. A connection's fields
    hold immutable values or lists of them (mitmproxy's `Client`/`Server`), so
    a tuple of their values, lists as tuples, tells whether it changed.
    """

    def __init__(self) -> None:
        self._memo: weakref.WeakKeyDictionary[connection.Connection, tuple[tuple, _Raw]] = weakref.WeakKeyDictionary()

    def encoded(self, conn: connection.Connection) -> _Raw:
        values = tuple(tuple(v) if isinstance(v, list) else v
                       for v in (getattr(conn, name) for name in _serialised_fields(type(conn))))
        known = self._memo.get(conn)
        if known is not None and known[0] == values:
            return known[1]
        raw = _Raw(tnetstring.dumps(conn.get_state()))
        self._memo[conn] = (values, raw)
        return raw


def flow_state(flow: http.HTTPFlow, conns: ConnectionStates) -> dict[str, Any]:
    """`flow.get_state()`, with the connections as encoded `_Raw` values and the metadata as a shallow copy.

    Encoded by `tnet_parts`, it gives the same bytes as `flow.get_state()`
    (the same keys in the same order: `Flow.get_state` then `HTTPFlow.get_state`;
    a test holds the two together). A flow with a backup (edited in mitmweb or
    the console) takes mitmproxy's own path, which decides whether to keep the
    backup. Only the returned containers may be changed, not the values they
    share with the live flow.
    """
    if flow._backup is not None:  # no public accessor; set only by flow.backup()
        return flow.get_state()
    return {
        "version": version.FLOW_FORMAT_VERSION,
        "type": flow.type,
        "id": flow.id,
        "error": flow.error.get_state() if flow.error else None,
        "client_conn": conns.encoded(flow.client_conn),
        "server_conn": conns.encoded(flow.server_conn),
        "intercepted": flow.intercepted,
        "is_replay": flow.is_replay,
        "marked": flow.marked,
        "metadata": dict(flow.metadata),
        "comment": flow.comment,
        "timestamp_created": flow.timestamp_created,
        "backup": None,
        "request": flow.request.get_state(),
        "response": flow.response.get_state() if flow.response else None,
        "websocket": flow.websocket.get_state() if flow.websocket else None,
    }


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
        self.conns = ConnectionStates()

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
        failing = bool(self.failure) and time.monotonic() - self.failed_at < RETRY_AFTER_FAILURE
        fs.admit_unless_failing(flow, stage="record", failing=failing, hold=RETRY_AFTER_FAILURE,
                                what="record this session", reason="recording")

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
        """Append `flow`, secrets scrubbed, to its session file; return the file's path.

        The flow is serialised once (`flow_state`: fresh containers, the
        connections' states reused while unchanged) and the secrets are
        replaced in that state, so the live flow is never changed or copied.
        """
        assert self.files is not None
        subject = subject_of(flow) or "anonymous"
        session = session_key(flow)
        note: dict[str, Any] = {"session": session, "subject": subject, "latency_ms": fs.elapsed_ms(flow)}
        state = flow_state(flow, self.conns)
        if flow.metadata.get(fs.MCP, {}).get("closed"):
            # The client closed an event stream after its answer arrived (the Gateway notes it in
            # bastion.mcp "closed"): not an error, and mitmproxy would list the flow twice for one.
            state["error"] = None
        redacted = scrub(state, flow.metadata.get(SECRET_HEADERS))
        if redacted:
            note["redacted"] = redacted
        if incomplete:
            note["incomplete"] = incomplete
        response = state["response"]
        if spool is None and response is not None and callable(flow.response.stream):
            spool = Spool(self.files.directory, 0)  # a stream that sent nothing: record an empty body
        blob = None
        if spool is not None and response is not None:
            note["stream"] = spool.summary()
            if spool.in_memory:
                response["content"] = spool.getvalue()
            else:
                response["content"] = blob = _Blob(spool)
        state["metadata"][RECORD] = note
        parts, _ = tnet_parts(state)
        if blob is None:
            pieces: list[bytes | _Blob] = [b"".join(parts)]  # type: ignore[arg-type]
        else:  # the spooled body is copied from disk between the two halves
            at = parts.index(blob)
            pieces = [b"".join(parts[:at]), blob, b"".join(parts[at + 1:])]  # type: ignore[arg-type]
        target = self.files.get(subject, session, flow.request.timestamp_start or time.time())
        target.append(pieces)
        return target.path
