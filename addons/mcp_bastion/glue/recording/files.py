"""
Session recordings on disk: one append-only mitmproxy flow file per (subject, session).

Files are named `<UTC start>_<subject>_<session>.mitm`; at most `MAX_OPEN`
are kept open (least recently used closed first), and `sweep` removes the
recordings older than the retention.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections import OrderedDict
from pathlib import Path

from mcp_bastion.glue.recording.sessions import safe_name
from mcp_bastion.glue.recording.tnet import Blob

MAX_OPEN = 64  # session files kept open at once (least recently used are closed)
FILE_SUFFIX = ".mitm"
_FILE_NAME = re.compile(r"^\d{8}T\d{6}Z_.+\.mitm$")


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

    def append(self, parts: list[bytes | Blob]) -> None:
        start = os.lseek(self.fd, 0, os.SEEK_END)
        try:
            if not any(isinstance(p, Blob) for p in parts):
                _write_all(self.fd, b"".join(parts))  # type: ignore[arg-type]
            else:
                for p in parts:
                    if isinstance(p, Blob):
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

    def __init__(self, directory: Path, max_open: int = MAX_OPEN, replica: str = ""):
        self.directory = directory
        self.max_open = max_open
        # Replicas sharing a record directory each write their own files: `<stamp>_<replica>_<subject>_<session>`.
        self.replica = replica
        self.open: OrderedDict[tuple[str, str], SessionFile] = OrderedDict()
        # `_<subject>_<session>.mitm` -> the newest recording's name with it: read from the directory once,
        # then kept up to date, so a new session never lists the directory (which grows with every session
        # the retention keeps: listing it per session made each one cost more than the last).
        self.latest: dict[str, str] = {}
        for path in directory.iterdir():
            if _FILE_NAME.match(path.name):
                self._note(path.name)

    def _note(self, name: str) -> None:
        suffix = name[name.index("_"):]
        if name > self.latest.get(suffix, ""):
            self.latest[suffix] = name

    def get(self, subject: str, session: str, started: float) -> SessionFile:
        key = (subject, session)
        f = self.open.get(key)
        if f is not None:
            self.open.move_to_end(key)
            return f
        replica = f"_{self.replica}" if self.replica else ""
        suffix = f"{replica}_{safe_name(subject)}_{safe_name(session)}{FILE_SUFFIX}"
        earlier = self.latest.get(suffix)
        if earlier is not None and (self.directory / earlier).exists():
            path = self.directory / earlier  # a session resumed after its file was closed
        else:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
            path = self.directory / f"{stamp}{suffix}"
            self._note(path.name)
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
                    suffix = path.name[path.name.index("_"):]
                    if self.latest.get(suffix) == path.name:
                        del self.latest[suffix]
            except FileNotFoundError:
                continue
        return removed
