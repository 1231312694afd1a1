"""
The commands in scripts/ as a user runs them, as real processes from another directory: --help and
--version; wrong input ends with one line on stderr and exit status 2; `scripts/setup --help` installs
nothing; `scripts/replay client` exits 1 when the replayed requests get no answer; `scripts/replay timeline`
fits a 100-column terminal; `scripts/bench` stopped with SIGTERM or Ctrl-C leaves no process behind.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.cells import cell_len

from harness import ROOT, free_port

sys.path.insert(0, str(ROOT / "tests" / "cli"))
import recordings

pytestmark = pytest.mark.e2e

SCRIPTS = ROOT / "scripts"
COMMANDS = ("setup", "test", "demo", "policy", "audit", "replay", "approvals", "pins", "bench", "load", "cluster")
VERSION = importlib.metadata.version("mcp-bastion")


def run(*argv: str, cwd: Path, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def test_every_user_command_is_covered():
    """Every executable in scripts/ is one of the commands tested here."""
    found = {p.name for p in SCRIPTS.iterdir() if p.is_file() and os.access(p, os.X_OK)}
    assert found == set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_and_version(name, tmp_path):
    helped = run(SCRIPTS / name, "--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: scripts/{name}") and "--version" in helped.stdout
    assert helped.stderr == ""  # nothing was set up or installed to answer
    version = run(SCRIPTS / name, "--version", cwd=tmp_path)
    assert (version.returncode, version.stdout, version.stderr) == (0, f"scripts/{name} (mcp-bastion) {VERSION}\n",
                                                                    "")


def fake_checkout(tmp_path: Path, *names: str) -> Path:
    """A checkout with only these scripts and a pyproject.toml: no .venv, nothing installed."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    for name in names:
        shutil.copy2(SCRIPTS / name, root / "scripts" / name)
    (root / "pyproject.toml").write_text('[project]\nname = "mcp-bastion"\nversion = "9.8.7"\n')
    return root


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_setup_help_explains_and_installs_nothing(tmp_path):
    root = fake_checkout(tmp_path, "setup")
    before = tree(root)
    out = run(root / "scripts" / "setup", "--help", cwd=tmp_path, env={"BASTION_PYTHON": "/nonexistent"})
    assert out.returncode == 0 and out.stderr == ""
    for what in (".venv", "pip install -e", ".peers", "npm", "chromium", "Idempotent", "Exit status"):
        assert what in out.stdout, what
    assert tree(root) == before  # no .venv, no .peers, no stamp
    # Without .venv, the version is read from pyproject.toml, the one source.
    version = run(root / "scripts" / "setup", "--version", cwd=tmp_path)
    assert version.stdout == "scripts/setup (mcp-bastion) 9.8.7\n" and tree(root) == before
    bad = run(root / "scripts" / "setup", "--full", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr == "scripts/setup: unknown argument '--full' (see scripts/setup --help)\n"
    assert tree(root) == before


def test_test_help_runs_nothing(tmp_path):
    root = fake_checkout(tmp_path, "setup", "test")
    before = tree(root)
    out = run(root / "scripts" / "test", "--help", cwd=tmp_path)
    assert out.returncode == 0 and "pytest" in out.stdout and "ruff" in out.stdout
    assert tree(root) == before


# --- wrong input, as the user meets it ----------------------------------------------------


@pytest.fixture
def wrong(tmp_path) -> Path:
    """A working directory holding wrong inputs, named relative to it (as a user types them)."""
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "garbage").write_bytes(bytes(range(256)) * 3)
    key = tmp_path / "audit.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o600)
    recordings.write(recordings.session(), tmp_path / "session.mitm")
    return tmp_path


WRONG = [
    ("policy", ["check", "nothing-here.yaml"], "scripts/policy check: cannot read ruleset nothing-here.yaml"),
    ("policy", ["what-if", str(ROOT / "rulesets" / "allow-all.yaml"), "garbage"], "is not a mitmproxy flow file"),
    ("policy", ["explain", str(ROOT / "rulesets" / "allow-all.yaml"), "@garbage"], "is not UTF-8 text"),
    ("audit", ["verify", "a-directory", "--key-file", "audit.key"], "audit log a-directory is a directory"),
    ("audit", ["export", "garbage", "--key-file", "audit.key", "--no-verify"], "line 1 is not an audit record"),
    ("replay", ["timeline", "garbage"], "scripts/replay timeline: garbage is not a mitmproxy flow file"),
    ("replay", ["client", "nothing-here.mitm"], "cannot read recording nothing-here.mitm"),
    ("replay", ["server", "session.mitm", "--port", "70000"], "not a port"),
    ("approvals", ["list", "--gateway", "http://127.0.0.1:9", "--token-file", "empty"], "is empty"),
    ("pins", ["list", "--store", "a-directory"], "is a directory"),
    ("bench", ["--json", "a-directory"], "--json file a-directory is a directory"),
    ("load", ["--clients", "0"], "must be more than 0"),
    ("demo", ["--keep", "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("name,argv,says", WRONG, ids=[f"{n} {' '.join(a)}" for n, a, _ in WRONG])
def test_wrong_input_is_one_line_and_exit_2(wrong, name, argv, says):
    out = run(SCRIPTS / name, *argv, cwd=wrong, env={"BASTION_AUDIT_KEY": ""})
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"scripts/{name}"), out.stderr
    assert says in out.stderr and out.returncode == 2, out.stderr


# --- replay client: a request without an answer is a failure ---------------------------------


class Upstream(http.server.ThreadingHTTPServer):
    """Answers every JSON-RPC request it is sent with the recorded result, or (mute) with an empty 202."""

    def __init__(self, mute: bool):
        self.mute = mute
        self.port = free_port()
        super().__init__(("127.0.0.1", self.port), Handler)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        msg = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        if self.server.mute:
            self.send_response(202)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        body = json.dumps({"jsonrpc": "2.0", "id": msg["id"],
                           "result": {"content": [{"type": "text", "text": "ok"}]}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream(request) -> Iterator[Upstream]:
    server = Upstream(mute=request.param == "mute")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def recording(tmp_path) -> Path:
    flows = [recordings.call_flow(1, "lookup_customer"), recordings.call_flow(2, "deploy", at=0.1),
             recordings.call_flow(3, "drop_table", action="deny", rule="no-drop", reason="never", at=0.2)]
    return recordings.write(flows, tmp_path / "session.mitm")


def test_replay_client_to_an_upstream_that_is_down_exits_1_naming_the_requests(recording, tmp_path):
    out = run(SCRIPTS / "replay", "client", recording, "--to", f"http://127.0.0.1:{free_port()}/mcp", cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "0 of 2 requests answered" in out.stdout
    (line,) = out.stderr.splitlines()
    assert line.startswith("scripts/replay client: 2 of 2 requests got no answer on replay: "
                           "tools/call lookup_customer #1, tools/call deploy #2 (error: ")
    assert "drop_table" not in line  # refused when recorded: not re-sent, not counted


@pytest.mark.parametrize("upstream", ["mute"], indirect=True)
def test_replay_client_to_an_upstream_that_answers_nothing_exits_1(recording, upstream, tmp_path):
    out = run(SCRIPTS / "replay", "client", recording, "--to", f"http://127.0.0.1:{upstream.port}/mcp", cwd=tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.strip() == ("scripts/replay client: 2 of 2 requests got no answer on replay: "
                                  "tools/call lookup_customer #1, tools/call deploy #2 "
                                  "(HTTP 202 without the recorded answer)")


@pytest.mark.parametrize("upstream", ["answers"], indirect=True)
def test_replay_client_exits_0_when_every_request_is_answered(recording, upstream, tmp_path):
    out = run(SCRIPTS / "replay", "client", recording, "--to", f"http://127.0.0.1:{upstream.port}/mcp", cwd=tmp_path)
    assert (out.returncode, out.stderr) == (0, ""), out.stdout + out.stderr
    assert "2 of 2 requests answered; 0 answers differ from the recording" in out.stdout


# --- timeline at 100 columns ----------------------------------------------------------------


def test_timeline_fits_100_columns(tmp_path):
    path = recordings.write(recordings.session(("alice", "carol")), tmp_path / "session.mitm")
    out = run(SCRIPTS / "replay", "timeline", path, cwd=tmp_path, env={"COLUMNS": "100"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) > 10 and max(cell_len(line) for line in lines) <= 100
    assert "…" not in out.stdout and "deploy" in out.stdout


@pytest.mark.parametrize("argv", [["timeline"], ["timeline", "--json"]])
def test_timeline_into_a_closed_pipe_ends_quietly(tmp_path, argv):
    path = recordings.write(recordings.session() * 50, tmp_path / "long.mitm")
    cmd = f"{SCRIPTS / 'replay'} {' '.join(argv)} {path} | head -n 1 >/dev/null"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert out.stderr == "" and out.returncode == 141  # the shell's status for SIGPIPE, as for any tool


# --- bench: stopped, it leaves nothing behind ----------------------------------------------


def processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    out = {}
    if psutil is not None:
        for p in psutil.process_iter(["pid", "ppid", "status", "cmdline"]):
            status = "Z" if p.info["status"] == psutil.STATUS_ZOMBIE else "R"
            out[p.info["pid"]] = (p.info["ppid"], status, " ".join(p.info["cmdline"] or []))
        return out
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone meanwhile
            continue
        out[int(entry)] = (int(fields[1]), fields[0], cmdline)
    return out


def descendants(pid: int) -> dict[int, str]:
    table = processes()
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _, cmdline) in table.items():
            if ppid == parent and child not in found:
                found[child] = cmdline
                todo.append(child)
    return found


def alive(pids) -> list[int]:
    table = processes()
    return [pid for pid in pids if pid in table and table[pid][1] != "Z"]


def read_stderr(proc: subprocess.Popen, lines: list[str]) -> threading.Thread:
    def pump():
        for line in proc.stderr:
            lines.append(line)

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_bench_stopped_leaves_no_process_behind(how, tmp_path):
    # A run long enough to be stopped in the middle of its first measurement through mitmdump.
    cmd = [str(SCRIPTS / "bench"), "--quick", "--configs", "bare", "--no-micro", "--samples", "200000",
           "--json", str(tmp_path / "run.json")]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    said: list[str] = []
    pump = read_stderr(proc, said)
    children: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 60
        while not any("3/11: latency, small JSON" in line for line in said):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(said)
            time.sleep(0.05)
        children = descendants(proc.pid)
        commands = " ".join(children.values())
        assert "bench_upstream.py" in commands and "mitmdump" in commands, children
        if how == "SIGTERM":
            os.kill(proc.pid, signal.SIGTERM)
        else:  # what a terminal does: SIGINT to the foreground process group (the children have their own)
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(30)
        pump.join(5)
        check_stopped(proc, said, children)
        assert not (tmp_path / "run.json").exists()  # stopped before any result
    finally:  # whatever failed above, nothing is left running
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in alive(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def check_stopped(proc: subprocess.Popen, said: list[str], children: dict[int, str]) -> None:
    text = "".join(said)
    assert "bench: starting the upstream" in text and "bench: config bare (1/1): starting mitmdump" in text
    assert "bench: config bare (1/1), 1/11: waiting until it answers" in text
    assert proc.returncode == 2 and "scripts/bench: interrupted; every process it started is stopped" in text
    assert "Traceback" not in text
    deadline = time.monotonic() + 5
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive(children) == [], {pid: children[pid] for pid in alive(children)}
