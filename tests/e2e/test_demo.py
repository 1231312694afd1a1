"""The README's first command, run as a newcomer would: scripts/demo, end to end."""

import os
import re
import socket
import subprocess

import pytest

from harness import ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def demo_output() -> str:
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([str(ROOT / "scripts" / "demo")], capture_output=True, text=True, timeout=300,
                          env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def rows(output: str, user: str) -> list[str]:
    """The demo table's rows for `user`, wrapped cells joined, as 'cell │ cell │ ...'."""
    table: list[list[str]] = []
    for line in output.splitlines():
        if not line.startswith("│ "):
            continue
        cells = [c.strip() for c in line.strip("│").split("│")]
        if cells[0]:
            table.append(cells)
        elif table and len(cells) == len(table[-1]):
            table[-1] = [f"{a} {b}".strip() for a, b in zip(table[-1], cells, strict=True)]
    return [" │ ".join(" ".join(c.split()) for c in r) for r in table if r[0] == user]


def test_engineer_reads_but_secrets_and_destruction_are_stopped(demo_output):
    alice = rows(demo_output, "alice")
    assert any("lookup_customer(c-1001) │ ok" in r for r in alice)
    assert any("read_file(/etc/ssl/private/deploy.pem) │ denied │ -31001" in r and "no-secret-files" in r
               for r in alice)
    assert any("deploy(billing-api, staging) │ ok" in r for r in alice)
    # the production deploy waited for a second engineer: bob (sre) approved it with scripts/approvals
    assert any("deploy(billing-api, prod) │ ok │ deployment of billing-api to prod started" in r for r in alice)
    assert "bob (sre) scripts/approvals approve apr-" in demo_output and " approved (tools/call deploy" in demo_output
    assert sum("no-drop-table" in r for r in alice) == 2  # drop_table and its full-width spelling


def test_contractor_sees_a_filtered_catalogue_and_no_unmasked_customers(demo_output):
    carol = rows(demo_output, "carol")
    # the customer tools are reachable through the 'pii' masking profile: the record, its identifiers masked
    assert any("tools/list │ ok │" in r and "lookup_customer" in r and "read_file" not in r for r in carol)
    (lookup,) = [r for r in carol if "lookup_customer(c-1001) │ ok" in r]
    assert "Dana Whitfield" in lookup and "[MASKED:card]" in lookup and "[MASKED:email]" in lookup
    assert "4111" not in lookup and "dana.whitfield@" not in lookup and "555 0142" not in lookup
    alice = rows(demo_output, "alice")
    (plain,) = [r for r in alice if "lookup_customer(c-1001) │ ok" in r]
    assert "dana.whitfield@example.com" in plain  # engineers see the record as it is


def test_anonymous_is_refused_and_everything_is_recorded(demo_output):
    assert any("connect │ refused" in r and "bearer token is required" in r for r in rows(demo_output, "anonymous"))
    assert "session timeline" in demo_output
    assert "chain intact" in demo_output


def test_demo_web_keeps_mitmweb_running_until_interrupted():
    """`scripts/demo --web`: the same session, then mitmweb stays up for inspection until Ctrl-C."""
    import re
    import signal
    import urllib.request

    proc = subprocess.Popen([str(ROOT / "scripts" / "demo"), "--web"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "COLUMNS": "200"}, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Running; Ctrl-C"):
                break
        text = "".join(lines)
        assert "Running; Ctrl-C" in text, text[-3000:]
        web = re.search(r"^mitmweb\s+(http://127\.0\.0\.1:\d+/\?token=\S+)", text, re.M).group(1)
        with urllib.request.urlopen(web, timeout=10) as r:  # the printed link opens the UI
            assert r.status == 200 and b"mitmproxy" in r.read().lower()
        assert any("deploy(billing-api, prod) │ ok" in r for r in rows(text, "alice"))  # approved by bob
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_sigterm_to_the_demo_stops_everything_it_started():
    """Its peers run in their own sessions: the demo must stop them itself when it is told to stop."""
    import signal

    proc = subprocess.Popen([str(ROOT / "scripts" / "demo"), "--keep"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"},
                            stdin=subprocess.DEVNULL)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("Running; Ctrl-C"):
            break
    text = "".join(lines)
    ports = [int(p) for p in re.findall(r"^(?:upstream|gateway)\s.*http://127\.0\.0\.1:(\d+)/mcp", text, re.M)]
    assert len(ports) == 2, text[-2000:]
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"
