"""scripts/policy: check, explain and what-if, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mitmproxy import http, io
from mitmproxy.test import tflow

from mcp_bastion.cli.policy import main

ROOT = Path(__file__).resolve().parents[2]
ENGINEERS = str(ROOT / "rulesets" / "examples" / "read-only-engineers.yaml")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_script_runs_from_anywhere(tmp_path):
    proc = subprocess.run([str(ROOT / "scripts" / "policy"), "check", ENGINEERS], capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"{ENGINEERS}: ok (10 rules, default deny)"


# --- check -----------------------------------------------------------------


def test_check_accepts_every_shipped_ruleset(capsys):
    files = sorted(str(p) for p in (ROOT / "rulesets").rglob("*.yaml"))
    code, out, _ = run(capsys, "check", *files)
    assert code == 0 and out.count(": ok (") == len(files) >= 6


def test_check_lists_every_problem_with_line_and_rule(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - id: a\n    match: {tool: x}\n    action: deny\n"
                   "  - id: b\n    action: mask\n")
    code, out, _ = run(capsys, "check", str(bad), ENGINEERS)
    assert code == 1
    assert out.splitlines() == [
        f"{bad}:4: rule 'a': match: unknown key 'tool' (did you mean 'tools'?)",
        f"{bad}:6: rule 'b': action mask needs a 'profile' (the masking profile to apply)",
        f"{ENGINEERS}: ok (10 rules, default deny)",
    ]


def test_check_prints_warnings_but_passes(tmp_path, capsys):
    f = tmp_path / "w.yaml"
    f.write_text("version: 1\nrules:\n  - id: all\n    action: allow\n  - id: late\n    action: deny\n")
    code, out, _ = run(capsys, "check", str(f))
    assert code == 0
    assert f"{f}:5: warning: rule 'late': never reached" in out


# --- explain ---------------------------------------------------------------


def test_explain_shows_the_deciding_rule_and_why_earlier_rules_missed(capsys):
    message = json.dumps({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
                          "params": {"name": "read_file", "arguments": {"path": "/srv/app/.env"}}})
    code, out, _ = run(capsys, "explain", ENGINEERS, "--sub", "alice", "--group", "engineering", message)
    assert code == 0
    assert "identity:  alice groups=['engineering']" in out
    assert "message:   tools/call read_file #3" in out
    assert "session-lifecycle          no     methods: 'tools/call' matches none of" in out
    assert "engineers-no-secret-files  MATCH  every condition holds" in out
    assert out.rstrip().endswith("decision:  deny by rule 'engineers-no-secret-files': "
                                 "secrets are not readable through MCP; use the vault")


def test_explain_batches_files_stdin_and_pseudo_methods(tmp_path, capsys, monkeypatch):
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps([
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "LOOKUP_CUSTOMER", "arguments": {}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
    ]))
    code, out, _ = run(capsys, "explain", ENGINEERS, "--identity", '{"sub": "alice", "groups": ["engineering"]}',
                       f"@{batch}")
    assert out.count("decision:") == 2
    assert "decision:  allow by rule 'engineers-read-tools'" in out
    assert "decision:  allow by rule 'session-lifecycle'" in out
    code, out, _ = run(capsys, "explain", ENGINEERS, "http:GET")
    assert "anonymous" in out and "decision:  deny by rule 'bastion:default'" in out
    monkeypatch.setattr("sys.stdin", open(batch))
    code, out, _ = run(capsys, "explain", ENGINEERS, "--sub", "x", "-")
    assert out.count("decision:") == 2


@pytest.mark.parametrize("argv,error", [
    (["explain", ENGINEERS, '{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}'], "duplicate JSON object key"),
    (["explain", ENGINEERS, "--group", "eng", "{}"], "--group/--issuer need --sub"),
    (["explain", ENGINEERS, "--identity", "[1]", "{}"], "must be a JSON object"),
    (["explain", "/nonexistent.yaml", "{}"], "cannot read"),
    (["what-if", ENGINEERS, "/nonexistent.mitm"], "cannot read"),
])
def test_usage_errors_exit_2(capsys, argv, error):
    code, _, err = run(capsys, *argv)
    assert code == 2 and error in err


# --- what-if -------------------------------------------------------------------


def recorded_flow(body, identity, decisions, sse_events=None):
    f = tflow.tflow(req=http.Request.make("POST", "http://127.0.0.1:9000/mcp", json.dumps(body),
                                          {"content-type": "application/json"}))
    if sse_events is not None:
        data = "".join(f"event: message\ndata: {json.dumps(e)}\n\n" for e in sse_events)
        f.response = http.Response.make(200, data, {"content-type": "text/event-stream"})
    f.metadata.update({"bastion.mcp": {}, "bastion.identity": identity, "bastion.upstream": "127.0.0.1:9000",
                       "bastion.decisions": decisions})
    return f


def call(id, tool, **args):
    return {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": args}}


def decision(id, method, action, rule, stage="policy", direction="client_to_server", **kw):
    return {"stage": stage, "direction": direction, "id": id, "method": method, "action": action, "rule": rule, **kw}


@pytest.fixture
def session(tmp_path):
    alice = {"sub": "alice", "groups": ["engineering"]}
    carol = {"sub": "carol", "groups": ["contractors"]}
    flows = [
        recorded_flow(call(1, "read_file", path="/srv/app/README.md"), alice,
                      [decision(1, "tools/call", "allow", "allow-all")]),
        recorded_flow(call(2, "deploy", env="prod"), alice, [decision(2, "tools/call", "allow", "allow-all")],
                      sse_events=[{"jsonrpc": "2.0", "id": 5, "method": "sampling/createMessage", "params": {}},
                                  {"jsonrpc": "2.0", "id": 2, "result": {}}]),
        recorded_flow([call(3, "lookup_customer", query="c"),
                       {"jsonrpc": "2.0", "method": "notifications/initialized"}],
                      carol, [decision(3, "tools/call", "deny", "bastion:default", reason="no rule"),
                              decision(None, "notifications/initialized", "allow", "session-lifecycle")]),
    ]
    flows[1].metadata["bastion.decisions"].append(
        decision(5, "sampling/createMessage", "allow", "allow-all", stage="resp:policy", direction="server_to_client"))
    path = tmp_path / "session.mitm"
    with open(path, "wb") as fo:
        w = io.FlowWriter(fo)
        for f in flows:
            w.add(f)
        w.add(tflow.tflow())  # not MCP: skipped
    return path


def test_what_if_lists_every_decision_that_would_change(session, capsys):
    code, out, _ = run(capsys, "what-if", ENGINEERS, str(session))
    lines = out.splitlines()
    assert code == 1
    assert lines == [
        f"{session} flow 2 alice -> tools/call deploy #2: allow by rule 'allow-all'  =>  "
        "deny by rule 'engineers-no-writes': engineers have read-only access; ask on-call to deploy",
        f"{session} flow 2 alice <- sampling/createMessage #5: allow by rule 'allow-all'  =>  "
        "deny by rule 'bastion:default': no rule allows this message",
        "5 messages re-evaluated against the recorded decisions: 2 would change",
    ]


def test_what_if_against_a_baseline_ruleset(session, capsys):
    code, out, _ = run(capsys, "what-if", ENGINEERS, str(session), "--baseline", ENGINEERS)
    assert code == 0 and out.strip() == f"5 messages re-evaluated against ruleset {ENGINEERS}: 0 would change"
    allow_all = str(ROOT / "rulesets" / "allow-all.yaml")
    code, out, _ = run(capsys, "what-if", allow_all, str(session), "--baseline", ENGINEERS)
    assert code == 1 and "3 would change" in out
    assert (f"{session} flow 3 carol -> tools/call lookup_customer #3: "
            "deny by rule 'bastion:default': no rule allows this message  =>  allow by rule 'allow-all'") in out
