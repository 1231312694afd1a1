"""Operations in the shipped bundle: the admin listener (metrics, probes), the decision log, traces."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from mitmproxy.proxy.layers.http import HttpResponseHook
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mcp_bastion.addons.auditlog import AuditLog
from mcp_bastion.addons.metrics import Metrics
from mcp_bastion.addons.tracing import Tracing
from mcp_bastion.bundle import bundle

from bundled import bundled, bundled_addons, forwarded, result
from bundled import tool_call as call
from harness import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


ALICE = {"sub": "alice", "groups": ["engineering"], "iss": "https://idp", "name": "Alice"}
RULES = """\
version: 1
default: allow
rules:
  - id: no-deletes
    match: {tools: [delete_everything]}
    action: deny
    reason: never
"""


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return str(path)


async def get(port: int, path: str, method: str = "GET") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def traffic(b) -> None:
    ok = b.flow("POST", call("add", 1, a=1, b=2))
    await b.request(ok, identity=ALICE)
    assert forwarded(ok)
    await b.response(ok, result(1, {"content": [{"type": "text", "text": "3"}]}))
    no = b.flow("POST", call("delete_everything", 2))
    await b.request(no, identity=ALICE)
    assert not forwarded(no)
    # a refused flow ends with the gateway's own answer: mitmproxy still runs the `response` hook
    await b.tctx.master.addons.trigger_event(HttpResponseHook(no))


async def test_the_admin_listener_serves_metrics_and_probes(rules):
    port = free_port()
    with bundled(ruleset=rules, admin_listen=f"127.0.0.1:{port}") as b:
        metrics = b.addon(Metrics)
        await metrics.running()
        try:
            await traffic(b)
            status, text = await get(port, "/metrics")
            assert status == 200
            assert 'bastion_decisions_total{action="deny",group="engineering",rule="no-deletes"} 1.0' in text
            assert 'bastion_decisions_total{action="allow",group="engineering",rule="bastion:default"}' in text
            assert "bastion_request_duration_seconds_bucket" in text and 'outcome="refused"' in text
            assert "bastion_approvals_pending 0.0" in text
            assert await get(port, "/healthz") == (200, '{"status":"ok"}')
            status, body = await get(port, "/readyz")
            assert status == 200 and json.loads(body)["checks"]["ruleset"]["ok"] is True
            assert (await get(port, "/nope"))[0] == 404
            assert (await get(port, "/metrics", "POST"))[0] == 405
        finally:
            metrics.done()


async def test_readiness_fails_while_a_required_writer_fails_or_no_ruleset_is_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("BASTION_AUDIT_KEY", "k" * 32)
    port = free_port()
    with bundled(audit_log=str(tmp_path / "audit.jsonl"), admin_listen=f"127.0.0.1:{port}") as b:
        metrics = b.addon(Metrics)
        await metrics.running()
        try:
            b.addon(AuditLog).health.failed("disk full")
            status, body = await get(port, "/readyz")
            doc = json.loads(body)
            assert status == 503 and doc["checks"]["audit"] == {"ok": False, "why": "disk full"}
            text = (await get(port, "/metrics"))[1]
            assert 'bastion_writer_ok{writer="audit"} 0.0' in text
            assert 'bastion_write_failures_total{writer="audit"} 1.0' in text
        finally:
            metrics.done()
    addons = bundle()
    with bundled_addons(addons, ruleset="") as b:
        ready, checks = b.addon(Metrics).ready()
        assert not ready and checks["ruleset"]["ok"] is False


def test_a_bad_admin_address_stops_the_gateway_at_start():
    from mitmproxy import exceptions

    with pytest.raises(exceptions.OptionsError, match="HOST:PORT"), bundled(admin_listen="nine-thousand"):
        pass


async def test_the_mcp_listener_answers_none_of_the_admin_paths():
    with bundled() as b:
        for path in ("/metrics", "/healthz", "/readyz"):
            f = b.flow("GET", None, path=path)
            await b.request(f)
            assert f.response is not None and f.response.status_code == 404, path


async def test_the_decision_log_writes_one_json_line_per_decision(rules, tmp_path):
    log = tmp_path / "decisions.jsonl"
    with bundled(ruleset=rules, decision_log=str(log)) as b:
        await traffic(b)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["tool"], e["action"], e["rule"]) for e in entries] == [
        ("add", "allow", "bastion:default"), ("delete_everything", "deny", "no-deletes")]
    for e in entries:
        assert e["subject"] == "alice" and e["groups"] == ["engineering"] and e["method"] == "tools/call"
        assert isinstance(e["latency_ms"], float) and e["upstream"] and e["time"]


async def test_the_console_shows_one_readable_line_per_decision(rules, caplog):
    with caplog.at_level(logging.INFO, logger="mcp_bastion"), bundled(ruleset=rules) as b:
        await traffic(b)
    shown = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert any(line.startswith("alice  tools/call add  -> allow [bastion:default]") for line in shown), shown
    assert any("tools/call delete_everything  -> deny [no-deletes]: never" in line for line in shown), shown


async def test_each_message_becomes_a_span_with_identity_and_decision(rules):
    exporter = InMemorySpanExporter()
    addons = [Tracing(exporter) if isinstance(a, Tracing) else a for a in bundle()]
    with bundled_addons(addons, ruleset=rules) as b:
        await traffic(b)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    ok, no = spans["mcp tools/call add"], spans["mcp tools/call delete_everything"]
    assert ok.attributes["enduser.id"] == "alice" and ok.attributes["mcp.action"] == "allow"
    assert tuple(ok.attributes["enduser.groups"]) == ("engineering",) and ok.status.is_ok
    assert no.attributes["mcp.rule"] == "no-deletes" and not no.status.is_ok
    assert ok.end_time >= ok.start_time


async def test_stage_timing_counts_each_stage_and_hook_on_the_admin_listener_and_off_again(rules):
    from mcp_bastion.addons.auditlog import AuditLog as Audit
    from mcp_bastion.addons.timing import Timing
    from mcp_bastion.core import timing

    timing.STAGES.reset()
    timing.HOOKS.reset()
    port = free_port()
    with bundled(ruleset=rules, admin_listen=f"127.0.0.1:{port}", stage_timing=True) as b:
        metrics = b.addon(Metrics)
        await metrics.running()
        try:
            assert "request" in vars(b.addon(Audit))  # wrapped on the instance
            await traffic(b)
            text = (await get(port, "/metrics"))[1]
            checks = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
                      for line in text.splitlines() if line.startswith("bastion_stage_checks_total")}
            assert checks['stage="policy"'] == 2 and checks['stage="resp:policy"'] >= 1
            assert checks['stage="wire"'] == 2  # every stage of the pipeline, not only the policy
            hooks = [line for line in text.splitlines() if line.startswith("bastion_hook_calls_total")]
            assert 'bastion_hook_calls_total{hook="auditlog.response"} 2.0' in hooks
            assert any(line.startswith('bastion_hook_calls_total{hook="pipeline.request"} 2.0') for line in hooks)
            cpu = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('bastion_hook_cpu_seconds_total{hook="gateway.request"}')]
            assert cpu and cpu[0] > 0
            b.tctx.options.update(stage_timing=False)
            assert "request" not in vars(b.addon(Audit)) and not timing.STAGES.enabled
            assert b.addon(Timing).clocks() is None
            assert "bastion_stage_cpu_seconds" not in (await get(port, "/metrics"))[1]
        finally:
            metrics.done()
            b.addon(Timing).done()


async def test_stage_timing_off_leaves_every_hook_the_class_method(rules):
    with bundled(ruleset=rules) as b:
        for addon in b.addons:
            assert not {"request", "response", "requestheaders", "responseheaders"} & set(vars(addon))


def test_the_decision_lines_follow_mitmdumps_verbosity():
    """At flow_detail 1 our lines replace mitmproxy's request lines; at 0 (the user's `-q`) there are none."""
    from mitmproxy.addons.dumper import Dumper
    from mitmproxy.test import taddons

    from mcp_bastion.addons.decisionlog import DecisionLog

    log = DecisionLog()
    with taddons.context(Dumper(), log) as tctx:
        tctx.options.update(flow_detail=1)
        assert log.console and tctx.options.flow_detail == 0  # ours stand in for mitmproxy's
        tctx.options.update(flow_detail=3)
        assert not log.console
        tctx.options.update(flow_detail=0)
        assert not log.console  # the user asked for quiet
        tctx.options.update(flow_detail=1)
        assert log.console
        tctx.options.update(decision_console=False)
        assert not log.console and tctx.options.flow_detail == 1  # mitmproxy's own lines back


async def test_the_audit_head_moves_once_per_loop_turn_and_a_failed_move_holds_new_requests(tmp_path, monkeypatch):
    from mcp_bastion.core import audit

    monkeypatch.setenv("BASTION_AUDIT_KEY", "k" * 32)
    log = tmp_path / "audit.jsonl"
    with bundled(audit_log=str(log)) as b:
        await asyncio.sleep(0)
        writer = b.addon(AuditLog).writer
        writes = []
        real = audit.HeadFile.write
        monkeypatch.setattr(audit.HeadFile, "write", lambda self, head: (writes.append(head["seq"]),
                                                                         real(self, head))[1])
        for i in range(3):  # three appends in one loop turn
            writer.append([audit.lifecycle_record("test", f"record {i}")])
        assert writes == []  # not yet: at the end of this loop turn
        await asyncio.sleep(0)
        assert writes == [writer.chain.seq] == [audit.read_head(log)["seq"]]  # one move, to the last record

        def broken(self, head):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(audit.HeadFile, "write", broken)
        f = b.flow("POST", call("add", 9, a=1))
        await b.request(f, identity=ALICE)
        await asyncio.sleep(0)
        audit_log = b.addon(AuditLog)
        assert audit_log.health.failure and "head file" in audit_log.health.failure
        late = b.flow("POST", call("add", 10, a=1))
        await b.request(late, identity=ALICE)
        assert not forwarded(late) and late.response.status_code == 503  # Admission holds new requests
        monkeypatch.setattr(audit.HeadFile, "write", real)
        audit_log._probe()
        assert audit.read_head(log)["seq"] == audit_log.writer.chain.seq
    assert audit.verify_file(log, b"k" * 32).ok


async def test_method_labels_are_bounded_however_clients_name_their_methods(rules):
    from mcp_bastion.addons import metrics as metrics_module
    from mcp_bastion.core.vocab import Meta

    with bundled(ruleset=rules) as b:
        m = b.addon(Metrics)
        conn = None
        for i in range(metrics_module.MAX_METHODS + 30):
            f = b.flow("POST", {"jsonrpc": "2.0", "id": i, "method": f"made/up-{i}", "params": {}})
            conn = conn or f.client_conn
            f.client_conn = conn  # one client connection: the upstream is probed once
            await b.request(f, identity=ALICE)
            f.metadata.setdefault(Meta.STARTED, 0.0)
            await b.tctx.master.addons.trigger_event(HttpResponseHook(f))
        methods = {s.labels["method"] for family in m.latency.collect() for s in family.samples}
    assert len(methods) <= metrics_module.MAX_METHODS + 1 and "other" in methods
