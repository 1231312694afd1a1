"""
CPU time per pipeline stage and per addon hook, for the benchmark and /metrics.

Off by default (option `stage_timing`): when off, nothing is measured and the
only cost is one attribute read per stage. When on, each stage's `check` and
each hook of the bundle is timed, and an async hook segment by segment, so time
spent waiting (an approval, the upstream) is never counted. The clock is the
monotonic one (`perf_counter_ns`, read without a system call): the event loop
runs one stretch of code at a time, so a stretch's time is its CPU time unless
the system preempts the gateway in between (rare for stretches of microseconds;
the thread's CPU clock costs a system call per read, ten times as much).

Pure: no mitmproxy import.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Coroutine
from typing import Any

now = time.perf_counter_ns


class Clock:
    """Calls and CPU nanoseconds per name (a stage, or `addon.hook`)."""

    def __init__(self) -> None:
        self.enabled = False
        self.totals: dict[str, list[int]] = {}

    def add(self, name: str, ns: int) -> None:
        total = self.totals.get(name)
        if total is None:
            self.totals[name] = [1, ns]
        else:
            total[0] += 1
            total[1] += ns

    def snapshot(self) -> dict[str, tuple[int, float]]:
        """name -> (calls, CPU seconds)."""
        return {name: (calls, ns / 1e9) for name, (calls, ns) in self.totals.items()}

    def reset(self) -> None:
        self.totals.clear()


STAGES = Clock()  # written by core.pipeline around every stage.check
HOOKS = Clock()  # written by the wrappers `timed` puts on the bundle's hooks


def timed(fn: Callable[..., Any], name: str, clock: Clock = HOOKS) -> Callable[..., Any]:
    """`fn` (a bound hook, sync or async) counting its CPU time under `name` in `clock`."""
    if not inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        def sync(*args: Any) -> Any:
            t0 = now()
            try:
                return fn(*args)
            finally:
                clock.add(name, now() - t0)

        return sync

    @functools.wraps(fn)
    async def run(*args: Any) -> Any:
        return await _Segments(fn(*args), name, clock)

    return run


class _Segments:
    """Await a coroutine, timing only the stretches it runs (not the ones it waits)."""

    __slots__ = ("coro", "name", "clock")

    def __init__(self, coro: Coroutine[Any, Any, Any], name: str, clock: Clock):
        self.coro, self.name, self.clock = coro, name, clock

    def __await__(self):
        return _drive(self.coro, self.name, self.clock)


def _drive(coro: Coroutine[Any, Any, Any], name: str, clock: Clock):
    spent, value, exc = 0, None, None
    try:
        while True:
            t0 = now()
            try:
                yielded = coro.send(value) if exc is None else coro.throw(exc)
            except StopIteration as stop:
                return stop.value
            finally:
                spent += now() - t0
            try:
                value, exc = (yield yielded), None
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as e:  # a cancellation: the coroutine handles it
                value, exc = None, e
    finally:
        clock.add(name, spent)

