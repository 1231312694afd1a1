"""
Incremental Server-Sent Events parser and writer (WHATWG HTML, "server-sent events").

The parser works on bytes as they arrive from the network and yields one
`SSEEvent` per *block* (everything up to and including a blank line), keeping
the block's exact raw bytes so that an unchanged event is forwarded byte for
byte. Blocks that carry only comments or `retry:` (keep-alives) are yielded too,
with `dispatch` false: a browser would not fire an event for them, but they are
part of the stream.

Line endings CRLF, LF and CR are all accepted, including a CRLF split across
two chunks. A leading UTF-8 byte order mark is skipped. The parser never holds
more than the one incomplete block it is waiting to finish, and refuses a block
larger than `max_event_bytes`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

DEFAULT_MAX_EVENT = 16 * 1024 * 1024

# Characters the SSE grammar does not treat as line ends but other line splitters do (Python's
# str.splitlines(), and SSE clients built on it): a block holding one is read differently there.
_LOOSE_BREAKS = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_LOOSE_BREAK_CHARS = re.compile(f"[{_LOOSE_BREAKS}]")
_JSON_ESCAPES = {c: f"\\u{ord(c):04x}" for c in _LOOSE_BREAKS}


_LOOSE_BREAK_SEQUENCES = (b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\xc2\x85", b"\xe2\x80\xa8", b"\xe2\x80\xa9")


_LOOSE_BREAK_BYTE_SET = bytes(sorted({seq[-1] for seq in _LOOSE_BREAK_SEQUENCES}))  # the last byte of each


def has_loose_breaks(raw: bytes) -> bool:
    """True if some line splitter other than the SSE grammar would cut `raw` into other lines.

    Most events hold none of the bytes such a break ends with: deleting them (one C pass) tells;
    only then are the sequences searched. Python's `re` with the equivalent alternation tries it
    at every byte: about 20 times slower on a 16 KiB event.
    """
    if len(raw.translate(None, _LOOSE_BREAK_BYTE_SET)) == len(raw):
        return False
    return any(seq in raw for seq in _LOOSE_BREAK_SEQUENCES)


def json_without_loose_breaks(text: str) -> str:
    """Serialised JSON with every such character written as a `\\uXXXX` escape (same value)."""
    return _LOOSE_BREAK_CHARS.sub(lambda m: _JSON_ESCAPES[m.group()], text)


class SSEError(ValueError):
    pass


@dataclass
class SSEEvent:
    """One block of an event stream."""

    raw: bytes
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    has_data: bool = False

    @property
    def dispatch(self) -> bool:
        """True when a conforming client would fire an event for this block."""
        return self.has_data

    def encode(self) -> bytes:
        """Serialise the parsed fields (used when an event was rewritten)."""
        return format_event(
            self.data if self.has_data else None,
            event=None if self.event == "message" else self.event,
            id=self.id,
            retry=self.retry,
            comments=self.comments,
        )


def format_event(
    data: str | None,
    *,
    event: str | None = None,
    id: str | None = None,
    retry: int | None = None,
    comments: list[str] | None = None,
) -> bytes:
    """Write one SSE block with LF line endings.

    Every line of it is one line for any line splitter: comments holding a
    character some splitter takes for a line end are left out, and such
    characters are removed from the other fields (escape JSON data first
    with `json_without_loose_breaks` to keep its value).
    """
    lines: list[str] = []
    for c in comments or ():
        if not _LOOSE_BREAK_CHARS.search(c):
            lines.extend(":" + part for part in _split_lines(c))
    event = _LOOSE_BREAK_CHARS.sub("", event) if event is not None else None
    id = _LOOSE_BREAK_CHARS.sub("", id) if id is not None else None
    data = _LOOSE_BREAK_CHARS.sub("", data) if data is not None else None
    if event is not None:
        _check_field("event", event)
        lines.append(f"event: {event}")
    if id is not None:
        _check_field("id", id)
        lines.append(f"id: {id}")
    if retry is not None:
        lines.append(f"retry: {int(retry)}")
    if data is not None:
        lines.extend(f"data: {part}" if part else "data:" for part in _split_lines(data))
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def _split_lines(text: str) -> list[str]:
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _check_field(name: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise SSEError(f"SSE {name} field must not contain line breaks")


class SSEParser:
    """Feed bytes, get complete blocks. `feed(b"")`-free: call `close()` at end of stream."""

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT):
        self.max_event_bytes = max_event_bytes
        self._buf = bytearray()
        self._scan = 0  # where to continue looking for line ends
        self._block_start = 0
        self._lines: list[bytes] = []
        self._first = True
        self._after_cr = False  # last chunk ended in CR: a leading LF belongs to it
        self.last_event_id: str | None = None
        self.events_seen = 0

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def feed(self, chunk: bytes) -> Iterator[SSEEvent]:
        """Add a network chunk; yield every block it completes, in order."""
        if not chunk:
            return
        self._buf += chunk
        if self._first:
            if len(self._buf) < 3 and b"\xef\xbb\xbf".startswith(bytes(self._buf)):
                return
            if self._buf.startswith(b"\xef\xbb\xbf"):
                del self._buf[:3]
            self._first = False
        buf = self._buf
        pos = self._scan
        n = len(buf)
        consumed = 0
        if self._after_cr and pos < n:
            self._after_cr = False
            if buf[pos] == 0x0A:
                pos += 1  # kept in the next block's raw bytes, so output == input
        while pos < n:
            lf = buf.find(b"\n", pos)
            cr = buf.find(b"\r", pos, lf if lf >= 0 else n)
            if cr >= 0:
                end = cr
                if cr == n - 1:  # CR ends the chunk: the line ends here; skip an LF that may follow
                    nxt = n
                    self._after_cr = True
                else:
                    nxt = cr + 2 if buf[cr + 1] == 0x0A else cr + 1
            elif lf >= 0:
                end = lf
                nxt = lf + 1
            else:
                break
            line = bytes(buf[pos:end])
            pos = nxt
            if line:
                self._lines.append(line)
                continue
            # blank line: the block is complete
            if pos - self._block_start - 1 > self.max_event_bytes:
                # the same limit as for a block still arriving, however the network cut the stream
                raise SSEError(f"SSE event larger than {self.max_event_bytes} bytes")
            raw = bytes(buf[self._block_start : pos])
            lines = self._lines
            self._lines = []
            self._block_start = pos
            consumed = pos
            yield self._build(raw, lines)
        if consumed:
            del buf[:consumed]
            pos -= consumed
            self._block_start -= consumed
        self._scan = pos
        if len(buf) - self._block_start > self.max_event_bytes:
            raise SSEError(
                f"SSE event larger than {self.max_event_bytes} bytes without a blank line"
            )

    def close(self) -> bytes:
        """End of stream. Returns the bytes of an unterminated block, which clients discard."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._lines = []
        self._scan = self._block_start = 0
        return rest

    def _build(self, raw: bytes, lines: list[bytes]) -> SSEEvent:
        ev = SSEEvent(raw=raw)
        data_parts: list[str] = []
        for bline in lines:
            line = bline.decode("utf-8", errors="replace")
            if line.startswith(":"):
                ev.comments.append(line[1:])
                continue
            name, sep, value = line.partition(":")
            if sep and value.startswith(" "):
                value = value[1:]
            if name == "data":
                data_parts.append(value)
                ev.has_data = True
            elif name == "event":
                ev.event = value or "message"
            elif name == "id":
                if "\0" not in value:
                    ev.id = value
                    self.last_event_id = value
            elif name == "retry":
                if value.isascii() and value.isdigit():
                    ev.retry = int(value)
            # other field names are ignored, per spec
        ev.data = "\n".join(data_parts)
        self.events_seen += 1
        return ev
