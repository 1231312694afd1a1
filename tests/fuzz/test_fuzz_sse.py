"""
Fuzzing the incremental SSE parser (core/sse.py) with hypothesis.

- The same bytes cut at arbitrary points give the same blocks as fed whole (fields,
  and the raw bytes, which reassemble the stream).
- What the parser dispatches is what a WHATWG client (browsers, the SDKs' SSE
  readers) dispatches for the same bytes: a reference implementation of the
  spec's interpretation, written here independently, is the oracle.
- Limits: the parser never holds more than `max_event_bytes` of an unfinished block,
  and raises nothing but `SSEError`.
- An event the gateway rewrites (`SSEEvent.encode`, `format_event`) reads back as the
  same event.

Inputs that hit a known finding are kept out of the strategies (each says where); the
findings are the `test_finding_*` tests at the end (each failed until its fix), with a minimal reproduction.

BASTION_FUZZ_EXAMPLES=N raises the number of examples (and explores new inputs) for a
longer local run; without it every run tries the same inputs (`derandomize`).
"""

from __future__ import annotations

import json
import os
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mcp_bastion.core.sse import (
    SSEError,
    SSEEvent,
    SSEParser,
    format_event,
    has_loose_breaks,
    json_without_loose_breaks,
)

EXTRA = int(os.environ.get("BASTION_FUZZ_EXAMPLES") or 0)
DERANDOMIZE = not EXTRA
SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def examples(n: int) -> int:
    """`n` in CI; BASTION_FUZZ_EXAMPLES raises it for a longer local run."""
    return max(n, EXTRA)


BOM = b"\xef\xbb\xbf"
TEXT = st.characters(exclude_categories=["Cs"])  # what a parsed event or dumped JSON holds: no lone surrogates
# What other line splitters (str.splitlines()) also take for a line end: format_event leaves it out.
LOOSE = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
LINE = st.characters(exclude_categories=["Cs"], exclude_characters="\r\n" + LOOSE)

# Pieces an event stream is made of, its line ends and its awkward bytes (a BOM anywhere,
# invalid and split UTF-8, NUL), glued in any order.
TOKENS = [
    b"data:", b"data: ", b"data", b"event:", b"event: message", b"event: endpoint", b"event:x", b"Event: message",
    b"id:", b"id: 7", b"id: a\x00b", b"retry:", b"retry: 100", b"retry: 1x", b": c", b":", b"\r", b"\n",
    b"\r\n", b"\n\n", b"\r\r", b"\r\n\r\n", b" ", b"x", b"{}", BOM, b"\xef\xbb", b"\xff", b"\xe2\x82", b"\xe2\x82\xac",
    b"\x00", b"\xc3", b"\xa9", b'{"jsonrpc":"2.0","id":1,"result":{}}',
]
pieces = st.one_of(st.sampled_from(TOKENS), st.binary(max_size=4))
streams = st.builds(lambda head, body: head + b"".join(body),
                    st.sampled_from([b"", b"", BOM, BOM[:1], BOM[:2], b"\r", b"\n"]),
                    st.lists(pieces, max_size=40))


@st.composite
def cut(draw, data: bytes) -> list[bytes]:
    """`data` in chunks cut at arbitrary points (empty chunks included)."""
    points = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    chunks, prev = [], 0
    for p in [*points, len(data)]:
        chunks.append(data[prev:p])
        prev = p
    return chunks


@st.composite
def stream_and_chunks(draw) -> tuple[bytes, list[bytes]]:
    data = draw(streams)
    return data, draw(cut(data))


def feed_all(chunks: list[bytes], max_event_bytes: int = 1 << 20) -> tuple[list[SSEEvent], SSEParser]:
    p = SSEParser(max_event_bytes)
    out: list[SSEEvent] = []
    for c in chunks:
        out.extend(p.feed(c))
    return out, p


def fields(e: SSEEvent) -> tuple:
    return (e.event, e.data, e.id, e.retry, tuple(e.comments), e.has_data, e.dispatch)


def whatwg(data: bytes) -> list[tuple[str, str, str]]:
    """The events a client dispatches for a complete stream, per the WHATWG "event stream interpretation":
    (type, data, last event id). Decode as UTF-8 with replacement, drop one leading BOM, lines end at
    CRLF, LF or CR; the unfinished block at the end is discarded."""
    text = data.decode("utf-8", errors="replace")
    text = text.removeprefix("\ufeff")
    lines = re.split("\r\n|\r|\n", text)
    lines.pop()  # what follows the last line end is not a line (yet)
    out = []
    buf, kind, last_id = "", "", ""
    for line in lines:
        if line == "":
            if buf:
                out.append((kind or "message", buf.removesuffix("\n"), last_id))
            buf, kind = "", ""
            continue
        if line.startswith(":"):
            continue
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            buf += value + "\n"
        elif name == "event":
            kind = value
        elif name == "id" and "\0" not in value:
            last_id = value
    return out


def dispatched(events: list[SSEEvent]) -> list[tuple[str, str, str]]:
    """What the parser's blocks dispatch, with the last event id in force at each."""
    out, last_id = [], ""
    for e in events:
        if e.id is not None:
            last_id = e.id
        if e.dispatch:
            out.append((e.event, e.data, last_id))
    return out


def realigned(raws: list[bytes]) -> list[bytes]:
    """Raw blocks (then the unfinished tail) with an LF that completes the previous block's CR moved back onto
    it: a block that ended at a chunk's last byte (a CR) cannot know yet that an LF follows, so that LF starts
    the next block."""
    out = list(raws)
    for i in range(1, len(out)):
        if out[i].startswith(b"\n") and out[i - 1].endswith(b"\r"):
            out[i - 1] += b"\n"
            out[i] = out[i][1:]
    return out


# --- the same bytes, however they are cut ---------------------------------------------------------


@settings(max_examples=examples(400), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(stream_and_chunks())
def test_any_split_gives_the_blocks_of_the_whole(case):
    data, chunks = case
    whole, pw = feed_all([data])
    split, ps = feed_all(chunks)
    assert [fields(e) for e in split] == [fields(e) for e in whole]
    assert (ps.last_event_id, ps.events_seen) == (pw.last_event_id, pw.events_seen)
    tail_s, tail_w = ps.close(), pw.close()
    assert realigned([e.raw for e in split] + [tail_s]) == [e.raw for e in whole] + [tail_w]
    # nothing is lost or duplicated: the blocks and the unfinished tail are the stream (a leading BOM aside)
    assert b"".join(e.raw for e in split) + tail_s == b"".join(e.raw for e in whole) + tail_w
    assert b"".join(e.raw for e in whole) + tail_w in (data, data.removeprefix(BOM))


@settings(max_examples=examples(400), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(stream_and_chunks())
def test_what_is_dispatched_is_what_a_whatwg_client_dispatches(case):
    """The gateway checks the events its parser sees; the client acts on the events it parses itself.
    Any difference would let an event through unchecked (or check one the client never sees)."""
    data, chunks = case
    events, _ = feed_all(chunks)
    assert dispatched(events) == whatwg(data)


@settings(max_examples=examples(200), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(st.lists(st.tuples(st.sampled_from(["message", "endpoint", "x"]), st.text(LINE, max_size=30)), max_size=6),
       st.data())
def test_a_stream_of_well_formed_events_reads_the_same_in_any_cut(events, data):
    wire = b"".join(format_event(d, event=None if k == "message" else k) for k, d in events)
    chunks = data.draw(cut(wire))
    parsed, p = feed_all(chunks)
    assert [(e.event, e.data) for e in parsed] == events
    assert p.close() == b""


# --- limits, and the one error type ------------------------------------------------------------------


@settings(max_examples=examples(400), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(stream_and_chunks(), st.integers(3, 48))  # (up to 2 bytes of a BOM are held before anything is decided)
def test_only_sse_error_is_raised_and_no_unfinished_block_beyond_the_limit_is_held(case, limit):
    _, chunks = case
    p = SSEParser(limit)
    for c in chunks:
        try:
            list(p.feed(c))
        except SSEError:
            return  # the gateway stops the stream here
        assert p.pending_bytes <= limit
    p.close()
    assert p.pending_bytes == 0


@settings(max_examples=examples(300), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(streams, st.integers(1, 48))
def test_byte_by_byte_no_block_larger_than_the_limit_is_yielded(data, limit):
    """Bytes arriving one at a time (the tightest cut): a block is refused before it outgrows the limit; only
    the line end that completes it may come on top."""
    p = SSEParser(limit)
    try:
        for i in range(len(data)):
            for e in p.feed(data[i:i + 1]):
                assert len(e.raw) <= limit + 1
    except SSEError:
        pass


def plain(value: str | None) -> str | None:
    """`value` as format_event writes it: without the characters other line splitters cut at."""
    return None if value is None else "".join(c for c in value if c not in LOOSE)


# --- what the gateway writes when it rewrites an event --------------------------------------------------


@settings(max_examples=examples(300), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(streams, st.one_of(st.none(), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(TEXT),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(TEXT, max_size=5), inner, max_size=3),
    max_leaves=8)))
def test_a_rewritten_event_reads_back_as_the_same_event(data, replacement):
    """SSEStream re-serialises an event whose messages a stage changed (`encode`, keeping its other fields, the
    JSON escaped with `json_without_loose_breaks`): the client must read exactly that event back, one block,
    nothing more (of the other fields, less what another line splitter would cut at)."""
    events, _ = feed_all([data])
    for e in events:
        if not e.has_data:
            continue
        if replacement is not None:
            e.data = json_without_loose_breaks(json.dumps(replacement, ensure_ascii=False, separators=(",", ":")))
            assert json.loads(e.data) == replacement
        wire = e.encode()
        assert not has_loose_breaks(wire)
        back, p = feed_all([wire])
        assert p.close() == b""
        expected = SSEEvent(b"", plain(e.event) or "message", plain(e.data), plain(e.id), e.retry,
                            [c for c in e.comments if plain(c) == c], True)
        assert [fields(b) for b in back] == [fields(expected)]
        assert whatwg(wire) == [(expected.event, expected.data, expected.id or "")]


@settings(max_examples=examples(300), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(
    data=st.one_of(st.none(), st.text(TEXT)),
    event=st.one_of(st.none(), st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"))),
    id=st.one_of(st.none(), st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\0"))),
    retry=st.one_of(st.none(), st.integers(0, 10**9)),
    comments=st.lists(st.text(TEXT), max_size=3),
)
def test_format_event_reads_back_the_same_for_every_line_splitter(data, event, id, retry, comments):
    """One block, read back with its fields (less what other line splitters would cut at), and nothing a
    `str.splitlines()` client would read as other lines."""
    assume(data is not None or id is not None or retry is not None or (event or "").strip(LOOSE))
    wire = format_event(data, event=event, id=id, retry=retry, comments=comments)
    assert not has_loose_breaks(wire)
    text = wire.decode("utf-8")
    assert text.splitlines() == text.split("\n")[:-1]

    (e,), p = feed_all([wire])
    assert p.close() == b""
    assert e.has_data == (data is not None)
    if data is not None:
        assert e.data == plain(data).replace("\r\n", "\n").replace("\r", "\n")
    assert (e.event, e.id, e.retry) == (plain(event) or "message", plain(id), retry)
    kept = [c for c in comments if not any(ch in LOOSE for ch in c)]
    assert e.comments == [c for comment in kept for c in comment.replace("\r\n", "\n").replace("\r", "\n")
                          .split("\n")]


@settings(max_examples=examples(100), deadline=None, derandomize=DERANDOMIZE, suppress_health_check=SLOW)
@given(st.builds(lambda a, br, b: a + br + b, st.text(TEXT), st.sampled_from(["\r", "\n", "\r\n"]), st.text(TEXT)),
       st.sampled_from(["event", "id"]))
def test_format_event_refuses_a_line_break_in_a_field_with_sse_error(value, name):
    with pytest.raises(SSEError):
        format_event("x", **{name: value})


# --- findings -----------------------------------------------------------------------------------------


def test_finding_the_event_size_limit_depends_on_the_chunking():
    event = b": " + b"x" * 100 + b"\ndata: {}\n\n"  # 111 bytes, limit 32
    byte_by_byte = SSEParser(32)
    with pytest.raises(SSEError):
        for i in range(len(event)):
            list(byte_by_byte.feed(event[i:i + 1]))
    with pytest.raises(SSEError):  # today: yields the 111-byte block
        list(SSEParser(32).feed(event))
