"""
scripts/cluster: K gateway replicas behind HAProxy, sharing one Redis, on 127.0.0.1.

--help documents the options; a bad argument is one line and exit status 2; the shipped HAProxy
configuration, rendered for three replicas, is one HAProxy accepts. End to end (real redis-server,
haproxy and mitmdump): the command started as a user starts it answers an MCP initialize through
HAProxy, spreads new sessions over the replicas and keeps a session on its replica, and SIGTERM leaves
no process behind; the Python API kills and restarts a replica and restarts Redis with its data.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from bastion_dev import cluster

from harness import ROOT, free_port, sdk_server

SCRIPT = ROOT / "scripts" / "cluster"
ALLOW_ALL = str(ROOT / "rulesets" / "allow-all.yaml")
HAVE_PROGRAMS = shutil.which("haproxy") is not None and shutil.which("redis-server") is not None
needs_programs = pytest.mark.skipif(not HAVE_PROGRAMS, reason="needs haproxy and redis-server on PATH")
INITIALIZE = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
              "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                         "clientInfo": {"name": "test_cluster_cli", "version": "1"}}}


def run(*argv: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *argv], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          stdin=subprocess.DEVNULL)


# --- the command line ------------------------------------------------------------------------


def test_help_documents_the_options(tmp_path):
    out = run("--help", cwd=tmp_path)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.startswith("usage: scripts/cluster")
    for option in ("--upstream URL", "--demo-upstream", "--replicas K", "--port PORT", "--dir DIR",
                   "--set NAME=VALUE", "--ruleset FILE", "--dev-issuer", "--verbose", "--version"):
        assert option in out.stdout, option
    for what in ("HAProxy", "Redis", "Mcp-Session-Id", "round robin", "audit-r<i>.jsonl", "BASTION_AUDIT_KEY",
                 "Exit status"):
        assert what in out.stdout, what


@pytest.mark.parametrize("argv, says", [
    (["--upstream", "http://127.0.0.1:9000/mcp", "--replicas", "0"], "argument --replicas: must be 1 to 16: 0"),
    (["--upstream", "http://127.0.0.1:9000/mcp", "--replicas", "17"], "argument --replicas: must be 1 to 16: 17"),
    (["--upstream", "http://127.0.0.1:9000/mcp", "--replicas", "two"], "argument --replicas: not a number"),
    ([], "no upstream: give --upstream URL, or --demo-upstream"),
    (["--replicas", "3"], "no upstream"),
    (["--upstream", "ftp://127.0.0.1/mcp"], "argument --upstream: not an http(s) URL"),
    (["--upstream", "http://127.0.0.1:9000/mcp", "--demo-upstream"], "not allowed with argument"),
    (["--upstream", "http://127.0.0.1:9000/mcp", "--port", "70000"], "argument --port: not a port"),
    (["--upstream", "http://127.0.0.1:9000/mcp", "--set", "replica_id=x"], "--set replica_id: the cluster sets it"),
    (["--upstream", "http://127.0.0.1:9000/mcp", "--set", "state_url=redis://x"], "--set state_url"),
    (["--upstream", "http://127.0.0.1:9000/mcp", "--set", "noequals"], "expected NAME=VALUE"),
    (["--upstream", "http://127.0.0.1:9000/mcp", "--ruleset", "nothing-here.yaml"], "cannot read ruleset"),
])
def test_a_bad_argument_is_one_line_and_exit_2(capsys, argv, says):
    with pytest.raises(SystemExit) as exited:
        cluster.main(argv)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("scripts/cluster: ") and says in err, err


def test_bad_arguments_as_the_user_meets_them(tmp_path):
    for argv, says in ((["--replicas", "0"], "must be 1 to 16"), (["--replicas", "17"], "must be 1 to 16"),
                       ([], "no upstream")):
        out = run(*argv, cwd=tmp_path)
        assert out.returncode == 2 and out.stdout == "", out
        assert out.stderr.startswith("scripts/cluster: ") and says in out.stderr and out.stderr.count("\n") == 1


def test_an_option_the_gateway_does_not_have_is_refused_before_anything_starts(tmp_path):
    # (mitmdump itself would ignore it without a word.) Through the API: should the check not refuse it,
    # the cluster it starts is stopped when the `with` ends.
    c = cluster.Cluster("http://127.0.0.1:9000/mcp", replicas=1, dir=tmp_path / "c",
                        options={"ruleset_typo": "x.yaml"})
    with pytest.raises(cluster.ClusterError) as refused:
        with c:
            pass
    assert str(refused.value).startswith("the gateway has no option ruleset_typo"), refused.value
    assert c.exited() == {} and c.redis is None  # nothing was started
    assert not any(p.is_file() for p in (tmp_path / "c").rglob("*"))


def test_the_api_refuses_what_it_sets_itself(tmp_path):
    with pytest.raises(ValueError, match="set by the cluster"):
        cluster.Cluster("http://127.0.0.1:9000/mcp", options={"audit_log": "x"}, dir=tmp_path)
    for bad in (0, 17):
        with pytest.raises(ValueError, match="replicas must be 1 to 16"):
            cluster.Cluster("http://127.0.0.1:9000/mcp", replicas=bad, dir=tmp_path)


def test_a_replica_gets_its_own_ports_audit_log_and_id_and_every_option(tmp_path):
    c = cluster.Cluster("http://127.0.0.1:9000/mcp", replicas=3, dir=tmp_path,
                        options={"ruleset": "rel/rules.yaml", "oidc_issuer": ["https://a", "https://b"],
                                 "stage_timing": True})
    assert c.front_url == f"http://127.0.0.1:{c.port}/mcp" and c.redis_url == f"redis://127.0.0.1:{c.redis_port}/0"
    ports = {c.port, c.redis_port, c.stats_port, *(r.port for r in c.replicas), *(r.admin_port for r in c.replicas)}
    assert len(ports) == 3 + 2 * 3  # all distinct
    assert [r.id for r in c.replicas] == ["r1", "r2", "r3"]
    args = c.replica_args(c.replicas[1])
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert args[args.index("--mode") + 1] == "reverse:http://127.0.0.1:9000"
    assert args[args.index("--listen-host") + 1] == "127.0.0.1"
    assert args[args.index("--listen-port") + 1] == str(c.replicas[1].port) and "-q" in args
    assert f"ruleset={Path.cwd() / 'rel' / 'rules.yaml'}" in sets  # the caller's relative path
    assert ["oidc_issuer=https://a", "oidc_issuer=https://b"] == [s for s in sets if s.startswith("oidc_issuer=")]
    for expected in ("stage_timing=true", "replica_id=r2", f"record_dir={tmp_path / 'sessions'}",
                     f"audit_log={tmp_path / 'audit-r2.jsonl'}",
                     f"admin_listen=127.0.0.1:{c.replicas[1].admin_port}", f"state_url={c.redis_url}"):
        assert expected in sets, expected


# --- the HAProxy configuration -------------------------------------------------------------------


def test_the_template_uses_environment_variables_and_has_one_place_for_servers():
    text = cluster.TEMPLATE.read_text()
    assert '"127.0.0.1:${BASTION_FRONT_PORT}"' in text and "${BASTION_STATS_PORT}" in text
    assert [line.strip() for line in text.splitlines()].count(cluster.MARKER) == 1
    for line in ("balance roundrobin", "stick-table type string len 128",
                 "stick store-response res.hdr(mcp-session-id)", "stick match req.hdr(mcp-session-id)"):
        assert line in text, line
    assert "option forwardfor" not in text.replace("No `option forwardfor`", "")


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
def test_the_config_rendered_for_three_replicas_is_one_haproxy_accepts(tmp_path):
    rendered = cluster.render_haproxy([("r1", 41001), ("r2", 41002), ("r3", 41003)])
    assert cluster.MARKER not in [line.strip() for line in rendered.splitlines()]
    servers = [line.split() for line in rendered.splitlines() if line.strip().startswith("server ")]
    assert servers == [["server", "r1", "127.0.0.1:41001"], ["server", "r2", "127.0.0.1:41002"],
                       ["server", "r3", "127.0.0.1:41003"]]
    path = tmp_path / "haproxy.cfg"
    path.write_text(rendered)
    out = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30,
                         env={**os.environ, **cluster.haproxy_env(free_port(), free_port())})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Configuration file is valid" in out.stdout + out.stderr


def test_a_template_without_its_marker_is_refused():
    with pytest.raises(cluster.ClusterError, match="exactly one line"):
        cluster.render_haproxy([("r1", 1)], template="backend bastion\n")


# --- end to end -------------------------------------------------------------------------------------


def initialize(url: str, session: str | None = None) -> tuple[int, str | None, str]:
    """POST an MCP request (initialize, or tools/list in `session`): status, Mcp-Session-Id, body."""
    body = INITIALIZE if session is None else {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    if session is not None:
        headers |= {"mcp-session-id": session, "mcp-protocol-version": "2025-06-18"}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=20) as response:
        return response.status, response.headers.get("mcp-session-id"), response.read().decode()


def children(pid: int) -> dict[int, str]:
    """Every descendant of `pid`: pid -> command line (from /proc)."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    table[int(entry)] = (ppid, f.read().replace(b"\0", b" ").decode(errors="replace"))
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, cmdline) in table.items():
            if ppid == parent and child not in found:
                found[child] = cmdline
                todo.append(child)
    return found


def running(pids) -> list[int]:
    """Those of `pids` that still run (a zombie does not)."""
    out = []
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(pid)
    return out


@pytest.mark.e2e
@needs_programs
def test_the_command_fronts_the_upstream_and_sigterm_leaves_no_process(tmp_path):
    port = free_port()
    with sdk_server() as upstream:
        proc = subprocess.Popen([str(SCRIPT), "--upstream", upstream.endpoint, "--replicas", "2", "--port", str(port),
                                 "--dir", str(tmp_path / "c"), "--set", f"ruleset={ALLOW_ALL}"],
                                cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True,
                                env={**os.environ, "BASTION_AUDIT_KEY": ""})
        said: list[str] = []
        pump = threading.Thread(target=lambda: said.extend(proc.stdout), daemon=True)
        pump.start()
        errors: list[str] = []
        err_pump = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
        err_pump.start()
        kids: dict[int, str] = {}
        try:
            deadline = time.monotonic() + 60
            while not any(line.startswith("Running;") for line in said):
                assert proc.poll() is None and time.monotonic() < deadline, "".join(said + errors)
                time.sleep(0.05)
            kids = children(proc.pid)
            commands = " ".join(kids.values())
            assert commands.count("mitmdump") == 2 and "redis-server" in commands and "haproxy" in commands, kids

            table = "".join(said)
            front = f"http://127.0.0.1:{port}/mcp"
            assert f"front       {front}" in table and "replica r1  http://127.0.0.1:" in table
            assert "redis       redis://127.0.0.1:" in table
            verify = next(line for line in said if line.startswith("verify")).split(None, 1)[1].split()
            assert verify[1:4] == ["verify", "--key-file", str(tmp_path / "c" / "audit.key")]
            assert verify[4:] == [str(tmp_path / "c" / "audit-r1.jsonl"), str(tmp_path / "c" / "audit-r2.jsonl")]

            # Through HAProxy to the upstream: two new sessions, one per replica; a session stays on its own.
            sessions = []
            for _ in range(2):
                status, session, body = initialize(front)
                assert status == 200 and session and '"serverInfo"' in body, body
                sessions.append(session)
            for _ in range(3):
                status, _, body = initialize(front, sessions[0])
                assert status == 200 and '"tools"' in body, body

            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(30) == 0, "".join(said + errors)
            pump.join(5)
            err_pump.join(5)
            deadline = time.monotonic() + 5
            while running(kids) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert running(kids) == [], {pid: kids[pid] for pid in running(kids)}
            assert "cluster: stopped; every process it started is stopped" in "".join(errors)
            assert "Traceback" not in "".join(errors)
        finally:  # whatever failed above, nothing is left running
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for pid in running(kids):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)

    # Which replica served what: the recordings' names carry it (<start>_<replica>_<subject>_<session>.mitm).
    recorded = {p.name.split("_")[3].removesuffix(".mitm"): p.name.split("_")[1]
                for p in (tmp_path / "c" / "sessions").glob("*.mitm")}
    assert {recorded.get(s) for s in sessions} == {"r1", "r2"}, recorded
    haproxy_log = (tmp_path / "c" / "logs" / "haproxy.log").read_text()
    served = [line.split()[3] for line in haproxy_log.splitlines() if '"POST /mcp' in line]
    first = f"bastion/{recorded[sessions[0]]}"
    assert served == [first, served[1], first, first, first] and served[1] != first, haproxy_log
    checked = subprocess.run(verify, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert checked.returncode == 0 and "every chain intact" in checked.stdout, checked.stdout + checked.stderr


def redis(port: int, *command: str) -> bytes:
    """One Redis command (RESP), its raw answer."""
    wire = f"*{len(command)}\r\n".encode() + b"".join(f"${len(c)}\r\n{c}\r\n".encode() for c in command)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(wire)
        return s.recv(4096)


@pytest.mark.e2e
@needs_programs
def test_the_api_kills_and_restarts_a_replica_and_restarts_redis_with_its_data(tmp_path):
    with sdk_server() as upstream:
        with cluster.Cluster(upstream.endpoint, replicas=2, options={"ruleset": ALLOW_ALL}, dir=tmp_path,
                             env={"BASTION_AUDIT_KEY": ""}) as c:
            pids = [c.redis.pid, c.haproxy.pid, *(r.proc.pid for r in c.replicas)]
            assert c.backend_state() == {"r1": "UP", "r2": "UP"}
            for r in c.replicas:
                assert initialize(r.url)[0] == 200  # each replica answers directly too
            made = [initialize(c.front_url)[1] for _ in range(2)]
            assert sorted(c.sticky()[session] for session in made) == ["r1", "r2"]  # HAProxy's stick-table

            first = c.replicas[0].proc
            assert c.kill(0) == -signal.SIGKILL and first.poll() is not None
            for _ in range(3):  # HAProxy sends what r1 would have had to r2
                assert initialize(c.front_url)[0] == 200
            c.wait_backend(0, up=False)
            restarted = c.start_replica(0)
            assert restarted.proc is not first and restarted.proc.poll() is None
            assert restarted.log.name == "r1-2.log" and c.backend_state()["r1"] == "UP"
            pids.append(restarted.proc.pid)

            assert redis(c.redis_port, "SET", "cluster-test", "kept") == b"+OK\r\n"
            c.restart_redis()
            assert redis(c.redis_port, "GET", "cluster-test") == b"$4\r\nkept\r\n"
            pids.append(c.redis.pid)
            assert c.exited() == {}
    assert running(pids) == []


def test_a_mask_key_the_replicas_share_is_made_once_before_they_start(tmp_path, monkeypatch):
    from bastion_dev.cluster import Cluster

    monkeypatch.delenv("BASTION_MASK_KEY", raising=False)
    key = tmp_path / "mask.key"
    c = Cluster("http://127.0.0.1:9/mcp", replicas=2, dir=tmp_path / "run", options={"mask_key_file": str(key)},
                env={"BASTION_AUDIT_KEY": "k" * 32})
    c._prepare()
    made = key.read_bytes()
    assert made and oct(key.stat().st_mode & 0o777) == "0o600"
    c._prepare()
    assert key.read_bytes() == made  # kept, not made again
