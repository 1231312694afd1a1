"""
The processes the benchmark and scripts/cluster start: each in a session of its own, listening on
127.0.0.1, its output in a log file, and stopped (SIGTERM, then SIGKILL) whatever happens, including
a Ctrl-C or SIGTERM of the run itself (`signals_deferred`, `stop_all`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "addons" / "bastion.py"
MITMDUMP = str(Path(sys.executable).parent / "mitmdump")


class BenchError(Exception):
    """A process (or, in the benchmark, a measurement) that could not be made; the benchmark reports it as
    n/a with this message."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done (then raise KeyboardInterrupt), so that a process is
    never started without being known, nor left half stopped. Only the main thread handles signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {sig: signal.signal(sig, lambda n, _f: got.append(n)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    if got:
        raise KeyboardInterrupt


LIVE: set[Process] = set()  # every process started and not yet stopped


def stop_all() -> None:
    """Stop every process this run started that is still running (the last line of defence)."""
    stop_each(list(LIVE))


def stop_each(processes: list[Process]) -> None:
    """Stop each of `processes`, in order. A Ctrl-C or SIGTERM meanwhile does not leave the rest running:
    it is raised once all are stopped."""
    interrupted = False
    for proc in processes:
        try:
            proc.stop()
        except KeyboardInterrupt:  # raised after that one was stopped
            interrupted = True
    if interrupted:
        raise KeyboardInterrupt


class Process:
    """A started process listening on a port on 127.0.0.1, output in a log file; stopped on exit.

    It runs in a session of its own (a Ctrl-C at the terminal reaches this process only); `stop()`
    signals its whole process group.
    """

    def __init__(self, args: list[str], port: int, log: Path, env: dict[str, str] | None = None):
        self.args = args
        self.port = port
        self.log = log
        with signals_deferred(), open(log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                         start_new_session=True, stdin=subprocess.DEVNULL)
            LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 30.0) -> Process:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{Path(self.args[0]).name} exited with {self.proc.returncode}: {self.tail()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise BenchError(f"{Path(self.args[0]).name} not listening on {self.port} after {timeout}s: {self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after 10 s; a Ctrl-C or SIGTERM meanwhile waits."""
        with signals_deferred():
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(5)
            else:  # it is gone; anything it left in its group goes too
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            LIVE.discard(self)


@contextlib.contextmanager
def started(args: list[str], port: int, log: Path) -> Iterator[Process]:
    proc = Process(args, port, log)
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def declared_options(script: Path) -> set[str]:
    """Names of the options mitmproxy and the bundle's addons declare, by loading the bundle in-process."""
    import runpy

    from mitmproxy.test import taddons

    addons = runpy.run_path(str(script))["addons"]
    with taddons.context(*addons) as tctx:
        return set(tctx.options.keys())
