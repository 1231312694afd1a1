"""
A fast MCP upstream for the benchmarks: a raw asyncio HTTP/1.1 server that
speaks just enough MCP streamable HTTP (POST /mcp, keep-alive) that it is never
the bottleneck of a measurement.

    .venv/bin/python scripts/bastion_dev/bench_upstream.py --port 8000

`initialize` answers with a new session id (as a real server does: a gateway
that keeps state per session must see each one), notifications get 202,
`tools/list` lists the tools below, and `tools/call` runs one of them:

- `small`: a JSON result of about 100 bytes.
- `large`: a JSON result whose text is `arguments.bytes` long (default 1 MiB).
- `sse`: an SSE response: a `notifications/progress` event at once, then the
  result `arguments.gap_ms` later (default 0). The gap makes a proxy that
  buffers the stream visible in the time to first event.
- `stream`: an SSE response of `arguments.bytes` (default 100 MiB) of
  `notifications/message` events of `arguments.event_bytes` each, then the
  result. The `x-bench-body-bytes` header gives the exact body length.

Bodies are built once and cached; writes respect the transport's flow control,
so a 100 MiB stream never sits in this process's memory either.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import uuid
from typing import Any

TOOLS = [
    {"name": "small", "description": "A small JSON result.", "inputSchema": {"type": "object"}},
    {"name": "large", "description": "A large JSON result.",
     "inputSchema": {"type": "object", "properties": {"bytes": {"type": "integer"}}}},
    {"name": "sse", "description": "A result sent as an event stream.",
     "inputSchema": {"type": "object", "properties": {"gap_ms": {"type": "number"}}}},
    {"name": "stream", "description": "A long event stream.",
     "inputSchema": {"type": "object",
                     "properties": {"bytes": {"type": "integer"}, "event_bytes": {"type": "integer"}}}},
]

# Plain log-like text without personal data: what most traffic looks like.
_LINE = "2025-01-01T12:00:00Z info worker-7 processed batch 4711 of 9000 in 12.5 ms (queue depth 3)\n"
CHUNK_TARGET = 64 * 1024  # bytes of SSE written per HTTP chunk in a stream


@functools.lru_cache(maxsize=16)
def filler(size: int) -> str:
    return (_LINE * (size // len(_LINE) + 1))[:size]


def rpc_result(msg_id: Any, result: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": msg_id, "result": result}, separators=(",", ":")).encode()


def text_result(msg_id: Any, text: str) -> bytes:
    return rpc_result(msg_id, {"content": [{"type": "text", "text": text}], "isError": False})


@functools.lru_cache(maxsize=8)
def large_result(size: int) -> bytes:
    """The encoded `result` member of a large answer (built once: the upstream must not be the bottleneck)."""
    return json.dumps({"content": [{"type": "text", "text": filler(size)}], "isError": False},
                      separators=(",", ":")).encode()


def sse_block(data: bytes) -> bytes:
    return b"event: message\ndata: " + data + b"\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


@functools.lru_cache(maxsize=8)
def stream_chunk(event_bytes: int) -> tuple[bytes, int, int]:
    """One HTTP chunk holding as many whole log events as fit in CHUNK_TARGET: (chunk, SSE bytes, events)."""
    note = json.dumps(
        {"jsonrpc": "2.0", "method": "notifications/message",
         "params": {"level": "info", "logger": "bench", "data": filler(event_bytes)}},
        separators=(",", ":"),
    ).encode()
    block = sse_block(note)
    per_chunk = max(1, CHUNK_TARGET // len(block))
    payload = block * per_chunk
    return chunk(payload), len(payload), per_chunk


def head(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def json_response(body: bytes, extra: dict[str, str] | None = None) -> bytes:
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    headers.update(extra or {})
    return head("200 OK", headers) + body


SSE_HEAD = {"content-type": "text/event-stream", "cache-control": "no-cache", "transfer-encoding": "chunked"}
ACCEPTED = head("202 Accepted", {"content-length": "0"})
LAST_CHUNK = b"0\r\n\r\n"


def error_response(status: str, message: str) -> bytes:
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message}}).encode()
    return head(status, {"content-type": "application/json", "content-length": str(len(body))}) + body


class MCPUpstream(asyncio.Protocol):
    """One client connection. Requests are answered in order; streamed answers hold the next one back."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self.process()

    def process(self) -> None:
        while not self.busy and not self.closed:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 64 * 1024:
                    self.transport.write(error_response("431 Request Header Fields Too Large", "header too large"))
                    self.transport.close()
                return
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            self.handle(method, target.split("?", 1)[0], body)

    def handle(self, method: str, path: str, body: bytes) -> None:
        if path != "/mcp":
            self.transport.write(error_response("404 Not Found", "no such endpoint"))
        elif method == "DELETE":
            self.transport.write(head("200 OK", {"content-length": "0"}))
        elif method != "POST":
            self.transport.write(error_response("405 Method Not Allowed", "POST only"))
        else:
            try:
                msg = json.loads(body)
            except ValueError:
                self.transport.write(error_response("400 Bad Request", "invalid JSON"))
                return
            self.rpc(msg)

    def rpc(self, msg: dict) -> None:
        method, msg_id = msg.get("method"), msg.get("id")
        params = msg.get("params") or {}
        write = self.transport.write
        if "id" not in msg:
            write(ACCEPTED)
        elif method == "initialize":
            result = {"protocolVersion": params.get("protocolVersion", "2025-06-18"),
                      "capabilities": {"tools": {}}, "serverInfo": {"name": "bench-upstream", "version": "1"}}
            write(json_response(rpc_result(msg_id, result), {"mcp-session-id": str(uuid.uuid4())}))
        elif method == "tools/list":
            write(json_response(rpc_result(msg_id, {"tools": TOOLS})))
        elif method == "tools/call":
            self.call(msg_id, params.get("name"), params.get("arguments") or {}, params.get("_meta") or {})
        else:
            write(json_response(json.dumps({"jsonrpc": "2.0", "id": msg_id,
                                            "error": {"code": -32601, "message": f"no method {method}"}}).encode()))

    def call(self, msg_id: Any, name: str, args: dict, meta: dict) -> None:
        if name == "small":
            self.transport.write(json_response(text_result(msg_id, "ok: 42 rows, all green")))
        elif name == "small_pii":  # the same size of answer, with values the `pii` profile masks
            self.transport.write(json_response(text_result(msg_id, "ok: jane@example.com, 4111 1111 1111 1111")))
        elif name == "large":
            body = b'{"jsonrpc":"2.0","id":%b,"result":%b}' % (json.dumps(msg_id).encode(),
                                                                large_result(int(args.get("bytes", 1 << 20))))
            self.transport.write(json_response(body))
        elif name == "sse":
            self.spawn(self.sse(msg_id, float(args.get("gap_ms", 0)), meta.get("progressToken", msg_id)))
        elif name == "stream":
            self.spawn(self.stream(msg_id, int(args.get("bytes", 100 << 20)), int(args.get("event_bytes", 16 * 1024))))
        else:
            error = {"code": -32602, "message": f"no tool {name}"}
            self.transport.write(json_response(json.dumps({"jsonrpc": "2.0", "id": msg_id, "error": error}).encode()))

    def spawn(self, coro) -> None:
        self.busy = True
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self.done)

    def done(self, task: asyncio.Task) -> None:
        self.busy = False
        if not task.cancelled() and task.exception() is not None and self.transport:
            self.transport.close()
            return
        self.process()

    async def sse(self, msg_id: Any, gap_ms: float, token: Any) -> None:
        progress = json.dumps({"jsonrpc": "2.0", "method": "notifications/progress",
                               "params": {"progressToken": token, "progress": 1, "total": 2}},
                              separators=(",", ":")).encode()
        self.transport.write(head("200 OK", SSE_HEAD) + chunk(sse_block(progress)))
        if gap_ms > 0:
            await asyncio.sleep(gap_ms / 1000)
        self.transport.write(chunk(sse_block(text_result(msg_id, "ok: streamed result"))) + LAST_CHUNK)

    async def stream(self, msg_id: Any, total: int, event_bytes: int) -> None:
        http_chunk, payload, per_chunk = stream_chunk(event_bytes)
        n_chunks = max(1, -(-total // payload))
        final = sse_block(text_result(msg_id, f"streamed {n_chunks * per_chunk} events"))
        body_bytes = n_chunks * payload + len(final)
        headers = dict(SSE_HEAD, **{"x-bench-body-bytes": str(body_bytes)})
        self.transport.write(head("200 OK", headers))
        for _ in range(n_chunks):
            if self.closed:
                return
            self.transport.write(http_chunk)
            if not self.writable.is_set():
                await self.writable.wait()
        self.transport.write(chunk(final) + LAST_CHUNK)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(MCPUpstream, host, port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
