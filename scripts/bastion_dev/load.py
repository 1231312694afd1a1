"""
A bounded load test of the whole gateway: many concurrent clients, a mix of allowed, denied, held and
masked calls, then the checks that nothing went through a side door.

    scripts/load [--clients 50] [--calls 40] [--duration 120] [--max-rss-growth-mb 64]

Everything runs on 127.0.0.1, in a fresh temporary directory:

- a counting MCP upstream (this module with `--serve-upstream PORT`: `bench_upstream`'s fast server
  with a session id per client, the load tools, and a count of what it received per tool and marker,
  read back over GET /_counts on its own port, which the gateway does not serve);
- the dev issuer (`bastion_dev.issuer`), one RS256 token per demo identity;
- `mitmdump -s addons/bastion.py` with identity, recording and the audit log on, and a ruleset that
  allows some tools, denies some, holds some for approval (`action: approve`) and masks one
  (`action: mask`, `profile: secrets`). A gateway that refuses to start with the mask rule is started
  again without it, and the mask class is reported "not available". Beside the bundle, a passive
  script (`LOG_TAP`) copies the gateway's warnings and errors, with their level, to a file.

Each client opens a session as one of the demo identities and makes its calls one after the other; each
call's JSON-RPC id and `arguments.marker` carry the same unique marker. The masked tool's answer holds a
fake AWS access key (`AKIA` + 16 characters). Then it checks: every call got the answer its class
expects; every call has exactly one audit record (by id, in its session, for its caller, with the
action its class expects) and `scripts/audit verify` accepts the log; no denied or held call reached the
upstream (from the upstream's own counts) and every forwarded call reached it once; no fake key reached a
client; the gateway stayed up, logged no error, and its RSS (VmRSS, sampled before, during and after)
grew less than --max-rss-growth-mb.

A held call is "held, not forwarded" when it is answered -31002 or any other approval error (today the
gateway answers -31002 at once; a real hold may answer later, within --call-timeout). A masked call passes
when its answer comes back without the key (masked) or as an error (refused: today the gateway denies a mask
rule whose profile it cannot apply; an error it fails closed with is caught by the log check).

Exit status: 0 every check passed, 1 a check failed, 2 the run could not be made (or was interrupted).
Every process it started is stopped on exit, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bastion_dev import bench, bench_upstream
from mcp_bastion.cli.common import ArgumentParser, CannotRun, check_writable, positive

ROOT = bench.ROOT
BUNDLE = bench.BUNDLE
MITMDUMP = bench.MITMDUMP
AUDIT = ROOT / "scripts" / "audit"
COUNTS_PATH = "/_counts"

DENIED = -31001  # mcp_bastion.core.errors.DENIED
APPROVAL_REQUIRED = -31002  # mcp_bastion.core.errors.APPROVAL_REQUIRED

# The classes of calls, their tools, and the rule each meets (in this order in the ruleset).
CLASSES: dict[str, tuple[str, ...]] = {
    "allow": ("read_status", "list_items"),
    "deny": ("drop_table", "delete_user"),
    "held": ("deploy_prod", "rotate_keys"),
    "mask": ("get_credentials",),
}
RULE_ACTION = {"allow": "allow", "deny": "deny", "held": "approve", "mask": "mask (profile secrets)"}
# The order calls cycle through (client i starts at position i): 4 allowed, 2 of each other class in 10.
MIX = ("allow", "deny", "held", "mask", "allow", "allow", "deny", "held", "mask", "allow")
USERS = ("alice", "carol", "ci-bot")
SECRET_RE = re.compile(rb"AKIA[0-9A-Z]{16}")

CHECKS = (
    "calls answered as expected",
    "one audit record per call",
    "audit log verifies",
    "no denied call reached the upstream",
    "no held call reached the upstream",
    "forwarded calls reached the upstream once",
    "no masked value reached a client",
    "gateway up, no errors logged",
    "gateway RSS flat",
)


class LoadError(Exception):
    """The run could not be made (exit status 2)."""


# --- the counting upstream (a child process) --------------------------------------------------------


def fake_key(marker: str) -> str:
    """An AWS-style access key id that is not one: `AKIA` + 16 characters derived from the marker."""
    return "AKIA" + base64.b32encode(hashlib.sha256(marker.encode()).digest()).decode()[:16]


class Counts:
    """What the upstream received (one process: shared by every connection)."""

    sessions = 0
    calls: dict[str, Counter[str]] = defaultdict(Counter)  # tool -> marker -> times received
    methods: Counter[str] = Counter()
    id_mismatch: list[tuple[Any, Any]] = []  # (JSON-RPC id, arguments.marker) that differ

    @classmethod
    def snapshot(cls) -> dict[str, Any]:
        return {"sessions": cls.sessions, "calls": {t: dict(c) for t, c in cls.calls.items()},
                "methods": dict(cls.methods), "id_mismatch": cls.id_mismatch[:20],
                "id_mismatch_count": len(cls.id_mismatch)}


LOAD_TOOLS = [
    {"name": tool, "description": f"A load-test tool ({cls}).",
     "inputSchema": {"type": "object", "properties": {"marker": {"type": "string"}}}}
    for cls, tools in CLASSES.items() for tool in tools
]


class CountingUpstream(bench_upstream.MCPUpstream):
    """bench_upstream's server with a session id per client, the load tools, and counts."""

    def handle(self, method: str, path: str, body: bytes) -> None:
        if path == COUNTS_PATH and method == "GET":
            self.transport.write(bench_upstream.json_response(json.dumps(Counts.snapshot()).encode()))
            return
        super().handle(method, path, body)

    def rpc(self, msg: Any) -> None:
        if not isinstance(msg, dict):
            self.transport.write(bench_upstream.error_response("400 Bad Request", "one message per POST"))
            return
        method, msg_id = msg.get("method"), msg.get("id")
        params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        Counts.methods[str(method) if method is not None else "(answer)"] += 1
        if method == "initialize":
            Counts.sessions += 1
            result = {"protocolVersion": params.get("protocolVersion", "2025-06-18"),
                      "capabilities": {"tools": {}}, "serverInfo": {"name": "load-upstream", "version": "1"}}
            self.transport.write(bench_upstream.json_response(
                bench_upstream.rpc_result(msg_id, result),
                {"mcp-session-id": f"load-{Counts.sessions}-{secrets.token_hex(4)}"}))
        elif method == "tools/list" and "id" in msg:
            self.transport.write(bench_upstream.json_response(bench_upstream.rpc_result(msg_id, {"tools": LOAD_TOOLS})))
        elif method == "tools/call" and "id" in msg:
            name = params.get("name")
            args = params.get("arguments") if isinstance(params.get("arguments"), dict) else {}
            marker = str(args.get("marker"))
            Counts.calls[str(name)][marker] += 1
            if msg_id != marker:
                Counts.id_mismatch.append((msg_id, marker))
            if name == "get_credentials":
                text = f"credentials for {marker}: aws_access_key_id={fake_key(marker)}"
            elif any(name in tools for tools in CLASSES.values()):
                text = f"ran {name} for {marker}"
            else:
                super().rpc(msg)
                return
            self.transport.write(bench_upstream.json_response(bench_upstream.text_result(msg_id, text)))
        else:
            super().rpc(msg)


def serve_upstream(port: int) -> None:
    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(CountingUpstream, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


def upstream_counts(port: int) -> dict[str, Any]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {COUNTS_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(1 << 16):  # the upstream keeps the connection open: read what Content-Length says
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if sep and length and len(body) >= int(length.group(1)):
                break
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise LoadError(f"the upstream's counts: {head[:200]!r}")
    return json.loads(body)


# --- processes ----------------------------------------------------------------------------------------


class Child(bench.Process):
    """bench.Process with an environment of its own (PYTHONPATH for our modules, no audit key variable)."""

    def __init__(self, args: list[str], port: int, log: Path, env: dict[str, str]):
        self.args, self.port, self.log = args, port, log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                         start_new_session=True, stdin=subprocess.DEVNULL)

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL); a Ctrl-C or SIGTERM meanwhile waits until it is stopped."""
        if threading.current_thread() is not threading.main_thread():
            super().stop()
            return
        got: list[int] = []
        old = {sig: signal.signal(sig, lambda n, _f: got.append(n)) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            super().stop()
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        if got:
            raise KeyboardInterrupt


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BASTION_AUDIT_KEY"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "scripts"), env.get("PYTHONPATH")) if p)
    return env


@contextlib.contextmanager
def started(args: list[str], port: int, log: Path) -> Iterator[Child]:
    proc = Child(args, port, log, child_env())
    try:
        try:
            yield proc.wait_ready()
        except bench.BenchError as e:
            raise LoadError(str(e)) from None
    finally:
        proc.stop()


def ruleset(mask: bool) -> dict[str, Any]:
    rules: list[dict[str, Any]] = [
        {"id": "load-session", "match": {"authenticated": True, "direction": "client_to_server",
                                         "methods": ["initialize", "notifications/initialized", "ping",
                                                     "tools/list", "http:GET", "http:DELETE"]},
         "action": "allow"},
        {"id": "load-allow", "match": {"tools": list(CLASSES["allow"])}, "action": "allow"},
        {"id": "load-deny", "match": {"tools": list(CLASSES["deny"])}, "action": "deny",
         "reason": "destructive: never through the gateway"},
        {"id": "load-hold", "match": {"tools": list(CLASSES["held"])}, "action": "approve",
         "reason": "a second person must approve"},
    ]
    if mask:
        rules.append({"id": "load-mask", "match": {"tools": list(CLASSES["mask"])}, "action": "mask",
                      "profile": "secrets"})
    return {"version": 1, "description": "scripts/load", "default": "deny", "rules": rules}


@dataclass
class Gateway:
    proc: Child
    port: int
    dir: Path
    mask: bool
    mask_note: str  # why the mask class is not available, if it is not

    @property
    def audit_log(self) -> Path:
        return self.dir / "audit.jsonl"

    @property
    def audit_key(self) -> Path:
        return self.dir / "audit.key"

    @property
    def log(self) -> Path:
        return self.dir / "gateway.log"

    @property
    def warnings(self) -> Path:
        return self.dir / "warnings.log"


# A second mitmdump script, beside the bundle: it decides nothing, it only copies every log record of
# level WARNING or above (mitmproxy's and the bundle's), with its level, to a file the checks read.
LOG_TAP = '''\
"""Written by scripts/load: copies the gateway's warnings and errors, with their level, to {path}."""
import logging


class _Tap(logging.Handler):
    def emit(self, record):
        try:
            with open({path!r}, "a", encoding="utf-8") as f:
                f.write(f"{{record.levelname}} {{record.name}}: {{record.getMessage()}}\\n")
        except Exception:
            pass


logging.getLogger().addHandler(_Tap(logging.WARNING))
'''


def start_gateway(stack: contextlib.ExitStack, tmp: Path, up_port: int, port: int, issuer_url: str,
                  token: str) -> Gateway:
    """mitmdump with the bundle, accepting sessions; with the mask rule if the gateway takes it, else without."""
    import yaml

    failure = ""
    for mask in (True, False):
        gdir = tmp / ("gateway" if mask else "gateway-without-mask")
        (gdir / "recordings").mkdir(parents=True)
        (gdir / "ruleset.yaml").write_text(yaml.safe_dump(ruleset(mask), sort_keys=False))
        options = {"ruleset": str(gdir / "ruleset.yaml"), "oidc_issuer": issuer_url,
                   "oidc_resource": f"http://127.0.0.1:{port}", "record_dir": str(gdir / "recordings"),
                   "audit_log": str(gdir / "audit.jsonl"), "audit_key_file": str(gdir / "audit.key"),
                   "audit_key_env": ""}
        tap = gdir / "log_tap.py"
        tap.write_text(LOG_TAP.format(path=str(gdir / "warnings.log")))
        args = bench.mitmdump_args(up_port, port, [tap, BUNDLE], options)
        proc = Child(args, port, gdir / "gateway.log", child_env())
        stack.callback(proc.stop)  # stopped however this ends, Ctrl-C included
        try:
            proc.wait_ready()
            # mitmdump listens before it has read every option, and exits when one was refused.
            asyncio.run(wait_ready(port, token, proc))
        except (bench.BenchError, LoadError) as e:
            proc.stop()
            said = proc.tail()
            if not mask:
                raise LoadError(f"the gateway did not start, even without the mask rule: {e}") from None
            if not re.search(r"load-mask|mask|profile", said, re.I):
                raise LoadError(f"the gateway did not start: {e}") from None
            failure = last_meaningful_line(said) or str(e)
            continue
        return Gateway(proc, port, gdir, mask, "" if mask else f"the gateway refused the mask rule: {failure}")
    raise AssertionError("unreachable")


def last_meaningful_line(text: str) -> str:
    """The line of a gateway's log that best says why it refused the mask rule."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for words in (("load-mask",), ("mask", "profile"), ("ruleset",), ("error",)):
        for line in reversed(lines):
            if any(w in line.lower() for w in words):
                return line[:300]
    return lines[-1][:300] if lines else ""


# --- the clients ------------------------------------------------------------------------------------


class Connection(bench.MCPConnection):
    """bench's keep-alive MCP connection; reopened (same session) when the gateway closed it."""

    verb = "POST"

    def _head(self, length: int) -> bytes:
        head = super()._head(length)
        return head if self.verb == "POST" else head.replace(b"POST ", self.verb.encode() + b" ", 1)

    @property
    def usable(self) -> bool:
        return not (self.writer is None or self.writer.is_closing() or self.reader is None or self.reader.at_eof())

    async def send(self, payload: bytes) -> bench.Reply:
        if not self.usable:
            await self.open()
        return await self.post(payload)

    async def delete(self) -> bench.Reply:
        self.verb = "DELETE"
        try:
            return await self.send(b"")
        finally:
            self.verb = "POST"


@dataclass
class Call:
    marker: str
    cls: str
    tool: str
    client: int
    user: str
    session: str | None = None
    sent: bool = False
    answered: bool = False  # a JSON-RPC answer for its id came back
    outcome: str = "not sent"  # what came back, e.g. "result", "error -31001", "HTTP 503", "timeout"
    expected: bool = False
    masked: bool | None = None  # for the mask class: True masked, False refused
    leaked: bool = False  # a fake key was in what the client received
    latency_ms: float | None = None
    detail: str = ""


def plan(clients: int, calls: int, run_id: str, mask: bool = True) -> list[list[Call]]:
    """Each client's calls: the classes in MIX order from its own offset (without the mask class if `mask` is off)."""
    mix = [cls for cls in MIX if mask or cls != "mask"]
    out = []
    for c in range(clients):
        user = USERS[c % len(USERS)]
        mine = []
        for n in range(calls):
            cls = mix[(c + n) % len(mix)]
            tools = CLASSES[cls]
            mine.append(Call(f"ld-{run_id}-c{c:03d}-n{n:04d}", cls, tools[(c + n) % len(tools)], c, user))
        out.append(mine)
    return out


def answer_of(reply: bench.Reply, msg_id: str) -> dict[str, Any] | None:
    """The JSON-RPC answer for `msg_id` in a JSON body or an event stream, if there is one."""
    if reply.media_type == "text/event-stream":
        candidates = []
        for event in reply.body.replace(b"\r\n", b"\n").split(b"\n\n"):
            data = b"\n".join(line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
            if data:
                candidates.append(data)
    else:
        candidates = [reply.body]
    for data in candidates:
        try:
            msg = json.loads(data)
        except ValueError:
            continue
        for m in msg if isinstance(msg, list) else [msg]:
            if isinstance(m, dict) and m.get("id") == msg_id and ("result" in m or "error" in m):
                return m
    return None


def is_approval_error(error: dict[str, Any]) -> bool:
    if error.get("code") == APPROVAL_REQUIRED:
        return True
    text = json.dumps([error.get("message"), error.get("data")]).lower()
    return "approv" in text


def judge(call: Call, reply: bench.Reply) -> None:
    """Fill in what came back for `call` and whether it is what its class expects."""
    call.leaked = bool(SECRET_RE.search(reply.body))
    answer = answer_of(reply, call.marker)
    if answer is None:
        call.outcome = f"HTTP {reply.status}" + ("" if reply.status != 200 else " without an answer")
        call.detail = reply.describe()
        return
    call.answered = True
    if "result" in answer:
        call.outcome = "result"
        text = json.dumps(answer["result"])
        if call.cls == "allow":
            call.expected = call.marker in text
            if not call.expected:
                call.detail = f"the result is not this call's: {text[:200]}"
        elif call.cls == "mask":
            call.expected = call.masked = not call.leaked
            if call.leaked:
                call.outcome, call.masked, call.detail = "unmasked result", None, f"unmasked: {text[:200]}"
        else:
            call.detail = f"a {call.cls} call got a result: {text[:200]}"
        return
    error = answer["error"] if isinstance(answer["error"], dict) else {}
    call.outcome = f"error {error.get('code')}"
    call.detail = str(error.get("message", ""))[:300]
    if call.cls == "deny":
        call.expected = error.get("code") == DENIED
    elif call.cls == "held":
        call.expected = is_approval_error(error)
        if call.expected:
            call.outcome = f"held ({error.get('code')})"
    elif call.cls == "mask":
        # Refused: a denial (no masking stage applies the profile) or any other error the gateway
        # fails closed with (which the log check reports). Either way the value did not leave.
        call.expected, call.masked = True, False


@dataclass
class ClientRun:
    client: int
    user: str
    session: str | None = None
    failure: str = ""
    ended: bool = False  # its session was ended with DELETE


async def run_client(index: int, calls: list[Call], port: int, token: str, deadline: float,
                     timeout: float) -> ClientRun:
    run = ClientRun(index, calls[0].user if calls else USERS[index % len(USERS)])
    conn = Connection(port, token)
    try:
        try:
            await asyncio.wait_for(conn.open(), timeout)
            await asyncio.wait_for(conn.initialize(), timeout)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, bench.BenchError, ValueError) as e:
            run.failure = f"no session: {type(e).__name__}: {e}"[:300]
            for call in calls:
                call.outcome, call.detail = "not sent (no session)", run.failure
            return run
        run.session = conn.session
        for call in calls:
            if time.monotonic() >= deadline:
                call.outcome = "not sent (--duration)"
                continue
            call.session, call.sent = conn.session, True
            payload = json.dumps({"jsonrpc": "2.0", "id": call.marker, "method": "tools/call",
                                  "params": {"name": call.tool, "arguments": {"marker": call.marker}}},
                                 separators=(",", ":")).encode()
            t0 = time.perf_counter()
            try:
                reply = await asyncio.wait_for(conn.send(payload), timeout)
            except TimeoutError:
                call.outcome, call.detail = "timeout", f"no answer within {timeout:g} s"
                conn.close()
                continue
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as e:
                call.outcome, call.detail = "transport error", f"{type(e).__name__}: {e}"[:300]
                conn.close()
                continue
            call.latency_ms = (time.perf_counter() - t0) * 1000
            judge(call, reply)
        try:
            reply = await asyncio.wait_for(conn.delete(), timeout)
            run.ended = reply.status in (200, 202, 204)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            pass
    finally:
        conn.close()
    return run


async def wait_ready(port: int, token: str, proc: Child, timeout: float = 30.0) -> None:
    """Until an initialize goes through (the gateway answers 503 while it fetches the issuer's keys)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise LoadError(f"the gateway exited with {proc.proc.returncode}: {proc.tail()}")
        conn = Connection(port, token)
        try:
            await conn.open()
            await conn.initialize()
            await conn.delete()
            return
        except (OSError, asyncio.IncompleteReadError, bench.BenchError, ValueError) as e:
            last = str(e)
        finally:
            conn.close()
        await asyncio.sleep(0.2)
    raise LoadError(f"the gateway did not accept a session within {timeout:g} s: {last[:500]}")


@dataclass
class Memory:
    before: float = 0.0
    peak: float = 0.0
    after: float = 0.0
    samples: int = 0

    @property
    def growth(self) -> float:
        return max(self.peak, self.after) - self.before


async def drive(s: Settings, gw: Gateway, tokens: dict[str, str]) -> tuple[list[Call], list[ClientRun], Memory, float]:
    await wait_ready(gw.port, tokens[USERS[0]], gw.proc)  # a warm-up session before the first sample
    rss = bench.Memory(gw.proc.pid)
    mem = Memory(before=rss.rss_mb())
    mem.peak = mem.before
    plans = plan(s.clients, s.calls, secrets.token_hex(3), gw.mask)
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError, bench.BenchError):
                mem.peak = max(mem.peak, rss.rss_mb())
                mem.samples += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.1)

    sampler = asyncio.create_task(sample())
    t0 = time.monotonic()
    deadline = t0 + s.duration
    tasks = [asyncio.create_task(run_client(i, p, gw.port, tokens[USERS[i % len(USERS)]], deadline, s.call_timeout))
             for i, p in enumerate(plans)]
    try:
        runs = await asyncio.wait_for(asyncio.gather(*tasks), s.duration + s.call_timeout * 2 + 30)
    except TimeoutError:
        raise LoadError("the clients did not finish in time (the run is bounded by --duration)") from None
    elapsed = time.monotonic() - t0
    done.set()
    await sampler
    await asyncio.sleep(1.0)  # let the gateway settle: connections closed, buffers freed
    with contextlib.suppress(OSError, bench.BenchError):
        mem.after = rss.rss_mb()
    return [c for p in plans for c in p], list(runs), mem, elapsed


# --- the checks --------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    status: str  # "pass", "FAIL" or "n/a"
    detail: str


@dataclass
class ClassRow:
    cls: str
    tools: str
    rule: str
    sent: int = 0
    answered: int = 0
    as_expected: int = 0
    errors: int = 0
    upstream: int = 0
    outcomes: str = ""
    p50_ms: float | None = None
    p95_ms: float | None = None


@dataclass
class Report:
    settings: dict[str, Any]
    mask: str  # "masked", "refused by the gateway", "not available: ...", ...
    elapsed: float = 0.0
    rows: list[ClassRow] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    memory: Memory = field(default_factory=Memory)
    notes: list[str] = field(default_factory=list)
    workdir: str = ""

    @property
    def passed(self) -> bool:
        return all(c.status != "FAIL" for c in self.checks)


def examples(items: list[str], n: int = 3) -> str:
    return "; ".join(items[:n]) + (f"; and {len(items) - n} more" if len(items) > n else "")


def read_audit(path: Path) -> tuple[list[dict[str, Any]], str]:
    records, problem = [], ""
    if not path.exists():
        return [], f"no audit log at {path}"
    for i, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            problem = problem or f"line {i} is not JSON"
    return records, problem


def audit_action_expected(call: Call) -> set[str]:
    if call.cls == "allow":
        return {"allow"}
    if call.cls == "deny":
        return {"deny"}
    if call.cls == "held":
        return {"approve", "hold"}
    return {"mask"} if call.masked else {"deny", "error"} if call.masked is False else {"mask", "deny", "error"}


def check_calls(calls: list[Call], runs: list[ClientRun]) -> Check:
    sent = [c for c in calls if c.sent]
    bad = [c for c in sent if not c.expected]
    failed = [r for r in runs if r.failure]
    if not sent and not failed:
        return Check(CHECKS[0], "FAIL", "no call was sent")
    problems = [f"{c.marker} ({c.tool}): {c.outcome}: {c.detail}" for c in bad]
    problems += [f"client {r.client} ({r.user}): {r.failure}" for r in failed]
    if problems:
        return Check(CHECKS[0], "FAIL", f"{len(bad)} of {len(sent)} calls not as expected, {len(failed)} clients "
                                        f"without a session: {examples(problems)}")
    ended = sum(r.ended for r in runs)
    return Check(CHECKS[0], "pass", f"{len(sent)} of {len(sent)} calls; {ended} of {len(runs)} sessions ended "
                                    "with DELETE")


def check_audit(calls: list[Call], records: list[dict[str, Any]], problem: str) -> Check:
    if problem:
        return Check(CHECKS[1], "FAIL", problem)
    by_id: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        if rec.get("method") == "tools/call" and rec.get("direction", "client_to_server") == "client_to_server":
            by_id[rec.get("id")].append(rec)
    sent = [c for c in calls if c.sent]
    markers = {c.marker for c in sent}
    missing = [c.marker for c in sent if not by_id.get(c.marker)]
    duplicated = [f"{c.marker} ×{len(by_id[c.marker])}" for c in sent if len(by_id.get(c.marker, ())) > 1]
    wrong = []
    for c in sent:
        recs = by_id.get(c.marker)
        if not recs or len(recs) > 1:
            continue
        rec = recs[0]
        why = []
        if rec.get("session") != c.session:
            why.append(f"session {rec.get('session')!r}, not {c.session!r}")
        if rec.get("subject") != c.user:
            why.append(f"subject {rec.get('subject')!r}, not {c.user!r}")
        if rec.get("tool") != c.tool:
            why.append(f"tool {rec.get('tool')!r}, not {c.tool!r}")
        if rec.get("action") not in audit_action_expected(c):
            why.append(f"action {rec.get('action')!r} for a {c.cls} call")
        if why:
            wrong.append(f"{c.marker}: {', '.join(why)}")
    stray = [str(i) for i in by_id if isinstance(i, str) and i.startswith("ld-") and i not in markers]
    detail = (f"{len(sent)} calls, {sum(len(v) for k, v in by_id.items() if k in markers)} records: "
              f"{len(missing)} missing, {len(duplicated)} duplicated, {len(wrong)} not matching the call, "
              f"{len(stray)} for no call sent")
    problems = ([f"missing {m}" for m in missing] + [f"duplicated {d}" for d in duplicated] + wrong
                + [f"stray {s}" for s in stray])
    if problems:
        return Check(CHECKS[1], "FAIL", f"{detail}: {examples(problems)}")
    return Check(CHECKS[1], "pass", f"{detail} ({len(records)} records in all)")


def check_verify(gw: Gateway) -> Check:
    cmd = [str(AUDIT), "verify", str(gw.audit_log), "--key-file", str(gw.audit_key)]
    env = {k: v for k, v in os.environ.items() if k != "BASTION_AUDIT_KEY"}
    env["COLUMNS"] = "200"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check(CHECKS[2], "FAIL", f"scripts/audit verify did not run: {e}")
    said = " ".join((proc.stdout + proc.stderr).split())[:300]
    return Check(CHECKS[2], "pass" if proc.returncode == 0 else "FAIL",
                 f"scripts/audit verify: exit {proc.returncode}: {said}")


def check_upstream(calls: list[Call], counts: dict[str, Any]) -> list[Check]:
    got: dict[str, dict[str, int]] = counts.get("calls", {})
    by_marker: Counter[str] = Counter()
    for per_marker in got.values():
        by_marker.update(per_marker)
    out = []
    for name, cls in ((CHECKS[3], "deny"), (CHECKS[4], "held")):
        tools = CLASSES[cls]
        reached = {t: sum(got.get(t, {}).values()) for t in tools}
        mine = [c.marker for c in calls if c.cls == cls and by_marker.get(c.marker)]
        total = sum(reached.values())
        sent = sum(c.sent for c in calls if c.cls == cls)
        if total or mine:
            out.append(Check(name, "FAIL", f"the upstream received {total} calls of {', '.join(tools)}: "
                                           f"{examples(mine or [t for t, n in reached.items() if n])}"))
        else:
            out.append(Check(name, "pass", f"0 of {sent} {cls} calls received by the upstream"))
    forwarded = [c for c in calls if c.sent and (c.cls == "allow" or (c.cls == "mask" and c.masked))]
    known = {c.marker for c in calls}
    wrong = [f"{c.marker} ×{by_marker.get(c.marker, 0)}" for c in forwarded if by_marker.get(c.marker, 0) != 1]
    stray = [m for m in by_marker if m not in known]
    mismatch = counts.get("id_mismatch_count", 0)
    if wrong or stray or mismatch:
        problems = wrong + [f"unknown marker {m}" for m in stray] + [f"id/marker differ: {p}" for p in
                                                                    counts.get("id_mismatch", [])]
        out.append(Check(CHECKS[5], "FAIL", f"{len(wrong)} forwarded calls not received exactly once, {len(stray)} "
                                            f"unknown markers, {mismatch} id/marker mismatches: {examples(problems)}"))
    else:
        out.append(Check(CHECKS[5], "pass", f"{len(forwarded)} of {len(forwarded)} forwarded calls received once; "
                                            f"{counts.get('sessions', 0)} sessions opened upstream"))
    return out


def check_masking(calls: list[Call], gw: Gateway) -> Check:
    leaked = [c for c in calls if c.leaked]
    if leaked:
        return Check(CHECKS[6], "FAIL", f"{len(leaked)} answers carried a fake key: "
                                        f"{examples([f'{c.marker} ({c.tool}, {c.outcome})' for c in leaked])}")
    mask = [c for c in calls if c.cls == "mask" and c.sent]
    if not gw.mask:
        return Check(CHECKS[6], "n/a", "mask: not available (" + gw.mask_note + ")")
    masked = sum(c.masked is True for c in mask)
    refused = sum(c.masked is False for c in mask)
    return Check(CHECKS[6], "pass", f"0 fake keys in what clients received; of {len(mask)} mask calls "
                                    f"{masked} masked, {refused} refused")


def check_gateway(gw: Gateway, exit_code: int | None, alive: bool) -> Check:
    """The gateway ran to the end, stopped cleanly, and logged no error (warnings are counted, not failed)."""
    tapped = gw.warnings.read_text(errors="replace").splitlines() if gw.warnings.exists() else []
    log = gw.log.read_text(errors="replace") if gw.log.exists() else ""
    errors = [line for line in tapped if line.startswith(("ERROR", "CRITICAL"))]
    errors += [line.strip() for line in log.splitlines() if re.search(r"Traceback|Addon error|error in script", line)]
    warnings = [line for line in tapped if line.startswith("WARNING")]
    problems = []
    if not alive:
        problems.append(f"mitmdump had exited (status {gw.proc.proc.returncode}) before the end of the load")
    if errors:
        problems.append(f"{len(errors)} errors logged ({gw.warnings.name}, {gw.log.name}): {examples(errors, 2)}")
    if exit_code not in (0, None) and alive:
        problems.append(f"mitmdump exited with {exit_code} on SIGTERM")
    if problems:
        return Check(CHECKS[7], "FAIL", "; ".join(problems)[:600])
    said = f"{len(warnings)} warnings: {examples(warnings, 2)}" if warnings else "no warning"
    return Check(CHECKS[7], "pass", f"mitmdump ran to the end and stopped with status {exit_code}; "
                                    f"no error logged, {said}")


def check_memory(mem: Memory, limit: float) -> Check:
    detail = (f"VmRSS before {mem.before:.1f} MiB, peak during {mem.peak:.1f} ({mem.samples} samples), "
              f"after {mem.after:.1f}: growth {mem.growth:+.1f} MiB (limit {limit:g})")
    return Check(CHECKS[8], "pass" if mem.growth < limit else "FAIL", detail)


def class_rows(calls: list[Call], counts: dict[str, Any], gw: Gateway) -> list[ClassRow]:
    got: dict[str, dict[str, int]] = counts.get("calls", {})
    rows = []
    for cls, tools in CLASSES.items():
        row = ClassRow(cls, ", ".join(tools), RULE_ACTION[cls])
        mine = [c for c in calls if c.cls == cls]
        if cls == "mask" and not gw.mask:
            row.rule, row.outcomes = "(not in the ruleset)", "mask: not available"
            rows.append(row)
            continue
        sent = [c for c in mine if c.sent]
        row.sent = len(sent)
        row.answered = sum(c.answered for c in sent)
        row.as_expected = sum(c.expected for c in sent)
        row.errors = row.sent - row.as_expected
        row.upstream = sum(sum(got.get(t, {}).values()) for t in tools)
        outcomes = Counter(c.outcome for c in sent)
        if cls == "mask":
            outcomes = Counter("masked" if c.masked else f"refused ({c.outcome})" if c.masked is False
                               else c.outcome for c in sent)
        row.outcomes = ", ".join(f"{k} ×{v}" for k, v in outcomes.most_common(3))
        unsent = Counter(c.outcome for c in mine if not c.sent)
        if unsent:
            row.outcomes += "; " + ", ".join(f"{k} ×{v}" for k, v in unsent.items())
        lat = [c.latency_ms for c in sent if c.latency_ms is not None]
        if lat:
            row.p50_ms, row.p95_ms = bench.percentile(lat, 50), bench.percentile(lat, 95)
        rows.append(row)
    return rows


def mask_summary(calls: list[Call], gw: Gateway) -> str:
    if not gw.mask:
        return "not available (" + gw.mask_note + ")"
    mask = [c for c in calls if c.cls == "mask" and c.sent]
    masked = sum(c.masked is True for c in mask)
    refused = [c for c in mask if c.masked is False]
    if mask and masked == len(mask):
        return "masked (the fake key replaced in every answer)"
    if mask and len(refused) == len(mask):
        return f"refused by the gateway ({refused[0].outcome}: {refused[0].detail})"
    return (f"{masked} masked, {len(refused)} refused, {sum(c.leaked for c in mask)} unmasked, "
            f"{sum(not c.answered for c in mask)} unanswered of {len(mask)}")


# --- one run -------------------------------------------------------------------------------------


@dataclass
class Settings:
    clients: int = 50
    calls: int = 40
    duration: float = 120.0
    call_timeout: float = 30.0
    max_rss_growth_mb: float = 64.0
    keep: bool = False


def run(s: Settings, tmp: Path) -> Report:
    """One whole run in the working directory `tmp` (removed at the end if every check passed, unless --keep)."""
    from bastion_dev.issuer import DevIssuer

    report = Report(asdict(s), mask="", workdir=str(tmp))
    finished = False
    try:
        with contextlib.ExitStack() as stack:
            up_port, gw_port = bench.free_port(), bench.free_port()
            upstream = stack.enter_context(started(
                [sys.executable, "-m", "bastion_dev.load", "--serve-upstream", str(up_port)], up_port,
                tmp / "upstream.log"))
            issuer = stack.enter_context(DevIssuer(audience=f"http://127.0.0.1:{gw_port}"))
            tokens = {u: issuer.mint(u) for u in USERS}
            gw = start_gateway(stack, tmp, up_port, gw_port, issuer.url, tokens[USERS[0]])
            print(f"load: upstream pid {upstream.pid}, gateway pid {gw.proc.pid} on 127.0.0.1:{gw_port}, "
                  f"mask rule {'on' if gw.mask else 'off'}; {s.clients} clients × {s.calls} calls", file=sys.stderr)
            calls, runs, mem, elapsed = asyncio.run(drive(s, gw, tokens))
            report.elapsed, report.memory = elapsed, mem
            alive = gw.proc.proc.poll() is None
            counts = upstream_counts(up_port)
            gw.proc.stop()  # SIGTERM: the gateway finishes its audit log and head file
            exit_code = gw.proc.proc.returncode
            records, problem = read_audit(gw.audit_log)
            report.mask = mask_summary(calls, gw)
            report.rows = class_rows(calls, counts, gw)
            report.checks = [
                check_calls(calls, runs),
                check_audit(calls, records, problem),
                check_verify(gw),
                *check_upstream(calls, counts),
                check_masking(calls, gw),
                check_gateway(gw, exit_code, alive),
                check_memory(mem, s.max_rss_growth_mb),
            ]
            planned, sent = len(calls), sum(c.sent for c in calls)
            if sent < planned:
                why = Counter(c.outcome for c in calls if not c.sent)
                report.notes.append(f"{planned - sent} of {planned} planned calls were not sent "
                                    f"({', '.join(f'{k} ×{v}' for k, v in why.items())})")
        finished = True
    finally:
        if finished and report.passed and not s.keep:
            shutil.rmtree(tmp, ignore_errors=True)
            report.workdir = ""
    return report


# --- the report ----------------------------------------------------------------------------------


def print_report(report: Report, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 140)
    s = report.settings
    sent = sum(r.sent for r in report.rows)
    rate = sent / report.elapsed if report.elapsed else 0.0
    table = Table(title=f"mcp-bastion load: {s['clients']} clients × {s['calls']} calls, {sent} sent in "
                        f"{report.elapsed:.1f} s ({rate:,.0f} calls/s)")
    for col, justify in (("class", "left"), ("tools", "left"), ("rule", "left"), ("sent", "right"),
                         ("answered", "right"), ("as expected", "right"), ("errors", "right"),
                         ("upstream got", "right"), ("p50/p95 ms", "right"), ("outcomes", "left")):
        table.add_column(col, justify=justify)
    for r in report.rows:
        lat = f"{r.p50_ms:.1f}/{r.p95_ms:.1f}" if r.p50_ms is not None else "n/a"
        style = "red" if r.errors else ""
        table.add_row(r.cls, r.tools, r.rule, str(r.sent), str(r.answered), str(r.as_expected),
                      f"[{style}]{r.errors}[/{style}]" if style else str(r.errors), str(r.upstream), lat, r.outcomes)
    console.print(table)
    console.print(f"mask: {report.mask}")

    checks = Table(title="checks")
    checks.add_column("check", no_wrap=True)
    checks.add_column("result", no_wrap=True)
    checks.add_column("detail")
    for c in report.checks:
        style = {"pass": "green", "FAIL": "bold red"}.get(c.status, "yellow")
        checks.add_row(c.name, f"[{style}]{c.status}[/{style}]", c.detail)
    console.print(checks)
    for note in report.notes:
        console.print(f"note: {note}")
    failed = [c.name for c in report.checks if c.status == "FAIL"]
    if failed:
        console.print(f"[bold red]FAILED: {', '.join(failed)}[/bold red]")
    else:
        console.print("[green]all checks passed[/green]")
    if report.workdir:
        console.print(f"logs, audit log and recordings kept in {report.workdir}")


def to_json(report: Report) -> dict[str, Any]:
    return {"settings": report.settings, "mask": report.mask, "elapsed_s": report.elapsed,
            "classes": [asdict(r) for r in report.rows], "checks": [asdict(c) for c in report.checks],
            "memory_mib": {**asdict(report.memory), "growth": report.memory.growth}, "notes": report.notes,
            "passed": report.passed, "workdir": report.workdir or None}


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.strip()
    parser = ArgumentParser(
        prog="scripts/load", description=doc.split("\n\n")[0],
        epilog="\n\n".join(doc.split("\n\n")[2:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=positive(int), default=50, help="concurrent clients, one session each "
                                                                          "(default 50)")
    parser.add_argument("--calls", type=positive(int), default=40, help="calls per client (default 40)")
    parser.add_argument("--duration", type=positive(float), default=120.0,
                        help="cap in seconds: no call is sent after it (default 120); calls not sent are reported")
    parser.add_argument("--call-timeout", type=positive(float), default=30.0,
                        help="seconds a call may wait for its answer (default 30)")
    parser.add_argument("--max-rss-growth-mb", type=positive(float), default=64.0,
                        help="the gateway's RSS is flat if it grows less than this many MiB (default 64)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--keep", action="store_true",
                        help="keep the working directory (logs, audit log, recordings); it is always kept "
                             "when a check fails")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    if args.json is not None:
        try:
            if not args.json.parent.is_dir():
                args.json.parent.mkdir(parents=True)
            check_writable(args.json, "--json file")
        except (CannotRun, OSError) as e:
            print(f"scripts/load: {e if isinstance(e, CannotRun) else f'cannot write {args.json}: {e.strerror}'}",
                  file=sys.stderr)
            return 2

    # Ctrl-C and SIGTERM unwind the stack, which stops every process this run started
    # (they run in sessions of their own, so a signal to this one alone would not reach them).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    settings = Settings(args.clients, args.calls, args.duration, args.call_timeout, args.max_rss_growth_mb, args.keep)
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bastion-load-"))
    try:
        report = run(settings, tmp)
    except KeyboardInterrupt:
        print(f"load: interrupted; every process it started is stopped (logs in {tmp})", file=sys.stderr)
        return 2
    except (LoadError, bench.BenchError, OSError) as e:
        print(f"load: could not run: {e}\n(logs in {tmp})", file=sys.stderr)
        return 2
    print_report(report)
    if args.json:
        try:
            args.json.write_text(json.dumps(to_json(report), indent=2) + "\n")
        except OSError as e:
            print(f"scripts/load: cannot write {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
    print(f"runtime {time.monotonic() - t0:.1f} s")
    return 0 if report.passed else 1


if __name__ == "__main__":
    from mcp_bastion.cli.common import run as run_command

    run_command(main, "scripts/load")
