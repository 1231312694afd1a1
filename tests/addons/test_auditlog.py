"""Audit: records from flow facts, the HMAC chain, verify, keys, export (pure), and the AuditLog addon."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import stat
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow

from mcp_bastion.addons.auditlog import AuditLog
from mcp_bastion.core import audit
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.vocab import Meta
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.recording import audit_writer
from mcp_bastion.glue.recording.audit_writer import DEFAULT_KEY_ENV
from mcp_bastion.glue.recording.facts import flow_facts

KEY = b"k" * 32


def facts(metadata, **kw):
    base = {"flow_id": "f1", "started": 1_700_000_000.25, "http_method": "POST", "metadata": metadata,
            "session": "s1", "status": 200, "latency_ms": 12.5}
    base.update(kw)
    return audit.FlowFacts(**base)


def mcp(request=(), response=(), events=()):
    return {Meta.MCP: {"request": list(request), "response": list(response), "events": list(events)}}


# --- building records ---------------------------------------------------------------


def test_record_carries_who_what_and_how_it_ended():
    meta = mcp([{"kind": "request", "id": 3, "method": "tools/call", "tool": "deploy"}],
               [{"kind": "response", "id": 3}])
    meta[Meta.IDENTITY] = {"sub": "alice", "groups": ["ops"], "client_id": "cli"}
    meta[Meta.UPSTREAM] = "127.0.0.1:9000"
    meta[Meta.DECISIONS] = [{"stage": "policy", "direction": "client_to_server", "id": 3,
                                  "method": "tools/call", "target": "deploy", "action": "allow", "rule": "ops-deploy"}]
    (rec,) = audit.build_records(facts(meta))
    assert rec["time"] == "2023-11-14T22:13:20.250Z"
    assert (rec["session"], rec["subject"], rec["groups"], rec["client_id"]) == ("s1", "alice", ["ops"], "cli")
    assert (rec["upstream"], rec["direction"], rec["method"], rec["tool"], rec["id"]) == (
        "127.0.0.1:9000", "client_to_server", "tools/call", "deploy", 3)
    assert (rec["action"], rec["rule"], rec["stage"]) == ("allow", "ops-deploy", "policy")
    assert (rec["status"], rec["rpc"], rec["latency_ms"]) == (200, "result", 12.5)
    assert "masking" not in rec and "approval" not in rec


def test_batch_gives_one_record_per_message_with_its_own_decision():
    meta = mcp([{"kind": "request", "id": 1, "method": "tools/call", "tool": "read"},
                {"kind": "request", "id": 2, "method": "tools/call", "tool": "rm"},
                {"kind": "notification", "method": "notifications/cancelled"}],
               [{"kind": "response", "id": 1}, {"kind": "error", "id": 2}])
    meta[Meta.DECISIONS] = [
        {"stage": "policy", "id": 1, "method": "tools/call", "action": "allow", "rule": "r-read"},
        {"stage": "policy", "id": 2, "method": "tools/call", "action": "deny", "rule": "r-rm", "reason": "no"},
        {"stage": "policy", "method": "notifications/cancelled", "action": "allow", "rule": "r-note"},
    ]
    recs = audit.build_records(facts(meta))
    assert [(r.get("tool"), r["action"], r["rule"], r.get("rpc")) for r in recs] == [
        ("read", "allow", "r-read", "result"), ("rm", "deny", "r-rm", "error"), (None, "allow", "r-note", None)]
    assert recs[1]["reason"] == "no"


def test_the_deciding_rule_names_the_record_not_the_auth_step():
    meta = mcp([{"kind": "request", "id": 4, "method": "tools/call", "tool": "deploy"}])
    meta[Meta.DECISIONS] = [
        {"stage": "auth", "direction": "client_to_server", "action": "allow", "reason": "token of alice"},
        {"stage": "policy", "direction": "client_to_server", "id": 4, "method": "tools/call", "action": "allow",
         "rule": "eng-deploy"},
    ]
    (rec,) = audit.build_records(facts(meta))
    assert (rec["action"], rec["rule"], rec["stage"]) == ("allow", "eng-deploy", "policy")
    assert "reason" not in rec


def test_a_batch_member_refused_with_its_batch_is_recorded_as_refused():
    meta = mcp([{"kind": "request", "id": 1, "method": "tools/call", "tool": "search"},
                {"kind": "request", "id": 2, "method": "tools/call", "tool": "deploy"}])
    meta[Meta.DECISIONS] = [
        {"stage": "policy", "id": 1, "method": "tools/call", "action": "allow", "rule": "logs"},
        {"stage": "policy", "id": 2, "method": "tools/call", "action": "deny", "rule": "no-deploy"},
        {"stage": "policy", "id": 1, "method": "tools/call", "action": "deny", "rule": "no-deploy",
         "reason": "not forwarded: tools/call deploy in the same batch was denied", "batch": True},
    ]
    recs = audit.build_records(facts(meta))
    assert [(r["id"], r["action"], r["rule"]) for r in recs] == [(1, "deny", "no-deploy"), (2, "deny", "no-deploy")]


def test_get_and_delete_give_one_record_each():
    for verb in ("GET", "DELETE"):
        meta = {Meta.MCP: {"request": [{"kind": "http", "method": verb}]}}
        meta[Meta.DECISIONS] = [
            {"stage": "auth", "direction": "client_to_server", "action": "allow"},
            {"stage": "policy", "direction": "client_to_server", "method": f"http:{verb}", "action": "allow",
             "rule": "lifecycle"},
        ]
        (rec,) = audit.build_records(facts(meta, http_method=verb))
        assert (rec["kind"], rec["method"], rec["rule"]) == ("http", verb, "lifecycle")


def test_flow_level_refusal_applies_to_every_message():
    meta = mcp([{"kind": "request", "id": 1, "method": "tools/list"}, {"kind": "request", "id": 2, "method": "ping"}])
    meta[Meta.DECISIONS] = [{"stage": "parse", "direction": "client_to_server", "action": "deny",
                                  "reason": "origin 'http://evil' is not allowed", "code": -31005, "status": 403}]
    recs = audit.build_records(facts(meta, status=403))
    assert [r["action"] for r in recs] == ["deny", "deny"]
    assert all(r["decisions"][0]["code"] == -31005 for r in recs)


def test_refused_before_parsing_still_gives_a_record():
    meta = {Meta.MCP: {}, Meta.DECISIONS: [{"stage": "parse", "action": "deny", "reason": "bad json"}]}
    (rec,) = audit.build_records(facts(meta, status=400))
    assert (rec["kind"], rec["method"], rec["action"], rec["reason"]) == ("http", "POST", "deny", "bad json")


def test_answer_side_decision_folds_into_the_request_and_wins_by_severity():
    meta = mcp([{"kind": "request", "id": 7, "method": "resources/read", "uri": "file:///etc/x"}],
               [{"kind": "response", "id": 7}])
    meta[Meta.DECISIONS] = [
        {"stage": "policy", "id": 7, "method": "resources/read", "action": "allow", "rule": "read-ok"},
        {"stage": "mask", "direction": "server_to_client", "id": 7, "action": "mask", "rule": "pii"},
    ]
    meta[Meta.MASK] = {"email": 2}
    (rec,) = audit.build_records(facts(meta))
    assert (rec["resource"], rec["action"], rec["rule"], rec["masking"]) == (
        "file:///etc/x", "mask", "pii", {"email": 2})
    assert [d["action"] for d in rec["decisions"]] == ["allow", "mask"]


def test_server_requests_and_stray_decisions_get_their_own_records():
    meta = mcp([{"kind": "request", "id": 1, "method": "tools/call", "tool": "ask"}],
               events=[{"kind": "request", "id": 1, "method": "sampling/createMessage"},
                       {"kind": "notification", "method": "notifications/progress"},
                       {"kind": "response", "id": 1}])
    meta[Meta.DECISIONS] = [
        {"stage": "policy", "id": 1, "method": "tools/call", "action": "allow", "rule": "r"},
        {"stage": "policy", "direction": "server_to_client", "id": 1, "method": "sampling/createMessage",
         "action": "deny", "rule": "no-sampling"},
        {"stage": "policy", "direction": "server_to_client", "id": 9, "method": "roots/list", "action": "deny"},
    ]
    meta[Meta.APPROVAL] = [{"id": "ap-1", "reviewers": ["bob"]}]
    recs = audit.build_records(facts(meta))
    assert [(r["direction"], r["method"], r["action"]) for r in recs] == [
        ("client_to_server", "tools/call", "allow"),
        ("server_to_client", "sampling/createMessage", "deny"),
        ("server_to_client", "roots/list", "deny"),
    ]
    assert recs[0]["approval"] == [{"id": "ap-1", "reviewers": ["bob"]}]


def test_no_decision_means_forward_and_errors_are_kept():
    meta = mcp([{"kind": "http", "method": "GET"}])
    (rec,) = audit.build_records(facts(meta, status=None, error="incomplete: gateway stopped"))
    assert (rec["action"], rec["status"], rec["error"]) == ("forward", None, "incomplete: gateway stopped")
    assert "decisions" not in rec


# --- the chain --------------------------------------------------------------------------


def write_log(tmp_path, n=5, key=KEY):
    path = tmp_path / "audit.jsonl"
    chain = audit.Chain(key)
    with open(path, "wb") as f:
        f.writelines(audit.line_of(chain.seal({"time": audit.iso_time(1_700_000_000 + i), "method": "tools/call",
                                              "tool": f"t{i}", "subject": "alice", "action": "allow"}))
                     for i in range(n))
    with audit.HeadFile(path) as head:
        head.write(audit.make_head(key, chain.seq, chain.prev))
    return path


def lines_of(path):
    return path.read_bytes().splitlines(keepends=True)


def test_intact_log_verifies(tmp_path):
    v = audit.verify_file(write_log(tmp_path), KEY)
    assert v.ok and v.records == 5 and v.last_seq == 5 and not v.notes


def test_edited_record_is_named(tmp_path):
    path = write_log(tmp_path)
    lines = lines_of(path)
    lines[2] = lines[2].replace(b'"allow"', b'"deny"')
    path.write_bytes(b"".join(lines))
    v = audit.verify_file(path, KEY)
    assert not v.ok and v.bad_line == 3 and v.bad_seq == 3 and "modified" in v.reason


def test_deleted_record_breaks_the_chain_at_the_next(tmp_path):
    path = write_log(tmp_path)
    lines = lines_of(path)
    del lines[1]
    path.write_bytes(b"".join(lines))
    v = audit.verify_file(path, KEY)
    assert not v.ok and v.bad_line == 2 and v.bad_seq == 3 and "chain broken" in v.reason


def test_reordered_records_are_detected(tmp_path):
    path = write_log(tmp_path)
    lines = lines_of(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))
    v = audit.verify_file(path, KEY)
    assert not v.ok and v.bad_line == 2


def test_records_removed_at_the_end_are_caught_by_the_head(tmp_path):
    path = write_log(tmp_path)
    path.write_bytes(b"".join(lines_of(path)[:-2]))
    v = audit.verify_file(path, KEY)
    assert not v.ok and v.bad_seq == 4 and "removed at the end" in v.reason


def test_missing_or_forged_head(tmp_path):
    path = write_log(tmp_path)
    head = json.loads(audit.head_path(path).read_bytes())
    head["seq"] = 3
    audit.head_path(path).write_text(json.dumps(head))
    assert "head file does not verify" in audit.verify_file(path, KEY).reason
    audit.head_path(path).unlink()
    assert not audit.verify_file(path, KEY).ok
    relaxed = audit.verify_file(path, KEY, require_head=False)
    assert relaxed.ok and relaxed.notes


def test_head_lagging_after_a_crash_is_a_note_not_tampering(tmp_path):
    path = write_log(tmp_path, n=3)
    seq, last = audit.resume_point(path)
    chain = audit.Chain(KEY, seq, last)
    with open(path, "ab") as f:
        f.write(audit.line_of(chain.seal({"method": "ping"})))
    v = audit.verify_file(path, KEY)
    assert v.ok and v.last_seq == 4 and "after the head" in v.notes[0]


def test_replaced_log_is_caught_by_the_head_hash(tmp_path):
    path = write_log(tmp_path, n=3)
    head = audit.head_path(path).read_bytes()
    chain = audit.Chain(KEY)  # a whole new, valid chain of the same length under the old head
    with open(path, "wb") as f:
        f.writelines(audit.line_of(chain.seal({"method": "forged", "n": i})) for i in range(3))
    audit.head_path(path).write_bytes(head)
    v = audit.verify_file(path, KEY)
    assert not v.ok and "replaced" in v.reason


def test_wrong_key_fails_at_the_first_record(tmp_path):
    v = audit.verify_file(write_log(tmp_path), b"x" * 32)
    assert not v.ok and "head file does not verify" in v.reason
    with open(tmp_path / "audit.jsonl", "rb") as f:
        v = audit.verify_lines(f, b"x" * 32)
    assert v.bad_line == 1 and "modified" in v.reason


def test_cut_off_last_line(tmp_path):
    path = write_log(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-20])
    v = audit.verify_file(path, KEY)
    assert not v.ok and v.bad_line == 5 and "cut off" in v.reason
    with pytest.raises(audit.AuditError, match="incomplete"):
        audit.resume_point(path)


def test_chain_resumes_across_restarts(tmp_path):
    path = write_log(tmp_path, n=2)
    seq, last = audit.resume_point(path)
    assert seq == 2
    chain = audit.Chain(KEY, seq, last)
    with open(path, "ab") as f:
        f.writelines(audit.line_of(chain.seal({"i": i})) for i in range(3))
    with audit.HeadFile(path) as head:
        head.write(audit.make_head(KEY, chain.seq, chain.prev))
    v = audit.verify_file(path, KEY)
    assert v.ok and v.records == 5
    assert audit.resume_point(tmp_path / "missing.jsonl") == (0, audit.GENESIS)


def test_head_is_one_fixed_size_record_rewritten_in_place(tmp_path):
    path = write_log(tmp_path, n=2)
    head_file = audit.head_path(path)
    assert head_file.stat().st_size == audit.HEAD_SIZE and stat.S_IMODE(head_file.stat().st_mode) == 0o600
    inode = head_file.stat().st_ino
    with audit.HeadFile(path) as head:
        head.write(audit.make_head(KEY, 10**15, "f" * 64))  # a long seq still fits
    assert head_file.stat().st_ino == inode and head_file.stat().st_size == audit.HEAD_SIZE
    assert audit.read_head(path)["seq"] == 10**15


def test_foreign_longer_head_file_is_cut_to_the_record(tmp_path):
    path = write_log(tmp_path, n=2)
    seq, last = audit.resume_point(path)
    audit.head_path(path).write_bytes(b"x" * 1000)
    with audit.HeadFile(path) as head:
        head.write(audit.make_head(KEY, seq, last))
    assert audit.head_path(path).stat().st_size == audit.HEAD_SIZE and audit.verify_file(path, KEY).ok


def torn(path):
    """The head file as a crash in the middle of rewriting it leaves it: the start of a newer head, the rest older."""
    seq, _ = audit.resume_point(path)
    old = audit.head_path(path).read_bytes()
    with audit.HeadFile(path) as head:
        head.write(audit.make_head(KEY, seq + 1, "e" * 64))
    new = audit.head_path(path).read_bytes()
    audit.head_path(path).write_bytes(new[:20] + old[20:])


def test_torn_head_does_not_verify(tmp_path):
    path = write_log(tmp_path)
    torn(path)
    v = audit.verify_file(path, KEY)
    assert not v.ok and "head file does not verify" in v.reason and "crash" in v.reason


def test_head_being_rewritten_while_read_is_read_again(tmp_path, monkeypatch):
    path = write_log(tmp_path)
    good = audit.head_path(path).read_bytes()
    torn(path)
    monkeypatch.setattr(audit.time, "sleep", lambda s: audit.head_path(path).write_bytes(good))  # the writer finishes
    assert audit.verify_file(path, KEY).ok


def test_last_line_reads_across_blocks(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"a" * 100 + b"\n" + b"b" * 300 + b"\n")
    assert audit.last_line(path, block=64) == b"b" * 300 + b"\n"


@settings(max_examples=60, deadline=None)
@given(index=st.integers(0, 4), field=st.sampled_from(["time", "method", "tool", "subject", "action", "seq", "prev"]),
       value=st.one_of(st.text(max_size=8), st.integers()))
def test_any_change_to_any_field_is_detected(tmp_path_factory, index, field, value):
    path = write_log(tmp_path_factory.mktemp("log"))
    lines = lines_of(path)
    rec = json.loads(lines[index])
    if rec[field] == value:
        return
    rec[field] = value
    lines[index] = audit.line_of(rec)
    path.write_bytes(b"".join(lines))
    v = audit.verify_file(path, KEY)
    assert not v.ok and v.bad_line == index + 1


# --- keys ------------------------------------------------------------------------------


def test_key_from_environment_first(tmp_path):
    key, source = audit.load_key("K", str(tmp_path / "key"), environ={"K": "s" * 20})
    assert key == b"s" * 20 and source == "$K"
    assert not (tmp_path / "key").exists()


def test_key_file_created_private(tmp_path):
    path = tmp_path / "sub" / "key"
    key, _ = audit.load_key("K", str(path), create=True, environ={})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(key) == 64
    assert audit.load_key("K", str(path), environ={})[0] == key


def test_key_refusals(tmp_path):
    with pytest.raises(audit.AuditError, match="no audit key"):
        audit.load_key("K", "", environ={})
    with pytest.raises(audit.AuditError, match="does not exist"):
        audit.load_key("K", str(tmp_path / "nope"), environ={})
    with pytest.raises(audit.AuditError, match="shorter"):
        audit.load_key("K", None, environ={"K": "short"})
    path = tmp_path / "key"
    path.write_text("x" * 40)
    os.chmod(path, 0o640)
    with pytest.raises(audit.AuditError, match="group or others"):
        audit.load_key("K", str(path), environ={})


# --- export ------------------------------------------------------------------------------


def test_parse_when_and_duration():
    assert audit.parse_duration("30d") == 30 * 86400
    assert audit.parse_when("2h", now=10_000) == 10_000 - 7200
    assert audit.parse_when("2023-11-14T22:13:20Z") == 1_700_000_000
    assert audit.parse_when("2023-11-14T22:13:20") == 1_700_000_000  # naive means UTC
    with pytest.raises(ValueError):
        audit.parse_when("yesterday")
    with pytest.raises(ValueError):
        audit.parse_duration("5 years")


def sample_records():
    return [
        {"seq": 1, "time": "2025-01-01T10:00:00.000Z", "subject": "alice", "tool": "read", "action": "allow",
         "session": "a"},
        {"seq": 2, "time": "2025-01-01T11:00:00.000Z", "subject": "bob", "tool": "rm", "action": "deny",
         "session": "b", "groups": ["ops", "dev"], "masking": {"email": 1}},
        {"seq": 3, "time": "2025-01-02T10:00:00.000Z", "subject": "alice", "tool": "rm", "action": "deny",
         "session": "a"},
    ]


@pytest.mark.parametrize("flt,seqs", [
    (audit.Filter(), [1, 2, 3]),
    (audit.Filter(subjects=("alice",)), [1, 3]),
    (audit.Filter(tools=("rm",), actions=("deny",)), [2, 3]),
    (audit.Filter(since=audit.parse_iso("2025-01-01T10:30:00Z")), [2, 3]),
    (audit.Filter(until=audit.parse_iso("2025-01-01T11:00:00Z")), [1]),
    (audit.Filter(sessions=("b",), subjects=("alice",)), []),
])
def test_filter(flt, seqs):
    assert [r["seq"] for r in sample_records() if flt.match(r)] == seqs


def test_csv_and_json_writers():
    out = io.StringIO()
    assert audit.write_csv(sample_records(), out) == 3
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert rows[1]["subject"] == "bob" and rows[1]["groups"] == '["ops","dev"]' and rows[1]["masking"] == '{"email":1}'
    assert rows[0]["masking"] == ""
    out = io.StringIO()
    assert audit.write_json(iter(sample_records()), out) == 3
    assert json.loads(out.getvalue()) == sample_records()
    out = io.StringIO()
    audit.write_json([], out)
    assert json.loads(out.getvalue()) == []


# --- the AuditLog addon ------------------------------------------------------------------

def mcp_flow(tool="echo", session="sess-1"):
    f = tflow.tflow(resp=True)
    f.request.headers["mcp-session-id"] = session
    f.metadata[Meta.MCP] = {"request": [{"kind": "request", "id": 1, "method": "tools/call", "tool": tool}],
                          "response": [{"kind": "response", "id": 1}]}
    f.metadata[Meta.IDENTITY] = {"sub": "alice", "groups": ["dev"]}
    f.metadata[Meta.STARTED] = time.monotonic()
    fs.add_decision(f, stage="policy", id=1, method="tools/call", action="allow", rule="r1")
    return f


def run(addon, f):
    answer, f.response = f.response, None
    addon.requestheaders(f)
    if f.response is None:
        f.response = answer
    addon.response(f)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def keyfile(tmp_path):
    path = tmp_path / "audit.key"
    path.write_text("q" * 40)
    path.chmod(0o600)
    return path


def test_addon_refuses_to_start_without_a_key(tmp_path, monkeypatch):
    monkeypatch.delenv(DEFAULT_KEY_ENV, raising=False)
    a = AuditLog()
    with taddons.context(a) as tctx, pytest.raises(exceptions.OptionsError, match="no audit key"):
        tctx.configure(a, audit_log=str(tmp_path / "audit.jsonl"))


def test_addon_generates_a_missing_key_file(tmp_path, monkeypatch):
    monkeypatch.delenv(DEFAULT_KEY_ENV, raising=False)
    a = AuditLog()
    with taddons.context(a) as tctx:
        tctx.configure(a, audit_log=str(tmp_path / "audit.jsonl"), audit_key_file=str(tmp_path / "k"))
        run(a, mcp_flow())
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    key = (tmp_path / "k").read_bytes().strip()
    assert audit.verify_file(tmp_path / "audit.jsonl", key).ok


def test_addon_writes_verifiable_records_and_continues_the_chain(tmp_path, keyfile):
    log = tmp_path / "audit.jsonl"
    for _round in range(2):  # two gateway runs on one log
        a = AuditLog()
        with taddons.context(a) as tctx:
            tctx.configure(a, audit_log=str(log), audit_key_file=str(keyfile))
            assert a.health.required and not hasattr(a, "request_stage")
            for tool in ("read", "write"):
                f = mcp_flow(tool)
                run(a, f)
                assert a.health.failure is None and Meta.ERROR not in f.metadata
            a.done()
    v = audit.verify_file(log, b"q" * 40)
    assert v.ok and v.records == 8
    recs = [json.loads(line) for line in log.read_bytes().splitlines()]
    assert [(r["seq"], r.get("tool"), r.get("subject"), r.get("session"), r.get("rule") or r["action"])
            for r in recs] == [
        (1, None, None, None, "start"),
        (2, "read", "alice", "sess-1", "r1"), (3, "write", "alice", "sess-1", "r1"),
        (4, None, None, None, "stop"), (5, None, None, None, "start"),
        (6, "read", "alice", "sess-1", "r1"), (7, "write", "alice", "sess-1", "r1"),
        (8, None, None, None, "stop")]
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


def test_addon_refuses_to_start_on_a_truncated_log(tmp_path, keyfile):
    log = tmp_path / "audit.jsonl"
    a = AuditLog()
    with taddons.context(a) as tctx:
        tctx.configure(a, audit_log=str(log), audit_key_file=str(keyfile))
        run(a, mcp_flow("one"))
        run(a, mcp_flow("two"))
        a.done()
    log.write_bytes(log.read_bytes().splitlines(keepends=True)[0])
    b = AuditLog()
    with taddons.context(b) as tctx, pytest.raises(exceptions.OptionsError, match="records were removed"):
        tctx.configure(b, audit_log=str(log), audit_key_file=str(keyfile))


def two_runs_then(tmp_path, keyfile, damage):
    """Write two records with the addon, stop it, `damage(log)`, start it again and write one more."""
    log = tmp_path / "audit.jsonl"
    a = AuditLog()
    with taddons.context(a) as tctx:
        tctx.configure(a, audit_log=str(log), audit_key_file=str(keyfile))
        run(a, mcp_flow("one"))
        run(a, mcp_flow("two"))
        tctx.configure(a, audit_log="")
        damage(log)
        tctx.configure(a, audit_log=str(log))
        run(a, mcp_flow("three"))
        a.done()
    return log


@pytest.mark.parametrize("damage", [
    torn,
    lambda log: audit.head_path(log).write_bytes(audit.head_path(log).read_bytes()[:100]),  # cut short: no JSON
    lambda log: audit.head_path(log).unlink(),
], ids=["torn", "cut-short", "missing"])
def test_addon_continues_a_log_its_head_cannot_vouch_for_and_says_so(tmp_path, keyfile, damage, caplog):
    log = two_runs_then(tmp_path, keyfile, damage)
    v = audit.verify_file(log, b"q" * 40)
    assert v.ok and v.records == 8
    recs = [json.loads(x) for x in log.read_bytes().splitlines()]
    assert [(r["seq"], r.get("tool"), r["action"]) for r in recs] == [
        (1, None, "start"), (2, "one", "allow"), (3, "two", "allow"), (4, None, "stop"),
        (5, None, "recover"), (6, None, "start"), (7, "three", "allow"), (8, None, "stop")]
    assert recs[4]["kind"] == "audit" and "to seq 4" in recs[4]["reason"]
    assert "recovery record" in caplog.text


def test_addon_refuses_a_log_whose_head_cannot_vouch_and_that_does_not_verify(tmp_path, keyfile):
    def torn_and_edited(log):
        torn(log)
        log.write_bytes(log.read_bytes().replace(b'"two"', b'"TWO"'))

    with pytest.raises(exceptions.OptionsError, match="does not verify either"):
        two_runs_then(tmp_path, keyfile, torn_and_edited)


def test_addon_refuses_a_log_under_another_key(tmp_path, keyfile):
    def rekey(log):
        keyfile.write_text("z" * 40)

    with pytest.raises(exceptions.OptionsError, match="does not verify"):
        two_runs_then(tmp_path, keyfile, rekey)


def test_addon_write_failure_refuses_new_requests_until_writing_works(tmp_path, keyfile, monkeypatch, caplog):
    a = AuditLog()
    with taddons.context(a) as tctx:
        tctx.configure(a, audit_log=str(tmp_path / "audit.jsonl"), audit_key_file=str(keyfile))
        assert a.health.refusal() is None
        clock = [1000.0]
        a.health._clock = lambda: clock[0]

        def full(*args):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(audit_writer.os, "write", full)
        f = mcp_flow()
        run(a, f)
        assert f.response.status_code == 200  # already recorded as sent: not withheld
        assert "audit" in f.metadata[Meta.ERROR]
        for _ in range(3):  # refused for as long as the disk is full: there is no window after which it opens
            clock[0] += 3600
            refusal = a.health.refusal()
            assert isinstance(refusal, Refusal) and refusal.status == 503
        assert refusal.headers["retry-after"] == "1"
        assert refusal.data == {"reason": "audit"} and "write its audit log" in refusal.message
        g = mcp_flow()
        g.response = None
        a.requestheaders(g)
        a.request(g)  # its `forward` record cannot be written: not forwarded
        assert g.response.status_code == 503 and json.loads(g.response.content)["error"]["data"]["reason"] == "audit"
        monkeypatch.undo()
        assert a.health.refusal() is not None  # no retry within a second of the last one
        clock[0] += 1.5
        assert a.health.refusal() is None  # the retry wrote f's records: admitted again
        h = mcp_flow("after")
        h.response = None
        a.requestheaders(h)
        a.request(h)
        assert h.response is None  # its forward record is written
        h.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
        a.response(h)
        assert a.health.failure is None
        a.done()
    assert "AUDIT LOG WRITE FAILED" in caplog.text
    v = audit.verify_file(tmp_path / "audit.jsonl", b"q" * 40)
    assert v.ok  # the failed write left nothing half-written
    recs = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_bytes().splitlines()]
    # nothing lost: f's records were written by the retry, then h's forward and final records, then g's refusal
    assert [(r["kind"], r.get("tool"), r["action"]) for r in recs] == [
        ("audit", None, "start"), ("request", "echo", "allow"), ("forward", None, "forward"),
        ("request", "after", "allow"), ("request", "echo", "error"), ("audit", None, "stop")]
    assert recs[2]["messages"] == [{"kind": "request", "method": "tools/call", "id": 1, "tool": "after"}]


def test_addon_is_required_only_when_on_and_audit_required(tmp_path, keyfile):
    a = AuditLog()
    with taddons.context(a) as tctx:
        assert not a.health.required
        tctx.configure(a, audit_log=str(tmp_path / "audit.jsonl"), audit_key_file=str(keyfile))
        assert a.health.required
        tctx.configure(a, audit_required=False)
        assert not a.health.required
        a.health.failed("OSError: disk full")

        def still_full():
            raise OSError(errno.ENOSPC, "No space left on device")

        a.health.probe = still_full
        assert a.health.failing() and a.health.refusal() is None
        tctx.configure(a, audit_required=True)
        assert a.health.refusal() is not None
        tctx.configure(a, audit_log="")
        assert not a.health.required and a.health.refusal() is None
        a.done()


def test_flow_facts_take_the_session_and_latency_of_the_flow():
    f = mcp_flow(session="sess-9")
    facts_ = flow_facts(f, latency_ms=7.5)
    assert (facts_.flow_id, facts_.session, facts_.status, facts_.latency_ms, facts_.error) == (
        f.id, "sess-9", 200, 7.5, None)
    assert flow_facts(f, incomplete="cut").error == "cut"


def test_addon_writes_in_flight_flows_on_shutdown_once(tmp_path, keyfile):
    log = tmp_path / "audit.jsonl"
    a = AuditLog()
    with taddons.context(a) as tctx:
        tctx.configure(a, audit_log=str(log), audit_key_file=str(keyfile))
        f = mcp_flow()
        f.response = None
        a.requestheaders(f)
        a.done()
        a.error(f)
    start, rec, stop = [json.loads(x) for x in log.read_bytes().splitlines()]
    assert (start["action"], stop["action"]) == ("start", "stop")
    assert rec["status"] is None and rec["error"].startswith("incomplete")


def test_transport_failure_is_an_error_not_a_decision():
    meta = mcp([{"kind": "request", "id": 2, "method": "tools/call", "tool": "echo"}],
               events=[{"kind": "response", "id": 2}])
    meta[Meta.DECISIONS] = [{"stage": "transport", "action": "error", "reason": "Client disconnected."}]
    (rec,) = audit.build_records(facts(meta, error="Client disconnected."))
    assert (rec["action"], rec["rpc"], rec["error"]) == ("forward", "result", "Client disconnected.")


# --- a gateway killed mid-call ------------------------------------------------------------


def forwarded_flow(a: AuditLog, tool: str) -> http.HTTPFlow:
    """A flow that passed every request hook: its `forward` record is written, its answer never comes."""
    f = mcp_flow(tool)
    f.response = None
    a.requestheaders(f)
    a.request(f)
    assert f.response is None
    return f


@pytest.mark.anyio
async def test_a_call_forwarded_by_a_killed_gateway_is_reported_at_the_next_start(tmp_path, keyfile, caplog):
    log = tmp_path / "audit.jsonl"
    a = AuditLog()
    with taddons.context(a) as tctx:
        tctx.configure(a, audit_log=str(log), audit_key_file=str(keyfile))
        ended = forwarded_flow(a, "quick")
        ended.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
        a.response(ended)
        hanging = [forwarded_flow(a, f"slow{i}") for i in range(2)]
        a.writer.close()  # SIGKILL: no `done`, no `stop` record
        a.writer = None
    b = AuditLog()
    with taddons.context(b) as tctx:
        tctx.configure(b, audit_log=str(log), audit_key_file=str(keyfile))
        b.done()
    assert audit.verify_file(log, b"q" * 40).ok
    recs = [json.loads(x) for x in log.read_bytes().splitlines()]
    assert [(r["kind"], r["action"]) for r in recs] == [
        ("audit", "start"), ("forward", "forward"), ("request", "allow"), ("forward", "forward"),
        ("forward", "forward"), ("audit", "incomplete"), ("audit", "start"), ("audit", "stop")]
    assert recs[5]["flows"] == [f.id for f in hanging]
    assert "2 call(s) were forwarded by a gateway that stopped" in caplog.text
    # the next restart after a clean stop has nothing to report
    c = AuditLog()
    with taddons.context(c) as tctx:
        tctx.configure(c, audit_log=str(log), audit_key_file=str(keyfile))
        c.done()
    assert [json.loads(x)["action"] for x in log.read_bytes().splitlines()][-2:] == ["start", "stop"]


def test_a_batch_writes_one_forward_record_of_bounded_size(tmp_path, keyfile):
    """A huge batch names at most MAX_LISTED messages in its forward record (and counts the rest)."""
    a = AuditLog()
    with taddons.context(a) as tctx:
        tctx.configure(a, audit_log=str(tmp_path / "audit.jsonl"), audit_key_file=str(keyfile))
        f = mcp_flow()
        f.metadata[Meta.MCP]["request"] = [{"kind": "request", "id": i, "method": "tools/call", "tool": "t"}
                                           for i in range(5000)]
        f.response = None
        a.requestheaders(f)
        a.request(f)
        a.done()
    fwd = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_bytes().splitlines()][1]
    assert fwd["kind"] == "forward" and len(fwd["messages"]) == audit.MAX_LISTED
    assert fwd["more_messages"] == 5000 - audit.MAX_LISTED


def test_without_audit_required_a_failed_forward_record_does_not_refuse(tmp_path, keyfile, monkeypatch):
    a = AuditLog()
    with taddons.context(a) as tctx:
        tctx.configure(a, audit_log=str(tmp_path / "audit.jsonl"), audit_key_file=str(keyfile), audit_required=False)
        monkeypatch.setattr(audit_writer.os, "write", lambda *args: (_ for _ in ()).throw(OSError(28, "full")))
        f = mcp_flow()
        f.response = None
        a.requestheaders(f)
        a.request(f)
        assert f.response is None and a.health.failing()
        monkeypatch.undo()
        a.done()
