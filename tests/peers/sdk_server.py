"""
A small MCP server written with the Python `mcp` SDK (2.x), the real upstream
of the end-to-end tests.

    python tests/peers/sdk_server.py --transport streamable-http --port 8000   # endpoint /mcp
    python tests/peers/sdk_server.py --transport sse --port 8000               # GET /sse, POST /messages/

It offers what a gateway has to carry in both directions:

- `add`: a plain tool call;
- `count`: sends one progress notification per step before it answers;
- `ask_name`: asks the client for input with `elicitation/create` (a
  server-to-client request) and answers with what the client sent;
- `summarize`: asks the client for a `sampling/createMessage`;
- `confirm_deploy`: three rounds on the 2026-07-28 wire (a multi-round-trip request:
  `input_required` results asking for elicitations, retries carrying `inputResponses`);
- `notes://readme`: a resource; `greet`: a prompt.

The SDK's own DNS-rebinding protection stays on (as the SDK sets it up for a
server bound to 127.0.0.1): the gateway must present a Host the SDK accepts.
"""

from __future__ import annotations

import argparse

import mcp_types as types
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import BaseModel

README_TEXT = "mcp-bastion test server: the readme resource"

server = MCPServer("bastion-sdk-test-server", version="1.0.0")


@server.tool()
def add(a: int, b: int) -> str:
    """Add two integers."""
    return str(a + b)


@server.tool()
async def count(steps: int, ctx: Context) -> str:
    """Count to `steps`, reporting progress at each step."""
    for i in range(1, steps + 1):
        await ctx.report_progress(i, steps, f"step {i}")
    return f"counted to {steps}"


class Name(BaseModel):
    name: str


@server.tool()
async def ask_name(ctx: Context) -> str:
    """Ask the client (elicitation) for a name and greet it."""
    result = await ctx.elicit("What is your name?", Name)
    if result.action == "accept":
        return f"hello {result.data.name}"
    return f"no name ({result.action})"


@server.tool()
async def summarize(text: str, ctx: Context) -> str:
    """Ask the client's model (sampling) to summarise `text`."""
    result = await ctx.session.create_message(
        [types.SamplingMessage(role="user", content=types.TextContent(type="text", text=text))],
        max_tokens=50,
        related_request_id=ctx.request_id,
    )
    content = result.content
    return f"summary: {content.text}" if isinstance(content, types.TextContent) else "summary: (not text)"


@server.resource("notes://readme", mime_type="text/plain")
def readme() -> str:
    return README_TEXT


@server.prompt()
def greet(who: str) -> str:
    """A greeting prompt."""
    return f"Please greet {who} warmly."


class AbsoluteEndpoint:
    """ASGI middleware: announce the old transport's message URL as an absolute URL to this server.

    The SDK always announces a relative path; some servers announce
    `http://host:port/messages/?...`, which a client would POST to directly,
    past a reverse proxy. The gateway must rewrite it.
    """

    def __init__(self, app, base: str) -> None:
        self.app = app
        self.base = base.encode()

    async def __call__(self, scope, receive, send):
        async def rewrite(message):
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                if b"event: endpoint" in body:
                    message = {**message, "body": body.replace(b"data: /", b"data: " + self.base + b"/", 1)}
            await send(message)

        await self.app(scope, receive, rewrite)


@server.tool()
async def confirm_deploy(env: str, ctx: Context) -> str | types.InputRequiredResult:
    """Three rounds on the 2026-07-28 wire (a multi-round-trip request): ask for a name, then for
    a yes/no, then answer. Each round's answers come back in `inputResponses`, with `requestState`."""
    answers = ctx.input_responses or {}
    state = ctx.request_state or ""

    def ask(key: str, message: str, field: str, kind: str) -> types.InputRequiredResult:
        params = types.ElicitRequestFormParams(message=message, requested_schema={
            "type": "object", "properties": {field: {"type": kind}}, "required": [field]})
        return types.InputRequiredResult(input_requests={key: types.ElicitRequest(params=params)},
                                         request_state=state + key + ";")

    if "who;" not in state:
        return ask("who", f"Who deploys to {env}?", "name", "string")
    if "sure;" not in state:
        return ask("sure", "Sure?", "yes", "boolean")
    sure = answers.get("sure")
    content = getattr(sure, "content", None) or {}
    return f"deployed to {env}" if content.get("yes") else "not deployed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transport", choices=("streamable-http", "sse"), default="streamable-http")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certfile", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM)")
    parser.add_argument("--allowed-host", action="append", default=[],
                        help="also accept this Host (host:port) in the SDK's DNS-rebinding protection")
    parser.add_argument("--absolute-endpoint", action="store_true",
                        help="sse transport: announce the message URL as an absolute URL")
    args = parser.parse_args()
    security = TransportSecuritySettings(
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*", *args.allowed_host],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
    )
    if args.transport == "sse":
        app = server.sse_app(transport_security=security)
        if args.absolute_endpoint:
            scheme = "https" if args.certfile else "http"
            app = AbsoluteEndpoint(app, f"{scheme}://127.0.0.1:{args.port}")
    else:
        app = server.streamable_http_app(transport_security=security)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning",
                ssl_certfile=args.certfile, ssl_keyfile=args.keyfile)


if __name__ == "__main__":
    main()
