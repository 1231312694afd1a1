"""The incremental SSE parser against the WHATWG rules it claims to follow."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_bastion.core.sse import SSEError, SSEParser, format_event


def parse_all(chunks, **kw):
    p = SSEParser(**kw)
    out = []
    for c in chunks:
        out.extend(p.feed(c))
    return out, p


def test_single_event_fields():
    (ev,), _ = parse_all([b"event: message\nid: 7\nretry: 1500\ndata: {\"a\":1}\n\n"])
    assert (ev.event, ev.id, ev.retry, ev.data, ev.dispatch) == ("message", "7", 1500, '{"a":1}', True)


def test_multiline_data_and_comment_and_crlf():
    raw = b": keep\r\ndata: line1\r\ndata:line2\r\ndata\r\n\r\n"
    (ev,), _ = parse_all([raw])
    assert ev.data == "line1\nline2\n"
    assert ev.comments == [" keep"]
    assert ev.raw == raw


def test_cr_only_line_endings_and_cr_lf_split_across_chunks():
    evs, _ = parse_all([b"data: a\r", b"\ndata: b\r", b"\r", b"data: c\r\r"])
    assert [e.data for e in evs] == ["a\nb", "c"]


def test_event_not_emitted_until_blank_line():
    p = SSEParser()
    assert list(p.feed(b"data: x\n")) == []
    assert [e.data for e in p.feed(b"\n")] == ["x"]


def test_comment_only_block_is_kept_but_not_dispatched():
    (ev,), _ = parse_all([b": ping\n\n"])
    assert not ev.dispatch and ev.raw == b": ping\n\n"


def test_bom_is_skipped_even_when_split():
    evs, _ = parse_all([b"\xef", b"\xbb\xbfdata: x\n\n"])
    assert evs[0].data == "x"


def test_id_with_nul_is_ignored_and_bad_retry_ignored():
    (ev,), p = parse_all([b"id: a\x00b\nretry: 12x\ndata: y\n\n"])
    assert ev.id is None and ev.retry is None and p.last_event_id is None


def test_oversized_event_refused():
    p = SSEParser(max_event_bytes=100)
    with pytest.raises(SSEError):
        list(p.feed(b"data: " + b"x" * 200))


def test_close_returns_unterminated_tail():
    _, p = parse_all([b"data: done\n\ndata: half"])
    assert p.close() == b"data: half"


def test_format_roundtrip():
    raw = format_event('{"x":"a\\nb"}\nsecond', event="message", id="3")
    (ev,), _ = parse_all([raw])
    assert ev.data == '{"x":"a\\nb"}\nsecond' and ev.id == "3"


def test_format_refuses_line_break_in_id():
    with pytest.raises(SSEError):
        format_event("x", id="a\nb")


STREAM = (
    b"\xef\xbb\xbf: hello\r\n\r\n"
    b"event: message\r\nid: 1\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{}}\r\n\r\n"
    b"data: a\rdata: b\r\r"
    b"event: endpoint\ndata: /messages?session_id=abc\n\n"
    b"retry: 100\n\n"
)


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_any_chunking_gives_the_same_events(cuts):
    cuts = sorted(set(cuts))
    chunks, prev = [], 0
    for c in cuts + [len(STREAM)]:
        chunks.append(STREAM[prev:c])
        prev = c
    whole, _ = parse_all([STREAM])
    split, _ = parse_all(chunks)
    assert [(e.event, e.data, e.id) for e in split] == [(e.event, e.data, e.id) for e in whole]
    assert [e.data for e in whole if e.dispatch] == [
        '{"jsonrpc":"2.0","id":1,"result":{}}', "a\nb", "/messages?session_id=abc"
    ]
    # raw bytes of all blocks reassemble the stream (minus the BOM): nothing is lost or duplicated
    assert b"".join(e.raw for e in split) == STREAM[3:]


def test_crlf_split_at_block_end_keeps_every_byte():
    raw = b"data: a\r\n\r\ndata: b\r\n\r\n"
    for cut in range(len(raw) + 1):
        evs, p = parse_all([raw[:cut], raw[cut:]])
        assert [e.data for e in evs] == ["a", "b"]
        assert b"".join(e.raw for e in evs) + p.close() == raw
