"""
The in-flight journal: what the gateway forwarded, written before it is forwarded.

A session file only receives a flow when it ends. So that a gateway killed
mid-call still leaves the call recorded, the Recorder first appends the flow
as it is about to be forwarded (request only, scrubbed like any recording)
to `<record_dir>/.inflight/<pid>-<stamp>.mitm`, an ordinary flow file, and
writes the flow's id to the `.done` file beside it once the finished flow is
in its session file. The journal is locked (`flock`) for as long as its
gateway runs, grows to `ROTATE_AT` bytes and is then replaced by a new one
holding only the flows still in flight, and is removed on a clean stop.

At start, `recover` takes every journal no running gateway holds: each flow
in it without a `.done` line is appended to its session file, marked
incomplete ("the gateway stopped after forwarding this request"), and the
journal is removed. A journal cut short by the kill is read up to its last
whole flow.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

from mitmproxy.io import tnetstring

from mcp_bastion.core.vocab import Meta
from mcp_bastion.glue.recording.files import SessionFile, SessionFiles
from mcp_bastion.glue.recording.tnet import Blob

logger = logging.getLogger("mcp_bastion")

FOLDER = ".inflight"  # under the record directory
ROTATE_AT = 32 * 1024 * 1024
RECOVERED = ("the gateway stopped (killed or crashed) after forwarding this request and before it ended; "
             "recovered from its in-flight journal at the next start")


class Journal:
    """This gateway's in-flight journal: a locked flow file and its `.done` list."""

    def __init__(self, directory: Path):
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        folder = directory / FOLDER
        folder.mkdir(mode=0o700, exist_ok=True)
        base = folder / f"{os.getpid()}-{stamp}-{time.monotonic_ns() % 10**9}"
        self.flows = SessionFile(base.with_suffix(".mitm"))
        try:
            fcntl.flock(self.flows.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.done_fd = os.open(base.with_suffix(".done"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except BaseException:
            self.flows.close()
            raise
        self.size = 0

    @property
    def path(self) -> Path:
        return self.flows.path

    def begin(self, pieces: list[bytes | Blob]) -> None:
        """Append one flow about to be forwarded (rolled back if the write fails)."""
        self.flows.append(pieces)
        self.size += sum(len(p) for p in pieces if isinstance(p, bytes))

    def end(self, flow_id: str) -> None:
        """The flow is in its session file."""
        data = flow_id.encode() + b"\n"
        if os.write(self.done_fd, data) != len(data):
            raise OSError("short write to the in-flight journal")

    def full(self) -> bool:
        return self.size >= ROTATE_AT

    def close(self, remove: bool) -> None:
        """Close; `remove` on a clean stop (every flow of it is in its session file)."""
        with contextlib.suppress(OSError):
            os.close(self.done_fd)
        with contextlib.suppress(OSError):
            self.flows.close()
        if remove:
            for path in (self.path, self.path.with_suffix(".done")):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def recover(directory: Path, files: SessionFiles) -> list[str]:
    """Append the unfinished flows of every abandoned journal in `directory` to their session files.

    Returns their ids. A journal another running gateway holds is left alone.
    """
    recovered: list[str] = []
    for path in sorted((directory / FOLDER).glob("*.mitm")):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its gateway is running
            done_path = path.with_suffix(".done")
            try:
                done = set(done_path.read_text("ascii", "replace").split())
            except FileNotFoundError:
                done = set()
            with os.fdopen(os.dup(fd), "rb") as f:
                states = list(_states(f))
            for state in states:
                if state.get("id") in done:
                    continue
                _append_recovered(files, state)
                recovered.append(str(state.get("id")))
            path.unlink()
            with contextlib.suppress(FileNotFoundError):
                done_path.unlink()
        finally:
            os.close(fd)
    return recovered


def _states(f) -> Iterable[dict]:
    """The whole flows of a journal; one cut short by a kill ends the read."""
    while True:
        try:
            state = tnetstring.load(f)
        except (ValueError, IndexError, TypeError):
            return  # end of file, or a record cut short
        if isinstance(state, dict):
            yield state


def _append_recovered(files: SessionFiles, state: dict) -> None:
    metadata = state.setdefault("metadata", {})
    note = metadata.setdefault(Meta.RECORD, {})
    note["incomplete"] = RECOVERED
    subject = str(note.get("subject") or "anonymous")
    session = str(note.get("session") or state.get("id"))
    request = state.get("request") or {}
    started = request.get("timestamp_start") or time.time()
    files.get(subject, session, started).append([tnetstring.dumps(state)])
