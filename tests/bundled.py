"""
The shipped bundle in a mitmproxy test context: every addon of `bundle()`, in
its order, behind the one addon mitmproxy sees in production (`glue.dispatch`),
driven hook by hook through the real addon manager (no network).

    with bundled(ruleset=RULES_FILE) as b:
        f = b.flow("POST", call("tools/call", name="add"))
        await b.request(f)
        b.respond(f, payload)
        await b.response(f)
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import http
from mitmproxy.proxy.layers.http import (
    HttpErrorHook,
    HttpRequestHeadersHook,
    HttpRequestHook,
    HttpResponseHeadersHook,
    HttpResponseHook,
)
from mitmproxy.proxy.mode_specs import ProxyMode
from mitmproxy.test import taddons, tflow

from mcp_bastion.bundle import bundle
from mcp_bastion.core.vocab import Meta
from mcp_bastion.glue.dispatch import Dispatch

ROOT = Path(__file__).resolve().parent.parent
ALLOW_ALL = str(ROOT / "rulesets" / "allow-all.yaml")
UPSTREAM = "http://127.0.0.1:8000"
ACCEPT = "application/json, text/event-stream"
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}  # a 2026-07-28 request's _meta
V2026 = {"mcp-protocol-version": "2026-07-28"}  # ... and its version header


def call(method: str = "tools/call", msg_id: object = 1, **params) -> dict:
    return {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params}


def rpc(method: str, params: Any = None, id: object = 1) -> dict:
    """A JSON-RPC request (a notification with `id=None`)."""
    m: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if id is not None:
        m["id"] = id
    if params is not None:
        m["params"] = params
    return m


def tool_call(tool: str, id: object = 1, **args: Any) -> dict:
    return rpc("tools/call", {"name": tool, "arguments": args}, id)


def sse(*messages: Any) -> bytes:
    """An event stream carrying each message in its own event."""
    return b"".join(b"event: message\ndata: " + json.dumps(m).encode() + b"\n\n" for m in messages)


def result(msg_id: object, value: Any) -> dict:
    return {"jsonrpc": "2.0", "id": msg_id, "result": value}


def make_flow(method: str = "POST", body: object = None, *, path: str = "/mcp", host: str | None = None,
              headers: dict | None = None, mode: str = f"reverse:{UPSTREAM}", url: str = UPSTREAM) -> http.HTTPFlow:
    """A live flow as the gateway sees it; in reverse mode the client addressed localhost:8080."""
    f = tflow.tflow()
    content = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    f.request = http.Request.make(method, url + path, content)
    f.request.headers["host"] = host or ("localhost:8080" if mode.startswith("reverse") else urlsplit(url).netloc)
    if method == "POST":
        f.request.headers["content-type"] = "application/json"
        f.request.headers["accept"] = ACCEPT
    f.request.headers.update(headers or {})
    f.client_conn.proxy_mode = ProxyMode.parse(mode)
    return f


class Bundled:
    """The bundle's addons in a test context."""

    def __init__(self, tctx, addons: list, upstream: str):
        self.tctx = tctx
        self.addons = addons
        self.upstream = upstream

    def addon(self, cls: type) -> Any:
        return next(a for a in self.addons if isinstance(a, cls))

    @property
    def dispatch(self) -> Dispatch:
        """The one addon mitmproxy sees, whose parts are `addons`."""
        return next(a for a in self.tctx.master.addons.chain if isinstance(a, Dispatch))

    def flow(self, method: str = "POST", body: object = None, **kw: Any) -> http.HTTPFlow:
        """A flow to this context's upstream (see make_flow)."""
        kw.setdefault("url", self.upstream)
        kw.setdefault("mode", f"reverse:{self.upstream}")
        return make_flow(method, body, **kw)

    async def request(self, f: http.HTTPFlow, identity: dict | None = None) -> None:
        """requestheaders then request, as mitmproxy runs them; `identity` stands in for a verified token."""
        await self.tctx.master.addons.trigger_event(HttpRequestHeadersHook(f))
        if identity is not None and not f.response:
            f.metadata[Meta.IDENTITY] = identity
        await self.tctx.master.addons.trigger_event(HttpRequestHook(f))

    async def response(self, f: http.HTTPFlow, payload: Any = None, *, status: int = 200,
                       ctype: str = "application/json", headers: dict | None = None) -> bytes:
        """The upstream answers `payload`; returns what the client gets (all of it, for an event stream)."""
        if isinstance(payload, bytes):
            data = payload
        elif isinstance(payload, str):
            data = payload.encode()
        else:
            data = json.dumps(payload).encode() if payload is not None else b""
        streamed = ctype == "text/event-stream"
        f.response = http.Response.make(status, b"" if streamed else data, {"content-type": ctype})
        f.response.headers.update(headers or {})
        await self.tctx.master.addons.trigger_event(HttpResponseHeadersHook(f))
        out = b""
        if streamed and callable(f.response.stream):
            out = b"".join(f.response.stream(data)) + b"".join(f.response.stream(b""))
        await self.tctx.master.addons.trigger_event(HttpResponseHook(f))
        return out if streamed and out else (f.response.content or b"")

    async def error(self, f: http.HTTPFlow) -> None:
        await self.tctx.master.addons.trigger_event(HttpErrorHook(f))


@contextlib.contextmanager
def bundled(**options: Any) -> Iterator[Bundled]:
    """The shipped `bundle()` loaded in a taddons context; `ruleset` defaults to allow-all."""
    addons = bundle()
    options.setdefault("ruleset", ALLOW_ALL)
    # UpstreamCheck opens a TCP connection to the upstream before forwarding: a listening
    # socket (never read) stands in for it.
    with socket.socket() as upstream, taddons.context(Dispatch(addons)) as tctx:
        upstream.bind(("127.0.0.1", 0))
        upstream.listen(64)
        tctx.options.update(**options)
        yield Bundled(tctx, addons, f"http://127.0.0.1:{upstream.getsockname()[1]}")


def forwarded(f: http.HTTPFlow) -> bool:
    """True when mitmproxy would send the request upstream."""
    return f.response is None and f.error is None


def error_of(f: http.HTTPFlow) -> dict:
    assert f.response is not None
    return json.loads(f.response.content)["error"]


@contextlib.contextmanager
def bundled_addons(addons: list, **options: Any) -> Iterator[Bundled]:
    """`bundled`, over `addons` (e.g. from `bundle_with_stages` or `bundle_without`) instead of a fresh `bundle()`."""
    options.setdefault("ruleset", ALLOW_ALL)
    with socket.socket() as upstream, taddons.context(Dispatch(addons)) as tctx:
        upstream.bind(("127.0.0.1", 0))
        upstream.listen(64)
        tctx.options.update(**options)
        yield Bundled(tctx, addons, f"http://127.0.0.1:{upstream.getsockname()[1]}")


def bundle_with_stages(*stages: Any) -> list:
    """`bundle()` whose Pipeline runs `stages` after the Policy, and whose Gate requires their marks too."""
    return bundle(extra_stages=stages)


def bundle_without(cls: type) -> list:
    """`bundle()` with its instance of `cls` left out (the rest unchanged, the Gate's list as built)."""
    return [a for a in bundle() if not isinstance(a, cls)]


def stage_name(name: str) -> str:
    """A stage name for a test stage: a string with `.response` (`x` -> `resp:x`), like `StageName`."""

    class TestStageName(str):
        @property
        def response(self) -> TestStageName:
            return self if self.startswith("resp:") else TestStageName(f"resp:{self}")

        @property
        def is_response(self) -> bool:
            return self.startswith("resp:")

    return TestStageName(name)


def open_session(b: Bundled, sid: str, identity: dict | None = None) -> str:
    """Bind session `sid` to `identity` as if the upstream had handed it out through this gateway."""
    from mcp_bastion.addons.sessions import Sessions
    from mcp_bastion.core.identity import Identity
    from mcp_bastion.core.sessions import owner_of

    assert b.addon(Sessions).bindings.bind(sid, owner_of(Identity.from_claims(identity)))
    return sid
