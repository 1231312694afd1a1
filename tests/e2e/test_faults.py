"""
Faults around the real gateway (mitmdump with the bundle, addons/bastion.py): a dead, dying, hanging or
misbehaving upstream; an identity provider that is down or rotates its keys; a full disk; the recording
directory removed; the ruleset file deleted or truncated. In every case the gateway must fail closed:
the client gets a clear error, nothing unchecked reaches it, nothing reaches the upstream that should not,
and what was recorded still reads and verifies.

The upstream is scripted here (stdlib `http.server`, one behaviour per tool name), so each fault is exact;
the OpenID issuer is a small one here too, whose keys and availability the tests control. Every process
and server is started on 127.0.0.1 on a free port and stopped at the end; every wait is bounded.

Tests marked `xfail(strict=True, reason="finding: ...")` pin a defect found while writing this file: they
fail today and start failing as XPASS once it is fixed (then drop the marker).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from mitmproxy import io as mitmio

from mcp_bastion.core.sse import SSEParser

from harness import ROOT, free_port, gateway, mitmdump_args, running, wait_port

pytestmark = pytest.mark.e2e

GUARD = 15.0  # seconds: the bound on any single wait; only reached when something is broken
AUDIT_KEY = "faults-e2e-audit-key-0123456789abcdef"
ACCEPT = {"accept": "application/json, text/event-stream"}
PROGRESS = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "t", "progress": 1}}


def result(id_, text: str) -> dict:
    return {"jsonrpc": "2.0", "id": id_, "result": {"content": [{"type": "text", "text": text}]}}


def event(obj) -> bytes:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return b"event: message\ndata: " + data + b"\n\n"


# --- a scripted upstream ------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """MCP over streamable HTTP, just enough: `initialize` hands out a session, notifications get 202,
    and `tools/call` runs the method `tool_<name>` of this class (the fault to play)."""

    protocol_version = "HTTP/1.1"
    server: Upstream

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.conns.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.conns.discard(self.connection)

    def do_POST(self) -> None:
        msg = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        self.server.seen.append(msg)
        if msg.get("method") == "initialize":
            self.server.sessions += 1
            info = {"protocolVersion": "2025-06-18", "capabilities": {},
                    "serverInfo": {"name": "faulty", "version": "1"}}
            self.json({"jsonrpc": "2.0", "id": msg["id"], "result": info},
                      {"mcp-session-id": f"session-{self.server.sessions}"})
        elif "id" not in msg:
            self.send_response(202)
            self.send_header("content-length", "0")
            self.end_headers()
        else:
            getattr(self, "tool_" + msg["params"]["name"], self.tool_echo)(msg["id"])

    # --- writing ---

    def json(self, obj, headers: dict | None = None, raw: bytes | None = None, ctype: str = "application/json"):
        data = raw if raw is not None else json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def start_sse(self, chunked: bool = True) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        if chunked:
            self.send_header("transfer-encoding", "chunked")
        else:  # the body ends when the connection closes
            self.send_header("connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.flush()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def sse(self, *blocks: bytes) -> None:
        self.start_sse()
        for b in blocks:
            self.chunk(b)
        self.end()

    def reset(self) -> None:
        """Drop the connection at once, with a TCP RST: no end of the chunked body, nothing more."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.connection.close()
        self.close_connection = True

    # --- the tools: one behaviour each ---

    def tool_echo(self, id_) -> None:
        self.json(result(id_, "ok"))

    def tool_sse_echo(self, id_) -> None:
        self.sse(event(PROGRESS), event(result(id_, "ok")))

    def tool_cut(self, id_) -> None:
        """An SSE answer cut in the middle of its second event: the connection is reset."""
        whole = event(result(id_, "PARTIAL-SECRET-cut"))
        self.start_sse()
        self.chunk(event(PROGRESS))
        self.chunk(whole[: len(whole) // 2])
        self.reset()

    def tool_cut_eof(self, id_) -> None:
        """The same, on an event stream whose end is the end of the connection (no chunked encoding)."""
        whole = event(result(id_, "PARTIAL-SECRET-eof"))
        self.start_sse(chunked=False)
        self.wfile.write(event(PROGRESS) + whole[: len(whole) // 2])
        self.wfile.flush()

    def tool_hang(self, id_) -> None:
        """No answer at all until the test releases it."""
        self.server.hung.set()
        self.server.release.wait(GUARD)
        self.json(result(id_, "released"))

    def tool_hang_sse(self, id_) -> None:
        """An event stream that goes silent after its first event, until the test releases it."""
        self.start_sse()
        self.chunk(event(PROGRESS))
        self.server.hung.set()
        self.server.release.wait(GUARD)
        self.chunk(event(result(id_, "released")))
        self.end()

    def tool_huge_chunked(self, id_) -> None:
        """A JSON answer with no length that never ends: 64 MiB of one string, sent chunked."""
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            self.chunk(b'{"jsonrpc":"2.0","id":%d,"result":{"text":"LEAK-huge' % id_)
            piece = b"x" * (1 << 20)
            for _ in range(64):
                self.chunk(piece)
            self.chunk(b'"}}')
            self.end()
        except OSError:
            self.close_connection = True  # the gateway gave up on it: the point of the test

    # malformed answers: each carries a LEAK marker that must never reach the client

    def tool_bad_json(self, id_) -> None:
        self.json(None, raw=b'{"jsonrpc":"2.0","id":%d,"result":{"text":"LEAK-bad-json"' % id_)

    def tool_duplicate_keys(self, id_) -> None:
        self.json(None, raw=b'{"jsonrpc":"2.0","id":%d,"result":{},"result":{"text":"LEAK-duplicate"}}' % id_)

    def tool_not_json_type(self, id_) -> None:
        self.json(None, raw=b"<html><body>LEAK-html</body></html>", ctype="text/html")

    def tool_not_jsonrpc(self, id_) -> None:
        self.json({"text": "LEAK-not-jsonrpc", "id": id_})

    def tool_sse_not_json(self, id_) -> None:
        self.sse(b'data: {"jsonrpc":"2.0","id":%d,"result":LEAK-sse-not-json}\n\n' % id_)

    def tool_sse_not_jsonrpc(self, id_) -> None:
        self.sse(event({"text": "LEAK-sse-not-jsonrpc"}))

    def tool_sse_blank_line_inside(self, id_) -> None:
        """Bad framing: a blank line in the middle of the JSON splits one message into two events."""
        text = json.dumps(result(id_, "LEAK-sse-split")).encode()
        self.sse(b"data: " + text[:20] + b"\n\ndata: " + text[20:] + b"\n\n")

    def tool_sse_huge(self, id_) -> None:
        """One event larger than the gateway's sse_max_event_size (64 KiB in these tests)."""
        self.sse(event(PROGRESS), event(result(id_, "LEAK-sse-huge" + "H" * 200_000)))

    def tool_sse_u2028(self, id_) -> None:
        """An event whose `event:` field holds a U+2028 LINE SEPARATOR. Per the SSE spec only CR and LF end
        lines, so the gateway reads the type `x<U+2028>event: message`, not a message, and forwards the
        event unread. A client that splits lines as str.splitlines() does (httpx's Response.iter_lines, which
        httpx-sse used until its 0.4.2 fix, florimondmanca/httpx-sse#34) reads two `event:` lines, the last
        one `message`, and takes the JSON-RPC answer the gateway never checked."""
        data = json.dumps(result(id_, "LEAK-sse-u2028")).encode()
        self.sse("event: x\u2028event: message\n".encode() + b"data: " + data + b"\n\n")


class Upstream(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.seen: list[dict] = []  # every JSON-RPC message that reached the upstream
        self.sessions = 0
        self.conns: set[socket.socket] = set()
        self.hung = threading.Event()
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def calls(self) -> list:
        """The ids of the tools/call requests that reached the upstream, in order."""
        return [m.get("id") for m in self.seen if m.get("method") == "tools/call"]

    def down(self) -> None:
        """Stop listening and drop every open connection: the upstream is gone."""
        self.shutdown()
        self.server_close()
        for conn in list(self.conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.close()


@contextlib.contextmanager
def upstream() -> Iterator[Upstream]:
    srv = Upstream()
    thread = threading.Thread(target=srv.serve_forever, name="faulty-upstream", daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.release.set()
        if thread.is_alive():
            srv.down()
        thread.join(GUARD)


# --- client helpers ---------------------------------------------------------------------------------------


def call(client: httpx.Client, url: str, tool: str, id_: int, session: str | None = None,
         token: str | None = None) -> httpx.Response:
    headers = dict(ACCEPT)
    if session:
        headers["mcp-session-id"] = session
    if token:
        headers["authorization"] = f"Bearer {token}"
    return client.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": id_, "method": "tools/call",
                                           "params": {"name": tool, "arguments": {}}}, headers=headers)


def initialize(client: httpx.Client, url: str) -> str:
    r = client.post(f"{url}/mcp", headers=ACCEPT, json={
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "f", "version": "1"}}})
    assert r.status_code == 200, r.text
    return r.headers["mcp-session-id"]


def rpc_error(r: httpx.Response, id_) -> dict:
    """The JSON-RPC error the gateway answered for request `id_` (fails if the body is anything else)."""
    assert r.headers.get("content-type", "").startswith("application/json"), (r.status_code, r.text[:300])
    body = r.json()
    assert body["jsonrpc"] == "2.0" and body["id"] == id_ and "result" not in body, body
    return body["error"]


def events(raw: bytes) -> list[dict]:
    """The JSON-RPC messages of a complete event stream, as a conforming SSE client reads them."""
    return [json.loads(e.data) for e in SSEParser(len(raw) + 1).feed(raw) if e.has_data and e.event == "message"]


def until(predicate: Callable[[], object], timeout: float = GUARD, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def audit_verify(log: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "audit"), "verify", str(log)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "BASTION_AUDIT_KEY": AUDIT_KEY}, cwd=ROOT)


def audit_records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def recorded_flows(directory: Path) -> list:
    """Every flow of every recording in `directory`; raises if a file does not read back."""
    flows = []
    for path in sorted(directory.glob("*.mitm")) if directory.exists() else []:
        with open(path, "rb") as f:
            flows.extend(mitmio.FlowReader(f).stream())
    return flows


def request_id(flow):
    """The JSON-RPC id of a recorded flow's request, or None."""
    try:
        body = json.loads(flow.request.content or b"null")
    except ValueError:
        return None
    return body.get("id") if isinstance(body, dict) else None


def recorded_ids(directory: Path) -> list:
    return [request_id(f) for f in recorded_flows(directory)]


# --- the gateway in front of the scripted upstream, shared by the upstream-fault tests ---------------------


@dataclass
class Stack:
    up: Upstream
    gw: object  # harness.Proc
    tmp: Path
    records: Path = field(init=False)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.records = self.tmp / "sessions"
        self.log = self.tmp / "audit.jsonl"

    @property
    def url(self) -> str:
        return self.gw.url

    def audited(self, id_, timeout: float = 5.0) -> list[dict]:
        """The audit records of the client's request `id_` (they are written once the flow ends)."""
        return until(lambda: [r for r in audit_records(self.log) if r.get("id") == id_
                              and r.get("direction") == "client_to_server"], timeout) or []


def recording_options(tmp: Path) -> dict:
    return {"record_dir": str(tmp / "sessions"), "audit_log": str(tmp / "audit.jsonl")}


@contextlib.contextmanager
def bastion(upstream_url: str, options: dict) -> Iterator:
    """harness.running(mitmdump with the bundle), with the audit key in its environment."""
    port = free_port()
    with running(mitmdump_args(upstream_url, port, options), port, env={"BASTION_AUDIT_KEY": AUDIT_KEY}) as gw:
        yield gw


@contextlib.contextmanager
def recording_stack(tmp: Path, **options) -> Iterator[Stack]:
    """The scripted upstream behind a gateway that records to `tmp`/sessions and audits to `tmp`/audit.jsonl."""
    with upstream() as up, bastion(up.url, {**recording_options(tmp), **options}) as gw:
        yield Stack(up, gw, tmp)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    with recording_stack(tmp_path_factory.mktemp("faults"), sse_max_event_size="64k") as s:
        yield s


_ids = iter(range(100, 100_000))


def next_id() -> int:
    return next(_ids)


# --- upstream down ------------------------------------------------------------------------------------


def test_upstream_down_gets_a_json_rpc_error_and_the_records_verify(tmp_path):
    dead = free_port()  # nothing listens there: connection refused
    with bastion(f"http://127.0.0.1:{dead}", recording_options(tmp_path)) as gw, \
            httpx.Client(timeout=GUARD) as c1, httpx.Client(timeout=GUARD) as c2:
        answers = [(1, call(c1, gw.url, "echo", 1)), (2, call(c1, gw.url, "echo", 2)), (3, call(c2, gw.url, "echo", 3))]
    for id_, r in answers:
        assert r.status_code == 502
        err = rpc_error(r, id_)
        assert err["code"] == -31011 and err["data"]["reason"] == "upstream_unreachable"
        assert str(dead) not in r.text  # where the upstream lives stays in the gateway's log
    verify = audit_verify(tmp_path / "audit.jsonl")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    records = {r.get("id"): r for r in audit_records(tmp_path / "audit.jsonl")}
    assert {1, 2, 3} <= set(records)
    assert all(records[i]["status"] == 502 and records[i]["action"] == "error" for i in (1, 2, 3))
    flows = recorded_flows(tmp_path / "sessions")
    assert sorted(i for i in recorded_ids(tmp_path / "sessions") if i in (1, 2, 3)) == [1, 2, 3]
    assert all(f.response.status_code == 502 for f in flows)


def test_upstream_dying_between_two_requests_of_one_connection_gets_a_json_rpc_error():
    with upstream() as up, gateway(up.url) as gw, httpx.Client(timeout=GUARD) as client:
        assert call(client, gw.url, "echo", 1).status_code == 200
        port = up.server_address[1]
        up.down()
        r = call(client, gw.url, "echo", 2)
    assert r.status_code == 502
    assert str(port) not in r.text
    err = rpc_error(r, 2)
    assert err["code"] == -31011


# --- upstream cut mid-stream ----------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["cut", "cut_eof"])
def test_an_answer_cut_mid_event_is_not_delivered_in_part(stack, tool):
    """The upstream sends one event, half of the next, then the connection ends (reset, or EOF on a
    close-delimited stream): the client gets the first event whole and nothing of the half one."""
    id_ = next_id()
    got = bytearray()
    with httpx.Client(timeout=GUARD) as client:
        with client.stream("POST", f"{stack.url}/mcp", headers=ACCEPT, json={
                "jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": tool}}) as r:
            assert r.status_code == 200
            with contextlib.suppress(httpx.TransportError):  # a reset upstream may end the client's body abruptly
                for piece in r.iter_raw():
                    got += piece
    assert b"PARTIAL-SECRET" not in got
    assert bytes(got).startswith(event(PROGRESS))
    parser = SSEParser(len(got) + 1)
    blocks = list(parser.feed(bytes(got)))
    assert parser.close() == b"", "an unfinished event reached the client"
    for block in blocks:  # every event the client got is a whole, readable JSON-RPC message
        if block.has_data:
            assert json.loads(block.data)["jsonrpc"] == "2.0"
    assert [m.get("method") for m in events(bytes(got))][:1] == ["notifications/progress"]
    (record,) = stack.audited(id_)
    assert record["tool"] == tool
    if tool == "cut":
        assert record.get("error"), record  # the broken transfer is in the audit log
    verify = audit_verify(stack.log)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    (flow,) = [f for f in recorded_flows(stack.records) if request_id(f) == id_]
    assert b"PARTIAL-SECRET" not in (flow.response.raw_content or b"")


# --- upstream hanging -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["hang", "hang_sse"])
def test_a_hanging_upstream_does_not_hold_up_other_sessions(stack, tool):
    stack.up.hung.clear()
    stack.up.release.clear()
    id_ = next_id()
    outcome: dict = {}

    def hanging_client() -> None:
        try:
            with httpx.Client(timeout=GUARD) as client:
                r = call(client, stack.url, tool, id_)
                outcome["status"] = r.status_code
                outcome["body"] = r.content
        except Exception as e:  # reported by the assertions below
            outcome["error"] = repr(e)

    t = threading.Thread(target=hanging_client, daemon=True)
    t.start()
    try:
        assert stack.up.hung.wait(GUARD), "the hanging call never reached the upstream"
        started = time.monotonic()
        with httpx.Client(timeout=5.0) as other:  # a second caller, on its own connection and session
            session = initialize(other, stack.url)
            second = next_id()
            r = call(other, stack.url, "sse_echo", second, session=session)
        elapsed = time.monotonic() - started
        assert r.status_code == 200 and events(r.content)[-1] == result(second, "ok")
        assert elapsed < 5.0
        assert t.is_alive(), f"the hanging call ended early: {outcome}"
    finally:
        stack.up.release.set()
        t.join(GUARD)
    assert not t.is_alive()
    assert outcome.get("status") == 200, outcome
    assert b'"released"' in outcome["body"]  # the held call still got its own answer once the upstream spoke


# --- malformed answers ------------------------------------------------------------------------------------


JSON_FAULTS = ["bad_json", "duplicate_keys", "not_json_type", "not_jsonrpc"]
SSE_FAULTS = ["sse_not_json", "sse_not_jsonrpc", "sse_blank_line_inside", "sse_huge", "sse_u2028"]


def splitlines_client(raw: bytes) -> list[dict]:
    """The JSON-RPC messages a client reads when it takes its lines from httpx's Response.iter_lines()
    (str.splitlines() semantics), as httpx-sse did before 0.4.2."""
    out, etype, data = [], "message", []
    for line in [*httpx.Response(200, content=raw).iter_lines(), ""]:
        if not line:
            if data and etype == "message":
                with contextlib.suppress(ValueError):
                    out.append(json.loads("\n".join(data)))
            etype, data = "message", []
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            etype = value or "message"
        elif name == "data":
            data.append(value)
    return out


@pytest.mark.parametrize("tool", JSON_FAULTS)
def test_a_malformed_json_answer_is_withheld(stack, tool):
    id_ = next_id()
    with httpx.Client(timeout=GUARD) as client:
        r = call(client, stack.url, tool, id_)
    assert id_ in stack.up.calls()  # the call went out; its answer is what is broken
    assert b"LEAK" not in r.content
    assert r.status_code == 502
    err = rpc_error(r, id_)
    assert err["code"] == -31011
    (record,) = stack.audited(id_)
    assert (record["status"], record["action"], record["stage"]) == (502, "error", "resp:parse")


@pytest.mark.parametrize("tool", SSE_FAULTS)
def test_a_malformed_event_stream_ends_with_an_error_and_nothing_unread(stack, tool):
    id_ = next_id()
    with httpx.Client(timeout=GUARD) as client:
        r = call(client, stack.url, tool, id_)
    assert id_ in stack.up.calls()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert not [m for m in splitlines_client(r.content) if "LEAK" in json.dumps(m)]
    assert b"LEAK" not in r.content
    messages = events(r.content)
    assert messages, r.content
    assert messages[-1]["id"] == id_ and messages[-1]["error"]["code"] == -31010
    assert all("result" not in m for m in messages)
    (record,) = stack.audited(id_)
    assert record.get("error") or record["rpc"] == "error" or record["action"] == "error", record


# --- the identity provider ------------------------------------------------------------------------------


class Issuer:
    """An OpenID issuer on 127.0.0.1:`port`: discovery and JWKS only, started and stopped at will.

    Keys are RS256, named by kid; `published` is what the JWKS lists; `jwks_fetches` counts its fetches.
    Tokens are minted here directly (no token endpoint is needed to test the gateway's checks).
    """

    def __init__(self, port: int | None = None, max_age: int = 300):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.max_age = max_age
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.published: list[str] = []
        self.jwks_fetches = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add_key(self, kid: str, publish: bool = True) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if publish:
            self.published.append(kid)

    def jwks(self) -> dict:
        keys = []
        for kid in self.published:
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.keys[kid].public_key(), as_dict=True)
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": keys}

    def token(self, kid: str, audience: str, sub: str = "alice") -> str:
        now = int(time.time())
        claims = {"iss": self.url, "sub": sub, "aud": audience, "iat": now, "nbf": now, "exp": now + 600,
                  "jti": uuid.uuid4().hex, "groups": ["engineering"], "scope": "mcp:tools"}
        return jwt.encode(claims, self.keys[kid], algorithm="RS256", headers={"kid": kid, "typ": "at+jwt"})

    def start(self) -> Issuer:
        issuer = self

        class IssuerHandler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/.well-known/openid-configuration":
                    doc = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks"}
                elif path == "/jwks":
                    issuer.jwks_fetches += 1
                    doc = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.send_header("cache-control", f"public, max-age={issuer.max_age}")
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), IssuerHandler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faults-issuer", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(GUARD)
            self._server = None


@contextlib.contextmanager
def identity_stack(issuer: Issuer, **options) -> Iterator[tuple[Upstream, object, str]]:
    """The scripted upstream behind a gateway that trusts `issuer`; yields (upstream, gateway, audience)."""
    port = free_port()
    audience = f"http://127.0.0.1:{port}/mcp"
    opts = {"oidc_issuer": issuer.url, "oidc_resource": audience, "oidc_jwks_min_refresh": 1, **options}
    try:
        with upstream() as up, running(mitmdump_args(up.url, port, opts), port) as gw:
            yield up, gw, audience
    finally:
        issuer.stop()


def identity_call(gw, token: str, id_: int) -> httpx.Response:
    with httpx.Client(timeout=GUARD) as client:
        return call(client, gw.url, "echo", id_, token=token)


def assert_keys_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after")
    err = rpc_error(r, None)  # Auth answers from the headers, before the body (and its id) is read
    assert err["code"] == -31010 and err["data"]["reason"] == "keys_unavailable"


def test_issuer_down_at_start_fails_closed_then_recovers_when_it_is_back():
    issuer = Issuer()
    issuer.add_key("k1")
    with identity_stack(issuer) as (up, gw, audience):
        assert until(lambda: "cannot fetch the signing keys" in gw.output()), gw.output()
        token = issuer.token("k1", audience)
        assert_keys_unavailable(identity_call(gw, token, 1))
        time.sleep(1.2)  # past oidc_jwks_min_refresh: this time the gateway tries the issuer again, and fails
        assert_keys_unavailable(identity_call(gw, token, 2))
        assert up.seen == []  # nothing was forwarded

        issuer.start()
        time.sleep(1.2)
        r = identity_call(gw, token, 3)
        assert r.status_code == 200 and r.json() == result(3, "ok")
        assert up.calls() == [3] and issuer.jwks_fetches == 1


def test_issuer_down_mid_run_cached_keys_keep_working_within_their_lifetime():
    issuer = Issuer(max_age=300)
    issuer.add_key("k1")
    issuer.add_key("k-never-published", publish=False)
    issuer.start()
    with identity_stack(issuer) as (up, gw, audience):
        assert until(lambda: f"issuer {issuer.url}:" in gw.output()), gw.output()
        assert identity_call(gw, issuer.token("k1", audience), 1).status_code == 200
        issuer.stop()
        time.sleep(1.2)  # a refresh would be allowed now: the gateway must not need one
        fresh = issuer.token("k1", audience, sub="bob")  # never seen: verified with the cached keys
        r = identity_call(gw, fresh, 2)
        assert r.status_code == 200 and r.json() == result(2, "ok")
        # A kid the gateway does not know: it tries the (dead) issuer, and refuses.
        r = identity_call(gw, issuer.token("k-never-published", audience), 3)
        assert r.status_code in (401, 503)
        assert rpc_error(r, None)["code"] in (-31004, -31010)
        assert up.calls() == [1, 2]


def test_issuer_down_past_the_stale_limit_fails_closed():
    """Keys of 1 s lifetime, oidc_jwks_max_stale=2: stale keys serve while the issuer is down, then 503."""
    issuer = Issuer(max_age=1)
    issuer.add_key("k1")
    issuer.start()
    with identity_stack(issuer, oidc_jwks_max_stale=2) as (up, gw, audience):
        assert until(lambda: f"issuer {issuer.url}:" in gw.output(), every=0.01), gw.output()
        fetched = time.monotonic()  # at most this late: the keys expire by fetched + 1, are stale until + 3
        assert identity_call(gw, issuer.token("k1", audience), 1).status_code == 200
        issuer.stop()
        time.sleep(max(0.0, fetched + 1.4 - time.monotonic()))
        r = identity_call(gw, issuer.token("k1", audience, sub="bob"), 2)
        assert r.status_code == 200, r.text  # expired, the refresh failed, still within max_stale
        time.sleep(max(0.0, fetched + 3.5 - time.monotonic()))
        assert_keys_unavailable(identity_call(gw, issuer.token("k1", audience, sub="carol"), 3))
        assert up.calls() == [1, 2]


def test_rotated_keys_are_fetched_when_a_token_names_an_unknown_kid():
    issuer = Issuer(max_age=300)
    issuer.add_key("k1")
    issuer.start()
    with identity_stack(issuer) as (up, gw, audience):
        assert until(lambda: f"issuer {issuer.url}:" in gw.output()), gw.output()
        old = issuer.token("k1", audience)
        assert identity_call(gw, old, 1).status_code == 200
        fetches = issuer.jwks_fetches
        issuer.add_key("k2")  # the issuer rotates: k2 signs from now on, k1 is still published
        time.sleep(1.2)  # past oidc_jwks_min_refresh
        r = identity_call(gw, issuer.token("k2", audience), 2)
        assert r.status_code == 200, r.text
        assert issuer.jwks_fetches == fetches + 1  # the unknown kid made the gateway fetch the JWKS again
        assert identity_call(gw, old, 3).status_code == 200
        assert up.calls() == [1, 2, 3]


# --- a full disk --------------------------------------------------------------------------------------------


FILE_LIMIT = 24 * 1024  # bytes any file the gateway writes may reach (RLIMIT_FSIZE)
HOLD = 5.0  # seconds new requests were refused after a failed write, before "until a write succeeds again"


@contextlib.contextmanager
def size_limited_gateway(upstream_url: str, options: dict, limit: int) -> Iterator[PipedProc]:
    """mitmdump with the bundle under RLIMIT_FSIZE=`limit`, SIGXFSZ ignored: a write past the limit
    fails with EFBIG, as on a full disk. Its output goes through a pipe (a log file would be limited too)."""

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    port = free_port()
    proc = subprocess.Popen(mitmdump_args(upstream_url, port, options), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=limit_files, cwd=ROOT, start_new_session=True,
                            env={**os.environ, "BASTION_AUDIT_KEY": AUDIT_KEY})
    p = PipedProc(proc, port)
    try:
        wait_port(port, 30, proc)
        yield p
    finally:
        p.stop()


class PipedProc:
    """A started mitmdump whose output is read from a pipe (see size_limited_gateway)."""

    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[bytes] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self._reader.start()

    def output(self) -> str:
        return b"".join(self.lines).decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._reader.join(5)


@dataclass
class FullDisk:
    writer: str  # "audit" or "record": which writer the full disk stops
    up: Upstream
    gw: PipedProc
    tmp: Path
    client: httpx.Client
    session: str = ""
    first_failure: httpx.Response | None = None  # the answer to the call whose write failed first
    failed_id: int | None = None
    last_call: float = 0.0  # time.monotonic() of the last call through this gateway

    def call(self, id_: int) -> httpx.Response:
        try:
            return call(self.client, self.gw.url, "echo", id_, session=self.session)
        finally:
            self.last_call = time.monotonic()

    def fill(self) -> None:
        """Call until a write fails (a refused call, or the gateway logging a failed write)."""
        self.session = initialize(self.client, self.gw.url)  # one session: one recording file that fills up
        answers = {}
        for id_ in range(1, 500):
            answers[id_] = self.call(id_)
            if answers[id_].status_code != 200 or "FAILED" in self.gw.output():  # RECORDING / AUDIT LOG WRITE FAILED
                break
        else:
            pytest.fail(f"no write failed under a {FILE_LIMIT}-byte file limit:\n{self.gw.output()[-3000:]}")
        assert until(lambda: "FAILED" in self.gw.output(), 5.0), self.gw.output()[-3000:]
        self.failed_id = self.up.calls()[-1]  # the last call that went out is the one whose write failed
        self.first_failure = answers[self.failed_id]


@pytest.fixture(scope="module")
def full_disks(tmp_path_factory) -> Iterator[dict[str, FullDisk]]:
    """Two gateways under the file-size limit, filled until a write fails: one whose audit log fills up,
    one whose recording does. Both at once, so that their waits past the old hold overlap."""
    disks = {}
    with contextlib.ExitStack() as es:
        for writer in ("audit", "record"):
            tmp = tmp_path_factory.mktemp(f"full-{writer}")
            options = ({"audit_log": str(tmp / "audit.jsonl")} if writer == "audit"
                       else {"record_dir": str(tmp / "sessions")})
            up = es.enter_context(upstream())
            gw = es.enter_context(size_limited_gateway(up.url, options, FILE_LIMIT))
            disks[writer] = FullDisk(writer, up, gw, tmp, es.enter_context(httpx.Client(timeout=GUARD)))
            disks[writer].fill()
        yield disks


@pytest.fixture(params=["audit", "record"])
def full_disk(request, full_disks) -> FullDisk:
    return full_disks[request.param]


def test_disk_full_refuses_new_requests_and_forwards_nothing(full_disk):
    d = full_disk
    forwarded = d.up.calls()
    assert forwarded[-1] == d.failed_id  # the call in flight when the disk filled went out (write after)
    for id_ in (1001, 1002, 1003):
        r = d.call(id_)
        assert r.status_code in (502, 503), r.text
        assert rpc_error(r, id_)["code"] == -31010
    assert d.up.calls() == forwarded, "a request went to the upstream while its records could not be written"
    if d.writer == "audit":
        verify = audit_verify(d.tmp / "audit.jsonl")
        assert verify.returncode == 0, verify.stdout + verify.stderr  # the failed appends were rolled back
        audited = {r.get("id") for r in audit_records(d.tmp / "audit.jsonl")}
        assert set(forwarded) - audited <= {d.failed_id}  # only the one in flight when writes began to fail
    else:
        assert d.first_failure.status_code == 502  # its answer was withheld: it could not be recorded
        ids = recorded_ids(d.tmp / "sessions")  # every file still reads back (failed appends rolled back)
        assert set(forwarded) - set(ids) == {d.failed_id}


def test_disk_full_refusal_is_503_with_retry_after(full_disk):
    d = full_disk
    r = d.call(2001)
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after")
    assert rpc_error(r, 2001)["data"]["reason"] == d.writer


def test_disk_full_still_refused_after_the_hold(full_disk):
    d = full_disk
    before = d.up.calls()
    time.sleep(max(0.0, d.last_call + HOLD + 0.6 - time.monotonic()))  # no traffic for longer than the hold
    r = d.call(3001)
    assert d.up.calls() == before, "forwarded while the disk is still full"
    assert r.status_code in (502, 503) and rpc_error(r, 3001)["code"] == -31010


# --- the recording directory removed mid-run ------------------------------------------------------------------


def test_record_dir_removed_no_unrecorded_answer_reaches_a_new_session(tmp_path):
    with recording_stack(tmp_path) as s, httpx.Client(timeout=GUARD) as c1:
        session = initialize(c1, s.url)
        assert call(c1, s.url, "echo", 1, session=session).status_code == 200
        shutil.rmtree(s.records)
        answers = []
        for id_ in (2, 3, 4):
            with httpx.Client(timeout=GUARD) as fresh:  # a new connection: a new (connection) session
                answers.append((id_, call(fresh, s.url, "echo", id_)))
        forwarded = s.up.calls()
    recorded = recorded_ids(s.records)  # the gateway recreated the directory: what it answered is in it
    for id_, r in answers:
        if r.status_code == 200:
            assert id_ in recorded and id_ in forwarded, (id_, recorded)
        else:  # no upstream answer the gateway could not record
            assert r.status_code in (502, 503) and rpc_error(r, id_)["code"] == -31010, (id_, r.text)
    assert set(forwarded) - {1} <= set(recorded)
    assert [r["id"] for r in audit_records(s.log) if r.get("id") in (2, 3, 4) and r["kind"] != "forward"] == [2, 3, 4]
    assert audit_verify(s.log).returncode == 0


def test_record_dir_removed_a_new_session_is_refused_or_recorded(tmp_path):
    with recording_stack(tmp_path) as s, httpx.Client(timeout=GUARD) as client:
        assert call(client, s.url, "echo", 1).status_code == 200
        shutil.rmtree(s.records)
        with httpx.Client(timeout=GUARD) as fresh:
            r = call(fresh, s.url, "echo", 2)
        if 2 in s.up.calls():  # forwarded: then it must be recorded, in a recreated directory
            assert r.status_code == 200 and 2 in recorded_ids(s.records)
        else:
            assert r.status_code == 503 and rpc_error(r, 2)["code"] == -31010


def test_record_dir_removed_an_open_session_is_refused_or_recorded(tmp_path):
    """(Each such write also counts as a success, which clears the Recorder's failure state: a new
    session's request refused a moment before is admitted again, and reaches the upstream.)"""
    with recording_stack(tmp_path) as s, httpx.Client(timeout=GUARD) as client:
        session = initialize(client, s.url)
        assert call(client, s.url, "echo", 1, session=session).status_code == 200
        shutil.rmtree(s.records)
        r = call(client, s.url, "echo", 2, session=session)
        s.gw.stop()  # every open recording is closed: what is on disk is all there is
    if 2 in s.up.calls():
        assert r.status_code == 200 and 2 in recorded_ids(s.records), "forwarded and not recorded"
    else:
        assert r.status_code in (502, 503) and rpc_error(r, 2)["code"] == -31010


# --- the ruleset file deleted or truncated -----------------------------------------------------------------------


RULESET = """\
version: 1
default: deny
rules:
  - id: no-danger
    description: the dangerous tool is denied to everyone
    match: {tools: [danger]}
    action: deny
    reason: too dangerous
  - id: echo-only
    description: only the echo tool may be called
    match: {methods: [tools/call], tools: [echo]}
    action: allow
"""


def _delete(path: Path) -> str:
    path.unlink()
    return "cannot be read"


def _empty(path: Path) -> str:
    path.write_text("")
    return "edit refused"


def _cut_mid_rule(path: Path) -> str:
    text = RULESET
    path.write_text(text[: text.index("match: {methods") + 12])  # ends inside a flow mapping
    return "edit refused"


def _not_utf8(path: Path) -> str:
    path.write_bytes(b"version: 1\ndefault: allow\nrules: []\n\xff\xfe")
    return "edit refused"


@pytest.mark.parametrize("edit", [_delete, _empty, _cut_mid_rule, _not_utf8],
                         ids=["deleted", "emptied", "truncated-mid-rule", "not-utf8"])
def test_a_broken_ruleset_file_keeps_the_last_good_ruleset(tmp_path, edit):
    ruleset = tmp_path / "ruleset.yaml"
    ruleset.write_text(RULESET)
    with upstream() as up, gateway(up.url, {"ruleset": str(ruleset)}) as gw, \
            httpx.Client(timeout=GUARD) as client:

        def check(id_: int, tool: str) -> dict:
            r = call(client, gw.url, tool, id_)
            return r.json()

        assert check(1, "echo") == result(1, "ok")
        assert check(2, "danger")["error"]["data"]["rule"] == "no-danger"
        assert check(3, "other")["error"]["data"]["rule"] == "bastion:default"
        logged = edit(ruleset)
        assert until(lambda: logged in gw.output()), gw.output()[-2000:]
        assert check(4, "echo") == result(4, "ok")  # the last good ruleset is still in force
        assert check(5, "danger")["error"]["data"]["rule"] == "no-danger"  # ... with its denials
        assert check(6, "other")["error"]["data"]["rule"] == "bastion:default"  # ... and its default
        assert up.calls() == [1, 4]

        # The watcher is still alive: a valid file takes effect again.
        ruleset.write_text(RULESET.replace("tools: [echo]", "tools: [other]"))
        assert until(lambda: gw.output().count("reloaded") >= 1), gw.output()[-2000:]
        assert check(7, "echo")["error"]["data"]["rule"] == "bastion:default"
        assert up.calls() == [1, 4]


def test_a_chunked_answer_without_end_is_cut_at_the_limit_not_buffered_whole(stack):
    """mitmproxy would buffer the whole body before any hook runs: the bundle bounds it (body_size_limit)."""
    id_ = next_id()
    peak_before = rss_mib(stack.gw.proc.pid, "VmHWM")
    with httpx.Client(timeout=GUARD) as client:
        r = call(client, stack.url, "huge_chunked", id_)
        assert r.status_code == 502 and b"LEAK" not in r.content
        assert len(r.content) < 64 * 1024
        assert call(client, stack.url, "echo", next_id()).status_code == 200  # and it keeps serving
    # 64 MiB were sent; buffering them whole would raise the peak by well over that (about 130 MiB);
    # body_size_limit (32 MiB here) ends the exchange first
    assert rss_mib(stack.gw.proc.pid, "VmHWM") - peak_before < 56


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


# --- the gateway killed mid-call ---------------------------------------------------------------------------


def test_a_call_in_flight_when_the_gateway_is_killed_is_reported_at_the_next_start(tmp_path):
    """SIGKILL while the upstream works on a call: the next start names it in the audit log and the recording."""
    with upstream() as up:
        port = free_port()
        args = mitmdump_args(up.url, port, recording_options(tmp_path))
        env = {"BASTION_AUDIT_KEY": AUDIT_KEY}
        outcome: dict = {}
        with running(args, port, env=env) as gw:
            with httpx.Client(timeout=GUARD) as client:
                assert call(client, gw.url, "echo", 1).status_code == 200

            def hanging_client() -> None:
                try:
                    with httpx.Client(timeout=GUARD) as c:
                        outcome["response"] = call(c, gw.url, "hang", 2)
                except httpx.HTTPError as e:
                    outcome["error"] = repr(e)

            t = threading.Thread(target=hanging_client, daemon=True)
            t.start()
            assert up.hung.wait(GUARD), "the call never reached the upstream"
            os.kill(gw.proc.pid, signal.SIGKILL)  # no shutdown hook runs
            gw.proc.wait(10)
            t.join(GUARD)
        assert "error" in outcome  # the client lost its connection, not an answer
        forward = [r for r in audit_records(tmp_path / "audit.jsonl") if r["kind"] == "forward"]
        assert [m["id"] for r in forward for m in r["messages"]] == [1, 2]  # written before it was forwarded
        assert 2 not in recorded_ids(tmp_path / "sessions")  # a session file gets a flow only when it ends
        with running(args, port, env=env) as gw, httpx.Client(timeout=GUARD) as client:
            assert call(client, gw.url, "echo", 3).status_code == 200
        up.release.set()
    records = audit_records(tmp_path / "audit.jsonl")
    (incomplete,) = [r for r in records if r["action"] == "incomplete"]
    hung_flow = forward[1]["flow"]
    assert incomplete["flows"] == [hung_flow]
    assert audit_verify(tmp_path / "audit.jsonl").returncode == 0
    (flow,) = [f for f in recorded_flows(tmp_path / "sessions") if request_id(f) == 2]
    assert flow.id == hung_flow and flow.response is None
    assert "killed or crashed" in flow.metadata["bastion.record"]["incomplete"]


# --- a bug in one of the bundle's hooks (the real mitmdump) -------------------------------------------------

FAULT_SCRIPT = '''\
"""Loaded after the bundle: once running, one part's hook raises, as a bug would."""
from mitmproxy import ctx


def _boom(*args):
    raise RuntimeError("an injected bug")


class Fault:
    def running(self):
        bundle = ctx.master.addons.get("mcp-bastion")
        part = next(p for p in bundle.parts if type(p).__name__ == "{cls}")
        setattr(part, "{hook}", _boom)
        bundle.rebuild()


addons = [Fault()]
'''


@pytest.mark.parametrize("cls, hook", [("Pinning", "request"), ("Approvals", "request"), ("Gate", "request"),
                                       ("Sessions", "responseheaders"), ("Recorder", "response")])
def test_a_hook_that_raises_in_real_mitmdump_fails_closed_and_is_audited(tmp_path, cls, hook):
    """mitmproxy alone would log the error, skip the rest of the bundle (the Gate too) and forward the request."""
    fault = tmp_path / "fault.py"
    fault.write_text(FAULT_SCRIPT.format(cls=cls, hook=hook))
    port = free_port()
    with upstream() as up:
        args = mitmdump_args(up.url, port, recording_options(tmp_path), extra=["-s", str(fault)])
        with running(args, port, env={"BASTION_AUDIT_KEY": AUDIT_KEY}) as gw, httpx.Client(timeout=GUARD) as c:
            # mitmdump exits on an error logged while it starts (its error check): the injected one must come after
            time.sleep(1.5)
            try:
                r = call(c, gw.url, "echo", 7)
            except httpx.HTTPError:
                raise AssertionError(gw.output()) from None
            body = r.json()
            where = f"{cls.lower()}.{hook}" if hook.startswith("request") else f"resp:{cls.lower()}.{hook}"
            assert body["id"] == 7 and body["error"]["data"]["stage"] == where, body
            forwarded = [m for m in up.seen if m.get("method") == "tools/call"]
            if hook == "request":
                assert forwarded == [] and r.status_code == 500  # nothing reached the upstream
            else:
                assert len(forwarded) == 1 and r.status_code == 502  # its answer was withheld
                assert "result" not in body
            records = until(lambda: [x for x in audit_records(tmp_path / "audit.jsonl")
                                     if x.get("id") == 7 and x.get("action") == "error"], 5.0)
            assert records, audit_records(tmp_path / "audit.jsonl")
    assert audit_verify(tmp_path / "audit.jsonl").returncode == 0


def test_the_bundle_refuses_to_start_behind_a_script_with_flow_hooks(tmp_path):
    """mitmproxy skips every script after one whose hook raises: a script before the bundle could bypass it."""
    other = tmp_path / "other.py"
    other.write_text("def request(flow):\n    pass\n")
    quiet = tmp_path / "quiet.py"  # no flow hooks (a log handler, say): it may come first
    quiet.write_text("import logging\nlogging.getLogger('x')\n")
    args = mitmdump_args("http://127.0.0.1:9", free_port(), recording_options(tmp_path))
    args[1:1] = ["-s", str(quiet), "-s", str(other)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, env={**os.environ,
                                                                               "BASTION_AUDIT_KEY": AUDIT_KEY})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert f"before {other}, whose addons have flow hooks (request)" in out
    assert str(quiet) not in out.split("whose addons")[0].split("before")[-1]


def test_a_script_without_flow_hooks_may_come_before_the_bundle(tmp_path):
    quiet = tmp_path / "quiet.py"
    quiet.write_text("import logging\nlogging.getLogger('x')\n")
    with upstream() as up:
        port = free_port()
        args = mitmdump_args(up.url, port, recording_options(tmp_path))
        args[1:1] = ["-s", str(quiet)]
        with running(args, port, env={"BASTION_AUDIT_KEY": AUDIT_KEY}) as gw, httpx.Client(timeout=GUARD) as c:
            assert call(c, gw.url, "echo", 8).json()["result"]
