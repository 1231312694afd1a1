"""The audit chain's faster spelling (orjson) and the old one (Python's json) both verify; times read the same."""

from __future__ import annotations

import hmac
import json
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from mcp_bastion.core import audit

KEY = b"k" * 32
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                           max_size=3), max_leaves=12)


def old_seal(chain: audit.Chain, record: dict) -> dict:
    """How records were sealed before orjson: the MAC over Python's json spelling."""
    out = dict(record, seq=chain.seq + 1, prev=chain.prev)
    out["hash"] = hmac.digest(KEY, audit.canonical(out), "sha256").hex()
    chain.seq, chain.prev = out["seq"], out["hash"]
    return out


def old_line(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


@given(st.lists(st.dictionaries(st.sampled_from(["a", "b", "latency_ms", "é", "z"]), values, max_size=4),
                min_size=1, max_size=4), st.booleans())
def test_a_log_written_either_way_verifies_and_an_edit_does_not(records, old):
    chain = audit.Chain(KEY)
    if old:
        lines = [old_line(old_seal(chain, r)) for r in records]
    else:
        lines = [audit.line_of(chain.seal(r)) for r in records]
    assert audit.verify_lines(lines, KEY).ok
    edited = json.loads(lines[0])
    edited["tampered"] = 1
    assert not audit.verify_lines([old_line(edited), *lines[1:]], KEY).ok


def test_tiny_floats_are_where_the_spellings_differ_and_both_verify():
    record = {"x": 1e-05, "y": float("1e16"), "n": 2**65}
    chain = audit.Chain(KEY)
    line = audit.line_of(chain.seal(record))
    assert audit.verify_lines([line], KEY).ok
    assert audit.chain_bytes({"x": 1e-05}) != audit.canonical({"x": 1e-05})  # the one difference
    assert audit.verify_lines([old_line(old_seal(audit.Chain(KEY), record))], KEY).ok


def test_a_head_made_either_way_checks():
    head = audit.make_head(KEY, 3, "ab" * 32)
    assert audit.check_head(KEY, head)
    body = {k: v for k, v in head.items() if k != "mac"}
    import hashlib
    old = dict(body, mac=hmac.new(KEY, b"head|" + audit.canonical(body), hashlib.sha256).hexdigest())
    assert audit.check_head(KEY, old)
    assert not audit.check_head(KEY, dict(head, seq=4)) and not audit.check_head(b"x" * 32, head)


@given(st.floats(0, 253402300799.9999, allow_nan=False) | st.sampled_from(
    [0.0, 1.9995, 1.9999995, 1.0000005, 59.9999996, 1700000000.9999996, 1e9 + 0.0005, 1e9 + 0.0015]))
def test_iso_time_reads_as_datetime_writes_it(epoch):
    want = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert audit.iso_time(epoch) == want
    assert audit.iso_time(epoch) == want  # the second, formatted once, is reused


def test_iso_time_outside_the_fast_range_still_answers():
    assert audit.iso_time(-1.5) == "1969-12-31T23:59:58.500Z"
