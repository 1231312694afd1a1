"""
The benchmark harness in a tiny mode: it must produce a well-formed table and
JSON, and every figure it cannot give must say why. Structure only: no figure
here is compared with a speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bastion_dev import bench

# --- pure parts ------------------------------------------------------------------


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert [bench.percentile(values, p) for p in (50, 95, 99, 100)] == [50.0, 95.0, 99.0, 100.0]
    assert bench.percentile([3.0], 99) == 3.0


def reply(body: bytes, status: int = 200, ctype: str = "application/json") -> bench.Reply:
    return bench.Reply(status, {"content-type": ctype}, body, len(body), None, 0.0)


def test_check_result_reads_json_and_the_last_sse_event():
    bench.check_result(reply(b'{"jsonrpc":"2.0","id":4,"result":{}}'), 4)
    sse = (b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n'
           b'data: {"jsonrpc":"2.0",\ndata: "id":5,"result":{"content":[]}}\n\n')
    bench.check_result(reply(sse, ctype="text/event-stream"), 5)


@pytest.mark.parametrize("r, why", [
    (reply(b'{"jsonrpc":"2.0","id":4,"error":{"code":-31001,"message":"denied"}}'), "not the result"),
    (reply(b'{"jsonrpc":"2.0","id":3,"result":{}}'), "not the result"),
    (reply(b'{"error":"unauthorized"}', status=401), "HTTP 401"),
    (reply(b"data: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\"}\n\n", ctype="text/event-stream"),
     "not the result"),
    (reply(b"not json"), "unreadable"),
])
def test_check_result_refuses_what_is_not_the_result(r, why):
    with pytest.raises(bench.BenchError, match=why):
        bench.check_result(r, 4)


def test_quick_check_refuses_refusals():
    bench.quick_check(reply(b'{"jsonrpc":"2.0","id":1,"result":{}}'))
    with pytest.raises(bench.BenchError):
        bench.quick_check(reply(b'{"jsonrpc":"2.0","id":1,"error":{"code":-31001,"message":"no"}}'))


def test_body_notes_the_first_complete_event_across_chunks():
    body = bench._Body(keep=False, sse=True)
    body.add(b"data: {}\n")
    assert body.t_first is None
    body.add(b"\ndata: {}\n\n")
    assert body.t_first is not None
    body.add(b"x" * 10)
    body.add(b"tail")
    assert body.size == len(b"data: {}\n\ndata: {}\n\n") + 14
    assert body.bytes() == b"x" * 10 + b"tail"  # only the end is kept when the body is discarded


def synthetic(judge: bool = False) -> bench.Result:
    settings = bench.Settings() if judge else bench.Settings.quick()
    result = bench.Result(settings)
    result.configs = {
        "direct": {"metrics": {"small.p50": 0.2, "small.cN.calls_s": 10000.0}, "errors": {}},
        "bare": {"metrics": {"small.p50": 1.5, "small.cN.calls_s": 1000.0, "ttfe.p50": 1.0, "sse.p50": 2.0,
                             "sse.cN.calls_s": 500.0}, "errors": {}},
        "bundle": {"metrics": {"small.p50": 3.0, "small.cN.calls_s": 900.0, "ttfe.p50": 1.5,
                               "stream.rss_growth": 80.0, "sse.cN.calls_s": 350.0, "sessions.rss_growth": 12.5},
                   "errors": {"sse": "BenchError: HTTP 503"}},
        "masked": {"metrics": {"small.p50": 3.3, "small.cN.calls_s": 750.0}, "errors": {}},
    }
    result.components = [bench.Component("masking", "on", "pii on the answer to every tools/call", "masked")]
    result.micro = [{"name": "masking, all detectors", "value": 120.0, "unit": "MB/s", "note": ""}]
    return result


def test_ratios_and_targets_from_figures():
    result = synthetic(judge=True)
    rows = {r["key"]: r for r in bench.table_rows(result)}
    assert rows["small.p50"]["ratio_3_2"] == "2.00" and rows["small.p50"]["ratio_3_1"] == "15.00"
    assert rows["small.p50"]["ratio_4_2"] == "2.20" and rows["small.cN.calls_s"]["ratio_4_2"] == "0.75"
    assert rows["sse.p50"]["bundle"] is None and rows["sse.p50"]["ratio_3_2"] == ""
    assert rows["sse.p50"]["why_na"]["bundle"] == "sse: BenchError: HTTP 503"
    status = {t["target"]: (t["status"], t["measured"]) for t in bench.targets(result)}
    assert status == {
        "calls/s, bundle vs bare (small JSON)": ("met", 0.9),
        "calls/s, bundle vs bare (SSE result)": ("missed", 0.7),
        "p50 added at concurrency 1 (small JSON)": ("missed", 1.5),
        "p50 added at concurrency 1 (SSE result)": ("n/a", None),  # the bundle's SSE step failed
        "calls/s, every answer masked with pii vs bare (small JSON)": ("met", 0.75),
        "masking throughput, all detectors (large text)": ("met", 120.0),
        "RSS growth across the stream (bundle)": ("missed", 80.0),
        "RSS growth across 10,000 sessions (bundle)": ("met", 12.5),
        "SSE time to first event vs bare (p50)": ("met", 0.5),
    }
    goals = {t["target"]: t["goal"] for t in bench.targets(result)}
    assert goals["p50 added at concurrency 1 (small JSON)"] == "< 0.5 ms"
    assert goals["RSS growth across 10,000 sessions (bundle)"] == "< 32 MiB"


def test_masked_throughput_is_judged_only_with_masking_in_force():
    result = synthetic(judge=True)
    result.components[0].status = "not enforced"
    status = {t["target"]: t["status"] for t in bench.targets(result)}
    assert status["calls/s, every answer masked with pii vs bare (small JSON)"] == "n/a"


def test_markdown_has_one_line_per_figure():
    md = bench.markdown(synthetic())
    lines = md.splitlines()
    assert lines[0].startswith("`scripts/bench` on ") and lines[0].endswith(", 50 sessions.")
    assert lines[2] == ("| metric | unit | 1 direct | 2 bare mitmdump | 3 full bundle | 4 masked (pii) "
                        "| 3/2 | 4/2 | 3/1 |")
    assert "- 3 full bundle, sse: BenchError: HTTP 503" in lines
    figures = [line for line in lines if line.startswith("| p50 | ms |")]
    assert figures[0] == "| p50 | ms | 0.20 | 1.50 | 3.00 | 3.30 | 2.00 | 2.20 | 15.00 |"
    assert sum(len(rows) for _, rows in bench.ROWS) + len(bench.ROWS) + 2 <= len(lines)


# What the gateway's admin listener shows with stage_timing on (trimmed from a real page): counters are
# exposed with `_total`, prometheus_client's own counters add `_created` gauges, other families around.
METRICS_PAGE = """\
# HELP bastion_decisions_total Message decisions by action, rule and caller group
# TYPE bastion_decisions_total counter
bastion_decisions_total{{action="mask",group="engineering",rule="bench-mask-all"}} {calls}.0
# HELP bastion_decisions_created Message decisions by action, rule and caller group
# TYPE bastion_decisions_created gauge
bastion_decisions_created{{action="mask",group="engineering",rule="bench-mask-all"}} 1.7960567529768822e+09
# HELP bastion_request_duration_seconds Time from request to the end of its answer
# TYPE bastion_request_duration_seconds histogram
bastion_request_duration_seconds_bucket{{le="0.001",method="tools/call",outcome="ok"}} 0.0
bastion_request_duration_seconds_bucket{{le="+Inf",method="tools/call",outcome="ok"}} {calls}.0
bastion_request_duration_seconds_count{{method="tools/call",outcome="ok"}} {calls}.0
bastion_request_duration_seconds_sum{{method="tools/call",outcome="ok"}} 0.016478
# HELP bastion_idp_keys Signing keys held per issuer
# TYPE bastion_idp_keys gauge
bastion_idp_keys{{issuer="http://127.0.0.1:44717"}} 1.0
# HELP bastion_stage_cpu_seconds_total CPU time per stage (stage_timing)
# TYPE bastion_stage_cpu_seconds_total counter
bastion_stage_cpu_seconds_total{{stage="approval"}} {approval_cpu}
bastion_stage_cpu_seconds_total{{stage="policy"}} {policy_cpu}
bastion_stage_cpu_seconds_total{{stage="resp:mask"}} {mask_cpu}
# HELP bastion_stage_checks_total Checks per stage (stage_timing)
# TYPE bastion_stage_checks_total counter
bastion_stage_checks_total{{stage="approval"}} {calls}.0
bastion_stage_checks_total{{stage="policy"}} {calls}.0
bastion_stage_checks_total{{stage="resp:mask"}} {events}.0
# HELP bastion_hook_cpu_seconds_total CPU time per hook (stage_timing)
# TYPE bastion_hook_cpu_seconds_total counter
bastion_hook_cpu_seconds_total{{hook="auditlog.response"}} {audit_cpu}
bastion_hook_cpu_seconds_total{{hook="pipeline.request"}} {pipeline_cpu}
# HELP bastion_hook_cpu_seconds_created CPU time per hook (stage_timing)
# TYPE bastion_hook_cpu_seconds_created gauge
bastion_hook_cpu_seconds_created{{hook="auditlog.response"}} 1.7960567529768822e+09
# HELP bastion_hook_calls_total Calls per hook (stage_timing)
# TYPE bastion_hook_calls_total counter
bastion_hook_calls_total{{hook="auditlog.response"}} {calls}.0
bastion_hook_calls_total{{hook="pipeline.request"}} {calls}.0
"""


def page(calls: int, **cpu: float) -> str:
    return METRICS_PAGE.format(calls=calls, events=2 * calls, **cpu)


BEFORE = page(7, approval_cpu=4.9225e-05, policy_cpu=0.000478573, mask_cpu=0.000426785, audit_cpu=0.002284663,
              pipeline_cpu=0.00303233)
AFTER = page(1007, approval_cpu=0.002049225, policy_cpu=0.040478573, mask_cpu=0.080426785, audit_cpu=0.302284663,
             pipeline_cpu=0.25303233)


def test_metrics_page_gives_the_stage_and_hook_counters():
    assert bench.read_counters(BEFORE) == {
        ("stage", "approval"): (7.0, 4.9225e-05), ("stage", "policy"): (7.0, 0.000478573),
        ("stage", "resp:mask"): (14.0, 0.000426785),
        ("hook", "auditlog.response"): (7.0, 0.002284663), ("hook", "pipeline.request"): (7.0, 0.00303233),
    }
    assert bench.read_counters(BEFORE.split("# HELP bastion_stage_cpu")[0]) == {}  # stage_timing off


def test_two_pages_give_the_cpu_per_call_of_each_stage_and_hook():
    figures = bench.per_call(bench.read_counters(BEFORE), bench.read_counters(AFTER), 1000)
    assert {name: (round(f["cpu_us"], 3), f["per_call"]) for name, f in figures["stage"].items()} == {
        "approval": (2.0, 1.0), "policy": (40.0, 1.0), "resp:mask": (80.0, 2.0)}
    assert {name: round(f["cpu_us"], 3) for name, f in figures["hook"].items()} == {
        "auditlog.response": 300.0, "pipeline.request": 250.0}


def test_stage_table_puts_the_costliest_first_next_to_the_process_total(capsys):
    result = synthetic()
    figures = bench.per_call(bench.read_counters(BEFORE), bench.read_counters(AFTER), 1000)
    masked = result.configs["masked"]
    masked["stages"] = {"small.cN": {"calls": 1000, **figures}}
    masked["metrics"].update({"small.cN.cpu_us": 2500.0, "small.cN.stages_cpu_us": 122.0,
                              "small.cN.hooks_cpu_us": 550.0})
    result.components.append(bench.Component("stage timing", "on", "stage_timing=true", "masked"))
    result.components.append(bench.Component("stage timing", "n/a", "the bundle declares no option stage_timing",
                                             "bundle"))
    table = bench.stage_table(result)
    assert table["columns"] == ["bundle/small.cN", "masked/small.cN", "bundle/sse.cN", "masked/sse.cN"]
    assert [(r["label"], r["cpu_us"]) for r in table["rows"]] == [
        ("stage resp:mask", {"masked/small.cN": pytest.approx(80.0)}),
        ("stage policy", {"masked/small.cN": pytest.approx(40.0)}),
        ("stage approval", {"masked/small.cN": pytest.approx(2.0)}),
        ("hook auditlog.response", {"masked/small.cN": pytest.approx(300.0)}),
        ("hook pipeline.request", {"masked/small.cN": pytest.approx(250.0)}),
        ("sum of the stages", {"masked/small.cN": 122.0}),
        ("sum of the hooks", {"masked/small.cN": 550.0}),
        ("the proxy process, all (/proc)", {"masked/small.cN": 2500.0}),
    ]
    assert table["why_na"] == {"bundle/small.cN": "stage timing n/a: the bundle declares no option stage_timing",
                               "bundle/sse.cN": "stage timing n/a: the bundle declares no option stage_timing",
                               "masked/sse.cN": "not measured"}
    bench.print_report(result)
    printed = capsys.readouterr().out
    assert "CPU per call by stage and hook (µs)" in printed
    assert ("CPU per stage and hook, 3 full bundle: n/a because stage timing n/a: the bundle declares no option "
            "stage_timing") in printed
    assert "CPU per stage and hook, 4 masked (pii), SSE: n/a because not measured" in printed
    md = bench.markdown(result)
    assert "| stage or hook | 3 full bundle, small JSON | 4 masked (pii), small JSON |" in md
    assert "| stage resp:mask | n/a | 80.0 | n/a | n/a |" in md
    assert "| the proxy process, all (/proc) | n/a | 2,500.0 | n/a | n/a |" in md


def test_a_bundle_without_stage_timing_has_its_stage_table_na_with_why(tmp_path, capsys):
    """The per-stage figures of a bundle that does not declare `stage_timing` are n/a, and say why."""
    script = tmp_path / "plain.py"
    script.write_text("addons = []\n")
    with contextlib.ExitStack() as stack:
        setup = bench.bundle_setup(script, tmp_path, bench.free_port(), stack, "masked")
    comps = {c.name: c for c in setup.components}
    assert setup.admin_port is None and "stage_timing" not in setup.options and "admin_listen" not in setup.options
    assert (comps["stage timing"].status, comps["stage timing"].detail) == (
        "n/a", "the bundle declares no option stage_timing")
    assert comps["masking"].status == "n/a" and all(c.config == "masked" for c in setup.components)
    result = bench.Result(bench.Settings.quick(), components=setup.components)
    result.configs["masked"] = {"metrics": {"small.cN.calls_s": 100.0, "small.cN.cpu_us": 900.0}, "errors": {}}
    table = bench.stage_table(result)
    assert table["rows"] == []
    assert set(table["why_na"].values()) == {"stage timing n/a: the bundle declares no option stage_timing"}
    bench.print_report(result)
    printed = capsys.readouterr().out
    assert "CPU per call by stage and hook" not in printed
    assert ("CPU per stage and hook, 4 masked (pii): n/a because stage timing n/a: the bundle declares no option "
            "stage_timing") in printed


def test_bench_ruleset_keeps_every_shipped_rule_and_allows_the_rest(tmp_path):
    from mcp_bastion.core.rules import Ruleset

    path = bench.bench_ruleset(tmp_path)
    shipped = Ruleset.load(bench.shipped_ruleset())
    ours = Ruleset.load(path)
    assert [r.id for r in ours.rules] == ([bench.MASK_RULE["id"]] + [r.id for r in shipped.rules]
                                          + [bench.BENCH_RULE["id"]])
    assert ours.rules[0].action == "mask" and ours.rules[0].profile == "pii"


def test_the_masked_ruleset_masks_the_answer_to_every_tools_call(tmp_path):
    from mcp_bastion.core.identity import Identity
    from mcp_bastion.core.jsonrpc import parse_body
    from mcp_bastion.core.rules import Ruleset

    ours = Ruleset.load(bench.bench_ruleset(tmp_path, mask_all=True))
    assert [r.id for r in ours.rules][0] == bench.MASK_ALL_RULE["id"]
    assert bench.MASK_RULE["id"] not in [r.id for r in ours.rules]  # only the catch-all can mask small_pii
    who = Identity(sub="alice", groups=("engineering",), iss="http://127.0.0.1:9100")

    def decide(method: str, params: dict):
        msg = parse_body(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode())
        return ours.evaluate(who, msg.messages[0], "client_to_server", "127.0.0.1:8000")

    for tool in ("small", "sse", "stream", "lookup_customer"):
        decision = decide("tools/call", {"name": tool, "arguments": {}})
        assert (decision.action, decision.rule, decision.profile) == ("mask", "bench-mask-all", "pii"), tool
    assert decide("tools/list", {}).rule != "bench-mask-all"


# --- the upstream, the gateway's /metrics, and one whole tiny run -----------------------


@contextlib.contextmanager
def metrics_server(*pages: str):
    """An admin listener that answers GET /metrics with each page in turn (the last one from then on)."""
    left = list(pages)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (left.pop(0) if len(left) > 1 else left[0]).encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class CountedLoad:
    """A load whose throughput step makes 1000 calls in a second, reading the proxy at its start."""

    async def saturate(self, call, concurrency, duration, at_start=None):
        at_start()
        return 1000, 1.0


def test_a_throughput_step_reads_the_stages_right_before_and_after_its_calls():
    with metrics_server(BEFORE, AFTER) as port:
        m = bench.Measurement(CountedLoad(), None, bench.Settings.quick(), progress=lambda _: None, admin=port)
        asyncio.run(m.throughput("small.cN", bench.Call("small")))
    assert m.errors == {}
    assert m.stages["small.cN"]["calls"] == 1000
    assert m.stages["small.cN"]["stage"]["resp:mask"]["cpu_us"] == pytest.approx(80.0)
    assert m.metrics["small.cN.calls_s"] == 1000.0
    assert m.metrics["small.cN.stages_cpu_us"] == pytest.approx(122.0)
    assert m.metrics["small.cN.hooks_cpu_us"] == pytest.approx(550.0)


def test_a_page_without_stage_counters_is_said_not_taken_for_zero():
    with metrics_server(BEFORE.split("# HELP bastion_stage_cpu")[0]) as port:
        m = bench.Measurement(CountedLoad(), None, bench.Settings.quick(), progress=lambda _: None, admin=port)
        asyncio.run(m.throughput("sse.cN", bench.Call("sse")))
        comps = [bench.Component("stage timing", "on", "stage_timing=true", "bundle")]
        bench.verify_components(comps, 0, Path("/nonexistent"), None, port)
    assert m.stages == {} and "sse.cN.stages_cpu_us" not in m.metrics and m.metrics["sse.cN.calls_s"] == 1000.0
    assert m.errors == {"sse.cN.stages": "/metrics shows no bastion_stage_* counters (stage_timing not in force)"}
    assert comps[0].status == "no figures"


@pytest.mark.e2e
def test_the_checks_catch_an_unmasked_answer_and_a_missing_admin_listener(tmp_path):
    """verify_components against the upstream itself: nothing masks small_pii, nobody serves /metrics."""
    port = bench.free_port()
    with bench.started([sys.executable, str(bench.UPSTREAM), "--port", str(port)], port, tmp_path / "up.log"):
        comps = [bench.Component("masking", "on", "pii on the answer to every tools/call", "masked"),
                 bench.Component("stage timing", "on", "stage_timing=true", "masked")]
        bench.verify_components(comps, port, tmp_path, None, bench.free_port())
    assert comps[0].status == "not enforced" and "small_pii answered unmasked" in comps[0].detail
    assert "jane@example.com" in comps[0].detail
    assert comps[1].status == "not checked" and "GET /metrics failed" in comps[1].detail


@pytest.mark.e2e
def test_upstream_streams_exactly_what_it_announces(tmp_path):
    port = bench.free_port()
    with bench.started([sys.executable, str(bench.UPSTREAM), "--port", str(port)], port, tmp_path / "up.log"):
        async def go():
            conn = await bench.Load(port).connect()
            try:
                small = await conn.call_tool("small", {})
                bench.check_result(small, conn.next_id)
                stream = await conn.call_tool("stream", {"bytes": 300_000, "event_bytes": 4096}, keep_body=False)
                bench.check_result(stream, conn.next_id)
                sse = await conn.call_tool("sse", {"gap_ms": 1})
                bench.check_result(sse, conn.next_id)
                return stream, sse
            finally:
                conn.close()

        stream, sse = asyncio.run(go())
    assert stream.size == int(stream.headers["x-bench-body-bytes"]) >= 300_000
    assert sse.t_first_event is not None and sse.t_first_event <= sse.t_end


@pytest.mark.e2e
def test_tiny_run_writes_a_table_and_json(tmp_path, capsys):
    out = tmp_path / "run.json"
    code = bench.main(["--quick", "--samples", "10", "--duration", "0.2", "--concurrency", "2",
                       "--stream-mb", "1", "--replicas", "1,2", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for title in ("1 direct", "mitmdump", "3 full", "4 masked", "3/2", "4/2", "3/1", "targets", "microbenchmarks",
                  "scale-out: K replicas behind HAProxy"):
        assert title in printed

    data = json.loads(out.read_text())
    assert data["schema"] == 1 and set(data["configs"]) == set(bench.CONFIGS)
    assert {"started", "commit", "python", "mitmproxy", "cpus"} <= set(data["meta"])
    assert [r["key"] for r in data["rows"]] == [row.key for _, rows in bench.ROWS for row in rows]

    # Direct and bare have nothing that can be missing: every figure of theirs is a number,
    # except what only a proxy has.
    for name in ("direct", "bare"):
        assert data["configs"][name]["errors"] == {}, data["configs"][name]["errors"]
        for row in data["rows"]:
            if row[name] is None:
                assert name == "direct" and row["why_na"][name] == "no proxy to measure", (name, row)
            else:
                assert isinstance(row[name], float) and math.isfinite(row[name]), (name, row)
                # Only a growth may be negative (a process can give memory back between two readings).
                assert row[name] >= 0 or row["key"].endswith("rss_growth"), (name, row)
    assert data["configs"]["bare"]["metrics"]["stream.mb"] >= 1
    assert data["settings"]["sessions"] == 50
    for name in ("direct", "bare"):
        assert data["configs"][name]["metrics"]["sessions.per_s"] > 0
    bare = data["configs"]["bare"]["metrics"]
    assert bare["sessions.rss_growth"] == pytest.approx(bare["sessions.rss_after"] - bare["sessions.rss_before"])

    # The bundle may lack figures while its parts land, but never without a reason.
    bundle = data["configs"]["bundle"]
    assert "mitmdump" in bundle["command"] and "bastion.py" in bundle["command"]
    for row in data["rows"]:
        if row["bundle"] is None:
            assert row["why_na"]["bundle"] not in ("", "not measured"), row
    for comp in data["components"]:
        assert comp["status"] and comp["detail"] and comp["config"] in bench.BUNDLE_CONFIGS, comp
    masked = data["configs"]["masked"]
    assert "masked/ruleset.yaml" in masked["command"] and "bundle/ruleset.yaml" in bundle["command"]
    components = {(c["config"], c["name"]): c for c in data["components"]}
    # The masked figures are those of masked answers: the check after the run saw small_pii masked there.
    assert components[("masked", "masking")]["status"] == "on", components[("masked", "masking")]
    assert "every tools/call" in components[("masked", "masking")]["detail"] and "masking" not in masked["errors"]

    # CPU per stage and hook: figures for each column, or why not.
    stages = data["stage_cpu"]
    assert stages["columns"] == ["bundle/small.cN", "masked/small.cN", "bundle/sse.cN", "masked/sse.cN"]
    for column in stages["columns"]:
        config, step = column.split("/")
        if components[(config, "stage timing")]["status"] != "on":
            assert stages["why_na"][column].startswith("stage timing "), stages["why_na"]
            continue
        assert column not in stages["why_na"], stages["why_na"]
        assert data["configs"][config]["stages"][step]["calls"] > 0
        kinds = {row["kind"] for row in stages["rows"] if row["cpu_us"].get(column) is not None}
        assert kinds == {"stage", "hook", "total"}, column
        for row in stages["rows"]:
            assert row["cpu_us"][column] >= 0, (column, row)
    if stages["rows"]:
        assert "CPU per call by stage and hook (µs)" in printed
        assert "| stage or hook | 3 full bundle, small JSON |" in out.with_suffix(".md").read_text()
    else:
        assert "CPU per stage and hook, 3 full bundle: n/a because stage timing" in printed

    for t in data["targets"]:
        assert t["status"] in ("met", "missed", "n/a") and (t["measured"] is None) == (t["status"] == "n/a")
    for m in data["micro"]:
        assert (m["value"] is None) == bool(m["note"]), m
    parsed = {m["name"]: m for m in data["micro"]}
    assert parsed["JSON-RPC parse, tools/call request"]["value"] > 0

    md = out.with_suffix(".md").read_text()
    assert md.startswith("`scripts/bench --quick --samples 10 ") and "| metric | unit | 1 direct |" in md

    # The scale-out step: a row per K with figures, every replica having served calls, and the
    # options of configuration 3 in force on the cluster as they are on the bundle.
    scale = data["scaleout"]
    assert scale["replicas"] == [1, 2] and [row["replicas"] for row in scale["rows"]] == [1, 2]
    for row in scale["rows"]:
        assert row["errors"] == {}, row["errors"]
        assert row["ids"] == [f"r{i}" for i in range(1, row["replicas"] + 1)]
        assert row["calls"] > 0 and row["calls_s"] > 0 and row["cores_busy"] > 0
        assert set(row["cpu_ms"]) == {*row["ids"], "redis", "haproxy", "client", "upstream"}
        assert all(math.isfinite(v) and v >= 0 for v in row["cpu_ms"].values()), row["cpu_ms"]
        assert all(row["cpu_ms"][rid] > 0 for rid in row["ids"]), row["cpu_ms"]
        assert row["served_check"] == "/metrics tools/call counts"
        assert set(row["served"]) == set(row["ids"]) and all(n > 0 for n in row["served"].values()), row["served"]
        assert abs(sum(row["served"].values()) - row["calls"]) <= row["replicas"], (row["served"], row["calls"])
        assert all(v > 0 for v in row["served_cpu_ms"].values())
        on_bundle = {c["name"] for c in data["components"] if c["config"] == "bundle" and c["status"] == "on"}
        assert {c["name"] for c in row["components"] if c["status"] == "on"} == on_bundle, row["components"]
        assert "state_url=redis://" in row["command"] and f"scaleout-{row['replicas']}/ruleset.yaml" in row["command"]
    table = data["scaleout_table"]
    assert [cells[0] for cells in table["rows"]] == ["1", "2"]
    for cells in table["rows"]:
        assert len(cells) == len(table["header"]) and not any("n/a" in cell for cell in cells), cells
    assert len(table["rows"][1][2].split(", ")) == 2  # CPU per call of r1 and of r2
    md_table = md.split("Scale-out: K replicas")[1].split("\n\n")[1].splitlines()
    assert md_table[0].startswith("| replicas | calls/s | CPU ms/call per replica (r1, r2) |")
    assert [line.split(" | ")[0] for line in md_table[2:]] == ["| 1", "| 2"]


@pytest.mark.e2e
def test_stopped_in_the_scale_out_step_it_leaves_no_process_behind(tmp_path):
    """SIGTERM while K replicas, Redis and HAProxy run: the run stops them all and exits with 2."""
    from test_commands_e2e import alive, descendants, read_stderr

    # Throughput steps of 4 s: two for the direct configuration, then the one through HAProxy, stopped.
    cmd = [str(bench.ROOT / "scripts" / "bench"), "--quick", "--configs", "direct", "--no-micro", "--replicas", "2",
           "--duration", "4", "--json", str(tmp_path / "run.json")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    said: list[str] = []
    pump = read_stderr(proc, said)
    children: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 90
        while not any("through HAProxy" in line and "throughput" in line for line in said):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(said)
            time.sleep(0.05)
        children = descendants(proc.pid)
        commands = " ".join(children.values())
        assert "redis-server" in commands and "haproxy" in commands and commands.count("mitmdump") == 2, children
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)
        pump.join(5)
        text = "".join(said)
        assert "bench: scale-out, 2 replicas (1/1): starting Redis, 2 replicas" in text
        assert proc.returncode == 2 and "scripts/bench: interrupted; every process it started is stopped" in text
        assert "Traceback" not in text and not (tmp_path / "run.json").exists()
        deadline = time.monotonic() + 5
        while alive(children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive(children) == [], {pid: children[pid] for pid in alive(children)}
    finally:  # whatever failed above, nothing is left running
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in alive(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
