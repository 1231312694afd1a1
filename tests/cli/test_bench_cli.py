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
               "small.mask.p50": 3.0}
    result.configs = {name: {"metrics": dict(figures), "errors": {}} for name in bench.CONFIGS}
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

    async def saturate(self, call, concurrency, duration):
        raise bench.BenchError("HTTP 502 nobody there")

    async def connect(self):
        raise bench.BenchError("HTTP 502 nobody there")


def test_each_step_says_what_it_runs():
    said: list[str] = []
    settings = bench.Settings.quick()
    m = bench.Measurement(NoLoad(), None, settings, progress=said.append)
    asyncio.run(m.run())
    assert said == [
        "1/10: waiting until it answers",
        "2/10: warm-up, 5 calls",
        "3/10: latency, small JSON, 20 calls",
        "4/10: latency, small JSON masked with pii, 20 calls",
        "5/10: latency, large JSON, 10 calls",
        "6/10: latency, SSE result, 20 calls",
        "7/10: SSE time to first event, 10 calls",
        "8/10: throughput, small JSON, 4 connections for 0.3 s",
        "9/10: throughput, SSE result, 4 connections for 0.3 s",
        "10/10: a 2 MiB event stream",
    ]
    assert set(m.errors) == {"ready", "warmup", "small", "small.mask", "large", "sse", "ttfe", "small.cN", "sse.cN",
                             "stream"}


def test_progress_goes_to_stderr(capsys):
    bench.say("config bundle (3/3), 4/10: latency, large JSON, 10 calls")
    out, err = capsys.readouterr()
    assert out == "" and err == "bench: config bundle (3/3), 4/10: latency, large JSON, 10 calls\n"


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
