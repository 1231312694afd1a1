"""The Recorder addon: session files, scrubbing, event-stream spooling, failure handling, retention."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import time
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import connection, exceptions, http, io
from mitmproxy.io import tnetstring
from mitmproxy.test import taddons, tflow

from mcp_bastion.addons.recorder import Recorder
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.vocab import Meta, StageName
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.recording import files as rfiles
from mcp_bastion.glue.recording import journal, tnet
from mcp_bastion.glue.recording.files import SessionFiles
from mcp_bastion.glue.recording.scrub import REDACTED
from mcp_bastion.glue.recording.sessions import session_of
from mcp_bastion.glue.recording.spool import Spool

CLIENT_TOKEN = "client-secret-token-123"
UPSTREAM_TOKEN = "upstream-credential-456"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def rec(tmp_path):
    r = Recorder()
    with taddons.context(r) as tctx:
        tctx.configure(r, record_dir=str(tmp_path / "rec"))
        yield r


def mcp_flow(session: str | None = "sess-1", sub: str | None = "alice", body: bytes | None = None,
             resp_session: str | None = None) -> http.HTTPFlow:
    f = tflow.tflow(resp=True)
    f.request.method = "POST"
    f.request.path = "/mcp"
    f.request.headers["content-type"] = "application/json"
    f.request.content = body or b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}'
    if session:
        f.request.headers["mcp-session-id"] = session
    if resp_session:
        f.response.headers["mcp-session-id"] = resp_session
    f.response.headers["content-type"] = "application/json"
    f.response.content = b'{"jsonrpc":"2.0","id":1,"result":{}}'
    f.metadata[Meta.MCP] = {"request": [{"kind": "request", "id": 1, "method": "tools/call", "tool": "echo"}]}
    f.metadata[Meta.STARTED] = time.monotonic()
    if sub:
        f.metadata[Meta.IDENTITY] = {"sub": sub, "groups": ["dev"]}
    return f


def finish(r: Recorder, f: http.HTTPFlow) -> None:
    """requestheaders (before the upstream answers), then response."""
    answer, f.response = f.response, None
    r.requestheaders(f)
    if f.response is None:
        f.response = answer
    r.response(f)


def files(r: Recorder):
    return sorted(r.files.directory.glob("*.mitm"))


def read(path):
    with open(path, "rb") as fo:
        return list(io.FlowReader(fo).stream())


# --- files and sessions --------------------------------------------------------------


def test_one_file_per_session_named_by_time_subject_session(rec):
    for sid in ("sess-1", "sess-1", "sess-2"):
        finish(rec, mcp_flow(sid))
    finish(rec, mcp_flow("sess-1", sub="bob"))
    names = [p.name for p in files(rec)]
    assert len(names) == 3
    assert sum(n.endswith("_alice_sess-1.mitm") for n in names) == 1
    assert any(n.endswith("_bob_sess-1.mitm") for n in names)
    first = next(p for p in files(rec) if p.name.endswith("_alice_sess-1.mitm"))
    assert len(read(first)) == 2
    assert first.name[:16] == time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(mcp_flow().request.timestamp_start))


def test_initialize_takes_its_session_from_the_response(rec):
    finish(rec, mcp_flow(session=None, resp_session="new-sess"))
    finish(rec, mcp_flow(session="new-sess"))
    (path,) = files(rec)
    assert path.name.endswith("_alice_new-sess.mitm")
    assert [f.metadata[Meta.RECORD]["session"] for f in read(path)] == ["new-sess", "new-sess"]


def test_stateless_flows_are_keyed_by_connection_and_anonymous(rec):
    f = mcp_flow(session=None, sub=None)
    finish(rec, f)
    (path,) = files(rec)
    assert path.name.endswith(f"_anonymous_conn-{f.client_conn.id}.mitm")


def test_legacy_sse_session_from_query_or_from_the_gateway(rec):
    f = mcp_flow(session=None)
    f.request.path = "/messages/?session_id=abc123"
    assert session_of(f) == "abc123"
    g = mcp_flow(session=None)
    g.request.method, g.request.path = "GET", "/sse"
    g.metadata[Meta.LEGACY_SESSION] = "abc123"  # set by the Gateway from the stream's `endpoint` event
    assert session_of(g) == "abc123"
    assert not hasattr(rec, "mcp_stream_event")  # the Recorder no longer reads stream events itself
    finish(rec, g)
    (path,) = files(rec)
    assert path.name.endswith("_alice_abc123.mitm")


def test_unsafe_names_cannot_escape_the_directory(rec):
    finish(rec, mcp_flow(session="../../etc/passwd", sub="a/b c"))
    (path,) = files(rec)
    assert path.parent == rec.files.directory and "/" not in path.name[16:]


def test_non_mcp_and_passthrough_flows_are_not_recorded(rec):
    plain = tflow.tflow(resp=True)
    finish(rec, plain)
    passed = mcp_flow()
    passed.metadata[Meta.PASSTHROUGH] = True
    finish(rec, passed)
    assert files(rec) == []


def test_off_by_default_and_not_required():
    r = Recorder()
    with taddons.context(r) as tctx:
        assert r.files is None and not r.health.required
        finish(r, mcp_flow())
        tctx.configure(r, record_dir="")
        assert not r.health.required


def test_required_only_when_on_and_record_required_and_never_a_request_stage(tmp_path):
    r = Recorder()
    with taddons.context(r) as tctx:
        assert not hasattr(r, "request_stage")  # the Admission addon, before the Gate, reads `health`
        tctx.configure(r, record_dir=str(tmp_path))
        assert r.health.required
        tctx.configure(r, record_required=False)
        assert not r.health.required
        tctx.configure(r, record_required=True)
        assert r.health.required
        tctx.configure(r, record_dir="")
        assert not r.health.required
        assert not hasattr(r, "request_stage")


def test_bad_options_are_refused(tmp_path):
    r = Recorder()
    with taddons.context(r) as tctx:
        with pytest.raises(exceptions.OptionsError, match="record_retention"):
            tctx.configure(r, record_retention="a month")
        with pytest.raises(exceptions.OptionsError, match="record_stream_limit"):
            tctx.configure(r, record_stream_limit="lots")
        (tmp_path / "file").write_text("x")
        with pytest.raises(exceptions.OptionsError, match="not writable"):
            tctx.configure(r, record_dir=str(tmp_path / "file" / "sub"))


# --- secrets ------------------------------------------------------------------------


def test_credentials_never_reach_the_file_and_the_live_flow_is_untouched(rec):
    f = mcp_flow()
    f.request.headers["authorization"] = f"Bearer {CLIENT_TOKEN}"
    f.request.headers["cookie"] = f"sid={CLIENT_TOKEN}"
    f.request.headers["x-upstream-key"] = UPSTREAM_TOKEN
    f.request.path = f"/mcp?access_token={CLIENT_TOKEN}&x=1"
    f.response.headers["set-cookie"] = f"sid={UPSTREAM_TOKEN}"
    f.metadata[Meta.SECRET_HEADERS] = ["X-Upstream-Key"]
    finish(rec, f)
    (path,) = files(rec)
    data = path.read_bytes()
    assert CLIENT_TOKEN.encode() not in data and UPSTREAM_TOKEN.encode() not in data
    (saved,) = read(path)
    assert saved.request.headers["authorization"] == REDACTED
    assert saved.request.headers["x-upstream-key"] == REDACTED
    assert saved.request.query["access_token"] == REDACTED and saved.request.query["x"] == "1"
    assert saved.response.headers["set-cookie"] == REDACTED
    assert "request header authorization" in saved.metadata[Meta.RECORD]["redacted"]
    assert f.request.headers["x-upstream-key"] == UPSTREAM_TOKEN  # live flow unchanged
    assert CLIENT_TOKEN in f.request.path


def test_every_value_of_a_secret_field_is_redacted_whatever_its_spelling(rec):
    f = mcp_flow()
    f.request.headers.add("Authorization", f"Bearer {CLIENT_TOKEN}")
    f.request.headers.add("AUTHORIZATION", f"Basic {CLIENT_TOKEN}")
    f.request.headers["X-Upstream-Key"] = UPSTREAM_TOKEN
    f.request.path = f"/mcp?access%5Ftoken={CLIENT_TOKEN}&access_token={CLIENT_TOKEN}&x=%2F"
    f.response.headers.add("set-cookie", f"a={UPSTREAM_TOKEN}")
    f.response.headers.add("Set-Cookie", f"b={UPSTREAM_TOKEN}")
    f.response.trailers = http.Headers(cookie=CLIENT_TOKEN, other="kept")
    f.metadata[Meta.SECRET_HEADERS] = "x-upstream-key"  # a single name, not a list
    before = f.get_state()
    finish(rec, f)
    after = f.get_state()
    (path,) = files(rec)
    assert CLIENT_TOKEN.encode() not in path.read_bytes() and UPSTREAM_TOKEN.encode() not in path.read_bytes()
    (saved,) = read(path)
    assert saved.request.headers.get_all("authorization") == [REDACTED, REDACTED]
    names = [k for k, _ in saved.request.headers.fields if k.lower() == b"authorization"]
    assert names == [b"Authorization", b"AUTHORIZATION"]  # each field kept its own spelling
    assert saved.request.query.get_all("access_token") == [REDACTED, REDACTED] and saved.request.query["x"] == "/"
    assert saved.response.headers.get_all("set-cookie") == [REDACTED, REDACTED]
    assert saved.response.trailers["cookie"] == REDACTED and saved.response.trailers["other"] == "kept"
    assert sorted(saved.metadata[Meta.RECORD]["redacted"]) == [
        "query access_token", "request header authorization", "request header x-upstream-key",
        "response header set-cookie", "response trailer cookie"]
    assert Meta.RECORD not in after["metadata"]
    # the live flow is untouched
    assert (after["request"], after["response"]) == (before["request"], before["response"])


def test_recorded_flow_keeps_its_id_and_is_what_mitmproxy_itself_writes(rec):
    f = mcp_flow()
    f.request.headers["authorization"] = f"Bearer {CLIENT_TOKEN}"
    fs.add_decision(f, stage="policy", id=1, method="tools/call", action="allow", rule="ok")
    del f.metadata[Meta.STARTED]  # no latency: the note below is known exactly
    finish(rec, f)
    (path,) = files(rec)
    (saved,) = read(path)
    assert saved.id == f.id
    expected = f.get_state()  # what mitmproxy's FlowWriter writes for the flow, scrubbed and annotated
    expected["request"]["headers"] = tuple((k, REDACTED.encode() if k == b"authorization" else v)
                                           for k, v in expected["request"]["headers"])
    expected["metadata"][Meta.RECORD] = {"session": "sess-1", "subject": "alice", "latency_ms": None,
                                    "redacted": ["request header authorization"]}
    assert path.read_bytes() == tnetstring.dumps(expected)


def encoded_state(flow, conns=None):
    return b"".join(tnet.tnet_parts(tnet.flow_state(flow, conns or tnet.ConnectionStates()))[0])


def backed_up_and_edited():
    f = tflow.tflow(resp=True)
    f.backup()
    f.request.path = "/edited"
    return f


def marked_and_commented():
    f = mcp_flow()
    f.marked, f.comment = ":no_entry:", "alice: tools/call echo -> deny"
    f.client_conn.alpn_offers = [b"h2", b"http/1.1"]
    return f


@pytest.mark.parametrize("make", [
    lambda: tflow.tflow(resp=True), lambda: tflow.tflow(err=True), lambda: tflow.tflow(),
    tflow.twebsocketflow, mcp_flow, marked_and_commented, backed_up_and_edited,
], ids=["response", "error", "no-response", "websocket", "mcp", "marked", "backup"])
def test_flow_state_encodes_as_mitmproxys_own_get_state(make):
    f = make()
    assert encoded_state(f) == tnetstring.dumps(f.get_state())


def test_connection_state_is_reused_until_the_connection_changes(monkeypatch):
    calls = []
    real = connection.Client.get_state
    monkeypatch.setattr(connection.Client, "get_state", lambda self: calls.append(self.id) or real(self))
    conns = tnet.ConnectionStates()
    first, second = tflow.tflow(resp=True), tflow.tflow(resp=True)
    second.client_conn = first.client_conn  # two requests on one keep-alive connection
    assert encoded_state(first, conns) == tnetstring.dumps(first.get_state())
    calls.clear()
    assert encoded_state(second, conns) == tnetstring.dumps(second.get_state())
    assert len(calls) == 1  # only the reference state above: the connection was encoded once
    client = first.client_conn
    for change in (lambda: setattr(client, "timestamp_end", 946681300.5),
                   lambda: setattr(client, "alpn_offers", [b"h2"]),
                   lambda: client.alpn_offers.append(b"http/1.1"),  # changed in place
                   lambda: setattr(client, "error", "connection reset")):
        change()
        assert encoded_state(second, conns) == tnetstring.dumps(second.get_state())


json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(max_size=5000),
    lambda inner: st.lists(inner) | st.lists(inner).map(tuple)
    | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), inner),
    max_leaves=30,
)


@given(json_like)
def test_tnet_parts_are_mitmproxys_tnetstring(value):
    parts, size = tnet.tnet_parts(value)
    data = b"".join(parts)
    assert data == tnetstring.dumps(value) and size == len(data)


def test_recording_keeps_the_decisions(rec):
    f = mcp_flow()
    fs.add_decision(f, stage="policy", id=1, method="tools/call", action="deny", rule="no-echo", reason="nope")
    finish(rec, f)
    (saved,) = read(files(rec)[0])
    assert saved.metadata[Meta.DECISIONS][0]["rule"] == "no-echo"
    assert saved.metadata[Meta.IDENTITY]["sub"] == "alice"
    assert saved.comment == f.comment and saved.marked == f.marked


SEVERE = {str(action): mark for action, mark in fs.MARKS.items()}  # most severe first


@given(st.lists(st.sampled_from([*SEVERE, "allow", "filter", "clear", "new-list"]), max_size=60))
def test_annotation_names_the_first_most_severe_decision_else_the_last(steps):
    """What the recording (and mitmweb) shows as the flow's comment and mark, decision after decision."""
    f = mcp_flow()
    for i, step in enumerate(steps):
        if step == "clear":  # changed otherwise than by appending: read again
            f.metadata.get(Meta.DECISIONS, []).clear()
        elif step == "new-list":
            f.metadata[Meta.DECISIONS] = list(f.metadata.get(Meta.DECISIONS, []))
        action = step if step in SEVERE or step == "filter" else "allow"
        fs.add_decision(f, stage="policy", action=action, rule=f"r{i}", reason=f"why {i}")
        decisions = f.metadata[Meta.DECISIONS]
        severe = sorted((d for d in decisions if d["action"] in SEVERE), key=lambda d: list(SEVERE).index(d["action"]))
        shown = severe[0] if severe else decisions[-1]
        reason = f": {shown['reason']}" if shown["action"] != "allow" else ""
        assert f.comment == f"alice: tools/call echo -> {shown['action']} [{shown['rule']}]{reason}"
        assert f.marked == (SEVERE[shown["action"]] if severe else "")


# --- event streams --------------------------------------------------------------------


def sse_flow() -> http.HTTPFlow:
    f = mcp_flow()
    f.response.headers["content-type"] = "text/event-stream"
    f.response.content = None
    f.response.stream = lambda chunk: chunk
    return f


def test_stream_is_recorded_completely_in_order(rec):
    f = sse_flow()
    rec.requestheaders(f)
    events = [f'data: {{"jsonrpc":"2.0","method":"notifications/progress","params":{{"n":{i}}}}}\n\n'.encode()
              for i in range(200)]
    for e in events:
        rec.mcp_stream_output(f, e)
    rec.response(f)
    (saved,) = read(files(rec)[0])
    assert saved.response.raw_content == b"".join(events)
    assert saved.metadata[Meta.RECORD]["stream"]["bytes"] == len(b"".join(events))


def test_stream_that_sent_nothing_records_an_empty_body(rec):
    f = sse_flow()
    finish(rec, f)
    (saved,) = read(files(rec)[0])
    assert saved.response.raw_content == b"" and saved.metadata[Meta.RECORD]["stream"]["bytes"] == 0


def test_large_stream_is_spooled_to_disk_and_written_from_it(rec):
    f = sse_flow()
    rec.requestheaders(f)
    chunk = b"data: " + b"x" * (64 * 1024 - 8) + b"\n\n"
    for _ in range(40):  # 2.5 MiB: beyond the in-memory threshold
        rec.mcp_stream_output(f, chunk)
    assert not rec.spools[f.id].in_memory
    rec.response(f)
    (saved,) = read(files(rec)[0])
    assert saved.response.raw_content == chunk * 40
    assert rec.spools == {}


def test_stream_beyond_the_limit_is_hashed_and_marked_truncated(tmp_path):
    import hashlib

    r = Recorder()
    with taddons.context(r) as tctx:
        tctx.configure(r, record_dir=str(tmp_path), record_stream_limit="1k")
        f = sse_flow()
        r.requestheaders(f)
        data = [bytes([65 + i]) * 300 + b"\n\n" for i in range(10)]
        for d in data:
            r.mcp_stream_output(f, d)
        r.response(f)
        (saved,) = read(files(r)[0])
    full = b"".join(data)
    assert saved.response.raw_content == full[:1024]
    assert saved.metadata[Meta.RECORD]["stream"] == {
        "bytes": len(full), "sha256": hashlib.sha256(full).hexdigest(), "stored_bytes": 1024, "truncated": True}


def test_streamed_writer_produces_a_standard_tnetstring(tmp_path):
    f = mcp_flow()
    spool = Spool(tmp_path, 1 << 30)
    payload = os.urandom(3 * (1 << 20))
    spool.write(payload)
    state = f.get_state()
    state["response"]["content"] = tnet.Blob(spool)
    parts, size = tnet.tnet_parts(state)
    out = bytearray()
    for p in parts:
        out += b"".join(p.spool.chunks()) if isinstance(p, tnet.Blob) else p
    state["response"]["content"] = payload
    assert len(out) == size
    assert tnetstring.loads(bytes(out)) == tnetstring.loads(tnetstring.dumps(state))


def test_100mb_stream_stays_out_of_memory(tmp_path):
    r = Recorder()
    with taddons.context(r) as tctx:
        tctx.configure(r, record_dir=str(tmp_path))
        f = sse_flow()
        r.requestheaders(f)
        chunk = b"data: " + b"y" * (64 * 1024 - 8) + b"\n\n"
        tracemalloc.start()
        try:
            for _ in range(1600):  # 100 MiB
                r.mcp_stream_output(f, chunk)
            r.response(f)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        (path,) = files(r)
    assert peak < 16 * 1024 * 1024
    assert path.stat().st_size > 100 * 1024 * 1024


# --- failures ---------------------------------------------------------------------------


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_write_withholds_the_response_and_the_health_refuses_new_requests(rec, monkeypatch):
    assert rec.health.refusal() is None
    clock = [1000.0]
    rec.health._clock = lambda: clock[0]
    monkeypatch.setattr(rfiles.SessionFile, "append", disk_full)
    f = mcp_flow()
    finish(rec, f)
    assert f.response.status_code == 502 and b"-31010" in f.response.content
    assert "resp:record" in f.metadata[Meta.ERROR]
    assert "No space left on device" in rec.health.failure
    for _ in range(3):  # refused for as long as the disk is full, however long that is
        clock[0] += 3600
        refusal = rec.health.refusal()
        assert isinstance(refusal, Refusal) and refusal.status == 503
    assert refusal.headers["retry-after"] == "1"
    assert refusal.data == {"reason": "record"} and "record this session" in refusal.message
    g = mcp_flow()
    g.response = None
    rec.requestheaders(g)
    rec.request(g)  # cannot be journalled: not forwarded
    assert g.response.status_code == 503 and json.loads(g.response.content)["error"]["data"]["reason"] == "record"
    monkeypatch.undo()
    assert rec.health.refusal() is not None  # no retry within a second of the last one
    clock[0] += 1.5
    assert rec.health.refusal() is None  # the retry wrote f: admitted again, nothing lost
    h = mcp_flow()
    finish(rec, h)
    assert h.response.status_code == 200 and rec.health.failure is None
    recorded = [x for path in files(rec) for x in read(path)]
    assert [x.id for x in recorded] == [f.id, h.id], files(rec)
    assert recorded[0].response.status_code == 502  # what the client got


def test_a_successful_write_clears_the_failure_at_once(rec, monkeypatch):
    monkeypatch.setattr(rfiles.SessionFile, "append", disk_full)
    finish(rec, mcp_flow())
    assert rec.health.refusal() is not None
    monkeypatch.undo()
    finish(rec, mcp_flow())
    assert rec.health.refusal() is None and not rec.health.failing()


def test_not_required_lets_traffic_through_but_logs(tmp_path, monkeypatch, caplog):
    r = Recorder()
    with taddons.context(r) as tctx:
        tctx.configure(r, record_dir=str(tmp_path), record_required=False)
        monkeypatch.setattr(rfiles.SessionFile, "append", disk_full)
        f = mcp_flow()
        finish(r, f)
        assert f.response.status_code == 200
        assert r.health.failing() and r.health.refusal() is None
        g = mcp_flow()
        g.response = None
        r.requestheaders(g)
        assert g.response is None
    assert "RECORDING FAILED" in caplog.text


def test_a_write_cut_short_is_rolled_back(tmp_path):
    path = tmp_path / "s.mitm"
    sf = rfiles.SessionFile(path)
    sf.append([tnetstring.dumps(mcp_flow().get_state())])
    good = path.stat().st_size

    class Broken:
        def chunks(self):
            yield b"x" * 1000
            raise OSError(errno.EIO, "I/O error")

    blob = tnet.Blob.__new__(tnet.Blob)
    blob.spool, blob.size = Broken(), 5000
    with pytest.raises(OSError):
        sf.append([b"5000:", blob, b","])
    sf.close()
    assert path.stat().st_size == good and len(read(path)) == 1


def test_shutdown_writes_flows_still_in_flight(rec):
    done = mcp_flow()
    finish(rec, done)
    waiting = mcp_flow()
    waiting.response = None
    rec.requestheaders(waiting)
    streaming = sse_flow()
    rec.requestheaders(streaming)
    rec.mcp_stream_output(streaming, b"data: {}\n\n")
    rec.done()
    saved = read(files(rec)[0])
    assert len(saved) == 3
    assert [bool(s.metadata[Meta.RECORD].get("incomplete")) for s in saved] == [False, True, True]
    assert saved[2].response.raw_content == b"data: {}\n\n"
    assert rec.files.open == {}


def test_a_stream_closed_by_the_client_after_its_answer_is_recorded_without_an_error(rec):
    """The SDK closes a POST's event stream once the result arrived; the Gateway notes it as `closed`."""
    from mitmproxy import flow as mflow

    answered, cut = sse_flow(), sse_flow()
    for f in (answered, cut):
        rec.requestheaders(f)
        rec.mcp_stream_output(f, b'data: {"jsonrpc":"2.0","id":1,"result":{}}\n\n')
        f.error = mflow.Error("Client disconnected.")
    answered.metadata[Meta.MCP]["closed"] = "Client disconnected."
    rec.error(answered)
    rec.error(cut)
    saved = {f.id: f for f in read(files(rec)[0])}
    assert saved[answered.id].error is None and saved[answered.id].metadata[Meta.MCP]["closed"]
    assert saved[cut.id].error.msg == "Client disconnected."


def test_error_after_response_does_not_write_twice(rec):
    f = mcp_flow()
    finish(rec, f)
    rec.error(f)
    assert len(read(files(rec)[0])) == 1


# --- lifetime of files ---------------------------------------------------------------------


def test_idle_files_are_closed_and_reopened_for_appending(tmp_path):
    sf = SessionFiles(tmp_path)
    a = sf.get("alice", "s1", time.time())
    a.append([tnetstring.dumps(mcp_flow().get_state())])
    assert sf.close_idle(idle=300, now=time.monotonic() + 301) == 1 and not sf.open
    b = sf.get("alice", "s1", time.time() + 3600)
    b.append([tnetstring.dumps(mcp_flow().get_state())])
    sf.close_all()
    (path,) = tmp_path.glob("*.mitm")
    assert path == a.path and len(read(path)) == 2


def test_open_files_are_capped(tmp_path):
    sf = SessionFiles(tmp_path, max_open=3)
    for i in range(5):
        sf.get("alice", f"s{i}", time.time())
    assert [k[1] for k in sf.open] == ["s2", "s3", "s4"]
    sf.close_all()


def test_retention_removes_old_recordings_only(tmp_path):
    sf = SessionFiles(tmp_path)
    old = tmp_path / "20200101T000000Z_alice_old.mitm"
    old.write_bytes(b"")
    os.utime(old, (time.time() - 40 * 86400,) * 2)
    other = tmp_path / "notes.txt"
    other.write_text("keep")
    os.utime(other, (time.time() - 40 * 86400,) * 2)
    busy = sf.get("alice", "busy", time.time() - 40 * 86400)
    os.utime(busy.path, (time.time() - 40 * 86400,) * 2)
    fresh = tmp_path / "20990101T000000Z_bob_new.mitm"
    fresh.write_bytes(b"")
    assert sf.sweep(30 * 86400) == [old]
    assert other.exists() and busy.path.exists() and fresh.exists()
    sf.close_all()


def test_retention_runs_when_configured(tmp_path):
    old = tmp_path / "20200101T000000Z_alice_old.mitm"
    old.write_bytes(b"")
    os.utime(old, (time.time() - 3 * 86400,) * 2)
    r = Recorder()
    with taddons.context(r) as tctx:
        tctx.configure(r, record_dir=str(tmp_path), record_retention="0")
        assert old.exists()
        tctx.configure(r, record_retention="2d")
        assert not old.exists()


# --- a gateway killed mid-call ------------------------------------------------------------


@pytest.mark.anyio
async def test_a_call_forwarded_by_a_killed_gateway_is_recovered_into_its_session_file(tmp_path, caplog):
    directory = tmp_path / "rec"
    r = Recorder()
    with taddons.context(r) as tctx:
        tctx.configure(r, record_dir=str(directory))
        quick = mcp_flow(session="sess-q")
        answer, quick.response = quick.response, None
        r.requestheaders(quick)
        r.request(quick)
        quick.response = answer
        r.response(quick)
        hanging = mcp_flow(session="sess-h")
        hanging.response = None
        r.requestheaders(hanging)
        r.request(hanging)  # journalled before it is forwarded
        assert hanging.response is None
        assert not any("sess-h" in p.name for p in files(r))  # no session file before it ends
        r.journal.close(remove=False)  # SIGKILL: the journal stays behind, unlocked
        r.journal = None
    survivor = Recorder()
    with taddons.context(survivor) as tctx:
        tctx.configure(survivor, record_dir=str(directory))
        (path,) = [p for p in files(survivor) if "sess-h" in p.name]
        (flow,) = read(path)
        assert flow.id == hanging.id and flow.response is None
        assert "killed or crashed" in flow.metadata[Meta.RECORD]["incomplete"]
        (q,) = [x for p in files(survivor) if "sess-q" in p.name for x in read(p)]
        assert q.response.status_code == 200  # the call that ended is recorded once, not recovered again
        survivor.done()
    assert "1 call(s) were forwarded by a gateway that stopped" in caplog.text
    assert not list((directory / ".inflight").iterdir())  # both journals are gone after a clean stop


@pytest.mark.anyio
async def test_a_journal_cut_short_by_the_kill_is_read_up_to_its_last_whole_flow(tmp_path):
    directory = tmp_path / "rec"
    r = Recorder()
    with taddons.context(r) as tctx:
        tctx.configure(r, record_dir=str(directory))
        flows = []
        for sid in ("s1", "s2"):
            f = mcp_flow(session=sid)
            f.response = None
            r.requestheaders(f)
            r.request(f)
            flows.append(f)
        path = r.journal.path
        r.journal.close(remove=False)
        r.journal = None
    with open(path, "r+b") as fo:
        fo.truncate(path.stat().st_size - 7)
    survivor = Recorder()
    with taddons.context(survivor) as tctx:
        tctx.configure(survivor, record_dir=str(directory))
        recovered = [x.id for p in files(survivor) for x in read(p)]
        assert recovered == [flows[0].id]
        survivor.done()


def test_a_journal_another_running_gateway_holds_is_left_alone(tmp_path):
    directory = tmp_path / "rec"
    first = Recorder()
    with taddons.context(first) as tctx:
        tctx.configure(first, record_dir=str(directory))
        f = mcp_flow()
        f.response = None
        first.requestheaders(f)
        first.request(f)
        # a replica sharing the directory starts: f is in flight on the first one, not abandoned
        assert journal.recover(directory, rfiles.SessionFiles(directory)) == []
        assert files(first) == []
        first.done()
    (flow,) = [x for p in sorted(directory.glob("*.mitm")) for x in read(p)]
    assert flow.id == f.id and "stopped before" in flow.metadata[Meta.RECORD]["incomplete"]


def test_a_request_that_cannot_be_journalled_is_refused(rec, monkeypatch):
    monkeypatch.setattr(rfiles.SessionFile, "append", disk_full)
    f = mcp_flow()
    f.response = None
    rec.requestheaders(f)
    rec.request(f)
    assert f.response.status_code == 503 and rec.health.failing()


def test_a_removed_record_directory_is_recreated_before_anything_is_forwarded(rec, caplog):
    import shutil

    first = mcp_flow(session="s-open")
    finish(rec, first)  # its session file is open
    shutil.rmtree(rec.files.directory)
    for sid in ("s-open", "s-new"):
        f = mcp_flow(session=sid)
        answer, f.response = f.response, None
        rec.requestheaders(f)
        rec.request(f)
        assert f.response is None  # journalled in the recreated directory, then forwarded
        f.response = answer
        rec.response(f)
        assert f.response.status_code == 200
    assert sorted(len(read(p)) for p in files(rec)) == [1, 1]  # both recorded where the directory is now
    assert "was removed or replaced; recreating it" in caplog.text


# --- what an unidentified caller can cost -------------------------------------------------


def refused_unknown(body: bytes) -> http.HTTPFlow:
    f = mcp_flow(session=None, body=body)
    fs.add_decision(f, stage=StageName.AUTH, action="deny", reason="missing_token")
    return f


def test_an_unidentified_callers_refused_body_is_recorded_by_its_head_size_and_digest(rec):
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"p":"' + b"A" * 3_000_000 + b'"}}'
    f = refused_unknown(body)
    finish(rec, f)
    (path,) = files(rec)
    assert path.stat().st_size < 8 * 1024  # not 3 MB
    (flow,) = read(path)
    note = flow.metadata[Meta.RECORD]["request_body"]
    assert note["bytes"] == len(body) and note["sha256"] == hashlib.sha256(body).hexdigest()
    assert flow.request.content == body[:note["kept"]]
    known = mcp_flow(body=body)  # a caller the Auth stage let in is recorded whole
    fs.add_decision(known, stage=StageName.AUTH, action="allow", reason="token")
    finish(rec, known)
    assert max(p.stat().st_size for p in files(rec)) > len(body)


def test_refusals_of_unidentified_callers_are_recorded_a_bounded_number_of_times(rec, caplog):
    from mcp_bastion.addons import recorder as recorder_mod

    for _ in range(recorder_mod.UNKNOWN_CALLERS_PER_MINUTE + 25):
        finish(rec, refused_unknown(b"{}"))
    recorded = [x for p in files(rec) for x in read(p)]
    assert len(recorded) == recorder_mod.UNKNOWN_CALLERS_PER_MINUTE
    assert rec.unknown[next(iter(rec.unknown))][2] == 25


def test_a_session_finds_its_earlier_file_without_listing_the_directory(tmp_path, monkeypatch):
    """Files of earlier runs are read once at start; after that a new session never lists the directory."""
    earlier = tmp_path / "20200101T000000Z_alice_s1.mitm"
    earlier.write_bytes(b"")
    (tmp_path / "20210101T000000Z_alice_s1.mitm").write_bytes(b"")  # the newest of a session's files
    sf = SessionFiles(tmp_path)

    def listing(*args, **kwargs):
        raise AssertionError("the record directory was listed for a session")

    monkeypatch.setattr(type(tmp_path), "glob", listing)
    monkeypatch.setattr(type(tmp_path), "iterdir", listing)
    assert sf.get("alice", "s1", time.time()).path.name == "20210101T000000Z_alice_s1.mitm"
    fresh = sf.get("bob", "s2", time.time())
    sf.close_all()
    assert sf.get("bob", "s2", time.time() + 3600).path == fresh.path  # closed, then resumed: the same file
    sf.close_all()


def test_a_swept_or_removed_file_is_not_resumed(tmp_path):
    sf = SessionFiles(tmp_path)
    a = sf.get("alice", "s1", time.time() - 40 * 86400)
    sf.close_all()
    os.utime(a.path, (time.time() - 40 * 86400,) * 2)
    assert sf.sweep(30 * 86400) == [a.path]
    b = sf.get("alice", "s1", time.time())
    assert b.path != a.path and b.path.exists()
    sf.close_all()
    b.path.unlink()  # removed by hand
    c = sf.get("alice", "s1", time.time() + 7200)
    assert c.path.exists()
    sf.close_all()


# --- replicas sharing a record directory ---------------------------------------------------------------


def test_replicas_sharing_a_directory_write_their_own_files_and_say_who_served(tmp_path):
    directory = tmp_path / "rec"
    a, b = Recorder(), Recorder()
    with taddons.context(a) as ta:
        ta.configure(a, record_dir=str(directory), replica_id="gw-a")
        with taddons.context(b) as tb:
            tb.configure(b, record_dir=str(directory), replica_id="gw-b.2")
            for i, replica in enumerate((a, b, a)):  # the same caller's session, reaching either replica
                f = mcp_flow("sess-1")
                f.request.timestamp_start += i
                finish(replica, f)
    names = sorted(p.name for p in directory.glob("*.mitm"))
    assert len(names) == 2
    assert any(n.endswith("_gw-a_alice_sess-1.mitm") for n in names)
    assert any(n.endswith("_gw-b.2_alice_sess-1.mitm") for n in names)
    for name, replica, count in ((n, "gw-a" if "_gw-a_" in n else "gw-b.2", 2 if "_gw-a_" in n else 1)
                                 for n in names):
        flows = read(directory / name)
        assert len(flows) == count and {f.metadata[Meta.RECORD]["replica"] for f in flows} == {replica}
    # the forensics timeline reads both files as one session, in the order the calls came, naming the replica
    from mcp_bastion.cli.forensics import timeline_rows

    rows = timeline_rows([f for n in reversed(names) for f in read(directory / n)])
    assert [r["replica"] for r in rows] == ["gw-a", "gw-b.2", "gw-a"]
    assert {r["session"] for r in rows} == {"sess-1"}


def test_without_a_replica_id_names_and_notes_stay_as_they_were(rec):
    finish(rec, mcp_flow("sess-1"))
    (path,) = files(rec)
    assert re.fullmatch(r"\d{8}T\d{6}Z_alice_sess-1\.mitm", path.name)
    assert "replica" not in read(path)[0].metadata[Meta.RECORD]


@pytest.mark.parametrize("bad", ["a_b", "../x", "-x", ".x", "a b", "x" * 41, "é", "a/b"])
def test_a_replica_id_that_cannot_be_part_of_a_file_name_is_refused_at_start(tmp_path, bad):
    r = Recorder()
    with taddons.context(r) as tctx, pytest.raises(exceptions.OptionsError, match="replica_id"):
        tctx.configure(r, record_dir=str(tmp_path / "rec"), replica_id=bad)
