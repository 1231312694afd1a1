"""The bytes a client received on one event stream, kept for its recording."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SPOOL_MEMORY = 1 << 20  # event-stream bytes kept in memory before spooling to disk


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
