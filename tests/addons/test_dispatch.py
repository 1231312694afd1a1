"""The bundle as one addon (`glue.dispatch`): every part's hook in order, and a failing hook fails closed.

mitmproxy, on an addon exception, logs it and skips the rest of that addon's
nested list for the event, then goes on with the flow: before the dispatcher,
a bug in any hook placed before the Gate forwarded the request unchecked.
"""

from __future__ import annotations

import json

import pytest
from mitmproxy import exceptions
from mitmproxy.proxy.layers.http import HttpResponseHook
from mitmproxy.test import taddons

from mcp_bastion.bundle import bundle
from mcp_bastion.core.vocab import Meta
from mcp_bastion.glue.dispatch import Dispatch

from bundled import META, V2026, bundled, forwarded, rpc, tool_call

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


ALICE = {"sub": "alice", "groups": ["engineering"], "iss": "https://idp"}
ANSWER = {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "secret answer"}]}}

REQUEST_PARTS = [type(a) for a in bundle() if hasattr(a, "request") and not getattr(a, "observes", False)]
RESPONSE_PARTS = [type(a) for a in bundle() if hasattr(a, "response") and not getattr(a, "observes", False)]


def call_in(b, era: str):
    """A tools/call of either era: a 2025 one, or a 2026-07-28 one (its version in _meta and the header)."""
    if era == "2025":
        return b.flow("POST", tool_call("add", 1, a=1))
    return b.flow("POST", rpc("tools/call", {"name": "add", "arguments": {"a": 1}, "_meta": META}, 1),
                  headers={**V2026, "mcp-method": "tools/call", "mcp-name": "add"})


ERAS = pytest.mark.parametrize("era", ["2025", "2026"])


def explode(*args, **kwargs):
    raise RuntimeError("a bug in this hook")


async def aexplode(*args, **kwargs):
    raise RuntimeError("a bug in this hook")


@ERAS
@pytest.mark.parametrize("cls", REQUEST_PARTS, ids=lambda c: c.__name__)
async def test_a_request_hook_that_raises_never_lets_the_request_through(cls, era, monkeypatch, tmp_path):
    import inspect

    monkeypatch.setattr(cls, "request", aexplode if inspect.iscoroutinefunction(cls.request) else explode)
    monkeypatch.setenv("BASTION_AUDIT_KEY", "k" * 32)
    with bundled(audit_log=str(tmp_path / "audit.jsonl")) as b:
        f = call_in(b, era)
        await b.request(f, identity=ALICE)
        assert not forwarded(f)
        assert f.response.status_code == 500
        body = json.loads(f.response.content)
        assert body["id"] == (None if cls.__name__ == "Gateway" else 1)  # the Gateway had not read the body yet
        assert body["error"]["data"]["stage"] == f"{cls.__name__.lower()}.request"
        assert f"{cls.__name__.lower()}.request: RuntimeError" in f.metadata[Meta.ERROR]
        await b.tctx.master.addons.trigger_event(HttpResponseHook(f))
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert any(r.get("action") == "error" and r.get("flow") == f.id for r in audit)  # the refusal is audited


@ERAS
@pytest.mark.parametrize("cls", RESPONSE_PARTS, ids=lambda c: c.__name__)
async def test_a_response_hook_that_raises_withholds_the_answer(cls, era, monkeypatch):
    import inspect

    monkeypatch.setattr(cls, "response", aexplode if inspect.iscoroutinefunction(cls.response) else explode)
    with bundled() as b:
        f = call_in(b, era)
        await b.request(f, identity=ALICE)
        assert forwarded(f), f.response and f.response.content
        out = await b.response(f, ANSWER)
        assert b"secret answer" not in out
        assert f.response.status_code == 502
        assert f"resp:{cls.__name__.lower()}.response: RuntimeError" in f.metadata[Meta.ERROR]


async def test_an_observer_that_raises_changes_nothing_the_client_gets(monkeypatch, caplog):
    from mcp_bastion.addons.decisionlog import DecisionLog

    monkeypatch.setattr(DecisionLog, "response", explode)
    with bundled() as b:
        f = b.flow("POST", tool_call("add", 1, a=1))
        await b.request(f, identity=ALICE)
        out = await b.response(f, ANSWER)
        assert b"secret answer" in out and f.response.status_code == 200
    assert "decisionlog.response failed" in caplog.text


async def test_the_hooks_after_a_failure_still_run(monkeypatch):
    from mcp_bastion.addons.approvals import Approvals
    from mcp_bastion.addons.gate import Gate

    seen = []
    real = Gate.request

    def gate(self, flow):
        seen.append(flow.response.status_code if flow.response else None)
        return real(self, flow)

    monkeypatch.setattr(Approvals, "request", explode)
    monkeypatch.setattr(Gate, "request", gate)
    with bundled() as b:
        f = b.flow("POST", tool_call("add", 1, a=1))
        await b.request(f, identity=ALICE)
    assert seen == [500]  # the Gate ran, and saw the refusal


def test_a_configure_failure_refuses_the_options(monkeypatch):
    from mcp_bastion.addons.recorder import Recorder

    def broken(self, updated):
        if "record_dir" in updated:
            raise KeyError("oops")

    monkeypatch.setattr(Recorder, "configure", broken)
    with pytest.raises(exceptions.OptionsError, match="could not configure Recorder: KeyError"):
        with taddons.context(Dispatch(bundle())) as tctx:
            tctx.options.update(record_dir="/tmp/x")


def test_done_reaches_every_part_even_after_one_fails(monkeypatch):
    from mcp_bastion.addons.pipeline import Pipeline
    from mcp_bastion.addons.recorder import Recorder

    closed = []
    monkeypatch.setattr(Pipeline, "done", explode)
    monkeypatch.setattr(Recorder, "done", lambda self: closed.append("recorder"))
    d = Dispatch(bundle())
    d.done()
    assert closed == ["recorder"]


def test_the_tables_follow_hooks_wrapped_at_configure():
    d = Dispatch(bundle())
    gate = next(p for p in d.parts if type(p).__name__ == "Gate")
    wrapped = gate.request = lambda flow: None
    d.rebuild()
    assert ("gate.request", wrapped, False) in d.tables["request"]
    assert not hasattr(d, "tcp_message") and "request" in d.tables  # only hooks some part has


async def test_as_mitmdump_nests_it_under_the_script_a_failing_hook_before_the_gate_is_no_bypass(monkeypatch):
    """mitmdump puts a script's `addons` under the script loader; there the dispatcher is one nested addon."""
    import socket

    from mitmproxy.proxy.layers.http import HttpRequestHeadersHook, HttpRequestHook

    from mcp_bastion.addons.pinning import Pinning
    from mcp_bastion.bundle import as_addon

    from bundled import ALLOW_ALL, make_flow

    class Script:  # what the script loader holds: the module, whose `addons` mitmproxy walks
        def __init__(self, addons):
            self.addons = addons

    monkeypatch.setattr(Pinning, "request", explode)
    with socket.socket() as up, taddons.context(Script([as_addon()])) as tctx:
        up.bind(("127.0.0.1", 0))
        up.listen(8)
        tctx.options.update(ruleset=ALLOW_ALL)
        url = f"http://127.0.0.1:{up.getsockname()[1]}"
        f = make_flow("POST", tool_call("add", 1, a=1), url=url, mode=f"reverse:{url}")
        await tctx.master.addons.trigger_event(HttpRequestHeadersHook(f))
        f.metadata[Meta.IDENTITY] = ALICE
        await tctx.master.addons.trigger_event(HttpRequestHook(f))
        assert not forwarded(f) and f.response.status_code == 500
        assert "gate" not in (f.metadata.get(Meta.STAGES) or [])  # refused before it; the Gate let nothing by
