"""flowstate.header: the same answer as mitmproxy's Headers.get, whatever the fields, before and after changes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import http

from mcp_bastion.glue import flowstate as fs

NAMES = ["mcp-session-id", "Mcp-Session-Id", "MCP-SESSION-ID", "content-type", "Content-Type", "accept",
         "x-\xff", "X-\xc4\xb0", "host", "mcp-session-id ", ""]
names = st.sampled_from(NAMES).map(lambda n: n.encode("latin-1"))
values = st.binary(max_size=12) | st.sampled_from([b"abc", b"\xff\xfe", b"a, b", b"", "é".encode()])


@given(st.lists(st.tuples(names, values), max_size=8), st.sampled_from(
    ["mcp-session-id", "content-type", "accept", "host", "x-\xff", "x-\u0130", "absent"]))
def test_the_map_answers_what_headers_get_answers(fields, name):
    headers = http.Headers(fields)
    assert fs.header(headers, name) == headers.get(name)
    assert fs.header(headers, name, "d") == headers.get(name, "d")


def test_a_change_to_the_headers_is_seen_at_once():
    headers = http.Headers([(b"Mcp-Session-Id", b"one")])
    assert fs.header(headers, "mcp-session-id") == "one"
    headers["mcp-session-id"] = "two"
    assert fs.header(headers, "mcp-session-id") == "two"
    headers.add("MCP-Session-Id", "three")
    assert fs.header(headers, "mcp-session-id") == "two, three" == headers.get("mcp-session-id")
    del headers["mcp-session-id"]
    assert fs.header(headers, "mcp-session-id") is None
    headers.fields = ((b"mcp-session-id", b"four"),)
    assert fs.header(headers, "mcp-session-id") == "four"
