"""
Benchmarks: what the gateway costs, measured against bare mitmdump and no proxy.

    scripts/bench [--quick] [--json PATH] [--configs direct,bare,bundle,masked] [--replicas 1,2]

Starts a fast MCP upstream (`scripts/bastion_dev/bench_upstream.py`) on 127.0.0.1 and
measures, one after the other against the same upstream:

1. `direct`: the load generator talks to the upstream itself;
2. `bare`: `mitmdump` in reverse mode with no addon of ours. mitmproxy buffers
   event streams unless a flow is marked for streaming (mitmproxy#4469), so
   this configuration loads a three-line script that sets `response.stream` for
   `text/event-stream` responses and does nothing else;
3. `bundle`: `mitmdump -s addons/bastion.py` with the options of
   `BUNDLE_OPTIONS` that the bundle declares when the benchmark runs;
4. `masked`: the bundle as in 3, its ruleset starting with a rule that masks
   the answer to every tools/call with the `pii` profile.

For each: tools/call latency p50/p95/p99 at concurrency 1 (small JSON, large
JSON, SSE), calls/s and the proxy's CPU time per call at a concurrency that
saturates the machine, SSE time to first event, the proxy's peak RSS, the RSS
growth while a 100 MiB event stream passes through, and the RSS before and
after 10,000 sessions that are opened and abandoned. With `stage_timing` on
(configurations 3 and 4), the gateway's /metrics says the CPU time of each
pipeline stage and addon hook per call of the throughput steps. Microbenchmarks
time the per-message work of the core modules. Results print as tables and are
written as JSON (and the same tables as Markdown next to it).

Then the scale-out step (`--replicas`, default 1,2): for each K, K replicas of the
bundle behind HAProxy sharing Redis (`bastion_dev.cluster.Cluster`, the options of
configuration 3 plus the shared state), saturated with small JSON calls through
HAProxy as in the throughput step, each connection its own session; it reports
calls/s and the CPU per call of each replica, of Redis and of HAProxy, and checks
that every replica served calls.

Speed is reported here, never asserted: targets are listed as met or missed
(a --quick run judges none: its figures mean little). What runs now is said on
stderr ("config bundle (3/4), 4/11: ..."). Ctrl-C or SIGTERM stops every
process the run started (upstream, mitmdump, the dev issuer, py-spy, Redis, HAProxy) before it exits.

Exit status: 0 the run was made (figures it could not make are n/a, with why),
2 it could not run (bad arguments, an unwritable --json) or was interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion_dev.processes import (  # noqa: F401 - bench.Process, bench.LIVE, ... are what its users know
    BUNDLE,
    LIVE,
    MITMDUMP,
    ROOT,
    BenchError,
    Process,
    declared_options,
    free_port,
    signals_deferred,
    started,
    stop_all,
)
from mcp_bastion.cli.common import ArgumentParser, CannotRun, check_writable, positive

UPSTREAM = ROOT / "scripts" / "bastion_dev" / "bench_upstream.py"
DEFAULT_JSON_DIR = ROOT / "var" / "bench"

CONFIGS = ("direct", "bare", "bundle", "masked")
TITLES = {"direct": "1 direct", "bare": "2 bare mitmdump", "bundle": "3 full bundle", "masked": "4 masked (pii)"}
BUNDLE_CONFIGS = ("bundle", "masked")  # mitmdump -s <script> with BUNDLE_OPTIONS

STREAM_SSE_SCRIPT = '''\
def responseheaders(flow):
    if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
        flow.response.stream = True
'''

# Configurations 3 and 4: one line per option, (component, option, value). In
# values, {tmp} is the configuration's temporary directory, {ruleset} the ruleset
# written by `bench_ruleset()` and {admin_port} a free port. An option the loaded
# bundle does not declare is left out and its component reported n/a (mitmdump
# would silently ignore it). Identity (oidc_issuer, oidc_resource) is set up by
# `bundle_setup` with the dev issuer.
BUNDLE_OPTIONS: list[tuple[str, str, str]] = [
    ("policy", "ruleset", "{ruleset}"),
    ("recording", "record_dir", "{tmp}/recordings"),
    ("audit", "audit_log", "{tmp}/audit.jsonl"),
    ("audit", "audit_key_file", "{tmp}/audit.key"),
    ("stage timing", "stage_timing", "true"),
    ("stage timing", "admin_listen", "127.0.0.1:{admin_port}"),
]
COMMON_MITMDUMP_OPTIONS = {"flow_detail": "0"}  # no per-flow console line in either configuration


@dataclass
class Settings:
    """How much work each measurement does."""

    samples: int = 2000  # sequential calls per latency measurement (large JSON and SSE gap use a tenth)
    duration: float = 10.0  # seconds per throughput measurement
    concurrency: int = 32  # connections in a throughput measurement
    sessions: int = 10_000  # sessions opened and abandoned in the sessions step
    session_concurrency: int = 16  # sessions under way at a time
    large_bytes: int = 1 << 20
    stream_bytes: int = 100 << 20
    gap_ms: float = 20.0  # pause between the first SSE event and the result (time to first event)
    micro_seconds: float = 1.0  # per microbenchmark
    warmup: int = 200
    step_timeout: float = 600.0  # a measurement that takes longer is reported n/a
    script: Path = BUNDLE  # the mitmdump script of configurations 3 and 4
    profile: Path | None = None  # run the proxies under cProfile: stats in <profile>.<config>.prof
    spy: Path | None = None  # sample the proxies with py-spy in the small JSON throughput step: <spy>.<config>.txt
    judge_targets: bool = True  # False for a --quick run: its figures mean too little to judge
    replicas: tuple[int, ...] = (1, 2)  # the scale-out step: one cluster of K replicas per K; () skips it

    @classmethod
    def quick(cls) -> Settings:
        """A tiny run: a few calls each, a 2 MiB stream, 50 sessions (for smoke tests, not for figures)."""
        return cls(samples=20, duration=0.3, concurrency=4, sessions=50, large_bytes=64 << 10,
                   stream_bytes=2 << 20, gap_ms=5.0, micro_seconds=0.02, warmup=5, step_timeout=60.0)


QUICK_NOTE = "targets not judged in --quick runs"


def say(message: str) -> None:
    """Progress on stderr: what the run does now."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- the load generator -------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes  # the whole body, or only its end when the caller discards it
    size: int  # body bytes received
    t_first_event: float | None  # perf_counter() when the first SSE block was complete
    t_end: float

    @property
    def media_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    def describe(self) -> str:
        return f"HTTP {self.status} {self.media_type}: {self.body[:300].decode('utf-8', 'replace')}"


class _Body:
    """Collects a response body; notes when the first SSE block is complete."""

    def __init__(self, keep: bool, sse: bool):
        self.keep = keep
        self.sse = sse
        self.parts: list[bytes] = []
        self.size = 0
        self.prefix = b""
        self.t_first: float | None = None

    def add(self, data: bytes) -> None:
        self.size += len(data)
        if self.sse and self.t_first is None:
            self.prefix += data
            if b"\n\n" in self.prefix or b"\r\n\r\n" in self.prefix:
                self.t_first = time.perf_counter()
                self.prefix = b""
        if self.keep:
            self.parts.append(data)
        else:  # the final event is small: the last two chunks always hold it
            self.parts = self.parts[-1:] + [data]

    def bytes(self) -> bytes:
        return b"".join(self.parts)


class MCPConnection:
    """One keep-alive connection posting MCP messages to /mcp: HTTP/1.1 written and read by hand."""

    def __init__(self, port: int, token: str | None = None):
        self.port = port
        self.token = token
        self.session: str | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.next_id = 0

    async def open(self) -> MCPConnection:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        self.writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    async def initialize(self) -> MCPConnection:
        reply = await self.rpc("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                              "clientInfo": {"name": "mcp-bastion-bench", "version": "1"}})
        check_result(reply, self.next_id)
        self.session = reply.headers.get("mcp-session-id")
        reply = await self.post(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}).encode())
        if reply.status != 202:
            raise BenchError(f"notifications/initialized: {reply.describe()}")
        return self

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _head(self, length: int) -> bytes:
        lines = [
            "POST /mcp HTTP/1.1",
            f"Host: 127.0.0.1:{self.port}",
            "Content-Type: application/json",
            "Accept: application/json, text/event-stream",
            "MCP-Protocol-Version: 2025-06-18",
            f"Content-Length: {length}",
        ]
        if self.session:
            lines.append(f"Mcp-Session-Id: {self.session}")
        if self.token:
            lines.append(f"Authorization: Bearer {self.token}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def rpc(self, method: str, params: dict, keep_body: bool = True) -> Reply:
        self.next_id += 1
        msg = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}
        return await self.post(json.dumps(msg, separators=(",", ":")).encode(), keep_body)

    async def call_tool(self, name: str, arguments: dict, keep_body: bool = True) -> Reply:
        return await self.rpc("tools/call", {"name": name, "arguments": arguments,
                                             "_meta": {"progressToken": self.next_id + 1}}, keep_body)

    async def post(self, payload: bytes, keep_body: bool = True) -> Reply:
        """Send one POST and read its whole answer; timestamps are perf_counter() values."""
        reader, writer = self.reader, self.writer
        writer.write(self._head(len(payload)) + payload)
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = _Body(keep_body, headers.get("content-type", "").startswith("text/event-stream"))
        if "content-length" in headers:
            body.add(await reader.readexactly(int(headers["content-length"])))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readline()).split(b";", 1)[0], 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body.add(await reader.readexactly(size))
                await reader.readexactly(2)
        else:
            while data := await reader.read(1 << 16):
                body.add(data)
        t_end = time.perf_counter()
        if headers.get("connection", "").lower() == "close" or reader.at_eof():
            self.close()
        return Reply(int(status_line.split(" ", 2)[1]), headers, body.bytes(), body.size, body.t_first, t_end)


def check_result(reply: Reply, msg_id: int) -> None:
    """Raise BenchError unless `reply` carries the JSON-RPC result for `msg_id` (JSON or SSE)."""
    if reply.status != 200:
        raise BenchError(reply.describe())
    if reply.media_type == "text/event-stream":
        events = [e for e in reply.body.replace(b"\r\n", b"\n").split(b"\n\n") if b"data:" in e]
        if not events:
            raise BenchError(f"no SSE event in the last bytes: {reply.describe()}")
        data = b"\n".join(line[5:].removeprefix(b" ") for line in events[-1].split(b"\n") if line.startswith(b"data:"))
    else:
        data = reply.body
    try:
        msg = json.loads(data)
    except ValueError:
        raise BenchError(f"unreadable result: {reply.describe()}") from None
    if msg.get("id") != msg_id or "result" not in msg:
        raise BenchError(f"not the result of call {msg_id}: {reply.describe()}")


def quick_check(reply: Reply) -> None:
    """The cheap check made on every call under load: a 200 carrying a result, not an error.

    A JSON body names its result near the start, an event stream in its last event.
    """
    if reply.status != 200 or (b'"result":' not in reply.body[:256] and b'"result":' not in reply.body[-4096:]):
        raise BenchError(reply.describe())


@dataclass
class Call:
    """One kind of tools/call the load generator repeats."""

    tool: str
    arguments: dict = field(default_factory=dict)
    keep_body: bool = True


class Load:
    """Drives MCP calls against one endpoint (the upstream or a proxy in front of it)."""

    def __init__(self, port: int, token: str | None = None):
        self.port = port
        self.token = token

    async def connect(self) -> MCPConnection:
        return await (await MCPConnection(self.port, self.token).open()).initialize()

    async def wait_ready(self, timeout: float = 15.0) -> None:
        """Retry `initialize` while the endpoint answers 503 (e.g. the gateway still fetching issuer keys)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                (await self.connect()).close()
                return
            except BenchError as e:
                if not str(e).startswith("HTTP 503") or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.1)

    async def sequential(self, call: Call, n: int) -> list[tuple[float, Reply]]:
        """n calls one after the other on one connection: (start time, reply) each, every reply checked."""
        conn = await self.connect()
        out = []
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                reply = await conn.call_tool(call.tool, call.arguments, call.keep_body)
                check_result(reply, conn.next_id)
                out.append((t0, reply))
        finally:
            conn.close()
        return out

    async def saturate(self, call: Call, concurrency: int, duration: float,
                       at_start: Callable[[], None] | None = None) -> tuple[int, float]:
        """`concurrency` connections calling back to back for `duration` seconds: (calls, seconds).

        `at_start` runs once the connections are open, right before the first call: what it reads
        of the proxy then covers the calls and nothing else.
        """
        conns = [await self.connect() for _ in range(concurrency)]
        counts = [0] * concurrency
        if at_start is not None:
            at_start()
        start = time.perf_counter()
        deadline = start + duration

        async def worker(i: int) -> None:
            conn = conns[i]
            while time.perf_counter() < deadline:
                quick_check(await conn.call_tool(call.tool, call.arguments, call.keep_body))
                counts[i] += 1

        try:
            async with asyncio.TaskGroup() as group:
                for i in range(concurrency):
                    group.create_task(worker(i))
        except ExceptionGroup as eg:  # the first failure stopped the others
            raise eg.exceptions[0] from None
        finally:
            for conn in conns:
                conn.close()
        return sum(counts), time.perf_counter() - start

    async def sessions(self, n: int, concurrency: int) -> float:
        """n sessions, `concurrency` at a time: initialize, one small call, then the connection is closed
        without a DELETE (a session its client abandons). Returns the seconds they took."""
        left = iter(range(n))

        async def worker() -> None:
            for _ in left:
                conn = await self.connect()
                try:
                    reply = await conn.call_tool("small", {})
                    check_result(reply, conn.next_id)
                finally:
                    conn.close()

        start = time.perf_counter()
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(n, concurrency)):
                    group.create_task(worker())
        except ExceptionGroup as eg:  # the first failure stopped the others
            raise eg.exceptions[0] from None
        return time.perf_counter() - start


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]




class Memory:
    """Resident memory and CPU time of a process, from /proc (Linux)."""

    def __init__(self, pid: int):
        self.pid = pid

    def status_kb(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise BenchError(f"no {key} in /proc/{self.pid}/status")

    def rss_mb(self) -> float:
        return self.status_kb("VmRSS") / 1024

    def peak_mb(self) -> float:
        return self.status_kb("VmHWM") / 1024

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux >= 4.0); False if the kernel refused."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def py_spy() -> str | None:
    """py-spy on PATH, or next to this Python (installed in the venv)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.is_file() else None)


class Spy:
    """py-spy sampling a proxy during one step (--spy). One that is missing or cannot attach is said on
    stderr and the run goes on: the samples are an aid, not a figure."""

    def __init__(self, out: Path, log: Path):
        self.out = out
        self.log = log
        self.proc: Process | None = None

    def start(self, pid: int, seconds: float) -> None:
        exe = py_spy()
        if exe is None:
            say(f"--spy: no py-spy on PATH nor next to {sys.executable}; {self.out} not written")
            return
        args = [exe, "record", "-p", str(pid), "-d", str(max(1, math.ceil(seconds))), "-r", "200", "-f", "raw",
                "-o", str(self.out)]
        try:
            self.proc = Process(args, 0, self.log)
        except OSError as e:
            say(f"--spy: py-spy did not start ({e}); {self.out} not written")

    def finish(self, timeout: float) -> None:
        """Wait until py-spy has written its samples (it stops by itself), and say where they are or why not."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            code = proc.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        proc.stop()
        if code == 0 and self.out.is_file():
            say(f"--spy: samples in {self.out}")
        else:
            say(f"--spy: py-spy could not sample the proxy ({'exit ' + str(code) if code is not None else 'no end'}):"
                f" {' '.join(proc.tail().split())[-400:]}")


# --- what the gateway says of itself: CPU per stage and per hook -------------------

# The counters `stage_timing` adds to /metrics, by family (the parser names a counter without `_total`):
# (kind, index): kind is the label that names the stage or hook, index 0 a count and 1 CPU seconds.
STAGE_FAMILIES = {
    "bastion_stage_checks": ("stage", 0),
    "bastion_stage_cpu_seconds": ("stage", 1),
    "bastion_hook_calls": ("hook", 0),
    "bastion_hook_cpu_seconds": ("hook", 1),
}
Counters = dict[tuple[str, str], tuple[float, float]]  # (kind, name) -> (checks or calls, CPU seconds)


def read_counters(text: str) -> Counters:
    """The stage and hook counters of a /metrics page (Prometheus text format)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, str], list[float]] = {}
    for family in text_string_to_metric_families(text):
        base = family.name.removesuffix("_total")
        if base not in STAGE_FAMILIES:
            continue
        kind, index = STAGE_FAMILIES[base]
        for sample in family.samples:
            if sample.name in (base, base + "_total") and kind in sample.labels:
                out.setdefault((kind, sample.labels[kind]), [0.0, 0.0])[index] = sample.value
    return {key: (n, cpu) for key, (n, cpu) in out.items()}


def metrics_page(admin_url: str) -> str:
    """GET /metrics on a gateway's admin listener (`http://HOST:PORT`), no proxy of the environment."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{admin_url}/metrics", timeout=10) as response:
        return response.read().decode()


def scrape(port: int) -> Counters:
    """The stage and hook counters on the gateway's admin listener now."""
    return read_counters(metrics_page(f"http://127.0.0.1:{port}"))


SERVED_FAMILY = "bastion_request_duration_seconds"  # a histogram by method and outcome: its _count counts requests


def served_calls(text: str) -> float:
    """How many tools/call requests a /metrics page says the gateway answered (every outcome)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(sample.value for family in text_string_to_metric_families(text) if family.name == SERVED_FAMILY
               for sample in family.samples
               if sample.name == SERVED_FAMILY + "_count" and sample.labels.get("method") == "tools/call")


def per_call(before: Counters, after: Counters, calls: int) -> dict[str, dict[str, dict[str, float]]]:
    """What each stage and hook cost per call between two scrapes: {kind: {name: {cpu_us, per_call}}}.

    `per_call` is how many checks (calls of a hook) a call made: a stage that runs 0 times costs nothing.
    """
    out: dict[str, dict[str, dict[str, float]]] = {"stage": {}, "hook": {}}
    for (kind, name), (n, cpu) in sorted(after.items()):
        n0, cpu0 = before.get((kind, name), (0.0, 0.0))
        out[kind][name] = {"cpu_us": (cpu - cpu0) / calls * 1e6, "per_call": (n - n0) / calls}
    return out


# --- configurations 3 and 4 ----------------------------------------------------


def shipped_ruleset() -> Path:
    """The most realistic ruleset in the tree: of rulesets/default.yaml and
    rulesets/examples/, the one with most rules."""
    import yaml

    candidates = [p for p in [ROOT / "rulesets" / "default.yaml",
                              *sorted((ROOT / "rulesets" / "examples").glob("*.yaml"))]
                  if p.exists()]
    if not candidates:
        return ROOT / "rulesets" / "allow-all.yaml"
    return max(candidates, key=lambda p: len((yaml.safe_load(p.read_text()) or {}).get("rules") or []))


BENCH_RULE = {"id": "bench-allow", "description": "Added by the benchmark: what no rule above decided.",
              "action": "allow"}
MASK_RULE = {"id": "bench-mask", "description": "Added by the benchmark: one small tool answered through `pii`.",
             "match": {"tools": ["small_pii"]}, "action": "mask", "profile": "pii"}
MASK_ALL_RULE = {"id": "bench-mask-all",
                 "description": "Added by the benchmark (configuration 4): every tools/call answered through `pii`.",
                 "match": {"direction": "client_to_server", "methods": ["tools/call"]},
                 "action": "mask", "profile": "pii"}
PII_VALUES = (b"jane@example.com", b"4111 1111 1111 1111")  # what the upstream's small_pii answers with


def bench_ruleset(tmp: Path, mask_all: bool = False) -> Path:
    """The shipped ruleset with one rule appended that allows what none of its rules decided.

    Every message is then evaluated against all the shipped rules (the
    realistic cost) and the benchmark's own tools are not refused by the default.
    The first rule masks small_pii's answers; with `mask_all` it masks every
    tools/call's instead (so that no other rule could be what masks small_pii).
    """
    import yaml

    doc = yaml.safe_load(shipped_ruleset().read_text())
    doc["rules"] = [MASK_ALL_RULE if mask_all else MASK_RULE] + list(doc.get("rules") or []) + [BENCH_RULE]
    path = tmp / "ruleset.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class Component:
    name: str
    status: str  # "on", "n/a", or what went wrong
    detail: str
    config: str = "bundle"  # the configuration (3 or 4) it is part of


@dataclass
class BundleSetup:
    """The options, bearer token, admin port (stage timing on) and component report of configuration 3 or 4."""

    options: dict[str, str]
    token: str | None
    admin_port: int | None
    components: list[Component]


def bundle_setup(script: Path, tmp: Path, port: int, stack: contextlib.ExitStack,
                 config: str = "bundle") -> BundleSetup:
    """Choose the bundle's options from BUNDLE_OPTIONS and start the dev issuer (closed with `stack`).

    `tmp` is the configuration's own directory: what one configuration wrote never passes for another's.
    """
    try:
        declared = declared_options(script)
        load_error = None
    except Exception as e:  # reported; mitmdump itself will say what is wrong
        declared, load_error = set(), f"the bundle did not load in-process ({type(e).__name__}: {e})"
    mask_all = config == "masked"
    values = {"tmp": str(tmp), "ruleset": str(bench_ruleset(tmp, mask_all)), "admin_port": str(free_port())}
    options: dict[str, str] = {}
    components: dict[str, Component] = {}
    wanted: dict[str, dict[str, str]] = {}
    for component, name, value in BUNDLE_OPTIONS:
        wanted.setdefault(component, {})[name] = value.format(**values)
    for component, chosen in wanted.items():
        missing = [name for name in chosen if name not in declared]
        if missing:
            components[component] = Component(component, "n/a",
                                              load_error or f"the bundle declares no option {missing[0]}", config)
        else:
            options.update(chosen)
            components[component] = Component(component, "on", ", ".join(f"{k}={v}" for k, v in chosen.items()),
                                               config)
    (tmp / "recordings").mkdir(exist_ok=True)
    token = None
    if "oidc_issuer" not in declared:
        components["identity"] = Component("identity", "n/a", load_error or "the bundle declares no option oidc_issuer",
                                           config)
    elif importlib.util.find_spec("bastion_dev.issuer") is None:
        components["identity"] = Component("identity", "n/a", "no dev issuer (bastion_dev.issuer)", config)
    else:
        from bastion_dev.issuer import DevIssuer

        resource = f"http://127.0.0.1:{port}"
        issuer = stack.enter_context(DevIssuer(audience=resource))
        options.update({"oidc_issuer": issuer.url, "oidc_resource": resource})
        token = issuer.mint("alice")
        components["identity"] = Component("identity", "on", f"dev issuer {issuer.url}, RS256 token of alice",
                                           config)
    policy = components["policy"]
    first = MASK_ALL_RULE if mask_all else MASK_RULE
    if policy.status == "on":
        policy.detail = (f"{shipped_ruleset().relative_to(ROOT)}, rule {first['id']} first and "
                         f"{BENCH_RULE['id']} (allow the rest) last")
        components["masking"] = Component("masking", "on", "pii on the answer to " + (
            "every tools/call" if mask_all else "small_pii (row 'p50, an answer to mask')"), config)
    else:
        components["masking"] = Component("masking", "n/a", f"no ruleset: {policy.detail}", config)
    stage_timing = components["stage timing"].status == "on"
    admin_port = int(values["admin_port"]) if stage_timing else None
    return BundleSetup(options, token, admin_port, list(components.values()))


def mitmdump_args(upstream_port: int, port: int, scripts: list[Path], options: dict[str, str],
                  profile: Path | None = None) -> list[str]:
    """The mitmdump command line; with `profile`, run under cProfile and write its stats there."""
    args = [sys.executable, "-m", "cProfile", "-o", str(profile)] if profile else []
    args += [MITMDUMP, "--listen-host", "127.0.0.1", "--mode", f"reverse:http://127.0.0.1:{upstream_port}@{port}"]
    for script in scripts:
        args += ["-s", str(script)]
    for name, value in {**COMMON_MITMDUMP_OPTIONS, **options}.items():
        args += ["--set", f"{name}={value}"]
    return args


# --- the measurements -------------------------------------------------------------


Metrics = dict[str, float | None]


class Measurement:
    """All figures of one configuration. `pid` is the proxy's (None for direct); `admin` the port of
    its admin listener when it counts CPU per stage (`stage_timing`); `spy` samples it (--spy)."""

    def __init__(self, load: Load, pid: int | None, settings: Settings, progress: Callable[[str], None] = say,
                 admin: int | None = None, spy: Spy | None = None):
        self.progress = progress
        self.load = load
        self.memory = Memory(pid) if pid else None
        self.s = settings
        self.admin = admin
        self.spy = spy
        self.metrics: Metrics = {}
        self.errors: dict[str, str] = {}
        self.stages: dict[str, dict[str, Any]] = {}  # per throughput step: calls, then per_call()'s figures
        self.earlier_peak = 0.0  # VmHWM before the stream step reset it

    async def run(self) -> None:
        s = self.s
        if self.memory:
            self.metrics["rss.idle"] = self.memory.rss_mb()
        large_n, ttfe_n = max(10, s.samples // 10), max(10, s.samples // 10)
        what = {
            "ready": "waiting until it answers", "warmup": f"warm-up, {s.warmup} calls",
            "small": f"latency, small JSON, {s.samples} calls",
            "small.mask": f"latency, small JSON masked with pii, {s.samples} calls",
            "large": f"latency, large JSON, {large_n} calls", "sse": f"latency, SSE result, {s.samples} calls",
            "ttfe": f"SSE time to first event, {ttfe_n} calls",
            "small.cN": f"throughput, small JSON, {s.concurrency} connections for {s.duration:g} s",
            "sse.cN": f"throughput, SSE result, {s.concurrency} connections for {s.duration:g} s",
            "stream": f"a {s.stream_bytes / (1 << 20):g} MiB event stream",
            "sessions": f"{s.sessions:,} sessions opened and abandoned, {s.session_concurrency} at a time",
        }
        steps: list[tuple[str, Callable]] = [
            ("ready", self.load.wait_ready),
            ("warmup", lambda: self.load.sequential(Call("small"), s.warmup)),
            ("small", lambda: self.latency("small", Call("small"), s.samples)),
            ("small.mask", lambda: self.latency("small.mask", Call("small_pii"), s.samples)),
            ("large", lambda: self.latency("large", Call("large", {"bytes": s.large_bytes}), max(10, s.samples // 10))),
            ("sse", lambda: self.latency("sse", Call("sse"), s.samples)),
            ("ttfe", lambda: self.first_event(max(10, s.samples // 10))),
            ("small.cN", lambda: self.throughput("small.cN", Call("small"))),
            ("sse.cN", lambda: self.throughput("sse.cN", Call("sse"))),
            ("stream", self.stream),
            ("sessions", self.sessions),
        ]
        for i, (name, step) in enumerate(steps, 1):
            self.progress(f"{i}/{len(steps)}: {what[name]}")
            try:
                await asyncio.wait_for(step(), s.step_timeout)
            except TimeoutError:
                self.errors[name] = f"no answer within {s.step_timeout:g} s"
            except (BenchError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
                self.errors[name] = f"{type(e).__name__}: {e}"[:500]
        if self.memory:
            self.metrics["rss.peak"] = max(self.memory.peak_mb(), self.earlier_peak)

    async def latency(self, key: str, call: Call, n: int) -> None:
        times = [(reply.t_end - t0) * 1000 for t0, reply in await self.load.sequential(call, n)]
        for p in (50, 95, 99):
            self.metrics[f"{key}.p{p}"] = percentile(times, p)

    async def first_event(self, n: int) -> None:
        replies = await self.load.sequential(Call("sse", {"gap_ms": self.s.gap_ms}), n)
        times = []
        for t0, reply in replies:
            if reply.t_first_event is None:
                raise BenchError(f"no SSE event seen: {reply.describe()}")
            times.append((reply.t_first_event - t0) * 1000)
        for p in (50, 95, 99):
            self.metrics[f"ttfe.p{p}"] = percentile(times, p)

    async def throughput(self, key: str, call: Call) -> None:
        """Calls/s; the proxy's CPU per call, in all and (stage timing on) per stage and hook.

        The proxy is read once its connections are open, so the figures cover the calls alone;
        with --spy, py-spy samples it during the small JSON step.
        """
        spy = self.spy if key == "small.cN" and self.memory else None
        start: dict[str, Any] = {}

        def at_start() -> None:
            if self.admin:
                start["counters"] = self.counters(key)
            if spy:
                spy.start(self.memory.pid, self.s.duration)
            if self.memory:
                start["cpu"] = self.memory.cpu_seconds()

        try:
            calls, seconds = await self.load.saturate(call, self.s.concurrency, self.s.duration, at_start)
            cpu = self.memory.cpu_seconds() if self.memory else None
        finally:
            if spy:
                spy.finish(self.s.duration + 30)
        self.metrics[f"{key}.calls_s"] = calls / seconds
        if self.memory and calls:
            self.metrics[f"{key}.cpu_us"] = (cpu - start["cpu"]) / calls * 1e6
        if start.get("counters") is not None and calls:
            after = self.counters(key)
            if after is not None:
                figures = per_call(start["counters"], after, calls)
                self.stages[key] = {"calls": calls, **figures}
                for kind in ("stage", "hook"):
                    self.metrics[f"{key}.{kind}s_cpu_us"] = sum(f["cpu_us"] for f in figures[kind].values())

    def counters(self, key: str) -> Counters | None:
        """The stage and hook counters now; None (and why, under `<key>.stages`) when there are none."""
        try:
            counters = scrape(self.admin)
        except (OSError, ValueError) as e:
            self.errors[f"{key}.stages"] = f"GET /metrics on the admin listener: {type(e).__name__}: {e}"[:500]
            return None
        if not counters:
            self.errors[f"{key}.stages"] = "/metrics shows no bastion_stage_* counters (stage_timing not in force)"
            return None
        return counters

    async def stream(self) -> None:
        """One long event stream; the proxy's RSS is sampled while it passes."""
        samples: list[float] = []
        if self.memory:
            self.earlier_peak = self.memory.peak_mb()
            before = self.memory.rss_mb()
            reset = self.memory.reset_peak()
        conn = await self.load.connect()
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                samples.append(self.memory.rss_mb())
                await asyncio.sleep(0.02)

        sampler = asyncio.create_task(sample()) if self.memory else None
        try:
            t0 = time.perf_counter()
            reply = await conn.call_tool("stream", {"bytes": self.s.stream_bytes}, keep_body=False)
            sent = int(reply.headers.get("x-bench-body-bytes", "0"))
            if reply.status == 200 and reply.size < sent and b'"result":' not in reply.body:
                raise BenchError(f"the stream ended early: {reply.size} of {sent} bytes, no result event")
            check_result(reply, conn.next_id)
        finally:
            done.set()
            conn.close()
            if sampler:
                await sampler
        self.metrics["stream.mb_s"] = reply.size / (1 << 20) / (reply.t_end - t0)
        self.metrics["stream.mb"] = reply.size / (1 << 20)
        if self.memory:
            peak = max(samples + [self.memory.rss_mb()] + ([self.memory.peak_mb()] if reset else []))
            self.metrics["stream.rss_before"] = before
            self.metrics["stream.rss_peak"] = peak
            self.metrics["stream.rss_growth"] = peak - before
            self.metrics["stream.rss_after"] = self.memory.rss_mb()

    async def sessions(self) -> None:
        """Sessions opened and abandoned (what a gateway must not keep forever): the proxy's RSS before and after."""
        before = self.memory.rss_mb() if self.memory else None
        seconds = await self.load.sessions(self.s.sessions, self.s.session_concurrency)
        self.metrics["sessions.per_s"] = self.s.sessions / seconds
        if self.memory:
            after = self.memory.rss_mb()
            self.metrics["sessions.rss_before"] = before
            self.metrics["sessions.rss_after"] = after
            self.metrics["sessions.rss_growth"] = after - before


# --- microbenchmarks ------------------------------------------------------------


class Unavailable(Exception):
    """A component that does not exist (yet): the microbenchmark reports n/a with this reason."""


def time_per_op(fn: Callable[[], Any], seconds: float) -> float:
    """Seconds per call of fn: the best of five rounds of about seconds/5 each."""
    batch, spent = 1, 0.0
    while spent < seconds / 25:  # calibrate a batch of about 1/25 of the budget
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        spent = time.perf_counter() - t0
        batch *= 2
    batch = max(1, int(batch / 2 * (seconds / 5) / max(spent, 1e-9)))
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        best = min(best, (time.perf_counter() - t0) / batch)
    return best


TOOLS_CALL = json.dumps({
    "jsonrpc": "2.0", "id": 7, "method": "tools/call",
    "params": {"name": "lookup_customer", "arguments": {"customer_id": "c-1001", "fields": ["name", "plan"]},
               "_meta": {"progressToken": 7}},
}).encode()


def micro_jsonrpc(seconds: float) -> tuple[float, str]:
    from mcp_bastion.core.jsonrpc import parse_body

    return time_per_op(lambda: parse_body(TOOLS_CALL), seconds) * 1e6, "µs/message"


def micro_sse(seconds: float) -> tuple[float, str]:
    from mcp_bastion.core.sse import SSEParser

    event = b"data: " + json.dumps({"jsonrpc": "2.0", "method": "notifications/message",
                                     "params": {"level": "info", "data": "x" * 1000}}).encode() + b"\n\n"
    stream = event * 1024

    def parse() -> None:
        for _ in SSEParser().feed(stream):
            pass

    return len(stream) / 1e6 / time_per_op(parse, seconds), "MB/s"


def require(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise Unavailable(f"{module} does not exist yet")


def micro_tokens(cached: bool) -> Callable[[float], tuple[float, str]]:
    """An RS256 token of the dev issuer, keys fetched once over HTTP; uncached: a verifier without a token cache."""

    def run(seconds: float) -> tuple[float, str]:
        require("mcp_bastion.core.tokens", "bastion_dev.issuer")
        from bastion_dev.issuer import DevIssuer
        from mcp_bastion.core.tokens import Verifier, VerifierConfig

        audience = "http://127.0.0.1:8080"
        with DevIssuer(audience=audience) as issuer:
            verifier = Verifier(VerifierConfig(issuers=(issuer.url,), audiences=(audience,),
                                               cache_size=10_000 if cached else 0))
            error = verifier.refresh(issuer.url)
            if error:
                raise Unavailable(f"the dev issuer's keys could not be fetched: {error}")
            token = issuer.mint("alice")
            verifier.verify(token)
            return time_per_op(lambda: verifier.verify(token), seconds) * 1e6, "µs/token"

    return run


def micro_rules(seconds: float) -> tuple[float, str]:
    """The benchmark's ruleset (shipped rules + allow the rest), one tools/call by alice."""
    require("mcp_bastion.core.rules")
    from mcp_bastion.core.identity import Identity
    from mcp_bastion.core.jsonrpc import parse_body
    from mcp_bastion.core.rules import Ruleset

    with tempfile.TemporaryDirectory() as tmp:
        ruleset = Ruleset.load(bench_ruleset(Path(tmp)))
    message = parse_body(TOOLS_CALL).messages[0]
    who = Identity(sub="alice", groups=("engineering",), iss="http://127.0.0.1:9100")
    decision = ruleset.evaluate(who, message, "client_to_server", "127.0.0.1:8000")
    per_op = time_per_op(lambda: ruleset.evaluate(who, message, "client_to_server", "127.0.0.1:8000"), seconds)
    return per_op * 1e6, f"µs/message ({len(ruleset.rules)} rules, decided by {decision.rule})"


def _pii_profile():
    require("mcp_bastion.core.masking")
    from mcp_bastion.core.detectors import BUILTIN_PROFILES
    from mcp_bastion.core.masking import build_profile

    return build_profile("pii", BUILTIN_PROFILES["pii"], {})


_PROSE = ("The deployment of billing-api to staging finished at 09:12 without errors; 42 pods were restarted "
          "and the cache hit rate recovered to 97.4% within five minutes of the rollout. ")


def _payload(kind: str) -> Any:
    """Realistic MCP results: large text (a log or document read), many small strings, nested records."""
    if kind == "large text":
        text = (_PROSE * 40 + "Contact jane.doe@example.com about invoice 88231. ") * 25
        return {"content": [{"type": "text", "text": text * 4}]}
    if kind == "many small strings":
        return {"content": [{"type": "text", "text": f"row {i}: status ok, region eu-west-{i % 3}"}
                            for i in range(20_000)]}
    return {"structuredContent": {"customers": [
        {"id": f"c-{i}", "name": "Dana Whitfield", "plan": "enterprise", "region": "eu-west-1",
         "address": {"street": "1 Main St", "city": "Springfield", "zip": "12345"},
         "notes": [_PROSE, "renewal due", "prefers email"], "card": "4111 1111 1111 1111" if i % 50 == 0 else None}
        for i in range(3000)]}}


def micro_masking_kind(kind: str) -> Callable[[float], tuple[float, str]]:
    """MB/s of JSON scanned with every detector of `pii` (the size is the payload's JSON text)."""

    def run(seconds: float) -> tuple[float, str]:
        profile = _pii_profile()
        payload = _payload(kind)
        size = len(json.dumps(payload))
        return size / 1e6 / time_per_op(lambda: profile.mask(payload), seconds), "MB/s"

    return run


def micro_masking_small_call(seconds: float) -> tuple[float, str]:
    """Time added to a small tools/call answer by masking it with `pii` (the p50 share of masking)."""
    profile = _pii_profile()
    payload = {"content": [{"type": "text", "text": "deployment of billing-api to staging started"}],
               "structuredContent": {"status": "started", "env": "staging", "id": 7}}
    return time_per_op(lambda: profile.mask(payload), seconds) * 1e6, "µs/answer"


micro_masking = micro_masking_kind("large text")


MICRO: list[tuple[str, Callable[[float], tuple[float, str]]]] = [
    ("JSON-RPC parse, tools/call request", micro_jsonrpc),
    ("SSE parse, 1 KB events", micro_sse),
    ("token verification, uncached", micro_tokens(cached=False)),
    ("token verification, cached", micro_tokens(cached=True)),
    ("rule evaluation per message", micro_rules),
    ("masking, all detectors", micro_masking),
    ("masking, many small strings", micro_masking_kind("many small strings")),
    ("masking, nested structured content", micro_masking_kind("nested structured content")),
    ("masking, a small call's answer", micro_masking_small_call),
]


def run_micro(seconds: float) -> list[dict[str, Any]]:
    out = []
    for i, (name, fn) in enumerate(MICRO, 1):
        say(f"microbenchmarks, {i}/{len(MICRO)}: {name}")
        try:
            value, unit = fn(seconds)
            out.append({"name": name, "value": value, "unit": unit, "note": ""})
        except Unavailable as e:
            out.append({"name": name, "value": None, "unit": "", "note": str(e)})
    return out


# --- the scale-out step: K replicas behind HAProxy, sharing Redis ----------------------------

SCALE_CALL = Call("small")
# Configuration 3's options the cluster sets itself: per replica (cluster.MANAGED: record_dir, audit_log,
# admin_listen, ...) or once for all (the audit key file, which K replicas would race to create).
SCALE_LEFT_OUT = ("audit_key_file",)
SCALE_IDLE_SHARE = 0.02  # without /metrics: a replica with less of the replicas' CPU than this served nothing
SCALE_OTHERS = 0.25  # cores that processes other than the measured parts may take before the row says so


def machine_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since it started (/proc/stat: user, nice, system, irq and
    softirq of every core), or None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def scale_note(settings: Settings, cores: int) -> str:
    return (
        f"Small JSON tools/call through HAProxy, {settings.concurrency} connections for {settings.duration:g} s, "
        "each connection its own 2025-06-18 session: HAProxy sends each initialize round robin and sticks the "
        "session to the replica that answered it, so the connections split evenly between the replicas. Each "
        "replica is addons/bastion.py with configuration 3's options (identity with the dev issuer, the bench "
        "ruleset, recording, audit, stage timing) and state_url on the cluster's Redis. CPU time from "
        "/proc/<pid>/stat across the step: a replica's per call it served (the tools/call count of its /metrics), "
        "the replicas' sum and the rest per call made; cores busy: CPU seconds per second of the parts above, "
        "then of the whole machine (/proc/stat). "
        f"The {cores} cores of this machine are shared by the load generator, the upstream, HAProxy, Redis and "
        "every replica: calls/s is what the whole machine does, not what replicas on cores of their own would; "
        "CPU per call is what each part costs, whatever the cores.")


def run_scaleout(up_port: int, up_pid: int | None, tmp: Path, settings: Settings) -> dict[str, Any]:
    """One cluster of K replicas per K of `settings.replicas`, one after the other, fronting the bench's upstream."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    out: dict[str, Any] = {"replicas": list(settings.replicas), "cores": cores,
                           "call": f"small JSON, {settings.concurrency} connections, one session each",
                           "note": scale_note(settings, cores), "rows": []}
    if settings.script != BUNDLE:
        out["note"] += f" The replicas run {BUNDLE.relative_to(ROOT)} (the cluster's), not --script."
    for i, k in enumerate(settings.replicas, 1):
        where = f"scale-out, {k} replica{'s' if k > 1 else ''} ({i}/{len(settings.replicas)})"
        out["rows"].append(scale_row(k, up_port, up_pid, tmp / f"scaleout-{k}", settings, where))
    return out


def scale_row(k: int, up_port: int, up_pid: int | None, own: Path, settings: Settings,
              where: str) -> dict[str, Any]:
    """Start K replicas, Redis and HAProxy, saturate them through HAProxy, check what ran; the row's figures."""
    from bastion_dev import cluster

    row: dict[str, Any] = {"replicas": k, "ids": [], "calls": None, "seconds": None, "calls_s": None,
                           "cpu_ms": {}, "replicas_cpu_ms": None, "served": None, "served_cpu_ms": None,
                           "served_check": None, "cores_busy": None, "machine_busy": None, "components": [],
                           "errors": {}, "warnings": []}
    own.mkdir(exist_ok=True)

    def progress(text: str) -> None:
        say(f"{where}: {text}")

    try:
        with contextlib.ExitStack() as stack:
            port = free_port()
            setup = bundle_setup(cluster.BUNDLE, own, port, stack, "bundle")
            options = {name: value for name, value in setup.options.items()
                       if name not in cluster.MANAGED and name not in SCALE_LEFT_OUT}
            c = cluster.Cluster(f"http://127.0.0.1:{up_port}/mcp", replicas=k, options=options, dir=own / "cluster",
                                port=port, timeout=min(60.0, settings.step_timeout), progress=progress)
            row["ids"] = [r.id for r in c.replicas]
            progress(f"starting Redis, {k} replica{'s' if k > 1 else ''} (mitmdump -s {cluster.BUNDLE.name}) "
                     "and HAProxy")
            stack.enter_context(c)
            row["command"] = " ".join("mitmdump" if a == MITMDUMP else a for a in c.replica_args(c.replicas[0]))
            try:
                asyncio.run(asyncio.wait_for(scale_measure(c, setup.token, up_pid, settings, row, progress),
                                             settings.step_timeout))
            except TimeoutError:
                row["errors"]["throughput"] = f"no answer within {settings.step_timeout:g} s"
            except (BenchError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
                row["errors"]["throughput"] = f"{type(e).__name__}: {e}"[:500]
            gone = c.exited()
            if gone:
                row["errors"]["cluster"] = "; ".join(
                    f"{name} exited with {status}: {' '.join(cluster.last_lines(c.part(name).log, 5).split())}"
                    for name, status in gone.items())[:2000]
            else:
                row["components"] = [dataclasses.asdict(comp) for comp in scale_verify(c, setup)]
    except (cluster.ClusterError, BenchError, ValueError) as e:
        row["errors"]["start"] = str(e)[:2000]
    return row


def replica_served(c) -> dict[str, float | str]:
    """Each replica's tools/call count now, from its /metrics (or why there is none)."""
    out: dict[str, float | str] = {}
    for r in c.replicas:
        try:
            out[r.id] = served_calls(metrics_page(r.admin_url))
        except (OSError, ValueError) as e:
            out[r.id] = f"GET {r.admin_url}/metrics: {type(e).__name__}: {e}"
    return out


async def scale_measure(c, token: str | None, up_pid: int | None, settings: Settings, row: dict[str, Any],
                        progress: Callable[[str], None]) -> None:
    """Warm every replica up, then the throughput step through HAProxy, the CPU of every part read right
    before the first call and after the last (as in `Measurement.throughput`)."""
    front = Load(c.port, token)
    progress("waiting until it answers through HAProxy")
    await front.wait_ready()
    progress(f"warm-up, {settings.warmup} calls on each replica (bypassing HAProxy)")
    for r in c.replicas:  # each fetches the issuer's keys and fills its caches before it is measured
        direct = Load(r.port, token)
        await direct.wait_ready()
        await direct.sequential(SCALE_CALL, settings.warmup)
    pids = {r.id: r.proc.pid for r in c.replicas}
    pids.update({"redis": c.redis.pid, "haproxy": c.haproxy.pid, "client": os.getpid()})
    if up_pid is not None:
        pids["upstream"] = up_pid
    start: dict[str, Any] = {}

    def at_start() -> None:
        start["served"] = replica_served(c)  # the replicas' /metrics first: their CPU is read after
        start["cpu"] = {name: Memory(pid).cpu_seconds() for name, pid in pids.items()}
        start["machine"] = machine_cpu_seconds()

    progress(f"throughput, small JSON, {settings.concurrency} connections (one session each) for "
             f"{settings.duration:g} s through HAProxy")
    calls, seconds = await front.saturate(SCALE_CALL, settings.concurrency, settings.duration, at_start)
    spent = {name: Memory(pid).cpu_seconds() - start["cpu"][name] for name, pid in pids.items()}
    machine = machine_cpu_seconds()
    served_after = replica_served(c)
    row.update(calls=calls, seconds=seconds, calls_s=calls / seconds, cores_busy=sum(spent.values()) / seconds)
    if machine is not None and start["machine"] is not None:
        row["machine_busy"] = (machine - start["machine"]) / seconds
        others = row["machine_busy"] - row["cores_busy"]
        if others > SCALE_OTHERS:
            row["warnings"].append(f"other processes kept {others:.2f} cores busy during the step (the machine "
                                   f"{row['machine_busy']:.2f}, the measured parts {row['cores_busy']:.2f}): "
                                   "calls/s is lower than on an idle machine")
    row["cpu_s"] = spent
    if calls:
        row["cpu_ms"] = {name: cpu / calls * 1000 for name, cpu in spent.items()}
        row["replicas_cpu_ms"] = sum(row["cpu_ms"][r.id] for r in c.replicas)
    failed = [v for v in (*start["served"].values(), *served_after.values()) if isinstance(v, str)]
    if failed:
        row["errors"]["served"] = failed[0][:500]
    else:
        served = {r.id: served_after[r.id] - start["served"][r.id] for r in c.replicas}
        row["served"] = served
        row["served_cpu_ms"] = {rid: spent[rid] / n * 1000 if n else None for rid, n in served.items()}
    check_balance(row)


def check_balance(row: dict[str, Any]) -> None:
    """Every replica must have served calls, or the row's figures are not those of K replicas: by the
    tools/call counts of their /metrics, else by their share of the replicas' CPU. Said under `balance`."""
    ids, served = row["ids"], row["served"]
    if served is not None:
        row["served_check"] = "/metrics tools/call counts"
        idle = [rid for rid in ids if not served.get(rid)]
        total = sum(served.values())
        if row["calls"] and total != row["calls"]:
            row["served_note"] = f"the replicas counted {total:.0f} tools/call, the client made {row['calls']}"
    elif row.get("cpu_s"):
        row["served_check"] = f"CPU share (no /metrics; idle below {SCALE_IDLE_SHARE:.0%} of the replicas' CPU)"
        total = sum(row["cpu_s"][rid] for rid in ids)
        idle = [rid for rid in ids if total <= 0 or row["cpu_s"][rid] / total < SCALE_IDLE_SHARE]
    else:
        return
    if idle:
        row["errors"]["balance"] = (f"{', '.join(idle)} served no call ({row['served_check']}): these are not "
                                    f"the figures of {len(ids)} replicas")


def scale_verify(c, setup: BundleSetup) -> list[Component]:
    """After the step, what configuration 3 checks, on the cluster: identity refuses an anonymous call,
    small_pii's answer is masked, every replica wrote recordings and its audit log, stage timing counts."""
    out = []
    for comp in setup.components:
        comp = dataclasses.replace(comp, config="scaleout")
        out.append(comp)
        if comp.status == "on" and comp.name in ("recording", "audit", "stage timing"):  # the cluster's paths, ports
            comp.detail = {"recording": f"record_dir={c.sessions}",
                           "audit": "audit_log=" + ", ".join(str(r.audit_log) for r in c.replicas),
                           "stage timing": "stage_timing=true, admin_listen=" + ", ".join(
                               r.admin_url for r in c.replicas)}[comp.name] + " (set by the cluster)"
        if comp.name == "masking" and comp.status == "on":
            comp.detail = "pii on the answer to small_pii (checked through HAProxy after the step)"
        if comp.status != "on":
            continue
        if comp.name == "identity":
            try:
                reply = asyncio.run(_anonymous_call(c.port))
                if reply.status != 401:
                    comp.status, comp.detail = "not enforced", f"an anonymous call got {reply.describe()}"
            except (OSError, asyncio.IncompleteReadError) as e:
                comp.status, comp.detail = "not checked", f"an anonymous call failed: {e!r}"
        elif comp.name == "masking":
            try:
                reply = asyncio.run(_pii_call(c.port, setup.token))
                if any(value in reply.body for value in PII_VALUES):
                    comp.status, comp.detail = "not enforced", f"small_pii answered unmasked: {reply.describe()}"
            except (BenchError, OSError, asyncio.IncompleteReadError) as e:
                comp.status, comp.detail = "not checked", f"a small_pii call failed: {e!r}"[:500]
        elif comp.name == "recording":
            mine = {r.id: any(r.id in p.name for p in c.sessions.rglob("*") if p.is_file() and p.stat().st_size)
                    for r in c.replicas}
            if not all(mine.values()):
                comp.status = "wrote nothing"
                comp.detail += f"; no recording names {', '.join(rid for rid, ok in mine.items() if not ok)}"
        elif comp.name == "audit":
            empty = [r.id for r in c.replicas if not (r.audit_log.exists() and r.audit_log.stat().st_size)]
            if empty:
                comp.status, comp.detail = "wrote nothing", f"{comp.detail}; empty: {', '.join(empty)}"
        elif comp.name == "stage timing":
            try:
                if not all(read_counters(metrics_page(r.admin_url)) for r in c.replicas):
                    comp.status = "no figures"
            except (OSError, ValueError) as e:
                comp.status, comp.detail = "not checked", f"GET /metrics failed: {type(e).__name__}: {e}"[:500]
    return out


# --- one whole run -------------------------------------------------------------


@dataclass
class Result:
    settings: Settings
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    components: list[Component] = field(default_factory=list)
    micro: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    scaleout: dict[str, Any] | None = None  # run_scaleout's figures; None when it did not run

    def metric(self, config: str, key: str) -> float | None:
        return self.configs.get(config, {}).get("metrics", {}).get(key)

    def component(self, config: str, name: str) -> Component | None:
        return next((c for c in self.components if c.config == config and c.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "meta": self.meta,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self.settings).items()},
            "configs": self.configs,
            "components": [dataclasses.asdict(c) for c in self.components],
            "micro": self.micro,
            "rows": table_rows(self),
            "stage_cpu": stage_table(self),
            "targets": targets(self),
            "targets_judged": self.settings.judge_targets,
            "scaleout": self.scaleout,
            "scaleout_table": scale_table(self),
            **({} if self.settings.judge_targets else {"targets_note": QUICK_NOTE}),
        }


def run(settings: Settings, configs: tuple[str, ...] = CONFIGS, micro: bool = True) -> Result:
    result = Result(settings, meta=host_meta())
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmpdir, contextlib.ExitStack() as stack:
            tmp = Path(tmpdir)
            up_port = free_port()
            say(f"starting the upstream ({UPSTREAM.name}) on 127.0.0.1:{up_port}")
            upstream = stack.enter_context(started([sys.executable, str(UPSTREAM), "--port", str(up_port)], up_port,
                                                   tmp / "upstream.log"))
            for i, name in enumerate(configs, 1):
                result.configs[name] = run_config(name, up_port, tmp, settings, result,
                                                  where=f"config {name} ({i}/{len(configs)})")
            if settings.replicas:
                result.scaleout = run_scaleout(up_port, upstream.pid, tmp, settings)
        if micro:
            result.micro = run_micro(settings.micro_seconds)
    finally:
        stop_all()
    say(f"done in {time.monotonic() - t0:.0f} s")
    return result


def run_config(name: str, up_port: int, tmp: Path, settings: Settings, result: Result,
               where: str | None = None) -> dict[str, Any]:
    where = where or f"config {name}"
    out: dict[str, Any] = {"metrics": {}, "errors": {}}
    try:
        with contextlib.ExitStack() as stack:
            token, pid, admin, spy = None, None, None, None
            if name == "direct":
                port = up_port
            else:
                port = free_port()
                if name == "bare":
                    shim = tmp / "stream_sse.py"
                    shim.write_text(STREAM_SSE_SCRIPT)
                    scripts, options = [shim], {}
                else:
                    own = tmp / name
                    own.mkdir(exist_ok=True)
                    setup = bundle_setup(settings.script, own, port, stack, name)
                    result.components += setup.components
                    scripts, options, token, admin = [settings.script], setup.options, setup.token, setup.admin_port
                profile = settings.profile.with_suffix(f".{name}.prof") if settings.profile else None
                args = mitmdump_args(up_port, port, scripts, options, profile)
                out["command"] = " ".join("mitmdump" if a == MITMDUMP else a for a in args)
                say(f"{where}: starting mitmdump" + (f" -s {Path(settings.script).name}" if name in BUNDLE_CONFIGS
                                                     else ""))
                proc = stack.enter_context(started(args, port, tmp / f"{name}.log"))
                pid = proc.pid
                if settings.spy:
                    spy = Spy(settings.spy.with_suffix(f".{name}.txt"), tmp / f"{name}.spy.log")
            m = Measurement(Load(port, token), pid, settings, progress=lambda text: say(f"{where}, {text}"),
                            admin=admin, spy=spy)
            asyncio.run(m.run())
            out["metrics"], out["errors"] = m.metrics, m.errors
            if m.stages:
                out["stages"] = m.stages
            if pid is not None and proc.proc.poll() is not None:
                out["errors"]["proxy"] = f"mitmdump exited with {proc.proc.returncode}: {proc.tail()}"
            elif name in BUNDLE_CONFIGS:
                verify_components([c for c in result.components if c.config == name], port, tmp / name, token,
                                  admin)
                masking = result.component(name, "masking")
                if name == "masked" and masking.status != "on":
                    out["errors"]["masking"] = (f"masking {masking.status}, so its figures are not those of masked "
                                                f"answers: {masking.detail}")
    except BenchError as e:
        out["errors"]["start"] = str(e)[:2000]
    return out


def verify_components(components: list[Component], port: int, tmp: Path, token: str | None,
                      admin: int | None) -> None:
    """After the run: identity must refuse an anonymous call; recording and audit must have written;
    masking must mask small_pii's answer; stage timing must show its counters on /metrics."""
    for comp in components:
        if comp.status != "on":
            continue
        if comp.name == "identity":
            try:
                reply = asyncio.run(_anonymous_call(port))
            except (OSError, asyncio.IncompleteReadError) as e:
                comp.status, comp.detail = "not checked", f"an anonymous call failed: {e!r}"
                continue
            if reply.status != 401:
                comp.status, comp.detail = "not enforced", f"an anonymous call got {reply.describe()}"
        elif comp.name in ("recording", "audit"):
            path = tmp / ("recordings" if comp.name == "recording" else "audit.jsonl")
            written = (sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir()
                       else (path.stat().st_size if path.exists() else 0))
            if not written:
                comp.status, comp.detail = "wrote nothing", f"{comp.detail}; {path.name} is empty"
        elif comp.name == "masking":
            try:
                reply = asyncio.run(_pii_call(port, token))
            except (BenchError, OSError, asyncio.IncompleteReadError) as e:
                comp.status, comp.detail = "not checked", f"a small_pii call failed: {e!r}"[:500]
                continue
            if any(value in reply.body for value in PII_VALUES):
                comp.status, comp.detail = "not enforced", f"small_pii answered unmasked: {reply.describe()}"
        elif comp.name == "stage timing":
            try:
                counters = scrape(admin)
            except (OSError, ValueError) as e:
                comp.status, comp.detail = "not checked", f"GET /metrics failed: {type(e).__name__}: {e}"[:500]
                continue
            if not counters:
                comp.status, comp.detail = "no figures", f"{comp.detail}; /metrics shows no bastion_stage_* counter"


async def _pii_call(port: int, token: str | None) -> Reply:
    conn = await Load(port, token).connect()
    try:
        reply = await conn.call_tool("small_pii", {})
        check_result(reply, conn.next_id)
        return reply
    finally:
        conn.close()


async def _anonymous_call(port: int) -> Reply:
    conn = await MCPConnection(port).open()
    try:
        return await conn.call_tool("small", {})
    finally:
        conn.close()


def host_meta() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except OSError:
        commit = ""
    try:
        from mitmproxy.version import VERSION as mitmproxy_version
    except ImportError:  # pragma: no cover
        mitmproxy_version = "?"
    return {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "python": platform.python_version(),
        "mitmproxy": mitmproxy_version,
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "platform": platform.platform(),
    }


# --- the report -------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One figure of the table; `key` is `<step>.<figure>`, the step being the Measurement's that makes it."""

    key: str
    label: str
    unit: str
    digits: int = 2

    @property
    def step(self) -> str:
        return self.key.rsplit(".", 1)[0]

    @property
    def proxy_only(self) -> bool:
        return "rss" in self.key or self.key.endswith("cpu_us")


ROWS: list[tuple[str, list[Row]]] = [
    ("tools/call, small JSON, concurrency 1", [
        Row("small.p50", "p50", "ms"), Row("small.p95", "p95", "ms"), Row("small.p99", "p99", "ms"),
        Row("small.mask.p50", "p50, an answer to mask (pii)", "ms")]),
    ("tools/call, large JSON, concurrency 1", [
        Row("large.p50", "p50", "ms"), Row("large.p95", "p95", "ms"), Row("large.p99", "p99", "ms")]),
    ("tools/call, SSE result, concurrency 1", [
        Row("sse.p50", "p50", "ms"), Row("sse.p95", "p95", "ms"), Row("sse.p99", "p99", "ms")]),
    ("SSE time to first event", [
        Row("ttfe.p50", "p50", "ms"), Row("ttfe.p95", "p95", "ms"), Row("ttfe.p99", "p99", "ms")]),
    ("throughput, concurrency N", [
        Row("small.cN.calls_s", "small JSON", "calls/s", 0), Row("sse.cN.calls_s", "SSE result", "calls/s", 0),
        Row("small.cN.cpu_us", "proxy CPU, small JSON", "µs/call", 0),
        Row("sse.cN.cpu_us", "proxy CPU, SSE", "µs/call", 0)]),
    ("long event stream", [
        Row("stream.mb", "size", "MiB", 0), Row("stream.mb_s", "throughput", "MiB/s", 0),
        Row("stream.rss_before", "proxy RSS before", "MiB", 1),
        Row("stream.rss_peak", "proxy RSS peak during", "MiB", 1),
        Row("stream.rss_growth", "proxy RSS growth", "MiB", 1), Row("stream.rss_after", "proxy RSS after", "MiB", 1)]),
    ("sessions, opened and abandoned", [
        Row("sessions.per_s", "initialize + 1 call", "sessions/s", 0),
        Row("sessions.rss_before", "proxy RSS before", "MiB", 1),
        Row("sessions.rss_after", "proxy RSS after", "MiB", 1),
        Row("sessions.rss_growth", "proxy RSS growth", "MiB", 1)]),
    ("proxy memory", [Row("rss.idle", "RSS after start", "MiB", 1), Row("rss.peak", "peak RSS (VmHWM)", "MiB", 1)]),
]
RATIOS = (("3/2", "bundle", "bare"), ("4/2", "masked", "bare"), ("3/1", "bundle", "direct"))


def fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "" if a is None or not b else f"{a / b:.2f}"


def ratio_key(label: str) -> str:
    return "ratio_" + label.replace("/", "_")


def table_rows(result: Result) -> list[dict[str, Any]]:
    """Every figure with its ratios: bundle/bare (3/2), masked/bare (4/2) and bundle/direct (3/1)."""
    rows = []
    for section, entries in ROWS:
        for row in entries:
            values = {c: result.metric(c, row.key) for c in CONFIGS}
            rows.append({
                "section": section, "key": row.key, "label": row.label, "unit": row.unit, "digits": row.digits,
                **values,
                **{ratio_key(label): ratio(values[a], values[b]) for label, a, b in RATIOS},
                "why_na": {c: why_missing(result, c, row) for c in CONFIGS if values[c] is None},
            })
    return rows


def why_missing(result: Result, config: str, row: Row) -> str:
    """Why a configuration has no figure for `row`."""
    cfg = result.configs.get(config)
    if cfg is None:
        return "not run"
    errors = cfg.get("errors", {})
    for step in ("start", "proxy", "ready", row.step):
        if step in errors:
            return f"{step}: {errors[step]}"
    if config == "direct" and row.proxy_only:
        return "no proxy to measure"
    return "not measured"


# --- CPU per stage and hook ------------------------------------------------------

STAGE_STEPS = (("small.cN", "small JSON"), ("sse.cN", "SSE"))
STAGE_NOTE = ("µs of CPU per call in the throughput steps, from the gateway's /metrics (stage_timing). "
              "The stages run inside the hooks, so the two sums overlap; the process total also holds "
              "mitmproxy's own work.")


def stage_columns(result: Result) -> list[str]:
    """`config/step` for each throughput step of each bundle configuration that ran."""
    return [f"{c}/{step}" for step, _ in STAGE_STEPS for c in BUNDLE_CONFIGS if c in result.configs]


def column_title(column: str, sep: str = "\n") -> str:
    config, step = column.split("/")
    return f"{TITLES[config]}{sep}{dict(STAGE_STEPS)[step]}"


def why_no_stages(result: Result, config: str, step: str) -> str | None:
    """Why a configuration has no CPU per stage for a step; None when it has."""
    cfg = result.configs[config]
    if step in cfg.get("stages", {}):
        return None
    errors = cfg.get("errors", {})
    for key in ("start", "proxy", "ready"):
        if key in errors:
            return f"{key}: {errors[key]}"
    comp = result.component(config, "stage timing")
    if comp is not None and comp.status != "on":
        return f"stage timing {comp.status}: {comp.detail}"
    for key in (f"{step}.stages", step):
        if key in errors:
            return f"{key}: {errors[key]}"
    return "not measured"


def stage_table(result: Result) -> dict[str, Any]:
    """The CPU per call of each stage and hook (costliest first), their sums and the process's total, per
    bundle configuration and throughput step; `why_na` says why a column has no figures."""
    columns = stage_columns(result)
    figures: dict[str, dict[str, Any]] = {}
    why_na: dict[str, str] = {}
    for column in columns:
        config, step = column.split("/")
        why = why_no_stages(result, config, step)
        if why is None:
            figures[column] = result.configs[config]["stages"][step]
        else:
            why_na[column] = why
    rows: list[dict[str, Any]] = []
    for kind in ("stage", "hook"):
        names = sorted({name for f in figures.values() for name in f[kind]})
        part = []
        for name in names:  # one that never ran in a configuration has no counter there: it cost nothing
            cells = {c: f[kind].get(name, {"cpu_us": 0.0, "per_call": 0.0}) for c, f in figures.items()}
            part.append({"kind": kind, "name": name, "label": f"{kind} {name}",
                         "cpu_us": {c: cell["cpu_us"] for c, cell in cells.items()},
                         "per_call": {c: cell["per_call"] for c, cell in cells.items()}})
        rows += sorted(part, key=lambda r: -max(r["cpu_us"].values()))
    for key, label in (("stages_cpu_us", "sum of the stages"), ("hooks_cpu_us", "sum of the hooks"),
                       ("cpu_us", "the proxy process, all (/proc)")):
        rows.append({"kind": "total", "name": key, "label": label,
                     "cpu_us": {c: result.metric(c.split("/")[0], f"{c.split('/')[1]}.{key}") for c in figures}})
    return {"columns": columns, "rows": rows if figures else [], "why_na": why_na}


def stage_reasons(table: dict[str, Any]) -> list[tuple[str, str]]:
    """(which, why) for each column without figures; a reason both steps of a configuration share is said once."""
    by_config: dict[str, list[tuple[str, str]]] = {}
    for column, why in table["why_na"].items():
        by_config.setdefault(column.split("/")[0], []).append((column, " ".join(why.split())[:400]))
    out = []
    for config, items in by_config.items():
        if len(items) == len(STAGE_STEPS) and len({why for _, why in items}) == 1:
            out.append((TITLES[config], items[0][1]))
        else:
            out += [(column_title(column, ", "), why) for column, why in items]
    return out


# --- the scale-out table -----------------------------------------------------------------------

SCALE_TITLE = "scale-out: K replicas behind HAProxy, sharing Redis (small JSON tools/call, CPU from /proc)"


def _cells(values: list[float | None], digits: int) -> str:
    return ", ".join(fmt(v, digits) for v in values) if values else "n/a"


def scale_table(result: Result) -> dict[str, Any] | None:
    """The scale-out figures as a table: a header, one row of cells per K, the note, the bundle's figures
    alone for reference, and what went wrong or was not on (which, why). None when the step did not run."""
    scale = result.scaleout
    if scale is None:
        return None
    widest = max((row["replicas"] for row in scale["rows"]), default=1)
    ids = ", ".join(f"r{i}" for i in range(1, widest + 1))
    header = ["replicas", "calls/s", f"CPU ms/call per replica ({ids})", "CPU ms/call, replicas' sum",
              "Redis ms/call", "HAProxy ms/call", "client + upstream ms/call",
              f"cores busy: these / all (of {scale['cores']})", f"calls served ({ids})"]
    cells, problems = [], []
    for row in scale["rows"]:
        cpu, served = row["cpu_ms"], row["served"]
        client = [cpu[p] for p in ("client", "upstream") if p in cpu]
        shares = "n/a"
        if served is not None and sum(served.values()):
            shares = ", ".join(f"{served[rid] / sum(served.values()):.0%}" for rid in row["ids"])
        cells.append([
            str(row["replicas"]), fmt(row["calls_s"], 0),
            _cells([row["served_cpu_ms"][rid] for rid in row["ids"]], 3) if row["served_cpu_ms"] else "n/a",
            fmt(row["replicas_cpu_ms"], 3), fmt(cpu.get("redis"), 3), fmt(cpu.get("haproxy"), 3),
            fmt(sum(client), 3) if len(client) == 2 else "n/a",
            "n/a" if row["cores_busy"] is None else f"{fmt(row['cores_busy'], 2)} / {fmt(row.get('machine_busy'), 2)}",
            shares,
        ])
        which = f"{row['replicas']} replica{'s' if row['replicas'] > 1 else ''}"
        problems += [(which, f"{step}: {' '.join(why.split())[:400]}") for step, why in row["errors"].items()]
        problems += [(which, warning) for warning in row.get("warnings", ())]
        problems += [(which, f"{comp['name']} {comp['status']}: {comp['detail']}") for comp in row["components"]
                     if comp["status"] != "on"]
    reference = None
    calls_s, cpu_us = result.metric("bundle", "small.cN.calls_s"), result.metric("bundle", "small.cN.cpu_us")
    if calls_s is not None:
        reference = (f"For reference, {TITLES['bundle']} (one mitmdump, neither HAProxy nor Redis, the same load): "
                     f"{fmt(calls_s, 0)} calls/s, " + (f"{cpu_us / 1000:.3f} ms of CPU per call."
                                                      if cpu_us is not None else "its CPU n/a."))
    return {"title": SCALE_TITLE, "header": header, "rows": cells, "note": scale["note"], "reference": reference,
            "problems": problems}


def targets(result: Result) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figure and met / missed / n/a; none for a --quick run.

    The masked configuration's figure counts only when its masking was seen in force.
    """
    if not result.settings.judge_targets:
        return []
    m = result.metric
    masking = next((x["value"] for x in result.micro if x["name"] == "masking, all detectors"), None)
    masked = result.component("masked", "masking")
    masked_calls = m("masked", "small.cN.calls_s") if masked is not None and masked.status == "on" else None

    def diff(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    def quotient(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    items = [
        ("calls/s, bundle vs bare (small JSON)", ">= 0.80",
         quotient(m("bundle", "small.cN.calls_s"), m("bare", "small.cN.calls_s")), lambda v: v >= 0.8, "x"),
        ("calls/s, bundle vs bare (SSE result)", ">= 0.80",
         quotient(m("bundle", "sse.cN.calls_s"), m("bare", "sse.cN.calls_s")), lambda v: v >= 0.8, "x"),
        ("p50 added at concurrency 1 (small JSON)", "< 0.5 ms",
         diff(m("bundle", "small.p50"), m("bare", "small.p50")), lambda v: v < 0.5, "ms"),
        ("p50 added at concurrency 1 (SSE result)", "< 0.5 ms",
         diff(m("bundle", "sse.p50"), m("bare", "sse.p50")), lambda v: v < 0.5, "ms"),
        ("calls/s, every answer masked with pii vs bare (small JSON)", ">= 0.70",
         quotient(masked_calls, m("bare", "small.cN.calls_s")), lambda v: v >= 0.7, "x"),
        ("masking throughput, all detectors (large text)", ">= 100 MB/s", masking, lambda v: v >= 100, "MB/s"),
        ("RSS growth across the stream (bundle)", "< 64 MiB",
         m("bundle", "stream.rss_growth"), lambda v: v < 64, "MiB"),
        (f"RSS growth across {result.settings.sessions:,} sessions (bundle)", "< 32 MiB",
         m("bundle", "sessions.rss_growth"), lambda v: v < 32, "MiB"),
        ("SSE time to first event vs bare (p50)", "< 2 ms",
         diff(m("bundle", "ttfe.p50"), m("bare", "ttfe.p50")), lambda v: v < 2.0, "ms"),
    ]
    return [{"target": name, "goal": goal, "measured": value, "unit": unit,
             "status": "n/a" if value is None else ("met" if ok(value) else "missed")}
            for name, goal, value, ok, unit in items]


def two_lines(title: str) -> str:
    """A long column title on two lines: the figures fit 120 columns with the labels unwrapped."""
    return title if len(title) <= 8 else "\n".join(title.rsplit(" ", 1))


def print_report(result: Result, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 120)
    s = result.settings
    table = Table(title=f"mcp-bastion benchmark (N = {s.concurrency} connections, stream {s.stream_bytes >> 20} MiB, "
                        f"{s.sessions:,} sessions)")
    table.add_column("metric")
    table.add_column("unit")
    for c in CONFIGS:
        table.add_column(two_lines(TITLES[c]), justify="right")
    for label, _, _ in RATIOS:
        table.add_column(label, justify="right")
    section = None
    for row in table_rows(result):
        if row["section"] != section:
            section = row["section"]
            table.add_row(f"[bold]{section}[/bold]", end_section=False)
        table.add_row("  " + row["label"], row["unit"], *(fmt(row[c], row["digits"]) for c in CONFIGS),
                      *(row[ratio_key(label)] for label, _, _ in RATIOS))
    console.print(table)

    stages = stage_table(result)
    if stages["rows"]:
        st = Table(title="CPU per call by stage and hook (µs)", caption=STAGE_NOTE)
        st.add_column("stage or hook")
        for column in stages["columns"]:
            st.add_column(column_title(column), justify="right")
        rows = stages["rows"]
        for i, row in enumerate(rows):
            st.add_row(row["label"], *(fmt(row["cpu_us"].get(c), 1) for c in stages["columns"]),
                       end_section=i + 1 < len(rows) and rows[i + 1]["kind"] != row["kind"])
        console.print(st)
    for which, why in stage_reasons(stages):
        console.print(f"CPU per stage and hook, {which}: n/a because {why}")

    scale = scale_table(result)
    if scale is not None:
        sc = Table(title=scale["title"], caption=scale["note"])
        for i, title in enumerate(scale["header"]):
            sc.add_column(title, justify="left" if i == 0 else "right")
        for cells in scale["rows"]:
            sc.add_row(*cells)
        console.print(sc)
        if scale["reference"]:
            console.print(scale["reference"])
        for which, why in scale["problems"]:
            console.print(f"[red]scale-out, {which}: {why}[/red]")

    if not s.judge_targets:
        console.print(f"targets: {QUICK_NOTE} (its figures mean little; run scripts/bench without --quick)")
    else:
        tt = Table(title="targets (reported, not asserted)")
        for col in ("target", "goal", "measured", "status"):
            tt.add_column(col)
        for t in targets(result):
            style = {"met": "green", "missed": "red"}.get(t["status"], "dim")
            tt.add_row(t["target"], t["goal"],
                       fmt(t["measured"], 2) + (f" {t['unit']}" if t["measured"] is not None else ""),
                       f"[{style}]{t['status']}[/{style}]")
        console.print(tt)

    if result.micro:
        mt = Table(title="microbenchmarks")
        for col in ("component", "figure", "unit", "note"):
            mt.add_column(col)
        for x in result.micro:
            mt.add_row(x["name"], fmt(x["value"], 2), x["unit"], x["note"])
        console.print(mt)

    if result.components:
        ct = Table(title=f"bundle components ({', '.join(dict.fromkeys(TITLES[c.config] for c in result.components))})")
        for col in ("config", "component", "status", "detail"):
            ct.add_column(col)
        for comp in result.components:
            ct.add_row(comp.config, comp.name, comp.status, comp.detail)
        console.print(ct)

    for name, cfg in result.configs.items():
        for step, err in cfg.get("errors", {}).items():
            console.print(f"[red]{name} / {step}: n/a because {err}[/red]")


def markdown(result: Result) -> str:
    """The same figures as GitHub tables, for the README: what ran, the figures, targets, what is n/a and why."""
    m, s = result.meta, result.settings
    lines = [
        f"`{m.get('command', 'scripts/bench')}` on {m.get('started', '?')}, commit {m.get('commit') or '?'}, "
        f"{m.get('cpus')} CPUs, Python {m.get('python')}, mitmproxy {m.get('mitmproxy')}; "
        f"N = {s.concurrency} connections, stream {s.stream_bytes >> 20} MiB, large result {s.large_bytes >> 10} KiB, "
        f"{s.sessions:,} sessions.",
        "",
        "| metric | unit | " + " | ".join(TITLES[c] for c in CONFIGS) + " | "
        + " | ".join(label for label, _, _ in RATIOS) + " |",
        "|" + "---|" * 2 + "---:|" * (len(CONFIGS) + len(RATIOS)),
    ]
    section = None
    for row in table_rows(result):
        if row["section"] != section:
            section = row["section"]
            lines.append(f"| **{section}** |" + " |" * (len(CONFIGS) + len(RATIOS) + 1))
        lines.append(f"| {row['label']} | {row['unit']} | " + " | ".join(fmt(row[c], row["digits"]) for c in CONFIGS)
                     + " | " + " | ".join(row[ratio_key(label)] for label, _, _ in RATIOS) + " |")
    stages = stage_table(result)
    if stages["rows"]:
        lines += ["", STAGE_NOTE, "",
                  "| stage or hook | " + " | ".join(column_title(c, ", ") for c in stages["columns"]) + " |",
                  "|---|" + "---:|" * len(stages["columns"])]
        for row in stages["rows"]:
            lines.append(f"| {row['label']} | " + " | ".join(fmt(row["cpu_us"].get(c), 1) for c in stages["columns"])
                         + " |")
    if stage_reasons(stages):
        lines += ["", "CPU per stage and hook, n/a:", ""]
        lines += [f"- {which}: {why}" for which, why in stage_reasons(stages)]
    scale = scale_table(result)
    if scale is not None:
        lines += ["", f"{scale['title'][0].upper()}{scale['title'][1:]}.", "",
                  "| " + " | ".join(scale["header"]) + " |", "|---:|" + "---:|" * (len(scale["header"]) - 1)]
        lines += ["| " + " | ".join(cells) + " |" for cells in scale["rows"]]
        lines += ["", scale["note"]]
        if scale["reference"]:
            lines += ["", scale["reference"]]
        if scale["problems"]:
            lines += ["", "Scale-out, what went wrong or was not on:", ""]
            lines += [f"- {which}: {' '.join(why.split())[:400]}" for which, why in scale["problems"]]
    if not s.judge_targets:
        lines += ["", f"Targets: {QUICK_NOTE}."]
    else:
        lines += ["", "| target | goal | measured | status |", "|---|---|---:|---|"]
        for t in targets(result):
            unit = f" {t['unit']}" if t["measured"] is not None else ""
            lines.append(f"| {t['target']} | {t['goal']} | {fmt(t['measured'], 2)}{unit} | {t['status']} |")
    if result.micro:
        lines += ["", "| microbenchmark | figure | unit |", "|---|---:|---|"]
        for x in result.micro:
            lines.append(f"| {x['name']} | {fmt(x['value'], 2)} | {x['unit'] or x['note']} |")
    errors = [(name, step, err) for name, cfg in result.configs.items() for step, err in cfg.get("errors", {}).items()]
    if errors:
        lines += ["", "Not measured:", ""]
        lines += [f"- {TITLES[name]}, {step}: {' '.join(err.split())[:300]}" for name, step, err in errors]
    return "\n".join(lines) + "\n"


def replica_list(text: str) -> tuple[int, ...]:
    """--replicas: K,K,... each 1 to cluster.MAX_REPLICAS, none twice; "" or "0" turns the scale-out step off."""
    from bastion_dev.cluster import MAX_REPLICAS

    if text.strip() in ("", "0"):
        return ()
    out: list[int] = []
    for item in text.split(","):
        try:
            k = int(item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of replica counts (e.g. 1,2): {text!r}") from None
        if not 1 <= k <= MAX_REPLICAS:
            raise argparse.ArgumentTypeError(f"replica counts must be 1 to {MAX_REPLICAS} (or 0 alone: no "
                                             f"scale-out step): {text!r}")
        if k in out:
            raise argparse.ArgumentTypeError(f"{k} replicas named twice: {text!r}")
        out.append(k)
    return tuple(out)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0].strip(),
                            epilog="\n\n".join(__doc__.strip().split("\n\n")[-2:]),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (few calls, 2 MiB stream, 50 sessions): checks the harness, figures mean "
                             "little; targets are not judged")
    parser.add_argument("--json", type=Path,
                        help=f"where to write the results (default: {DEFAULT_JSON_DIR.relative_to(ROOT)}/<time>.json); "
                             "the Markdown table goes next to it")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"which of {','.join(CONFIGS)} to run")
    parser.add_argument("--samples", type=positive(int), help="sequential calls per latency measurement")
    parser.add_argument("--duration", type=positive(float), help="seconds per throughput measurement")
    parser.add_argument("--concurrency", type=positive(int), help="connections in a throughput measurement")
    parser.add_argument("--stream-mb", type=positive(int), help="size of the long event stream in MiB")
    parser.add_argument("--sessions", type=positive(int), metavar="N",
                        help="sessions for the proxy's RSS across them, each initialize, one small call and the "
                             "connection closed without a DELETE (default: 10000; --quick: 50)")
    parser.add_argument("--script", type=Path,
                        help="mitmdump script of configurations 3 and 4 (default: addons/bastion.py)")
    parser.add_argument("--profile", type=Path, metavar="PATH",
                        help="run each mitmdump under cProfile and write PATH.<config>.prof (figures are then slower)")
    parser.add_argument("--spy", type=Path, metavar="PATH",
                        help="sample each mitmdump with py-spy (on PATH or next to python; 200 Hz) during the small "
                             "JSON throughput step and write PATH.<config>.txt: collapsed stacks, one line per "
                             "stack (frames joined by ';', then a sample count), for a flame graph tool "
                             "(flamegraph.pl, inferno-flamegraph, speedscope). The sampled process pauses at each "
                             "sample: that step's figures are slower. Without py-spy, or if it cannot attach, "
                             "the run goes on without it")
    parser.add_argument("--replicas", type=replica_list, metavar="LIST",
                        help="the scale-out step: for each K of LIST (comma-separated, e.g. 1,2,4), K replicas "
                             "of the bundle behind HAProxy sharing Redis (scripts/cluster), saturated through "
                             "HAProxy with --concurrency connections for --duration seconds; calls/s and the CPU "
                             "per call of each replica, Redis and HAProxy. \"\" or 0: no scale-out step "
                             "(default: 1,2; needs redis-server and haproxy)")
    parser.add_argument("--no-micro", action="store_true", help="skip the microbenchmarks")
    args = parser.parse_args(argv)
    configs = tuple(c.strip() for c in args.configs.split(",") if c.strip())
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configuration(s): {', '.join(sorted(unknown))} (choose from {', '.join(CONFIGS)})")
    if not configs:
        parser.error(f"--configs names no configuration (choose from {', '.join(CONFIGS)})")
    path = args.json or DEFAULT_JSON_DIR / (datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ".json")
    try:
        if args.script is not None and set(BUNDLE_CONFIGS) & set(configs):
            if not args.script.is_file():
                raise CannotRun(f"--script {args.script}: no such file")
        if args.profile is not None:
            check_writable(args.profile.with_suffix(".bare.prof"), "--profile")
        if args.spy is not None:
            check_writable(args.spy.with_suffix(".bare.txt"), "--spy")
        if not path.parent.is_dir() and not path.parent.exists():
            path.parent.mkdir(parents=True)
        check_writable(path, "--json file")
        check_writable(path.with_suffix(".md"), "Markdown table")
    except (CannotRun, OSError) as e:
        print(f"scripts/bench: {e if isinstance(e, CannotRun) else f'cannot write {path}: {e.strerror}'}",
              file=sys.stderr)
        return 2

    settings = Settings.quick() if args.quick else Settings()
    settings.judge_targets = not args.quick
    for name, value in (("samples", args.samples), ("duration", args.duration), ("concurrency", args.concurrency),
                        ("sessions", args.sessions), ("script", args.script and args.script.resolve()),
                        ("profile", args.profile and args.profile.resolve()),
                        ("spy", args.spy and args.spy.resolve()), ("replicas", args.replicas)):
        if value is not None:
            setattr(settings, name, value)
    if args.stream_mb is not None:
        settings.stream_bytes = args.stream_mb << 20

    # Ctrl-C and SIGTERM unwind the run, which stops every process it started (they run in sessions
    # of their own, so a signal to this process alone would not reach them).
    handlers = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = run(settings, configs, micro=not args.no_micro)
    except KeyboardInterrupt:
        print("scripts/bench: interrupted; every process it started is stopped", file=sys.stderr)
        return 2
    finally:
        stop_all()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    result.meta["command"] = " ".join(["scripts/bench", *(sys.argv[1:] if argv is None else argv)])
    print_report(result)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        path.with_suffix(".md").write_text(markdown(result))
    except OSError as e:
        print(f"scripts/bench: cannot write the results: {e.strerror or e}: {e.filename or path}", file=sys.stderr)
        return 2
    print(f"results: {path} (table: {path.with_suffix('.md')})")
    return 0


if __name__ == "__main__":
    # Run as bastion_dev.bench, the module bastion_dev.cluster imports: one set of started processes
    # (LIVE), which stop_all() stops, not two copies of this module with one each.
    from bastion_dev import bench as this
    from mcp_bastion.cli.common import run as run_command

    run_command(this.main, "scripts/bench")
