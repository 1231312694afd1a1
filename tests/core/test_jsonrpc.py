"""Strict JSON-RPC parsing: what is refused, and how messages are classified."""

import gzip
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcp_bastion.core.encoding import decode_content
from mcp_bastion.core.errors import DENIED, Refusal
from mcp_bastion.core.jsonrpc import ParseError, parse_body


def reason(data, **kw):
    with pytest.raises(ParseError) as e:
        parse_body(data, **kw)
    return e.value.reason


def test_request_classification_and_targets():
    body = parse_body(b'{"jsonrpc":"2.0","id":3,"method":"tools/call",'
                      b'"params":{"name":"deploy","arguments":{"env":"prod"}}}')
    (m,) = body.messages
    assert (m.kind, m.id, m.tool_name, m.arguments) == ("request", 3, "deploy", {"env": "prod"})
    assert m.summary() == {"kind": "request", "id": 3, "method": "tools/call", "tool": "deploy"}


def test_batch_members_classified():
    body = parse_body(b'[{"jsonrpc":"2.0","method":"notifications/initialized"},'
                      b'{"jsonrpc":"2.0","id":"a","result":{}},{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"x"}},'
                      b'{"jsonrpc":"1.0","id":2,"method":"x"}]')
    assert body.batch and [m.kind for m in body.messages] == ["notification", "response", "error", "invalid"]


@pytest.mark.parametrize("data,why", [
    (b'{"jsonrpc":"2.0","id":1,"method":"a","method":"b"}', "duplicate_key"),
    (b'{"jsonrpc":"2.0","id":1,"method":"\xff"}', "invalid_utf8"),
    (b'{"jsonrpc":"2.0","id":1,"method":"a","params":{"x":NaN}}', "invalid_json"),
    (b'{"jsonrpc":"2.0","id":1,"method":"a","params":{"x":"\\ud800"}}', "invalid_utf8"),
    (b'[]', "invalid_request"),
    (b'{"jsonrpc": "2.0",', "invalid_json"),
    (b'\xef\xbb\xbf{}', "invalid_json"),
])
def test_ambiguous_input_refused(data, why):
    assert reason(data) == why


def test_depth_and_size_limits():
    deep = b'{"jsonrpc":"2.0","id":1,"method":"a","params":' + b"[" * 100 + b"]" * 100 + b"}"
    assert reason(deep, max_depth=64) == "too_deep"
    assert reason(b"[" * 100000 + b"]" * 100000) == "too_deep"
    assert reason(b'{"a":"' + b"x" * 100 + b'"}', max_bytes=50) == "too_large"
    assert reason(b'[{"jsonrpc":"2.0","id":1,"method":"a"}]', allow_batch=False) == "batch_refused"


def test_id_null_request_and_bool_id_are_invalid():
    assert parse_body(b'{"jsonrpc":"2.0","id":null,"method":"a"}').messages[0].kind == "invalid"
    assert parse_body(b'{"jsonrpc":"2.0","id":true,"method":"a"}').messages[0].kind == "invalid"


def test_decode_content_bounded():
    payload = b'{"a":1}'
    assert decode_content(gzip.compress(payload), "gzip", 100) == payload
    assert decode_content(zlib.compress(payload), "deflate", 100) == payload
    bomb = gzip.compress(b"\0" * 10_000_000)
    with pytest.raises(ParseError) as e:
        decode_content(bomb, "gzip", 1_000_000)
    assert e.value.reason == "too_large"
    with pytest.raises(ParseError) as e:
        decode_content(b"xx", "br", 100)
    assert e.value.reason == "bad_encoding"
    with pytest.raises(ParseError):
        decode_content(b"not gzip", "gzip", 100)


def test_refusal_bodies_carry_request_ids():
    r = Refusal(200, DENIED, "no")
    body = parse_body(b'[{"jsonrpc":"2.0","id":1,"method":"a"},{"jsonrpc":"2.0","method":"n"},'
                      b'{"jsonrpc":"2.0","id":"x","method":"b"}]')
    import json
    out = json.loads(r.body_for_parsed(body))
    assert [o["id"] for o in out] == [1, "x"] and all(o["error"]["code"] == DENIED for o in out)
    assert json.loads(r.body_for(None))["id"] is None


_json_text = st.recursive(
    st.sampled_from(['1', '"a"', '"\\\\ud800"', '"\\\\uDBFF\\\\uDC00"', '"\\\\\\\\ud800"', '"\\\\udfff"', 'null',
                     '"\\\\u00e9"', '"x\\\\uD83D"']),
    lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ",".join(xs) + "]")
    | st.lists(inner, max_size=3).map(lambda xs: "{" + ",".join(f'"k{i}":{x}' for i, x in enumerate(xs)) + "}"),
    max_leaves=10)


@given(_json_text, st.integers(1, 6))
def test_the_shortcuts_refuse_exactly_what_walking_the_value_refuses(text, max_depth):
    """Depth and unpaired surrogates are only walked when the text could hold them: same verdicts."""
    import json

    from mcp_bastion.core.jsonrpc import ParseError, _check_surrogates, depth_of, loads_strict

    value = json.loads(text)
    if depth_of(value) > max_depth:
        expected = "too_deep"
    else:
        try:
            _check_surrogates(value)
            expected = None
        except ParseError as e:
            expected = e.reason
    try:
        loads_strict(text, max_depth=max_depth)
        got = None
    except ParseError as e:
        got = e.reason
    assert got == expected
