"""
scripts/bench as a command: a --quick run judges no target, progress is said on stderr, and every process
it started is stopped, whatever stops it. (A whole run stopped with SIGTERM and Ctrl-C:
tests/e2e/test_commands_e2e.py.)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bastion_dev import bench


def synthetic(settings: bench.Settings) -> bench.Result:
    """What a run would give: one figure per configuration, enough for every target to have a verdict."""
    result = bench.Result(settings, meta={"started": "2026-11-30T12:00:00+00:00", "commit": "abc1234"})
    figures = {"small.p50": 1.0, "small.cN.calls_s": 1000.0, "ttfe.p50": 1.0, "stream.rss_growth": 80.0,
               "small.mask.p50": 3.0, "sessions.rss_growth": 2.0}
    result.configs = {name: {"metrics": dict(figures), "errors": {}} for name in bench.CONFIGS}
    result.components = [bench.Component("masking", "on", "pii on the answer to every tools/call", "masked")]
    result.micro = [{"name": "masking, all detectors", "value": 50.0, "unit": "MB/s", "note": ""}]
    return result


@pytest.fixture
def fake_run(monkeypatch):
    seen: dict = {}

    def run(settings, configs, micro=True):
        seen.update(settings=settings, configs=configs, micro=micro)
        return synthetic(settings)

    monkeypatch.setattr(bench, "run", run)
    return seen


def test_a_quick_run_judges_no_target(fake_run, tmp_path, capsys):
    out = tmp_path / "quick.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert bench.QUICK_NOTE in printed
    assert "met" not in printed.split() and "missed" not in printed.split()
    assert "targets (reported, not asserted)" not in printed
    data = json.loads(out.read_text())
    assert data["targets"] == [] and data["targets_judged"] is False and data["targets_note"] == bench.QUICK_NOTE
    md = out.with_suffix(".md").read_text()
    assert f"Targets: {bench.QUICK_NOTE}." in md and "| target | goal |" not in md
    assert fake_run["settings"].samples == bench.Settings.quick().samples


def test_a_full_run_judges_the_targets(fake_run, tmp_path, capsys):
    out = tmp_path / "full.json"
    assert bench.main(["--configs", "bare,bundle", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "targets (reported, not asserted)" in printed and bench.QUICK_NOTE not in printed
    data = json.loads(out.read_text())
    assert data["targets_judged"] is True and "targets_note" not in data
    assert {t["status"] for t in data["targets"]} >= {"met", "missed"}
    assert fake_run["configs"] == ("bare", "bundle")


def test_every_configuration_runs_by_default_and_masked_can_be_chosen(fake_run, tmp_path, capsys):
    assert bench.main(["--quick", "--json", str(tmp_path / "a.json")]) == 0
    assert fake_run["configs"] == ("direct", "bare", "bundle", "masked")
    assert bench.main(["--quick", "--configs", "bare,masked", "--json", str(tmp_path / "b.json")]) == 0
    assert fake_run["configs"] == ("bare", "masked")
    printed = capsys.readouterr().out
    assert "4 masked" in printed and "4/2" in printed


@pytest.mark.parametrize("args, why", [
    (["--configs", "bare,masks"], "unknown configuration(s): masks"),
    (["--sessions", "0"], "--sessions: must be more than 0: 0"),
    (["--sessions", "many"], "--sessions: not a number: 'many'"),
    (["--spy", "/nonexistent/dir/spy"], "cannot write --spy /nonexistent/dir/spy.bare.txt"),
    (["--replicas", "1,x"], "--replicas: not a list of replica counts (e.g. 1,2): '1,x'"),
    (["--replicas", "two"], "--replicas: not a list of replica counts (e.g. 1,2): 'two'"),
    (["--replicas", "1,,2"], "--replicas: not a list of replica counts (e.g. 1,2): '1,,2'"),
    (["--replicas", "0,2"], "--replicas: replica counts must be 1 to 16 (or 0 alone: no scale-out step): '0,2'"),
    (["--replicas", "17"], "--replicas: replica counts must be 1 to 16"),
    (["--replicas=-1"], "--replicas: replica counts must be 1 to 16"),
    (["--replicas", "2,1,2"], "--replicas: 2 replicas named twice: '2,1,2'"),
])
def test_bad_arguments_are_refused_before_anything_runs(fake_run, tmp_path, capsys, args, why):
    assert exit_status([*args, "--json", str(tmp_path / "x.json")]) == 2
    assert why in capsys.readouterr().err
    assert fake_run == {} and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("args, replicas", [
    ([], (1, 2)),
    (["--quick"], (1, 2)),  # kept, with the tiny durations of --quick
    (["--replicas", "1,2"], (1, 2)),
    (["--replicas", "2, 1,4"], (2, 1, 4)),
    (["--replicas", "3"], (3,)),
    (["--replicas", ""], ()),  # no scale-out step
    (["--replicas", "0"], ()),
    (["--quick", "--replicas", "0"], ()),
])
def test_replicas_reach_the_settings(fake_run, tmp_path, args, replicas):
    assert bench.main([*args, "--json", str(tmp_path / "r.json")]) == 0
    assert fake_run["settings"].replicas == replicas
    if "--quick" in args:
        assert fake_run["settings"].duration == bench.Settings.quick().duration


def test_help_says_what_the_scale_out_step_does(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--replicas LIST" in text and "behind HAProxy sharing Redis" in text and "(default: 1,2;" in text


def scaled(rows: list[dict]) -> bench.Result:
    """A result whose scale-out step gave `rows` (the rest as a run without configurations would)."""
    result = bench.Result(bench.Settings.quick(), meta={"started": "2026-11-30T12:00:00+00:00", "commit": "abc"})
    result.scaleout = {"replicas": [r["replicas"] for r in rows], "cores": 2, "call": "small JSON",
                       "note": "NOTE", "rows": rows}
    return result


def scale_row(k: int, served: dict | None, cpu_s: dict, calls: int = 1000) -> dict:
    ids = [f"r{i}" for i in range(1, k + 1)]
    row = {"replicas": k, "ids": ids, "calls": calls, "seconds": 1.0, "calls_s": float(calls),
           "cpu_s": {**cpu_s, "redis": 0.1, "haproxy": 0.2, "client": 0.3, "upstream": 0.1},
           "served": served, "served_check": None, "cores_busy": 1.9, "machine_busy": 2.0, "components": [],
           "errors": {}, "warnings": []}
    row["cpu_ms"] = {name: v / calls * 1000 for name, v in row["cpu_s"].items()}
    row["replicas_cpu_ms"] = sum(row["cpu_ms"][rid] for rid in ids)
    row["served_cpu_ms"] = {rid: cpu_s[rid] / n * 1000 if n else None for rid, n in served.items()} if served else None
    return row


def test_the_scale_out_table_and_its_balance_check():
    even = scale_row(2, {"r1": 500.0, "r2": 500.0}, {"r1": 1.0, "r2": 1.1})
    lopsided = scale_row(2, {"r1": 1000.0, "r2": 0.0}, {"r1": 2.0, "r2": 0.01})
    blind = scale_row(2, None, {"r1": 2.0, "r2": 0.01})  # no /metrics: the CPU shares say r2 did nothing
    for row in (even, lopsided, blind):
        bench.check_balance(row)
    assert even["errors"] == {} and even["served_check"] == "/metrics tools/call counts"
    assert lopsided["errors"]["balance"].startswith("r2 served no call (/metrics tools/call counts)")
    assert blind["errors"]["balance"].startswith("r2 served no call (CPU share")
    one = scale_row(1, {"r1": 1000.0}, {"r1": 2.5})
    bench.check_balance(one)
    assert one["errors"] == {}

    result = scaled([one, even, lopsided])
    table = bench.scale_table(result)
    assert table["header"][:3] == ["replicas", "calls/s", "CPU ms/call per replica (r1, r2)"]
    assert table["rows"][0] == ["1", "1,000", "2.500", "2.500", "0.100", "0.200", "0.400", "1.90 / 2.00", "100%"]
    assert table["rows"][1][2:4] == ["2.000, 2.200", "2.100"] and table["rows"][1][-1] == "50%, 50%"
    assert table["rows"][2][2] == "2.000, n/a" and table["rows"][2][-1] == "100%, 0%"
    assert table["problems"] == [("2 replicas", "balance: " + lopsided["errors"]["balance"])]
    md = bench.markdown(result)
    assert "| replicas | calls/s | CPU ms/call per replica (r1, r2) |" in md and "\n| 2 | 1,000 | 2.000, 2.200 |" in md
    assert "- 2 replicas: balance: r2 served no call" in md and "NOTE" in md
    data = result.to_json()
    assert data["scaleout"]["rows"][0]["replicas"] == 1 and data["scaleout_table"]["rows"] == table["rows"]
    assert bench.scale_table(bench.Result(bench.Settings.quick())) is None


def exit_status(argv: list[str]) -> int:
    """main's status, whether it returns it or argparse exits with it."""
    try:
        return bench.main(argv)
    except SystemExit as e:
        return e.code


def test_sessions_and_spy_reach_the_settings(fake_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--quick", "--json", "q.json"]) == 0
    assert fake_run["settings"].sessions == 50 and fake_run["settings"].spy is None
    assert bench.main(["--quick", "--spy", "prof/spy", "--json", "q.json"]) == 2  # no directory prof
    (tmp_path / "prof").mkdir()
    assert bench.main(["--quick", "--sessions", "300", "--spy", "prof/spy", "--json", "q.json"]) == 0
    assert fake_run["settings"].sessions == 300 and fake_run["settings"].spy == tmp_path / "prof" / "spy"
    assert bench.main(["--json", "full.json"]) == 0
    assert fake_run["settings"].sessions == 10_000


def test_help_says_how_to_read_the_spy_samples(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--spy PATH" in text and "py-spy" in text and "PATH.<config>.txt: collapsed stacks" in text
    assert "flame graph" in text and "--sessions N" in text and "direct,bare,bundle,masked" in text


def test_json_goes_where_the_caller_is(fake_run, tmp_path, monkeypatch, capsys):
    """A relative --json is the caller's: the wrapper no longer changes into the checkout."""
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--quick", "--json", "sub/run.json"]) == 0
    assert (tmp_path / "sub" / "run.json").is_file() and (tmp_path / "sub" / "run.md").is_file()


class NoLoad:
    """A load that cannot reach anything: every step fails at once (and says so)."""

    async def wait_ready(self):
        raise bench.BenchError("HTTP 502 nobody there")

    async def sequential(self, call, n):
        raise bench.BenchError("HTTP 502 nobody there")

    async def saturate(self, call, concurrency, duration, at_start=None):
        raise bench.BenchError("HTTP 502 nobody there")

    async def sessions(self, n, concurrency):
        raise bench.BenchError("HTTP 502 nobody there")

    async def connect(self):
        raise bench.BenchError("HTTP 502 nobody there")


def test_each_step_says_what_it_runs():
    said: list[str] = []
    settings = bench.Settings.quick()
    m = bench.Measurement(NoLoad(), None, settings, progress=said.append)
    asyncio.run(m.run())
    assert said == [
        "1/11: waiting until it answers",
        "2/11: warm-up, 5 calls",
        "3/11: latency, small JSON, 20 calls",
        "4/11: latency, small JSON masked with pii, 20 calls",
        "5/11: latency, large JSON, 10 calls",
        "6/11: latency, SSE result, 20 calls",
        "7/11: SSE time to first event, 10 calls",
        "8/11: throughput, small JSON, 4 connections for 0.3 s",
        "9/11: throughput, SSE result, 4 connections for 0.3 s",
        "10/11: a 2 MiB event stream",
        "11/11: 50 sessions opened and abandoned, 16 at a time",
    ]
    assert set(m.errors) == {"ready", "warmup", "small", "small.mask", "large", "sse", "ttfe", "small.cN", "sse.cN",
                             "stream", "sessions"}


def test_progress_goes_to_stderr(capsys):
    bench.say("config bundle (3/4), 5/11: latency, large JSON, 10 calls")
    out, err = capsys.readouterr()
    assert out == "" and err == "bench: config bundle (3/4), 5/11: latency, large JSON, 10 calls\n"


@pytest.fixture
def sigterm_interrupts():
    old = signal.signal(signal.SIGTERM, signal.default_int_handler)
    yield
    signal.signal(signal.SIGTERM, old)


def test_a_signal_waits_until_a_process_is_started_or_stopped(sigterm_interrupts):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with bench.signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            done.append("the block ran to its end")
    assert done == ["the block ran to its end"]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_all_stops_every_process_and_what_it_started(tmp_path):
    # A child that starts a grandchild in its own process group, and writes the grandchild's pid.
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(tmp_path / 'grandchild')!r}, 'w').write(str(p.pid)); time.sleep(60)")
    procs = [bench.Process([sys.executable, "-c", code], 0, tmp_path / "a.log"),
             bench.Process([sys.executable, "-c", "import time; time.sleep(60)"], 0, tmp_path / "b.log")]
    assert set(procs) <= bench.LIVE
    deadline = time.monotonic() + 10
    while not (tmp_path / "grandchild").exists() or not (tmp_path / "grandchild").read_text():
        assert time.monotonic() < deadline, (tmp_path / "a.log").read_text()
        time.sleep(0.02)
    grandchild = int((tmp_path / "grandchild").read_text())
    bench.stop_all()
    assert not bench.LIVE
    assert not any(alive(p.pid) for p in procs)
    deadline = time.monotonic() + 5
    while alive(grandchild) and time.monotonic() < deadline:  # reparented to init, which reaps it
        time.sleep(0.02)
    assert not alive(grandchild)


def test_a_process_that_would_not_start_is_not_left_behind(tmp_path):
    with pytest.raises(bench.BenchError, match="exited with 3"):
        with bench.started([sys.executable, "-c", "raise SystemExit(3)"], bench.free_port(), tmp_path / "c.log"):
            pass
    assert not bench.LIVE


def test_the_wrapper_runs_bench_in_the_callers_directory():
    wrapper = (bench.ROOT / "scripts" / "bench").read_text()
    assert 'cd "$root"' not in wrapper and '"$root/.venv/bin/python" -m bastion_dev.bench' in wrapper
    proc = subprocess.run([str(bench.ROOT / "scripts" / "bench"), "--version"], capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert proc.returncode == 0 and proc.stdout.startswith("scripts/bench (mcp-bastion) ")


def test_spy_that_cannot_sample_is_said_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "py-spy"
    fake.write_text("#!/bin/sh\necho 'Permission Denied: Try running again with elevated permissions' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(bench, "py_spy", lambda: str(fake))
    spy = bench.Spy(tmp_path / "run.bundle.txt", tmp_path / "spy.log")
    spy.start(os.getpid(), 0.3)
    spy.finish(10)
    err = capsys.readouterr().err
    assert "bench: --spy: py-spy could not sample the proxy (exit 1): Permission Denied" in err
    assert not bench.LIVE and not (tmp_path / "run.bundle.txt").exists()

    monkeypatch.setattr(bench, "py_spy", lambda: None)
    spy.start(os.getpid(), 0.3)
    spy.finish(10)
    assert "--spy: no py-spy on PATH nor next to" in capsys.readouterr().err
