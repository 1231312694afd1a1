"""
The demo: everything on 127.0.0.1, nothing from outside the repository.

Starts the demo MCP server (acme-ops), the gateway (mitmdump with the bundle
and rulesets/demo.yaml) in front of it, then runs a scripted session as each
demo user and prints what happened. `--keep` leaves everything running (with
mitmweb instead of mitmdump under `--web`) so the flows can be inspected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bastion_dev.issuer import DevIssuer
from mcp_bastion.cli.common import ArgumentParser
from mcp_bastion.cli.common import run as run_command

from .client import Row, run_session

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
console = Console(width=max(120, Console().width))

STYLE = {"ok": "green", "denied": "red", "refused": "red", "held": "magenta", "error": "yellow"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: {what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"demo: {what} did not listen on {port} within {timeout}s")


class Stack(ExitStack):
    """Processes started by the demo, stopped in reverse order."""

    def start(self, what: str, args: list[str], port: int, log: Path, env: dict | None = None) -> subprocess.Popen:
        out = open(log, "wb")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT / "scripts"), **(env or {})},
                                start_new_session=True)
        self.callback(self._stop, proc, out)
        wait_port(port, proc, what)
        return proc

    @staticmethod
    def _stop(proc: subprocess.Popen, out) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        out.close()


def gateway_options(workdir: Path, issuer: DevIssuer) -> dict[str, str]:
    return {
        "ruleset": str(ROOT / "rulesets" / "demo.yaml"),
        "oidc_issuer": issuer.url,
        "oidc_required_scopes": "mcp:tools",
        "record_dir": str(workdir / "sessions"),
        "audit_log": str(workdir / "audit.jsonl"),
        "audit_key_file": str(workdir / "audit.key"),
        "upstream_token_env": "ACME_OPS_TOKEN",
    }


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="scripts/demo", description=__doc__.strip().splitlines()[0],
                        epilog="\n\n".join(__doc__.strip().split("\n\n")[1:]),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="leave server and gateway running until Ctrl-C")
    ap.add_argument("--web", action="store_true", help="run mitmweb instead of mitmdump (implies --keep)")
    args = ap.parse_args(argv)
    keep = args.keep or args.web
    # Ctrl-C and SIGTERM both unwind the stack below, which stops every process the demo started
    # (they run in their own sessions, so a signal to the demo alone would not reach them).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    workdir = Path(tempfile.mkdtemp(prefix="bastion-demo-"))
    upstream_port, gw_port, web_port = free_port(), free_port(), free_port()
    with Stack() as stack:
        console.rule("[bold]mcp-bastion demo")
        issuer = stack.enter_context(DevIssuer(audience=f"http://127.0.0.1:{gw_port}"))
        console.print(f"issuer    dev OpenID issuer      {issuer.url} "
                      "(alice: engineering, bob: sre, carol: contractors)")
        stack.start("demo MCP server",
                    [str(BIN / "python"), "-m", "bastion_dev.demo.server", "--port", str(upstream_port)],
                    upstream_port, workdir / "server.log")
        console.print(f"upstream  acme-ops MCP server   http://127.0.0.1:{upstream_port}/mcp")
        tool = "mitmweb" if args.web else "mitmdump"
        cmd = [str(BIN / tool), "--listen-host", "127.0.0.1", "-s", str(ROOT / "addons" / "bastion.py"),
               "--mode", f"reverse:http://127.0.0.1:{upstream_port}@{gw_port}"]
        web_token = secrets.token_urlsafe(12)
        if args.web:
            cmd += ["--set", "web_open_browser=false", "--set", f"web_port={web_port}",
                    "--set", f"web_password={web_token}"]
        for key, value in gateway_options(workdir, issuer).items():
            cmd += ["--set", f"{key}={value}"]
        # The upstream's own credential: the gateway injects it, clients never see it.
        stack.start("gateway", cmd, gw_port, workdir / "gateway.log",
                    env={"ACME_OPS_TOKEN": "acme-ops-upstream-secret"})
        console.print(f"gateway   {tool} + addons/bastion.py http://127.0.0.1:{gw_port}/mcp")
        if args.web:
            console.print(f"mitmweb   http://127.0.0.1:{web_port}/?token={web_token}")
        console.print(f"logs      {workdir}")

        url = f"http://127.0.0.1:{gw_port}/mcp"
        rows: list[Row] = []
        # bob (sre) is the second engineer: he approves what waits for approval, with scripts/approvals.
        reviewer = SecondEngineer(f"http://127.0.0.1:{gw_port}", issuer.mint("bob"))
        reviewer.start()
        try:
            for user in ("alice", "carol", "anonymous"):
                token = issuer.mint(user) if user != "anonymous" else None
                rows += asyncio.run(run_session(url, user, token))
        finally:
            reviewer.stop()
        show(rows)
        for line in reviewer.said:
            console.print(f"[dim]bob (sre)[/dim] {line}")
        forensics(workdir)
        if keep:
            console.print("\nRunning; Ctrl-C stops everything.")
            try:
                signal.pause()
            except KeyboardInterrupt:
                pass
    return 0


class SecondEngineer(threading.Thread):
    """Approves, with `scripts/approvals` and bob's own token, every request that waits for approval."""

    def __init__(self, gateway: str, token: str):
        super().__init__(name="demo reviewer", daemon=True)
        self.gateway, self.token = gateway, token
        self.said: list[str] = []
        self._stop = threading.Event()

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ROOT / "scripts" / "approvals"), *args, "--gateway", self.gateway],
                              capture_output=True, text=True, timeout=30,
                              env={**os.environ, "BASTION_APPROVER_TOKEN": self.token})

    def run(self) -> None:
        while not self._stop.wait(0.2):
            out = self._run("list", "--json")
            if out.returncode != 0:
                continue
            for item in json.loads(out.stdout or "[]"):
                done = self._run("approve", item["id"], "--reason", "demo: checked by a second engineer")
                self.said.append(f"scripts/approvals approve {item['id']}  ({item['requester']}: {item['tool']} "
                                 f"{json.dumps(item['arguments'])}) -> {(done.stdout or done.stderr).strip()}")

    def stop(self) -> None:
        self._stop.set()
        self.join(10)


def forensics(workdir: Path) -> None:
    """What was recorded: the session timelines and the audit log's verification."""
    console.rule("[bold]recorded")
    sessions = sorted((workdir / "sessions").glob("*.mitm"))
    for path in sessions:
        console.print(f"[dim]scripts/replay timeline {path}")
        subprocess.run([str(ROOT / "scripts" / "replay"), "timeline", str(path)], check=False)
    console.print(f"[dim]scripts/audit verify {workdir / 'audit.jsonl'} --key-file {workdir / 'audit.key'}")
    subprocess.run([str(ROOT / "scripts" / "audit"), "verify", str(workdir / "audit.jsonl"),
                    "--key-file", str(workdir / "audit.key")], check=False)


def show(rows: list[Row]) -> None:
    table = Table(title="What the gateway let through", show_lines=True)
    table.add_column("user")
    table.add_column("call")
    table.add_column("outcome")
    table.add_column("what the client got", overflow="fold", max_width=70)
    for r in rows:
        lines = r.detail.strip().splitlines() or [""]
        detail = "\n".join(line[:200] for line in lines[:3]) + ("\n..." if len(lines) > 3 else "")
        table.add_row(r.user, r.call, f"[{STYLE.get(r.outcome, 'white')}]{r.outcome}", detail)
    console.print(table)


if __name__ == "__main__":
    run_command(main, "scripts/demo")
