"""Operations through real mitmdump: the admin listener, the decision log and the console's decision lines."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import yaml

from bastion_dev.issuer import DevIssuer

from harness import BUNDLE, MITMDUMP, ROOT, free_port, mitmdump_args, running, sdk_server, wait_port

pytestmark = pytest.mark.e2e

HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json",
           "mcp-protocol-version": "2025-06-18"}
RULES = """\
version: 1
default: allow
rules:
  - id: no-greetings
    match: {prompts: [greet]}
    action: deny
    reason: not today
"""


def test_metrics_probes_decision_log_and_console_lines(tmp_path):
    (tmp_path / "rules.yaml").write_text(RULES)
    port, admin = free_port(), free_port()
    with DevIssuer(audience=f"http://127.0.0.1:{port}") as issuer, sdk_server() as server:
        options = {"ruleset": str(tmp_path / "rules.yaml"), "oidc_issuer": issuer.url,
                   "admin_listen": f"127.0.0.1:{admin}", "decision_log": str(tmp_path / "decisions.jsonl")}
        with running(mitmdump_args(server.url, port, options), port) as gw:
            wait_port(admin, proc=gw.proc)
            headers = {**HEADERS, "authorization": f"Bearer {issuer.mint('alice')}"}
            r = httpx.post(f"{gw.url}/mcp", headers=headers, timeout=30, json={
                "jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                    "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
            headers["mcp-session-id"] = r.headers["mcp-session-id"]
            httpx.post(f"{gw.url}/mcp", headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
            add = {"name": "add", "arguments": {"a": 1, "b": 2}}
            httpx.post(f"{gw.url}/mcp", headers=headers, timeout=30,
                       json={"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": add})
            greet = {"name": "greet", "arguments": {"who": "x"}}
            denied = httpx.post(f"{gw.url}/mcp", headers=headers, timeout=30,
                                json={"jsonrpc": "2.0", "id": 2, "method": "prompts/get", "params": greet})
            assert "not today" in denied.text
            time.sleep(0.3)
            metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10)
            assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
            assert 'bastion_decisions_total{action="deny",group="engineering",rule="no-greetings"} 1.0' in metrics.text
            assert 'bastion_idp_keys{issuer="' in metrics.text and "bastion_idp_keys_age_seconds" in metrics.text
            ready = httpx.get(f"http://127.0.0.1:{admin}/readyz", timeout=10)
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"]["keys"]["ok"] is True
            assert httpx.get(f"http://127.0.0.1:{admin}/healthz", timeout=10).json() == {"status": "ok"}
            assert httpx.get(f"{gw.url}/metrics", headers=headers, timeout=10).status_code == 404
            output = gw.output()
    entries = [json.loads(line) for line in (tmp_path / "decisions.jsonl").read_text().splitlines()]
    greet = [e for e in entries if e.get("prompt") == "greet"]
    assert greet and greet[0]["action"] == "deny" and greet[0]["subject"] == "alice"
    assert "alice  prompts/get greet  -> deny [no-greetings]: not today" in output
    assert "<< 200 OK" not in output  # mitmproxy's bare request lines gave way to the decision lines


def test_the_example_config_file_is_a_whole_deployment(tmp_path):
    """addons/config.yaml, with only its addresses and paths changed, runs the gateway with no --set at all."""
    config = yaml.safe_load((ROOT / "addons" / "config.yaml").read_text())
    port, admin = free_port(), free_port()
    with DevIssuer(audience=f"http://127.0.0.1:{port}/mcp") as issuer, sdk_server() as server:
        config.update({
            "mode": [f"reverse:{server.url}"], "listen_port": port, "oidc_issuer": [issuer.url],
            "oidc_resource": f"http://127.0.0.1:{port}/mcp", "ruleset": str(ROOT / "rulesets" / "default.yaml"),
            "pin_store": str(tmp_path / "pins.json"), "record_dir": str(tmp_path / "sessions"),
            "audit_log": str(tmp_path / "audit.jsonl"), "admin_listen": f"127.0.0.1:{admin}",
            "decision_log": str(tmp_path / "decisions.jsonl")})
        confdir = tmp_path / "confdir"
        confdir.mkdir()
        (confdir / "config.yaml").write_text(yaml.safe_dump(config))
        args = [MITMDUMP, "--set", f"confdir={confdir}", "-s", BUNDLE]
        env = {"BASTION_AUDIT_KEY": "k" * 32, "BASTION_UPSTREAM_TOKEN": "upstream-secret"}
        with running(args, port, env=env) as gw:
            wait_port(admin, proc=gw.proc)
            ready = httpx.get(f"http://127.0.0.1:{admin}/readyz", timeout=10)
            assert ready.status_code == 200, ready.text
            token = issuer.mint("alice")
            r = httpx.post(f"http://127.0.0.1:{port}/mcp", timeout=30,
                           headers={**HEADERS, "authorization": f"Bearer {token}"},
                           json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                               "protocolVersion": "2025-06-18", "capabilities": {},
                               "clientInfo": {"name": "t", "version": "1"}}})
            assert r.status_code == 200 and "bastion-sdk-test-server" in r.text
    assert (tmp_path / "audit.jsonl").read_text() and (tmp_path / "decisions.jsonl").read_text()
    assert list((tmp_path / "sessions").rglob("*.mitm"))
