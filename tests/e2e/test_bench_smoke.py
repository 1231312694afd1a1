"""
The benchmark harness in a tiny mode: it must produce a well-formed table and
JSON, and every figure it cannot give must say why. Structure only: no figure
here is compared with a speed.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys

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


def synthetic() -> bench.Result:
    result = bench.Result(bench.Settings.quick())
    result.configs = {
        "direct": {"metrics": {"small.p50": 0.2, "small.cN.calls_s": 10000.0}, "errors": {}},
        "bare": {"metrics": {"small.p50": 1.5, "small.cN.calls_s": 1000.0, "ttfe.p50": 1.0}, "errors": {}},
        "bundle": {"metrics": {"small.p50": 3.0, "small.cN.calls_s": 900.0, "ttfe.p50": 1.5,
                               "stream.rss_growth": 80.0}, "errors": {"sse": "BenchError: HTTP 503"}},
    }
    return result


def test_ratios_and_targets_from_figures():
    result = synthetic()
    rows = {r["key"]: r for r in bench.table_rows(result)}
    assert rows["small.p50"]["ratio_3_2"] == "2.00" and rows["small.p50"]["ratio_3_1"] == "15.00"
    assert rows["sse.p50"]["bundle"] is None and rows["sse.p50"]["ratio_3_2"] == ""
    status = {t["target"]: (t["status"], t["measured"]) for t in bench.targets(result)}
    assert status["calls/s, bundle vs bare (small JSON)"] == ("met", 0.9)
    assert status["p50 added at concurrency 1 (small JSON)"] == ("missed", 1.5)
    assert status["SSE time to first event vs bare (p50)"] == ("met", 0.5)
    assert status["RSS growth across the stream (bundle)"] == ("missed", 80.0)
    assert status["masking throughput, all detectors (large text)"] == ("n/a", None)


def test_markdown_has_one_line_per_figure():
    md = bench.markdown(synthetic())
    lines = md.splitlines()
    assert lines[0].startswith("`scripts/bench` on ")
    assert lines[2].startswith("| metric | unit | 1 direct | 2 bare mitmdump | 3 full bundle | 3/2 | 3/1 |")
    assert "- 3 full bundle, sse: BenchError: HTTP 503" in lines
    figures = [line for line in lines if line.startswith("| p50 | ms |")]
    assert figures[0] == "| p50 | ms | 0.20 | 1.50 | 3.00 | 2.00 | 15.00 |"
    assert sum(len(rows) for _, rows in bench.ROWS) + len(bench.ROWS) + 2 <= len(lines)


def test_bench_ruleset_keeps_every_shipped_rule_and_allows_the_rest(tmp_path):
    from mcp_bastion.core.rules import Ruleset

    path = bench.bench_ruleset(tmp_path)
    shipped = Ruleset.load(bench.shipped_ruleset())
    ours = Ruleset.load(path)
    assert [r.id for r in ours.rules] == ([bench.MASK_RULE["id"]] + [r.id for r in shipped.rules]
                                          + [bench.BENCH_RULE["id"]])
    assert ours.rules[0].action == "mask" and ours.rules[0].profile == "pii"


# --- the upstream, and one whole tiny run ------------------------------------------


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
                       "--stream-mb", "1", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for title in ("1 direct", "2 bare mitmdump", "3 full bundle", "3/2", "3/1", "targets", "microbenchmarks"):
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
                assert isinstance(row[name], float) and math.isfinite(row[name]) and row[name] >= 0, (name, row)
    assert data["configs"]["bare"]["metrics"]["stream.mb"] >= 1

    # The bundle may lack figures while its parts land, but never without a reason.
    bundle = data["configs"]["bundle"]
    assert "mitmdump" in bundle["command"] and "bastion.py" in bundle["command"]
    for row in data["rows"]:
        if row["bundle"] is None:
            assert row["why_na"]["bundle"] not in ("", "not measured"), row
    for comp in data["components"]:
        assert comp["status"] and comp["detail"], comp

    for t in data["targets"]:
        assert t["status"] in ("met", "missed", "n/a") and (t["measured"] is None) == (t["status"] == "n/a")
    for m in data["micro"]:
        assert (m["value"] is None) == bool(m["note"]), m
    parsed = {m["name"]: m for m in data["micro"]}
    assert parsed["JSON-RPC parse, tools/call request"]["value"] > 0

    md = out.with_suffix(".md").read_text()
    assert md.startswith("`scripts/bench --quick --samples 10 ") and "| metric | unit | 1 direct |" in md
