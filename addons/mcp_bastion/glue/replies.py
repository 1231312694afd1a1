"""
The one place that builds the gateway's own answers.

Stages decide (a `Refusal` in a `Refuse` outcome); this module turns a
decision into what goes on the wire:

- `refuse()`: answer the client instead of the upstream (or instead of the
  upstream's answer), with a JSON-RPC error for each request id;
- `refuse_request()`: the answer for a request body the pipeline refused -
  a batch is forwarded whole or not at all;
- `client_error()`: a JSON-RPC error standing in for one refused server answer;
- `sse_errors()`: the events that close a stream that failed closed;
- `UpstreamAnswers`: answering a server's request on the client's behalf
  (a denied `sampling/createMessage` gets an error, so the server does not wait).
"""

from __future__ import annotations

import http.client as httpclient
import logging
import ssl
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urljoin, urlsplit

from mitmproxy import http

from mcp_bastion.core import errors
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.jsonrpc import Body, dumps
from mcp_bastion.core.message import Message
from mcp_bastion.core.pipeline import Refuse, Run
from mcp_bastion.core.sse import format_event
from mcp_bastion.core.state import Unavailable
from mcp_bastion.core.vocab import Action, Direction, Kind, Meta, StageName
from mcp_bastion.glue import flowstate as fs

logger = logging.getLogger("mcp_bastion")

JSON_HEADERS = {"content-type": "application/json", "cache-control": "no-store"}
ANSWER_TIMEOUT = 10.0  # seconds to deliver an error answer for a denied server request

# Not copied from the client's request into the gateway's own answer to the upstream.
_NOT_COPIED = {
    "content-length", "content-type", "content-encoding", "transfer-encoding", "accept",
    "connection", "keep-alive", "te", "trailer", "upgrade", "expect", "last-event-id",
    "proxy-authorization", "proxy-connection",
}


def _answer(flow: http.HTTPFlow, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
    flow.response = http.Response.make(status, dumps(payload), {**JSON_HEADERS, **(headers or {})})
    flow.metadata[Meta.REFUSED] = True


def refuse(
    flow: http.HTTPFlow,
    refusal: Refusal,
    *,
    stage: StageName | str,
    body: Body | None = None,
    action: Action | str = Action.DENY,
    rule: str | None = None,
) -> None:
    """Answer the client with `refusal` instead of forwarding (or instead of the upstream's answer)."""
    if body is None:
        body = fs.request_body(flow)
    headers = {**JSON_HEADERS, **refusal.headers}
    flow.response = http.Response.make(refusal.status, refusal.body_for_parsed(body), headers)
    flow.metadata[Meta.REFUSED] = True
    fs.add_decision(flow, stage=stage, direction=Direction.C2S, action=action, rule=rule,
                    reason=refusal.message, code=refusal.code, status=refusal.status)


def document(flow: http.HTTPFlow, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
    """A JSON document the gateway serves itself (not an MCP answer, e.g. RFC 9728 metadata)."""
    flow.response = http.Response.make(status, dumps(doc), {"content-type": "application/json", **(headers or {})})


def accepted(flow: http.HTTPFlow) -> None:
    """202 Accepted, no body: the gateway took messages that need no answer and forwarded none of them."""
    flow.response = http.Response.make(202, b"", {"cache-control": "no-store"})
    flow.metadata[Meta.REFUSED] = True


def internal_error(stage: str, exc: BaseException) -> Refusal:
    """The refusal used when an enforcement step itself fails."""
    response = stage.startswith("resp")
    if isinstance(exc, Unavailable):  # the shared state (Redis) is unreachable: retry later
        return Refusal(
            status=503,
            code=errors.GATEWAY_ERROR,
            message=f"mcp-bastion's shared state is unreachable, so the {stage} check could not be made; "
                    + ("the response was withheld" if response else "the request was not forwarded")
                    + " (retry shortly)",
            data={"stage": stage, "error": "Unavailable", "reason": "state_unavailable"},
            headers={"retry-after": "1"},
        )
    return Refusal(
        status=502 if response else 500,
        code=errors.GATEWAY_ERROR,
        message=f"mcp-bastion could not complete the {stage} check; "
                + ("the response was withheld" if response else "the request was not forwarded"),
        data={"stage": stage, "error": type(exc).__name__},
    )


def refuse_request(flow: http.HTTPFlow, run: Run, batch: bool) -> None:
    """Answer the client for a request body the pipeline refused: a JSON-RPC error for each request id.

    A batch is forwarded whole or not at all: the members refused like the
    deciding one (a denial beats a hold) get their own refusal, the others an
    error saying which member stopped the batch
    (same code), recorded as decided with `batch: true`, so no call runs
    half-authorised. A body with no request id (only notifications or
    answers) gets the refusal's HTTP status and an error without id.
    """
    # The member that decides the batch's answer: a denial before a hold for approval (a batch that
    # contains a denied call cannot be approved), else the first refusal.
    culprit = next((r for r in run.refused if r.outcome.action == Action.DENY), run.refused[0])
    assert isinstance(culprit.outcome, Refuse)
    first = culprit.outcome.refusal
    rule = first.data.get("rule")
    items = []
    for r in run.results:
        m = r.original
        if m.kind != Kind.REQUEST or m.id is None:
            continue
        if isinstance(r.outcome, Refuse) and r.outcome.action == culprit.outcome.action:
            items.append(errors.error_message(m.id, r.outcome.refusal.code, r.outcome.refusal.message,
                                              r.outcome.refusal.data))
            continue
        why = "denied" if culprit.outcome.action == Action.DENY else "held for approval"
        message = f"not forwarded: {culprit.original.what()} in the same batch was {why}" + (
            f" by rule '{rule}'" if rule else "")
        items.append(errors.error_message(m.id, first.code, message, {"rule": rule, "reason": "batch"}))
        fs.add_decision(flow, stage=StageName.POLICY, direction=Direction.C2S, id=m.id, method=m.method,
                        target=m.target.name if m.target else None, action=culprit.outcome.action, rule=rule,
                        reason=message, batch=True, ref=m.ref)
    if items and not batch and first.status in (400, 404) and culprit.outcome.action != Action.APPROVE:
        # a request refused as malformed (HeaderMismatch) or naming no method says so in HTTP too
        _answer(flow, first.status, items[0])
    elif items:
        _answer(flow, 200, items if batch else items[0])
    else:
        _answer(flow, first.status, errors.error_message(None, first.code, first.message, first.data),
                first.headers)


def client_error(m: Message, refusal: Refusal) -> dict[str, Any]:
    """The JSON-RPC error the client gets in place of a server answer that was refused."""
    return errors.error_message(m.id, refusal.code, refusal.message, refusal.data)


def server_answer(m: Message, refusal: Refusal) -> dict[str, Any]:
    """The error the gateway sends the upstream for a server request the client must not see."""
    return errors.error_message(m.id, refusal.code, refusal.message, refusal.data)


def sse_errors(refusal: Refusal, ids: Sequence[Any]) -> bytes:
    """SSE events carrying `refusal` for each pending request id (a stream that failed closed)."""
    return b"".join(format_event(refusal.body_for([i]).decode("utf-8")) for i in ids)


class UpstreamAnswers:
    """Delivers the gateway's answers to server requests, as the client would, off the event loop."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def send(self, flow: http.HTTPFlow, answers: list[dict], verify: bool = True) -> None:
        if not answers:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bastion-answer")
        req = flow.request
        # The old HTTP+SSE transport takes the client's messages at the endpoint its stream announced.
        url = urljoin(req.url, fs.mcp_state(flow).get("endpoint") or req.url)
        headers = [(k, v) for k, v in req.headers.items(multi=True) if k.lower() not in _NOT_COPIED]
        credential = fs.upstream_credential(flow)  # the upstream's own, as on the forwarded request
        if credential is not None:
            headers = [(k, v) for k, v in headers if k.lower() != credential[0]] + [credential]
        for answer in answers:
            self._pool.submit(post_answer, url, headers, answer, verify, ANSWER_TIMEOUT)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def post_answer(url: str, headers: list[tuple[str, str]], answer: dict, verify: bool, timeout: float) -> int | None:
    """Deliver one JSON-RPC message to the upstream's MCP endpoint; returns the HTTP status (None on failure)."""
    parts = urlsplit(url)
    body = dumps(answer)
    try:
        if parts.scheme == "https":
            context = ssl.create_default_context()
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            conn: httpclient.HTTPConnection = httpclient.HTTPSConnection(
                parts.hostname, parts.port, timeout=timeout, context=context)
        else:
            conn = httpclient.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            conn.putrequest("POST", target, skip_host=any(k.lower() == "host" for k, _ in headers),
                            skip_accept_encoding=True)
            for k, v in headers:
                conn.putheader(k, v)
            conn.putheader("content-type", "application/json")
            conn.putheader("accept", "application/json, text/event-stream")
            conn.putheader("content-length", str(len(body)))
            conn.endheaders(body)
            resp = conn.getresponse()
            resp.read(64 * 1024)
        finally:
            conn.close()
    except (OSError, httpclient.HTTPException) as e:
        logger.error("mcp-bastion: could not answer the upstream's request #%s at %s: %r", answer.get("id"), url, e)
        return None
    level = logging.INFO if resp.status < 300 else logging.WARNING
    logger.log(level, "mcp-bastion: answered the upstream's request #%s with a policy error (HTTP %s)",
               answer.get("id"), resp.status)
    return resp.status
