"""
A scale-out deployment on one machine: K gateway replicas behind HAProxy, sharing one Redis.

    scripts/cluster --upstream http://127.0.0.1:9000/mcp [--replicas 2] [--port 8080] [--set NAME=VALUE ...]
    scripts/cluster --demo-upstream [--dev-issuer]

Everything listens on 127.0.0.1 only:

- Redis (`redis-server`), its append-only file in DIR/redis, so what it holds survives a restart of Redis;
- K replicas, `mitmdump -s addons/bastion.py` in reverse mode to the upstream. Replica i has
  `replica_id=r<i>`, `state_url` the Redis, recordings in DIR/sessions (shared by all: the file names
  carry the replica), its own audit log DIR/audit-r<i>.jsonl (one HMAC chain per replica) and its own
  admin listener (/metrics, /healthz, /readyz). Every --set goes to every replica;
- HAProxy (scripts/bastion_dev/haproxy.cfg, its server lines rendered into DIR/haproxy.cfg) on --port:
  requests spread round robin, a 2025-era session stuck to the replica that created it (by its
  Mcp-Session-Id header).

Once every part answers (each replica's /readyz 200) it prints the URLs, the directory and the
command that verifies the audit chains, and runs until Ctrl-C or SIGTERM, which stop every process it
started. A part that dies meanwhile is reported (the others keep running). The logs are in DIR/logs.

The audit key is $BASTION_AUDIT_KEY if set, else DIR/audit.key (made for the run if missing, kept with
the logs). The ruleset is rulesets/default.yaml (rulesets/demo.yaml with --demo-upstream) unless --ruleset
or --set ruleset=FILE says otherwise. With identity on (--dev-issuer, or --set oidc_issuer=URL), tokens
must name the front URL as their audience (oidc_resource is set to it unless given).

From Python (the tests): `with Cluster(upstream, replicas=2, options={...}) as c: ...` (see `Cluster`).

Exit status: 0 it ran until stopped by Ctrl-C or SIGTERM; 2 it could not start (a bad argument, a
missing program, a part that did not start: said why, with the end of its log) or was stopped while
starting. Every process it started is stopped either way.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bastion_dev import processes as procs
from mcp_bastion.cli.common import ArgumentParser, CannotRun, check_readable

ROOT = procs.ROOT
BUNDLE = procs.BUNDLE
MITMDUMP = procs.MITMDUMP
TEMPLATE = Path(__file__).with_name("haproxy.cfg")
MARKER = "# SERVERS"  # the line of TEMPLATE that the server lines replace
BACKEND = "bastion"  # the backend of TEMPLATE that holds the replicas
MAX_REPLICAS = 16
DEFAULT_PORT = 8080
KEY_ENV = "BASTION_AUDIT_KEY"  # what the gateway and scripts/audit read by default
DEFAULT_RULESET = ROOT / "rulesets" / "default.yaml"
DEMO_RULESET = ROOT / "rulesets" / "demo.yaml"
DEMO_SERVER = "bastion_dev.demo.server"
DEV_USERS = ("alice", "bob", "carol", "ci-bot")  # bastion_dev.issuer's identities

# Set by the cluster for each replica: a --set of one of these is refused.
MANAGED = ("mode", "listen_host", "listen_port", "replica_id", "state_url", "record_dir", "audit_log",
           "admin_listen")
# Options naming a file or directory: a relative value is the caller's (the replicas run in the checkout).
PATH_OPTIONS = ("ruleset", "audit_key_file", "confdir", "decision_log", "mask_key_file", "pin_store",
                "upstream_token_file", "client_certs", "ssl_verify_upstream_trusted_ca",
                "ssl_verify_upstream_trusted_confdir")

OptionValue = str | bool | int | Sequence[str]  # a list: one --set per item


class ClusterError(CannotRun):
    """The cluster could not start, or a part of it did not do what it was asked (exit status 2)."""


def say(message: str) -> None:
    """Progress on stderr."""
    print(f"cluster: {message}", file=sys.stderr, flush=True)


# --- the HAProxy configuration -------------------------------------------------------------


def render_haproxy(servers: Sequence[tuple[str, int]], template: str | None = None) -> str:
    """TEMPLATE (or `template`) with its `# SERVERS` line replaced by one `server` line per (name, port)."""
    text = TEMPLATE.read_text(encoding="utf-8") if template is None else template
    lines = text.splitlines(keepends=True)
    at = [n for n, line in enumerate(lines) if line.strip() == MARKER]
    if len(at) != 1:
        raise ClusterError(f"{TEMPLATE} must hold exactly one line {MARKER!r} (where the server lines go)")
    line = lines[at[0]]
    indent = line[: len(line) - len(line.lstrip())]
    rendered = [f"{indent}# servers: rendered by scripts/cluster\n"]
    rendered += [f"{indent}server {name} 127.0.0.1:{port}\n" for name, port in servers]
    return "".join(lines[: at[0]] + rendered + lines[at[0] + 1:])


def haproxy_env(front_port: int, stats_port: int) -> dict[str, str]:
    """The environment variables the configuration reads."""
    return {"BASTION_FRONT_PORT": str(front_port), "BASTION_STATS_PORT": str(stats_port)}


# --- small helpers ---------------------------------------------------------------------------


def split_upstream(url: str) -> tuple[str, str]:
    """`http://host:port/path` -> (`http://host:port`, `/path`); the path defaults to /mcp.

    mitmdump's reverse mode names the upstream's origin only: clients' paths go through as they are.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"the upstream URL must have no query or fragment: {url!r}")
    try:
        parts.port  # noqa: B018 (validates the port)
    except ValueError:
        raise ValueError(f"not a valid port in {url!r}") from None
    path = parts.path.rstrip("/") or "/mcp"
    return f"{parts.scheme}://{parts.netloc}", path


def free_ports(count: int, taken: Collection[int] = ()) -> list[int]:
    """`count` distinct free ports on 127.0.0.1, none of `taken`."""
    found: list[int] = []
    while len(found) < count:
        port = procs.free_port()
        if port not in found and port not in taken:
            found.append(port)
    return found


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def http_get(url: str, timeout: float = 2.0) -> tuple[int | None, str]:
    """(status, body) of a GET, or (None, why) when there is no answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")
    except (OSError, ValueError) as e:
        return None, str(getattr(e, "reason", None) or e)


def redis_ping(port: int, timeout: float = 2.0) -> str:
    """Redis's answer to PING (`+PONG` when it serves), or why there is none."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(256).decode("utf-8", "replace").strip()
    except OSError as e:
        return f"no answer: {e.strerror or e}"


def last_lines(path: Path, count: int = 15) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        return f"(cannot read it: {e.strerror or e})"
    return "\n".join(lines[-count:]) if lines else "(empty)"


def alive(process: procs.Process | None) -> bool:
    return process is not None and process.proc.poll() is None


# --- the cluster ----------------------------------------------------------------------------


@dataclass
class Replica:
    """One gateway replica: `id` r1..rK, its MCP `port`, its admin listener, its audit log, its process."""

    index: int  # 0-based, as Cluster.kill and start_replica take it
    id: str
    port: int
    admin_port: int
    audit_log: Path
    path: str  # the MCP endpoint's path
    logs: Path
    process: procs.Process | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        """The replica's MCP endpoint, bypassing HAProxy."""
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def admin_url(self) -> str:
        """Its admin listener: GET /metrics, /healthz, /readyz."""
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def proc(self) -> subprocess.Popen | None:
        """The mitmdump process of its latest start (None before the first)."""
        return self.process.proc if self.process is not None else None

    @property
    def log(self) -> Path:
        """The log of its latest start (logs/r1.log, then logs/r1-2.log, ...)."""
        return log_path(self.logs, self.id, max(self.starts, 1))


def log_path(logs: Path, name: str, start: int) -> Path:
    return logs / (f"{name}.log" if start <= 1 else f"{name}-{start}.log")


class Cluster:
    """K gateway replicas (real mitmdump with the bundle) behind HAProxy, sharing one Redis, on 127.0.0.1.

        with Cluster("http://127.0.0.1:9000/mcp", replicas=2, options={"ruleset": "rulesets/allow-all.yaml"}) as c:
            c.front_url, c.replicas[0].url, c.replicas[0].admin_url, c.redis_url, c.dir
            c.kill(0); c.start_replica(0); c.restart_redis()

    `upstream` is the MCP server's URL (its path becomes the front URL's; default /mcp). `options` go to
    every replica as `--set NAME=VALUE` (a list value: one --set per item); those in MANAGED are set per
    replica and refused here. Without a `ruleset` option, rulesets/default.yaml. With `oidc_issuer` and
    neither `oidc_resource` nor `oidc_audience`, oidc_resource is the front URL. `dir` holds what the
    cluster writes (default: a new temporary directory, kept); `env` is added to the replicas'
    environment. `port` is HAProxy's (default: a free one). Starting fails with ClusterError, having
    stopped what it started; `stop()` (or leaving the `with`) stops every process.
    """

    def __init__(self, upstream: str, replicas: int = 2, options: Mapping[str, OptionValue] | None = None,
                 dir: Path | None = None, env: Mapping[str, str] | None = None, *, port: int | None = None,
                 verbose: bool = False, timeout: float = 60.0, progress: Callable[[str], None] | None = None):
        if not 1 <= replicas <= MAX_REPLICAS:
            raise ValueError(f"replicas must be 1 to {MAX_REPLICAS}: {replicas}")
        self.upstream = upstream
        self.origin, path = split_upstream(upstream)
        options = dict(options or {})
        managed = sorted(set(options) & set(MANAGED))
        if managed:
            raise ValueError(f"set by the cluster for each replica, not as an option: {', '.join(managed)}")
        self.options: dict[str, OptionValue] = {name: absolute(name, value) for name, value in options.items()}
        self.dir = Path(dir).resolve() if dir is not None else Path(tempfile.mkdtemp(prefix="bastion-cluster-"))
        self.env = {**os.environ, **(env or {})}
        self.verbose = verbose
        self.timeout = timeout
        self.progress = progress or (lambda _message: None)
        self.port = port or free_ports(1)[0]
        ports = free_ports(2 + 2 * replicas, {self.port})
        self.redis_port, self.stats_port = ports[0], ports[1]
        self.front_url = f"http://127.0.0.1:{self.port}{path}"
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.sessions = self.dir / "sessions"
        self.logs = self.dir / "logs"
        self.replicas = [Replica(i, f"r{i + 1}", ports[2 + 2 * i], ports[3 + 2 * i],
                                 self.dir / f"audit-r{i + 1}.jsonl", path, self.logs) for i in range(replicas)]
        self.haproxy_cfg = self.dir / "haproxy.cfg"
        self.audit_key_note = ""
        self.verify_key_args: list[str] = []
        self.key_options: dict[str, str] = {}
        self.state = True  # whether the gateway takes state_url (checked at start)
        self._redis: procs.Process | None = None
        self._haproxy: procs.Process | None = None
        self._redis_starts = 0

    # --- what it is -----------------------------------------------------------------------

    @property
    def redis_dir(self) -> Path:
        return self.dir / "redis"

    @property
    def redis(self) -> subprocess.Popen | None:
        return self._redis.proc if self._redis is not None else None

    @property
    def haproxy(self) -> subprocess.Popen | None:
        return self._haproxy.proc if self._haproxy is not None else None

    def verify_command(self, audit: str = "scripts/audit") -> list[str]:
        """The command that verifies every replica's audit chain."""
        return [audit, "verify", *self.verify_key_args, *(str(r.audit_log) for r in self.replicas)]

    def part(self, name: str) -> procs.Process | None:
        """The latest process of a part: "redis", "haproxy" or a replica's id."""
        if name == "redis":
            return self._redis
        if name == "haproxy":
            return self._haproxy
        return next((r.process for r in self.replicas if r.id == name), None)

    def exited(self) -> dict[str, int]:
        """The parts whose process has ended ("redis", "haproxy", "r1", ...) and their exit status."""
        names = ["redis", "haproxy", *(r.id for r in self.replicas)]
        return {name: p.proc.returncode for name in names
                if (p := self.part(name)) is not None and p.proc.poll() is not None}

    # --- starting and stopping ------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Cluster:
        """Start Redis, the replicas (at once) and HAProxy; return when all are ready."""
        try:
            self._prepare()
            self.start_redis()
            for replica in self.replicas:
                self._spawn(replica)
            for replica in self.replicas:
                self._wait_replica(replica)
            self._start_haproxy()
        except BaseException:
            with contextlib.suppress(KeyboardInterrupt):  # raised again below, once all are stopped
                self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process of the cluster: SIGTERM to each process group, SIGKILL after 10 s."""
        processes = [p for p in (self._haproxy, *(r.process for r in self.replicas), self._redis) if p is not None]
        with procs.signals_deferred():  # all are told at once, then waited for one by one
            for p in processes:
                if alive(p):
                    for sig in (signal.SIGCONT, signal.SIGTERM):  # SIGCONT: one that kill(i, SIGSTOP) froze
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(p.pid, sig)
        procs.stop_each(processes)

    def _prepare(self) -> None:
        self._check_options()
        for program, package in (("redis-server", "redis-server"), ("haproxy", "haproxy")):
            if shutil.which(program) is None:
                raise ClusterError(f"{program} is not on PATH (on Debian: apt-get install {package})")
        if port_in_use(self.port):
            raise ClusterError(f"port {self.port} on 127.0.0.1 is in use (choose another with --port)")
        for directory in (self.dir, self.sessions, self.logs, self.redis_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._audit_key()
        mask_key = self.options.get("mask_key_file")
        if isinstance(mask_key, str) and mask_key and not os.environ.get("BASTION_MASK_KEY"):
            self._one_key(mask_key, "mask key")  # one pseudonym key for all replicas
        if "ruleset" not in self.options:
            self.options["ruleset"] = str(DEFAULT_RULESET)
        if self.options.get("oidc_issuer") and not {"oidc_resource", "oidc_audience"} & set(self.options):
            self.options["oidc_resource"] = self.front_url

    def _check_options(self) -> None:
        """Refuse an option the bundle does not declare (mitmdump would ignore it without a word)."""
        try:
            declared = procs.declared_options(BUNDLE)
        except Exception as e:  # mitmdump will say what is wrong when it starts
            self.progress(f"could not check the option names ({type(e).__name__}: {e})")
            return
        unknown = sorted(set(self.options) - declared)
        if unknown:
            raise ClusterError(f"the gateway has no option {', '.join(unknown)} "
                               "(mitmdump -s addons/bastion.py --options lists them)")
        self.state = "state_url" in declared
        if not self.state:
            self.progress("this gateway has no option state_url: the replicas share nothing through Redis")

    def _audit_key(self) -> None:
        """Where the replicas' audit key comes from, and how scripts/audit verify finds it."""
        env_name = self.options.get("audit_key_env", KEY_ENV)
        key_file = self.options.get("audit_key_file")
        if isinstance(env_name, str) and env_name and self.env.get(env_name):
            self.audit_key_note = f"from ${env_name}"
            self.verify_key_args = [] if env_name == KEY_ENV else ["--key-env", env_name]
            return
        if isinstance(key_file, str) and key_file:
            self._one_key(key_file, "audit key")
            self.audit_key_note = f"in {key_file}"
            self.verify_key_args = ["--key-file", key_file]
            return
        # One key file for all: made here, not by K replicas racing to create it.
        from mcp_bastion.core import audit

        path = self.dir / "audit.key"
        made = not path.exists()
        try:
            audit.load_key(None, str(path), create=True)
        except (audit.AuditError, OSError) as e:
            raise ClusterError(f"audit key: {e}") from None
        self.key_options = {"audit_key_file": str(path)}
        self.audit_key_note = (f"in {path} ({'made for this run' if made else 'from an earlier run'}; "
                               f"${KEY_ENV} is not set)")
        self.verify_key_args = ["--key-file", str(path)]

    @staticmethod
    def _one_key(path: str, what: str) -> None:
        """A key file every replica reads: made here if missing, not by K replicas racing to create it."""
        from mcp_bastion.core import audit

        try:
            audit.load_key(None, path, create=True)
        except (audit.AuditError, OSError) as e:
            raise ClusterError(f"{what}: {e}") from None

    # --- Redis ------------------------------------------------------------------------------

    def start_redis(self) -> None:
        """Start Redis (again) on the same port with the same data directory; return once it answers PING."""
        if alive(self._redis):
            raise ClusterError("redis is running")
        self._redis_starts += 1
        args = ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--dir", str(self.redis_dir), "--daemonize", "no"]
        self.progress(f"starting redis-server on 127.0.0.1:{self.redis_port}")
        self._redis = self._process("redis", args, self.redis_port, log_path(self.logs, "redis", self._redis_starts))
        deadline = time.monotonic() + self.timeout
        answer = ""
        while time.monotonic() < deadline:
            if not alive(self._redis):
                raise ClusterError(self._failed("redis-server", self._redis, "exited"))
            answer = redis_ping(self.redis_port)
            if answer == "+PONG":
                return
            time.sleep(0.05)
        raise ClusterError(self._failed("redis-server", self._redis,
                                        f"does not answer PING after {self.timeout:.0f}s ({answer})"))

    def stop_redis(self, sig: int = signal.SIGTERM) -> None:
        """Stop Redis: SIGTERM (it writes its append-only file and exits), or `sig` (SIGKILL: a crash)."""
        if self._redis is None:
            return
        if sig != signal.SIGTERM and alive(self._redis):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._redis.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._redis.proc.wait(10)
        self._redis.stop()

    def restart_redis(self) -> None:
        self.stop_redis()
        self.start_redis()

    # --- replicas ---------------------------------------------------------------------------

    def replica_args(self, replica: Replica) -> list[str]:
        """The replica's mitmdump command line."""
        options: dict[str, OptionValue] = {**self.options, **self.key_options,
                                           "replica_id": replica.id,
                                           "record_dir": str(self.sessions),
                                           "audit_log": str(replica.audit_log),
                                           "admin_listen": f"127.0.0.1:{replica.admin_port}"}
        if self.state:
            options["state_url"] = self.redis_url
        args = [MITMDUMP, "-s", str(BUNDLE), "--mode", f"reverse:{self.origin}",
                "--listen-host", "127.0.0.1", "--listen-port", str(replica.port)]
        if not self.verbose:
            args.append("-q")
        for name, value in options.items():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                args += ["--set", f"{name}={option_text(item)}"]
        return args

    def kill(self, i: int, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Send `sig` to replica `i` (0-based). For SIGKILL, SIGTERM and SIGINT, wait (up to `timeout`) until
        it has exited and return its exit status; for another signal (SIGSTOP) return None at once."""
        replica = self.replicas[i]
        if not alive(replica.process):
            raise ClusterError(f"replica {replica.id} is not running")
        assert replica.process is not None
        os.killpg(replica.process.pid, sig)
        if sig not in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            replica.process.proc.wait(timeout)
        replica.process.stop()  # whatever is left of it goes; then it is forgotten
        return replica.process.proc.returncode

    def start_replica(self, i: int) -> Replica:
        """Start replica `i` (0-based) again, with its ports and options; return once it is ready and
        HAProxy (when running) sends it requests again."""
        replica = self.replicas[i]
        if alive(replica.process):
            raise ClusterError(f"replica {replica.id} is running")
        if replica.process is not None:
            replica.process.stop()
        self._spawn(replica)
        self._wait_replica(replica)
        if alive(self._haproxy):
            self.wait_backend(i, up=True)
        return replica

    def _spawn(self, replica: Replica) -> None:
        replica.starts += 1
        self.progress(f"starting replica {replica.id} (mitmdump) on 127.0.0.1:{replica.port}, "
                      f"admin 127.0.0.1:{replica.admin_port}")
        replica.process = self._process(replica.id, self.replica_args(replica), replica.port, replica.log,
                                        self.env)

    def _wait_replica(self, replica: Replica) -> None:
        """Until it listens and its /readyz answers 200 (mitmdump listens before it has read every option)."""
        process = replica.process
        assert process is not None
        name = f"replica {replica.id}"
        deadline = time.monotonic() + self.timeout
        self._wait_port(name, process)
        why = "no answer"
        while True:
            if not alive(process):
                raise ClusterError(self._failed(name, process, "exited"))
            status, body = http_get(f"{replica.admin_url}/readyz")
            if status == 200:
                return
            why = f"/readyz answered {status}: {' '.join(body.split())[:500]}" if status else f"/readyz: {body}"
            if time.monotonic() > deadline:
                raise ClusterError(self._failed(name, process, f"is not ready after {self.timeout:.0f}s ({why})"))
            time.sleep(0.1)

    # --- HAProxy ----------------------------------------------------------------------------

    def _start_haproxy(self) -> None:
        self.haproxy_cfg.write_text(render_haproxy([(r.id, r.port) for r in self.replicas]), encoding="utf-8")
        self.progress(f"starting haproxy on 127.0.0.1:{self.port} ({self.haproxy_cfg})")
        env = {**os.environ, **haproxy_env(self.port, self.stats_port)}
        self._haproxy = self._process("haproxy", ["haproxy", "-f", str(self.haproxy_cfg), "-db"], self.port,
                                      self.logs / "haproxy.log", env)
        self._wait_port("haproxy", self._haproxy)
        for i in range(len(self.replicas)):
            self.wait_backend(i, up=True)

    def haproxy_command(self, command: str, timeout: float = 5.0) -> str:
        """A command on HAProxy's stats socket (level operator: `show stat`, `show table bastion`, ...)."""
        with socket.create_connection(("127.0.0.1", self.stats_port), timeout=timeout) as s:
            s.sendall(command.encode() + b"\n")
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
        return b"".join(chunks).decode("utf-8", "replace")

    def backend_state(self) -> dict[str, str]:
        """What HAProxy thinks of each replica: {"r1": "UP", "r2": "DOWN", ...} (its `show stat` status)."""
        text = self.haproxy_command("show stat").lstrip("# ")
        return {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text))
                if row.get("pxname") == BACKEND and row.get("svname") not in ("FRONTEND", "BACKEND")}

    def sticky(self) -> dict[str, str]:
        """HAProxy's stick-table: Mcp-Session-Id -> the id of the replica its session sticks to."""
        found = {}
        for line in self.haproxy_command(f"show table {BACKEND}").splitlines():
            fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
            if "key" in fields and "server_key" in fields:
                found[fields["key"]] = fields["server_key"]
        return found

    def wait_backend(self, i: int, up: bool = True, timeout: float = 15.0) -> None:
        """Until HAProxy's health checks see replica `i` up (or down)."""
        replica = self.replicas[i]
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            if not alive(self._haproxy):
                raise ClusterError(self._failed("haproxy", self._haproxy, "exited"))
            try:
                state = self.backend_state().get(replica.id, "not listed")
            except OSError as e:
                state = f"stats socket: {e.strerror or e}"
            if (state == "UP") if up else state.startswith("DOWN"):
                return
            time.sleep(0.1)
        raise ClusterError(f"HAProxy does not see replica {replica.id} {'up' if up else 'down'} "
                           f"after {timeout:.0f}s (it says {state})")

    # --- processes --------------------------------------------------------------------------

    def _process(self, name: str, args: list[str], port: int, log: Path,
                 env: Mapping[str, str] | None = None) -> procs.Process:
        try:
            return procs.Process(args, port, log, dict(env or os.environ))
        except OSError as e:
            raise ClusterError(f"cannot start {name} ({args[0]}): {e.strerror or e}") from None

    def _wait_port(self, name: str, process: procs.Process) -> None:
        try:
            process.wait_ready(self.timeout)
        except procs.BenchError:
            what = "exited" if not alive(process) else f"does not listen on {process.port} after {self.timeout:.0f}s"
            raise ClusterError(self._failed(name, process, what)) from None

    @staticmethod
    def _failed(name: str, process: procs.Process | None, what: str) -> str:
        if process is None:
            return f"{name} {what}"
        if what == "exited":
            what = f"exited with status {process.proc.returncode} while starting"
        tail = "\n".join("  " + line for line in last_lines(process.log).splitlines())
        return f"{name} {what}; the end of its log ({process.log}):\n{tail}"


def option_text(value: object) -> str:
    """An option's value as --set takes it (a bool as true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def absolute(name: str, value: OptionValue) -> OptionValue:
    """A file option's relative value, made absolute from the caller's directory (the replicas run in the
    checkout); other values as they are."""
    if name not in PATH_OPTIONS:
        return value
    if isinstance(value, str):
        return str(Path(value).expanduser().resolve()) if value and value != "-" else value
    if isinstance(value, (list, tuple)):
        return [str(absolute(name, item)) for item in value]
    return value


# --- the command --------------------------------------------------------------------------


def replicas_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= MAX_REPLICAS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_REPLICAS}: {value}")
    return value


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {value}")
    return value


def upstream_url(text: str) -> str:
    try:
        split_upstream(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def option_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE: {text!r}")
    return name.strip(), value


def collect(pairs: Sequence[tuple[str, str]]) -> dict[str, OptionValue]:
    """--set pairs -> options; a name given more than once becomes a list (one --set per value)."""
    options: dict[str, OptionValue] = {}
    for name, value in pairs:
        if name in options:
            previous = options[name]
            options[name] = [*([previous] if isinstance(previous, str) else previous), value]
        else:
            options[name] = value
    return options


def build_parser() -> ArgumentParser:
    paragraphs = __doc__.strip().split("\n\n")
    parser = ArgumentParser(prog="scripts/cluster", description=paragraphs[0],
                            epilog="\n\n".join(p for p in paragraphs[1:] if not p.startswith("From Python")),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    upstream = parser.add_mutually_exclusive_group()
    upstream.add_argument("--upstream", type=upstream_url, metavar="URL",
                          help="the MCP server the replicas front, e.g. http://127.0.0.1:9000/mcp (its path is "
                               "the front URL's too)")
    upstream.add_argument("--demo-upstream", action="store_true",
                          help="start the demo MCP server (acme-ops, as scripts/demo does) on a free port and front "
                               "it; implies --dev-issuer and rulesets/demo.yaml")
    parser.add_argument("--replicas", type=replicas_count, default=2, metavar="K",
                        help=f"how many gateway replicas, 1 to {MAX_REPLICAS} (default: 2)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                        help=f"HAProxy's port, the one clients use (default: {DEFAULT_PORT})")
    parser.add_argument("--dir", type=Path, metavar="DIR",
                        help="where the recordings (DIR/sessions), audit logs, Redis's data and the logs go "
                             "(default: a new temporary directory, printed and kept); an earlier run's DIR "
                             "continues its audit chains")
    parser.add_argument("--ruleset", type=Path, metavar="FILE",
                        help="the replicas' ruleset (default: rulesets/default.yaml; with --demo-upstream "
                             "rulesets/demo.yaml); same as --set ruleset=FILE")
    parser.add_argument("--dev-issuer", action="store_true",
                        help="turn identity on with the dev OpenID issuer (bastion_dev.issuer, in this process): "
                             "1-hour tokens for alice, bob, carol and ci-bot are written to DIR/tokens/")
    parser.add_argument("--set", dest="options", type=option_pair, action="append", default=[],
                        metavar="NAME=VALUE",
                        help="a gateway option for every replica (repeatable; twice the same NAME for a list), "
                             f"e.g. --set oidc_issuer=URL; not {', '.join(MANAGED)}: the cluster sets those")
    parser.add_argument("--verbose", action="store_true",
                        help="the replicas log at mitmdump's default verbosity (default: -q); logs are in DIR/logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.upstream is None and not args.demo_upstream:
        parser.error("no upstream: give --upstream URL, or --demo-upstream")
    options = collect(args.options)
    managed = sorted(set(options) & set(MANAGED))
    if managed:
        parser.error(f"--set {managed[0]}: the cluster sets it for each replica")
    if args.ruleset is not None:
        if "ruleset" in options:
            parser.error("--ruleset and --set ruleset=... both name the ruleset: give one")
        options["ruleset"] = str(args.ruleset)
    elif "ruleset" not in options:
        options["ruleset"] = str(DEMO_RULESET if args.demo_upstream else DEFAULT_RULESET)
    dev_issuer = args.dev_issuer or args.demo_upstream
    if dev_issuer and "oidc_issuer" in options:
        parser.error("--dev-issuer and --set oidc_issuer=... both name the issuer: give one")
    if isinstance(options["ruleset"], str):
        try:
            check_readable(options["ruleset"], "ruleset")
        except CannotRun as e:
            parser.error(str(e))

    # Ctrl-C and SIGTERM unwind what follows, which stops every process it started (they run in
    # sessions of their own, so a signal to this process alone would not reach them).
    handlers = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    running = False
    cluster_dir: Path | None = None
    try:
        with contextlib.ExitStack() as stack:
            upstream = args.upstream
            cluster_dir = args.dir.resolve() if args.dir is not None else Path(tempfile.mkdtemp(
                prefix="bastion-cluster-"))
            (cluster_dir / "logs").mkdir(parents=True, exist_ok=True)
            if args.demo_upstream:
                port = free_ports(1, {args.port})[0]
                say(f"starting the demo MCP server (acme-ops) on 127.0.0.1:{port}")
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                    p for p in (str(ROOT / "scripts"), os.environ.get("PYTHONPATH")) if p)}
                server = procs.Process([sys.executable, "-m", DEMO_SERVER, "--port", str(port)], port,
                                       cluster_dir / "logs" / "upstream.log", env)
                stack.callback(server.stop)
                try:
                    server.wait_ready()
                except procs.BenchError:
                    raise ClusterError(Cluster._failed("the demo MCP server", server, "exited" if not alive(server)
                                                       else "does not listen")) from None
                upstream = f"http://127.0.0.1:{port}/mcp"
            try:
                cluster = Cluster(upstream, args.replicas, options, cluster_dir, port=args.port,
                                  verbose=args.verbose, progress=say)
            except ValueError as e:
                raise ClusterError(str(e)) from None
            issuer = None
            if dev_issuer:
                from bastion_dev.issuer import DevIssuer

                issuer = stack.enter_context(DevIssuer(audience=cluster.front_url))
                cluster.options["oidc_issuer"] = issuer.url
                say(f"dev OpenID issuer on {issuer.url}")
            stack.callback(cluster.stop)
            cluster.start()
            running = True
            tokens = write_tokens(issuer, cluster.dir / "tokens") if issuer is not None else None
            show(cluster, upstream, issuer and issuer.url, tokens)
            reported: set[tuple[str, int]] = set()  # (part, pid)
            while True:
                for name, status in cluster.exited().items():
                    process = cluster.part(name)
                    if process is not None and (name, process.pid) not in reported:
                        reported.add((name, process.pid))
                        say(f"{describe(name)} {ended(status)}; the others keep running (its log: {process.log})")
                time.sleep(0.5)
    except KeyboardInterrupt:
        if running:
            say("stopped; every process it started is stopped")
            return 0
        print("scripts/cluster: interrupted while starting; every process it started is stopped", file=sys.stderr)
        return 2
    except ClusterError as e:
        print(f"scripts/cluster: {e}", file=sys.stderr)
        if args.dir is None and cluster_dir is not None and not any(p.is_file() for p in cluster_dir.rglob("*")):
            shutil.rmtree(cluster_dir, ignore_errors=True)  # a temporary directory it wrote nothing in
        return 2
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            procs.stop_all()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def describe(part: str) -> str:
    return {"redis": "redis-server", "haproxy": "haproxy"}.get(part, f"replica {part}")


def ended(status: int) -> str:
    if status < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


def write_tokens(issuer, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for user in DEV_USERS:
        path = directory / user
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(issuer.mint(user) + "\n")
    return directory


def show(cluster: Cluster, upstream: str, issuer: str | None, tokens: Path | None) -> None:
    audit = "scripts/audit" if Path.cwd() == ROOT else str(ROOT / "scripts" / "audit")
    rows = [("front", f"{cluster.front_url}   (HAProxy: round robin; a session sticks to its replica)")]
    for r in cluster.replicas:
        rows.append((f"replica {r.id}", f"{r.url}   admin {r.admin_url} (/metrics /healthz /readyz)"))
    rows.append(("redis", f"{cluster.redis_url}   (data in {cluster.redis_dir})"
                 + ("" if cluster.state else "   NOT USED: the gateway has no option state_url")))
    rows.append(("upstream", upstream))
    if issuer:
        rows.append(("issuer", f"{issuer}   (dev issuer; 1-hour tokens in {tokens}/alice, bob, carol, ci-bot)"))
    logs = "audit-r1.jsonl" if len(cluster.replicas) == 1 else f"audit-r1..r{len(cluster.replicas)}.jsonl"
    rows.append(("directory", f"{cluster.dir}   (sessions/: recordings of every replica; {logs}; logs/)"))
    rows.append(("audit key", cluster.audit_key_note))
    rows.append(("verify", shlex.join(cluster.verify_command(audit))))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("Running; Ctrl-C or SIGTERM stops everything.", flush=True)


if __name__ == "__main__":
    from mcp_bastion.cli.common import run as run_command

    run_command(main, "scripts/cluster")
