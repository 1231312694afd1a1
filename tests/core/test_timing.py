"""core.timing: CPU per name, and an async hook timed only while it runs."""

from __future__ import annotations

import asyncio

import pytest

from mcp_bastion.core import timing
from mcp_bastion.core.message import classify
from mcp_bastion.core.pipeline import Context, Pass, run_now
from mcp_bastion.core.vocab import Direction, StageName


def spin(ms: float) -> None:
    end = timing.now() + ms * 1e6
    while timing.now() < end:
        pass


def test_a_sync_function_counts_its_cpu_and_calls_and_keeps_its_result_and_errors():
    clock = timing.Clock()
    f = timing.timed(lambda x: (spin(5), x)[1], "f", clock)
    assert f(3) == 3
    boom = timing.timed(lambda: 1 / 0, "boom", clock)
    with pytest.raises(ZeroDivisionError):
        boom()
    calls, seconds = clock.snapshot()["f"]
    assert calls == 1 and 0.004 < seconds < 0.5
    assert clock.snapshot()["boom"][0] == 1


def test_an_async_hook_counts_what_it_runs_never_what_it_waits():
    clock = timing.Clock()

    async def hook(x):
        spin(10)
        await asyncio.sleep(0.3)  # waiting: not the hook's CPU
        spin(10)
        if x is None:
            raise ValueError("no")
        return x

    f = timing.timed(hook, "hook", clock)
    assert asyncio.run(f(7)) == 7
    calls, seconds = clock.snapshot()["hook"]
    assert calls == 1 and 0.019 < seconds < 0.2  # both spins, not the 300 ms sleep
    with pytest.raises(ValueError):
        asyncio.run(f(None))
    assert clock.snapshot()["hook"][0] == 2


def test_a_cancelled_async_hook_sees_the_cancellation_and_is_counted():
    clock = timing.Clock()
    seen = []

    async def hook():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main():
        task = asyncio.create_task(timing.timed(hook, "hook", clock)())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen == ["cancelled"] and clock.snapshot()["hook"][0] == 1


class Slow:
    name = StageName.POLICY

    def check(self, m, cx):
        spin(2)
        return Pass()


def test_the_pipeline_times_each_stage_by_its_side_only_when_enabled(monkeypatch):
    monkeypatch.setattr(timing.STAGES, "totals", {})
    cx = Context(identity=None)
    messages = [classify({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).placed(direction=Direction.C2S),
                classify({"jsonrpc": "2.0", "id": 1, "result": {}}).placed(direction=Direction.S2C)]
    timing.STAGES.enabled = False
    run_now([Slow()], messages, cx)
    assert timing.STAGES.totals == {}
    timing.STAGES.enabled = True
    try:
        run_now([Slow()], messages, cx)
    finally:
        timing.STAGES.enabled = False
    snap = timing.STAGES.snapshot()
    assert snap["policy"][0] == 1 and snap["resp:policy"][0] == 1
    assert snap["policy"][1] > 0.0015
