"""Side doors (issue 16): only the MCP endpoints are reachable, and only UTF-8 is read - in many spellings."""

from __future__ import annotations

import json

import pytest

from mcp_bastion.core import errors
from mcp_bastion.core.media import charset_problem

from bundled import bundled, call, error_of, forwarded

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.parametrize(("method", "path"), [
    ("DELETE", "/admin/users/42"), ("GET", "/"), ("POST", "/mcp/"), ("POST", "//mcp"), ("POST", "/MCP"),
    ("POST", "/%6dcp"), ("POST", "/mcp;x=1"), ("POST", "/mcp/../admin"), ("GET", "/metrics"),
    ("POST", "/api/mcp"), ("GET", "/.well-known/oauth-protected-resource"), ("POST", "/sse/x"),
])
async def test_any_other_path_is_refused_before_any_credential(monkeypatch, method, path):
    monkeypatch.setenv("BASTION_TEST_UPSTREAM", "upstream-secret")
    with bundled(upstream_token_env="BASTION_TEST_UPSTREAM") as b:
        body = call("tools/call", 1, name="add") if method == "POST" else None
        f = b.flow(method, body, path=path)
        await b.request(f)
    assert not forwarded(f) and f.response.status_code == 404
    assert error_of(f)["data"] == {"reason": "path"}
    assert "upstream-secret" not in str(f.request.headers)


@pytest.mark.parametrize("path", ["/mcp", "/mcp?x=1", "/sse", "/messages/?session_id=1", "/messages"])
async def test_the_mcp_endpoints_are_reachable(path):
    with bundled() as b:
        method = "GET" if path == "/sse" else "POST"
        f = b.flow(method, call("tools/call", 1, name="add") if method == "POST" else None, path=path)
        if path.startswith("/messages/?"):
            from bundled import open_session
            open_session(b, "1")
        await b.request(f)
    assert forwarded(f)


async def test_the_paths_are_configurable_and_checked_at_start():
    with bundled(mcp_paths=["/v1/mcp"]) as b:
        ok = b.flow("POST", call("tools/call", 1, name="add"), path="/v1/mcp")
        await b.request(ok)
        old = b.flow("POST", call("tools/call", 1, name="add"), path="/mcp")
        await b.request(old)
        assert forwarded(ok) and old.response.status_code == 404
        from mitmproxy import exceptions
        for bad in (["mcp"], ["/mcp?x=1"], []):
            with pytest.raises(exceptions.OptionsError):
                b.tctx.options.update(mcp_paths=bad)


async def test_an_announced_http_sse_endpoint_becomes_reachable():
    with bundled(mcp_paths=["/events"]) as b:
        stream = b.flow("GET", path="/events", headers={"accept": "text/event-stream"})
        await b.request(stream)
        before = b.flow("POST", call("tools/call", 1, name="add"), path="/rpc")
        await b.request(before)
        await b.response(stream, "event: endpoint\ndata: /rpc\n\n", ctype="text/event-stream")
        after = b.flow("POST", call("tools/call", 1, name="add"), path="/rpc")
        await b.request(after)
    assert before.response.status_code == 404 and forwarded(after)


@pytest.mark.parametrize("ctype", [
    "application/json; charset=utf-16", "application/json; charset=UTF-16LE", "application/json;charset=latin1",
    'application/json; charset="iso-8859-1"', "application/json; charset=utf-8; charset=utf-16",
    "application/json; charset", "application/json; CHARSET=cp1252", "application/json; charset=utf-7",
])
async def test_a_request_declaring_anything_but_utf8_is_refused(ctype):
    with bundled() as b:
        f = b.flow("POST", call("tools/call", 1, name="add"), headers={"content-type": ctype})
        await b.request(f)
    assert not forwarded(f) and f.response.status_code == 415
    err = error_of(f)
    assert err["code"] == errors.REFUSED_INPUT and err["data"] == {"reason": "charset"}


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8",
                                   "application/json; charset=UTF-8", 'application/json; charset="utf-8"',
                                   "application/json;charset=utf8", "application/json; boundary=x"])
async def test_utf8_in_any_spelling_is_read(ctype):
    with bundled() as b:
        f = b.flow("POST", call("tools/call", 1, name="add"), headers={"content-type": ctype})
        await b.request(f)
    assert forwarded(f)


async def test_an_answer_declaring_another_charset_is_withheld():
    with bundled() as b:
        f = b.flow("POST", call("tools/list", 1))
        await b.request(f)
        out = await b.response(f, {"jsonrpc": "2.0", "id": 1, "result": {"tools": []}},
                               ctype="application/json; charset=utf-16")
    assert json.loads(out)["error"]["code"] == errors.UPSTREAM_ERROR


async def test_an_event_stream_declaring_another_charset_fails_closed():
    with bundled() as b:
        f = b.flow("POST", call("tools/list", 1))
        await b.request(f)
        out = await b.response(f, 'data: {"jsonrpc":"2.0","id":1,"result":{"tools":[]}}\n\n',
                               ctype="text/event-stream",
                               headers={"content-type": "text/event-stream; charset=iso-8859-1"})
    assert b'"result"' not in out and b"-31010" in out


@pytest.mark.parametrize(("value", "problem"), [
    (None, None), ("application/json", None), ("application/json; charset=utf-8", None),
    ("application/json; charset=latin1", "charset 'latin1' (only UTF-8 is read)"),
    ("application/json; charset=utf-8; charset=utf-8", "2 charset parameters"),
])
def test_charset_problem(value, problem):
    assert charset_problem(value) == problem
