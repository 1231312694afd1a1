"""
Bounded decoding of compressed HTTP bodies.

The gateway must read what it enforces. gzip and deflate are decoded with a
hard limit on the decoded size (a small compressed body can expand to
gigabytes); other codings (br, zstd, ...) are refused with a clear reason.
"""

from __future__ import annotations

import zlib

from .jsonrpc import ParseError

IDENTITY = ("", "identity")


def decode_content(data: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """Return the decoded body or raise ParseError("bad_encoding" | "too_large")."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    for coding in reversed(codings):
        if coding in IDENTITY:
            continue
        if coding in ("gzip", "x-gzip", "deflate"):
            data = _inflate(data, coding, max_bytes)
        else:
            raise ParseError("bad_encoding", f"content-encoding {coding!r} is not accepted")
    if len(data) > max_bytes:
        raise ParseError("too_large", f"body of {len(data)} bytes exceeds {max_bytes}")
    return data


def _inflate(data: bytes, coding: str, max_bytes: int) -> bytes:
    # 47 = auto-detect gzip or zlib header; deflate may also come raw (-15).
    for wbits in ((47,) if coding != "deflate" else (47, -15)):
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(data, max_bytes + 1)
        except zlib.error:
            continue
        if len(out) > max_bytes or d.unconsumed_tail:
            raise ParseError("too_large", f"decoded body exceeds {max_bytes} bytes")
        if not d.eof:
            raise ParseError("bad_encoding", f"truncated {coding} body")
        return out
    raise ParseError("bad_encoding", f"body is not valid {coding}")
