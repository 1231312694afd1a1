"""The 2026-07-28 wire: protocol era, and routing headers that must say what the body says."""

from __future__ import annotations

import base64

import pytest

from mcp_bastion.core.message import classify
from mcp_bastion.core.wire import (
    Mismatch,
    ParamHeaders,
    check_headers,
    declared,
    decode,
    era,
    request_version,
)


def b64(text: str) -> str:
    return "=?base64?" + base64.b64encode(text.encode()).decode() + "?="


def req(method: str, **params) -> object:
    return classify({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})


CALL = req("tools/call", name="deploy", arguments={"env": "staging", "n": 42, "dry": True,
                                                   "target": {"region": "eu-west-1"}})
SCHEMA = {"type": "object", "properties": {
    "env": {"type": "string", "x-mcp-header": "Env"},
    "n": {"type": "integer", "x-mcp-header": "Count"},
    "dry": {"type": "boolean", "x-mcp-header": "Dry"},
    "target": {"type": "object", "properties": {"region": {"type": "string", "x-mcp-header": "Region"}}},
    "items": {"type": "array", "items": {"type": "string", "x-mcp-header": "Nope"}},
}}


def learned() -> ParamHeaders:
    p = ParamHeaders()
    assert p.learn("up:1", {"tools": [{"name": "deploy", "inputSchema": SCHEMA}, {"name": "plain"}]}) == 2
    return p


@pytest.mark.parametrize(("header", "meta", "expected"), [
    (None, None, "2025"), ("2025-06-18", None, "2025"), ("2025-11-25", None, "2025"),
    ("2026-07-28", None, "2026"), (None, "2026-07-28", "2026"), ("2026-07-28", "2026-07-28", "2026"),
    ("2027-01-01", None, "2026"), ("garbage", None, "2025"),
])
def test_era(header, meta, expected):
    assert era(header, meta) == expected


@pytest.mark.parametrize(("header", "meta"), [("2025-11-25", "2026-07-28"), ("2026-07-28", "2025-06-18"),
                                              ("2026-07-28", "2026-07-29")])
def test_conflicting_version_signals_are_a_mismatch(header, meta):
    with pytest.raises(Mismatch):
        era(header, meta)


def test_request_version_reads_meta():
    m = req("tools/list", _meta={"io.modelcontextprotocol/protocolVersion": "2026-07-28"})
    assert request_version(m) == "2026-07-28" and request_version(req("tools/list")) is None


@pytest.mark.parametrize("headers", [
    {}, {"mcp-method": "tools/call"}, {"mcp-method": "tools/call", "mcp-name": "deploy"},
    {"mcp-name": b64("deploy")},
], ids=["none", "method", "method+name", "base64-name"])
def test_agreeing_headers_pass(headers):
    check_headers(CALL, headers)


@pytest.mark.parametrize("headers", [
    {"mcp-method": "tools/list"}, {"mcp-method": "TOOLS/CALL"}, {"mcp-method": "tools/call, tools/call"},
    {"mcp-name": "drop_table"}, {"mcp-name": "DEPLOY"}, {"mcp-name": "deploy\u200b"},
    {"mcp-name": b64("drop_table")}, {"mcp-name": "=?base64?ZGVwbG95?"}, {"mcp-name": "=?base64?ZGVwbG9!?="},
    {"mcp-name": "=?base64?ZGVwbG9?="}, {"mcp-name": "deploy, drop_table"},
], ids=["other-method", "method-case", "method-twice", "other-tool", "tool-case", "zero-width", "base64-other",
        "base64-unterminated", "base64-bad-alphabet", "base64-bad-padding", "name-twice"])
def test_disagreeing_headers_are_refused(headers):
    with pytest.raises(Mismatch):
        check_headers(CALL, headers)


@pytest.mark.parametrize(("method", "params", "name"), [
    ("prompts/get", {"name": "greet"}, "greet"), ("resources/read", {"uri": "file:///a b"}, "file:///a b"),
    ("tasks/get", {"taskId": "t-1"}, "t-1"), ("tasks/cancel", {"taskId": "t-1"}, "t-1"),
])
def test_mcp_name_follows_each_methods_param(method, params, name):
    check_headers(req(method, **params), {"mcp-name": name})
    with pytest.raises(Mismatch):
        check_headers(req(method, **params), {"mcp-name": name + "x"})


def test_mcp_name_on_a_method_without_a_name_is_a_mismatch():
    with pytest.raises(Mismatch):
        check_headers(req("tools/list"), {"mcp-name": "x"})


def test_declared_headers_follow_properties_only():
    assert declared(SCHEMA) == {"env": ["env"], "count": ["n"], "dry": ["dry"], "region": ["target", "region"]}


@pytest.mark.parametrize("headers", [
    {"mcp-param-env": "staging"}, {"mcp-param-count": "42"}, {"mcp-param-count": "42.0"},
    {"mcp-param-dry": "true"}, {"mcp-param-region": "eu-west-1"}, {"mcp-param-env": b64("staging")},
    {"mcp-param-env": "staging", "mcp-param-region": "eu-west-1", "mcp-param-dry": "true"},
])
def test_param_headers_that_match_the_arguments_pass(headers):
    check_headers(CALL, headers, learned(), "up:1")


@pytest.mark.parametrize("headers", [
    {"mcp-param-env": "prod"}, {"mcp-param-env": "STAGING"}, {"mcp-param-count": "43"},
    {"mcp-param-count": "forty-two"}, {"mcp-param-dry": "True"}, {"mcp-param-dry": "false"},
    {"mcp-param-region": b64("us-east-1")}, {"mcp-param-nope": "x"}, {"mcp-param-other": "x"},
])
def test_param_headers_that_differ_or_are_undeclared_are_refused(headers):
    with pytest.raises(Mismatch):
        check_headers(CALL, headers, learned(), "up:1")


def test_param_headers_for_a_tool_whose_schema_is_unknown_are_refused():
    with pytest.raises(Mismatch, match="list the tools again"):
        check_headers(CALL, {"mcp-param-env": "staging"}, ParamHeaders(), "up:1")
    with pytest.raises(Mismatch):  # learned for another upstream
        check_headers(CALL, {"mcp-param-env": "staging"}, learned(), "other:2")


def test_param_headers_on_another_method_are_refused():
    with pytest.raises(Mismatch):
        check_headers(req("prompts/get", name="greet"), {"mcp-param-env": "x"}, learned(), "up:1")


def test_an_absent_argument_with_its_header_present_is_refused():
    call = req("tools/call", name="deploy", arguments={"n": 1})
    with pytest.raises(Mismatch):
        check_headers(call, {"mcp-param-env": "staging"}, learned(), "up:1")


@pytest.mark.parametrize(("value", "text"), [("plain", "plain"), (b64("Hello, 世界"), "Hello, 世界"),
                                             (b64(" padded "), " padded "), ("=?base64?", "=?base64?")])
def test_decode(value, text):
    assert decode(value) == text


def test_a_declaration_listed_again_does_not_lapse_while_the_tools_are_listed():
    from mcp_bastion.core.state import MemoryTable

    now = [0.0]
    table = MemoryTable("param_headers", 10, clock=lambda: now[0])
    p = ParamHeaders(table=table, clock=lambda: now[0])
    listed = {"tools": [{"name": "q", "inputSchema": {"properties": {"r": {"x-mcp-header": "R"}}}}]}
    p.learn("up:1", listed)
    now[0] = 6  # past half its idle time: the same list is written again
    p.learn("up:1", listed)
    now[0] = 12
    assert p.of("up:1", "q") == {"r": ["r"]}
    now[0] = 30  # listed no more, used no more: forgotten
    assert p.of("up:1", "q") is None
