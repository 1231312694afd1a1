"""
End to end: a real MCP SDK client and server through mitmdump with the recording bundle.

The recording opens in `mitmdump -nr` with every flow and every SSE event,
the timeline names every call, client replay repeats the calls against the
server, server replay answers a re-run client, a tampered audit line is
found, and a gateway killed with SIGKILL or stopped with SIGTERM leaves a
readable recording.

Run as a script, this file is the MCP server under test:
    python tests/test_forensics_e2e.py serve PORT CALL_LOG
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import harness  # noqa: E402

CONTENTVIEW = str(ROOT / "addons" / "mcp_bastion" / "addons" / "contentview.py")
AUDIT_KEY = "e2e-audit-key-0123456789abcdef"
TOKEN = "client-bearer-TOKEN-e2e-7f3a9c"

pytestmark = pytest.mark.e2e


# --- the MCP server (run as a script) --------------------------------------------------


def serve(port: int, call_log: str) -> None:
    from mcp.server.mcpserver import Context, MCPServer

    mcp = MCPServer("forensics-e2e")

    @mcp.tool()
    def echo(text: str) -> str:
        """Return the text (and log the call, so tests can see that it reached the server)."""
        with open(call_log, "a") as f:
            f.write(text + "\n")
        return text

    @mcp.tool()
    async def count(n: int, delay: float, ctx: Context) -> str:
        """Send n log notifications on the response stream, `delay` seconds apart."""
        with open(call_log, "a") as f:
            f.write(f"count {n}\n")
        for i in range(n):
            await ctx.info(f"step {i}")
            await asyncio.sleep(delay)
        return f"counted {n}"

    mcp.run("streamable-http", host="127.0.0.1", port=port)


# --- helpers ----------------------------------------------------------------------------


async def _session(url: str, calls, hold: float = 0.0):
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    transport = streamable_http_client(
        url, http_client=create_mcp_http_client(headers={"Authorization": f"Bearer {TOKEN}"}))
    results = []
    async with Client(transport, mode="legacy") as client:
        for name, args in calls:
            result = await client.call_tool(name, args)
            results.append([c.text for c in result.content])
        await asyncio.sleep(hold)
    return results


def session(url: str, calls, hold: float = 0.0):
    return asyncio.run(_session(url, calls, hold))


def run(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    import os

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def read_flows(path: Path):
    from mitmproxy import io

    with open(path, "rb") as f:
        return list(io.FlowReader(f).stream())


def sse_events(body: bytes) -> list[dict]:
    from mcp_bastion.core.sse import SSEParser

    return [json.loads(ev.data) for ev in SSEParser(len(body) + 1).feed(body) if ev.has_data]


class Gateway:
    """mitmdump with the recording bundle in front of the server, recording into `tmp`."""

    def __init__(self, upstream: str, tmp: Path):
        self.dir = tmp / "sessions"
        self.log = tmp / "audit.jsonl"
        self.port = harness.free_port()
        args = harness.mitmdump_args(upstream, self.port, {
            "record_dir": str(self.dir), "audit_log": str(self.log)})
        self.proc = harness.Proc(args, self.port, env={"BASTION_AUDIT_KEY": AUDIT_KEY}).wait_ready()
        self.url = f"http://127.0.0.1:{self.port}/mcp"

    def recordings(self) -> list[Path]:
        return sorted(self.dir.glob("*.mitm"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    calls = tmp_path_factory.mktemp("server") / "calls.log"
    calls.write_text("")
    port = harness.free_port()
    with harness.running([sys.executable, __file__, "serve", str(port), str(calls)], port) as proc:
        proc.calls = calls
        proc.mcp_url = f"{proc.url}/mcp"
        yield proc


@pytest.fixture(scope="module")
def recorded(server, tmp_path_factory):
    """One complete session through the gateway, stopped with SIGTERM afterwards."""
    tmp = tmp_path_factory.mktemp("recorded")
    gw = Gateway(server.url, tmp)
    try:
        results = session(gw.url, [("echo", {"text": "hello"}), ("count", {"n": 3, "delay": 0.05})])
    finally:
        gw.proc.stop(signal.SIGTERM)
    assert results == [["hello"], ["counted 3"]], gw.proc.output()
    (path,) = gw.recordings()
    return path, gw.log


# --- the proof -----------------------------------------------------------------------------


def test_recording_reads_back_with_every_flow_and_sse_event(recorded):
    path, _ = recorded
    out = run(harness.MITMDUMP, "-nr", str(path), "--flow-detail", "3", "-s", CONTENTVIEW)
    assert out.returncode == 0, out.stderr
    flows = read_flows(path)
    methods = [(f.request.method, [m.get("method") for m in f.metadata["bastion.mcp"].get("request", [])])
               for f in flows]
    for expected in (("POST", ["initialize"]), ("POST", ["notifications/initialized"]), ("POST", ["tools/call"]),
                     ("GET", ["GET"]), ("DELETE", ["DELETE"])):
        assert expected in methods, methods
    assert out.stdout.count("<< ") == len(flows) >= 7
    count_flow = next(f for f in flows if f.metadata["bastion.mcp"]["request"][0].get("tool") == "count")
    events = sse_events(count_flow.response.raw_content)
    assert [e.get("params", {}).get("data") for e in events[:3]] == ["step 0", "step 1", "step 2"]
    assert events[3]["result"]["content"][0]["text"] == "counted 3"
    for text in ('"step 0"', '"step 2"', '"counted 3"', "# response · id", "tool count"):
        assert text in out.stdout  # shown by mitmdump, through the MCP content view
    sid = path.name.rsplit("_", 1)[1].removesuffix(".mitm")
    assert all(f.metadata["bastion.record"]["session"] == sid for f in flows)
    assert all(f.request.headers.get("mcp-session-id") in (None, sid) for f in flows)


def test_no_credential_is_written(recorded):
    path, log = recorded
    assert TOKEN.encode() not in path.read_bytes()
    assert TOKEN.encode() not in log.read_bytes()
    flows = read_flows(path)
    # Auth strips the client's token before anything is recorded; a header left would be redacted.
    assert all(f.request.headers.get("authorization") in (None, "[redacted by mcp-bastion]") for f in flows)
    assert any("authorization" not in f.request.headers for f in flows)


def test_timeline_names_every_call(recorded):
    path, _ = recorded
    out = run(str(ROOT / "scripts" / "replay"), "timeline", "--json", str(path))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    names = [(r["method"], r.get("tool")) for r in rows]
    for call in (("initialize", None), ("notifications/initialized", None), ("tools/call", "echo"),
                 ("tools/call", "count"), ("GET", None), ("DELETE", None)):
        assert call in names
    table = run(str(ROOT / "scripts" / "replay"), "timeline", str(path))
    assert table.returncode == 0 and "tools/call echo" in table.stdout and "tools/call count" in table.stdout


def test_audit_log_verifies_and_a_tampered_line_is_named(recorded, tmp_path):
    _, log = recorded
    env = {"BASTION_AUDIT_KEY": AUDIT_KEY}
    ok = run(str(ROOT / "scripts" / "audit"), "verify", str(log), env=env)
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    calls = [r for r in records if r["kind"] != "audit"]  # not the gateway's own start/stop records
    # (a `forward` record of initialize is written before the session has an id: it names the connection)
    assert len({r["session"] for r in calls if r["kind"] != "forward"}) == 1
    assert (records[0]["action"], records[-1]["action"]) == ("start", "stop")
    forwards = {r["flow"] for r in calls if r["kind"] == "forward"}
    assert forwards and forwards <= {r["flow"] for r in calls if r["kind"] != "forward"}  # each one completed
    echo = next(i for i, r in enumerate(records) if r.get("tool") == "echo")

    copy = tmp_path / "audit.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    lines[echo] = lines[echo].replace('"tool":"echo"', '"tool":"innocent"')
    copy.write_text("".join(lines))
    (tmp_path / "audit.jsonl.head").write_bytes(Path(f"{log}.head").read_bytes())
    bad = run(str(ROOT / "scripts" / "audit"), "verify", str(copy), env=env)
    assert bad.returncode == 1 and f"line {echo + 1}" in bad.stdout and "TAMPERED" in bad.stdout

    export = run(str(ROOT / "scripts" / "audit"), "export", str(log), "--tool", "echo", "--format", "csv", env=env)
    assert export.returncode == 0, export.stdout + export.stderr
    assert len(export.stdout.splitlines()) == 2 and ",echo," in export.stdout
    refused = run(str(ROOT / "scripts" / "audit"), "export", str(copy), env=env)
    assert refused.returncode == 1 and "refusing to export" in refused.stdout
    no_key = run(str(ROOT / "scripts" / "audit"), "verify", str(log), env={"BASTION_AUDIT_KEY": ""})
    assert no_key.returncode == 2 and "no key" in no_key.stderr  # could not run: not the same as tampered


def test_client_replay_reproduces_the_calls_against_the_server(recorded, server):
    path, _ = recorded
    before = server.calls.read_text().splitlines().count("hello")
    out = run(str(ROOT / "scripts" / "replay"), "client", str(path), "--to", server.mcp_url)
    assert out.returncode == 0, out.stdout + out.stderr
    assert server.calls.read_text().splitlines().count("hello") == before + 1
    echo_row = next(line for line in out.stdout.splitlines() if "tools/call echo" in line)
    assert "same" in echo_row
    assert "answers differ" in out.stdout


def test_client_replay_saves_without_the_credentials_it_sent(recorded, server, tmp_path):
    """`--save` keeps what a recording keeps: the --header credential redacted, the file owner-only."""
    path, _ = recorded
    saved = tmp_path / "replayed.mitm"
    saved.write_bytes(b"")
    saved.chmod(0o644)  # an existing file does not keep a wider mode
    secret = "replay-secret-token-123"
    out = run(str(ROOT / "scripts" / "replay"), "client", str(path), "--to", server.mcp_url,
              "--header", f"Authorization: Bearer {secret}", "--header", "X-Api-Key: k-456", "--save", str(saved))
    assert out.returncode == 0, out.stdout + out.stderr
    data = saved.read_bytes()
    assert secret.encode() not in data and b"k-456" not in data
    flows = read_flows(saved)
    assert flows and all(f.request.headers.get("authorization") == "[redacted by mcp-bastion]" for f in flows)
    assert all(f.request.headers.get("x-api-key") == "[redacted by mcp-bastion]" for f in flows)
    assert saved.stat().st_mode & 0o777 == 0o600


def test_audit_export_into_a_closed_pipe_ends_quietly(recorded):
    _, log = recorded
    cmd = f"{ROOT / 'scripts' / 'audit'} export {log} | head -c 10 >/dev/null"
    out = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "BASTION_AUDIT_KEY": AUDIT_KEY})
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr, out.stderr
    assert out.returncode in (0, 141)


def test_server_replay_answers_a_rerun_client(recorded, server):
    path, _ = recorded
    port = harness.free_port()
    calls_before = server.calls.read_text()
    with harness.running([str(ROOT / "scripts" / "replay"), "server", str(path), "--port", str(port)], port):
        results = session(f"http://127.0.0.1:{port}/mcp",
                          [("echo", {"text": "hello"}), ("count", {"n": 3, "delay": 0.05})])
    assert results == [["hello"], ["counted 3"]]
    assert server.calls.read_text() == calls_before  # answered from the recording, not by the server


def wait_until_streaming(server, gw: Gateway, timeout: float = 30) -> None:
    """Until the echo call is in the recording and the long count call has started streaming."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recorded = gw.recordings()
        if recorded and "count 200" in server.calls.read_text():
            tools = [m.get("tool") for f in read_flows(recorded[0])
                     for m in f.metadata["bastion.mcp"].get("request", [])]
            if "echo" in tools:
                time.sleep(0.3)  # a few events of the count call have gone out
                return
        time.sleep(0.05)
    raise AssertionError(f"the session did not get going:\n{gw.proc.output()}")


def test_kill_9_mid_session_leaves_a_readable_recording(server, tmp_path):
    gw = Gateway(server.url, tmp_path)
    outcome: dict = {}

    def client():
        try:
            outcome["results"] = session(gw.url, [("echo", {"text": "before-kill"}),
                                                  ("count", {"n": 200, "delay": 0.05})])
        except BaseException as e:  # the gateway dies under it
            outcome["error"] = e

    t = threading.Thread(target=client)
    t.start()
    wait_until_streaming(server, gw)
    gw.proc.stop(signal.SIGKILL)
    t.join(60)
    assert "results" not in outcome
    (path,) = gw.recordings()
    out = run(harness.MITMDUMP, "-nr", str(path))
    assert out.returncode == 0 and "corrupted" not in out.stdout + out.stderr
    flows = read_flows(path)
    tools = [m.get("tool") for f in flows for m in f.metadata["bastion.mcp"].get("request", [])]
    assert "echo" in tools and "count" not in tools  # finished flows are there; the one in flight is not
    verify = run(str(ROOT / "scripts" / "audit"), "verify", str(gw.log), env={"BASTION_AUDIT_KEY": AUDIT_KEY})
    assert verify.returncode == 0, verify.stdout


def test_sigterm_loses_nothing_in_flight(server, tmp_path):
    gw = Gateway(server.url, tmp_path)
    outcome: dict = {}

    def client():
        try:
            outcome["results"] = session(gw.url, [("echo", {"text": "before-term"}),
                                                  ("count", {"n": 200, "delay": 0.05})])
        except BaseException as e:
            outcome["error"] = e

    t = threading.Thread(target=client)
    t.start()
    wait_until_streaming(server, gw)
    gw.proc.stop(signal.SIGTERM)
    t.join(60)
    (path,) = gw.recordings()
    flows = read_flows(path)
    by_tool = {m.get("tool") or m.get("method"): f for f in flows for m in f.metadata["bastion.mcp"].get("request", [])}
    count = by_tool["count"]
    assert count.metadata["bastion.record"].get("incomplete") or count.error
    steps = [e.get("params", {}).get("data") for e in sse_events(count.response.raw_content)]
    assert steps and steps == [f"step {i}" for i in range(len(steps))]  # what the client got so far, in order
    assert "GET" in by_tool
    records = [json.loads(line) for line in gw.log.read_text().splitlines()]
    assert any(r.get("tool") == "count" and r.get("error") for r in records)
    verify = run(str(ROOT / "scripts" / "audit"), "verify", str(gw.log), env={"BASTION_AUDIT_KEY": AUDIT_KEY})
    assert verify.returncode == 0, verify.stdout


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(int(sys.argv[2]), sys.argv[3])
