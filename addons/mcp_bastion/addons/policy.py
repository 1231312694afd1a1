"""
The Policy addon: evaluates every MCP message against the ruleset.

- Client to server (`request`): every message of the body (each batch
  member, notifications and the client's answers to server requests) is
  evaluated with the caller's identity (anonymous when identity is off) and the
  upstream's "host:port". Body-less requests are evaluated as the pseudo-methods
  `http:GET` (open the server's event stream), `http:DELETE` (end the session).
  If any message is denied, nothing is forwarded and the gateway answers: see
  `refuse()`. `approve` is routed through `route_approval()`.
- Server to client (`response`, `mcp_stream_event`): list results (tools,
  prompts, resources, resource templates) are filtered per identity; server
  requests and notifications are evaluated; a denied server request never
  reaches the client and is answered on the client's behalf with a JSON-RPC error.
- The ruleset file is reloaded when it changes (checked about once a second);
  an invalid edit is logged and the previous ruleset stays in force.
"""

from __future__ import annotations

import asyncio
import http.client as httpclient
import logging
import os
import ssl
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional
from urllib.parse import urljoin, urlsplit

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import traverse
from mitmproxy.utils import asyncio_utils

from mcp_bastion.glue import flowstate as fs
from mcp_bastion.core import errors, normalize
from mcp_bastion.core.jsonrpc import Body, Message, classify, dumps
from mcp_bastion.core.rules import Decision, Identity, ReloadingRuleset, Ruleset, RulesetError, http_request

logger = logging.getLogger("mcp_bastion")

C2S = "client_to_server"
S2C = "server_to_client"
MASK = "bastion.mask"  # {"profile", "rule", "profiles": [...]}: read by the masking addon
APPROVAL = "bastion.approval"  # {"rule", "status", "ids"}: read by the approval addon

MAX_RECORDED = 500  # decisions kept per flow; allows beyond it are only counted (long event streams)
ANSWER_TIMEOUT = 10.0  # seconds to deliver an error answer for a denied server request
RELOAD_INTERVAL = 1.0

NO_RULESET = Ruleset.deny_all(
    "mcp-bastion has no ruleset (option 'ruleset' is unset), so every message is denied"
)

# Not copied from the client's request into the gateway's own answer to the upstream.
_NOT_COPIED = {
    "content-length", "content-type", "content-encoding", "transfer-encoding", "accept",
    "connection", "keep-alive", "te", "trailer", "upgrade", "expect", "last-event-id",
    "proxy-authorization", "proxy-connection",
}


def _label(m: Message) -> str:
    return " ".join(x for x in (m.method or m.kind, m.target) if x)


class Policy:
    """Per-identity policy over every MCP message, in both directions."""

    request_stage = "policy"
    response_stage = "resp:policy"

    def __init__(self) -> None:
        self.source: ReloadingRuleset | None = None
        self._answers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="bastion-answer")
        self._watch: asyncio.Task | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "ruleset",
            Optional[str],
            None,
            """
            Path of the YAML ruleset (see rulesets/). Required: without it every MCP
            message is denied. Edits take effect without a restart; an invalid edit is
            refused and the previous ruleset stays in force.
            """,
        )

    def configure(self, updated: set[str]) -> None:
        if "ruleset" not in updated:
            return
        path = ctx.options.ruleset
        if not path:
            self.source = None
            logger.warning("mcp-bastion: no ruleset configured (--set ruleset=FILE): every MCP message is denied")
            return
        try:
            self.source = ReloadingRuleset(os.path.expanduser(path), RELOAD_INTERVAL)
        except RulesetError as e:
            raise exceptions.OptionsError(f"ruleset refused:\n{e}") from None
        rs = self.source.ruleset
        logger.info("mcp-bastion: ruleset %s loaded (%d rules, default %s)", path, len(rs.rules), rs.default)
        for w in rs.warnings:
            logger.warning("mcp-bastion: %s", w)

    def running(self) -> None:
        if self._watch is None:
            self._watch = asyncio_utils.create_task(self._watch_file(), name="bastion ruleset reload", keep_ref=True)

    async def _watch_file(self) -> None:
        """Notice edits even while no traffic flows, so the reload (or refusal) is logged at once."""
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            if self.source is not None:
                self.source.current()

    def done(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._answers.shutdown(wait=False, cancel_futures=True)

    def ruleset(self) -> Ruleset:
        """The ruleset in force now (reloaded first if the file changed)."""
        return self.source.current() if self.source is not None else NO_RULESET

    def _enforceable(self, d: Decision) -> Decision:
        """A `mask` decision that no loaded addon can carry out becomes a denial.

        Masking addons declare the profiles they apply in `masking_profiles`.
        Without one, `mask` would forward unmasked data: refuse instead.
        """
        if d.action != "mask" or d.profile in self._masking_profiles():
            return d
        return Decision("deny", d.rule, f"masking profile '{d.profile}' is not available in this gateway, "
                        "so the data is refused rather than sent unmasked", d.profile)

    def _masking_profiles(self) -> set[str]:
        profiles: set[str] = set()
        for addon in traverse(ctx.master.addons.chain):
            profiles.update(getattr(addon, "masking_profiles", ()) or ())
        return profiles

    # --- client to server ------------------------------------------------------

    @fs.fail_closed("policy")
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not fs.is_mcp(flow):
            return
        ruleset = self.ruleset()
        identity = Identity.from_claims(flow.metadata.get(fs.IDENTITY))
        upstream = flow.metadata.get(fs.UPSTREAM)
        body = fs.request_body(flow)
        messages = body.messages if body is not None else [http_request(flow.request.method)]
        verdicts = []
        for m in messages:
            d = self._enforceable(ruleset.evaluate(identity, m, C2S, upstream))
            verdicts.append((m, d))
            _record(flow, "policy", C2S, m, d)
        if any(d.action == "deny" for _, d in verdicts):
            self.refuse(flow, body, verdicts)
        elif any(d.action == "approve" for _, d in verdicts):
            self.route_approval(flow, body, verdicts)
        else:
            for _, d in verdicts:
                if d.action == "mask":
                    _select_mask(flow, d)
            fs.mark_stage(flow, "policy")

    def refuse(self, flow: http.HTTPFlow, body: Body | None, verdicts: list[tuple[Message, Decision]]) -> None:
        """Answer the client instead of forwarding: a JSON-RPC error for each request id.

        A batch is forwarded whole or not at all: the denied members get the
        denying rule's error, the others an error saying which member stopped the
        batch (same code), so no call runs half-authorised.
        """
        _answer(flow, body, verdicts, "deny", errors.DENIED)

    def route_approval(self, flow: http.HTTPFlow, body: Body | None, verdicts: list[tuple[Message, Decision]]) -> None:
        """The routing point for `approve`: the approval addon takes over here.

        Until it exists the message is held and not forwarded: the client gets
        APPROVAL_REQUIRED, and `flow.metadata["bastion.approval"]` says which
        rule asked for a person and for which request ids.
        """
        first = next(d for _, d in verdicts if d.action == "approve")
        flow.metadata[APPROVAL] = {
            "rule": first.rule,
            "status": "pending-workflow",
            "ids": [m.id for m, d in verdicts if d.action == "approve" and m.id is not None],
        }
        _answer(flow, body, verdicts, "approve", errors.APPROVAL_REQUIRED)

    # --- server to client ------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        # A streamed response is checked event by event in mcp_stream_event.
        if fs.is_mcp(flow) and flow.response is not None and not flow.metadata.get("bastion.refused"):
            if callable(flow.response.stream):
                fs.mark_stage(flow, "resp:policy")

    @fs.fail_closed("resp:policy")
    def response(self, flow: http.HTTPFlow) -> None:
        if not fs.is_mcp(flow) or flow.metadata.get("bastion.refused") or flow.response is None:
            return
        resp = flow.response
        if callable(resp.stream) or resp.stream:
            return
        body = fs.response_body(flow)
        if body is not None:
            kept, changed = self._screen(flow, body.messages)
            if changed:
                if kept:
                    data = kept if body.batch else kept[0]
                    resp.content = dumps(data)
                    fs.set_response_body(flow, Body([classify(x) for x in kept], body.batch, data))
                else:
                    resp.status_code = 202
                    resp.content = b""
                    fs.set_response_body(flow, None)
        fs.mark_stage(flow, "resp:policy")

    def mcp_stream_event(self, ev: fs.StreamEvent) -> None:
        """Filter list results and screen server requests/notifications in one SSE event."""
        if ev.body is None:
            return
        kept, changed = self._screen(ev.flow, ev.body.messages)
        if not changed:
            return
        if kept:
            ev.replace(kept if ev.body.batch else kept[0])
        else:
            ev.drop("denied by policy")

    def _screen(self, flow: http.HTTPFlow, messages: list[Message]) -> tuple[list[Any], bool]:
        """What of the server's messages may reach this client: (kept JSON values, anything changed)."""
        ruleset = self.ruleset()
        identity = Identity.from_claims(flow.metadata.get(fs.IDENTITY))
        upstream = flow.metadata.get(fs.UPSTREAM)
        asked = _request_methods(flow)
        kept: list[Any] = []
        answers: list[dict] = []
        changed = False
        for m in messages:
            if m.kind == "response":
                method = asked.get(m.id) if m.id is not None else None
                result, hidden = ruleset.filter_list(identity, upstream, method, m.params, self._masking_profiles())
                if hidden:
                    changed = True
                    fs.add_decision(flow, stage="resp:policy", direction=S2C, id=m.id, method=method,
                                    action="filter", reason=f"{len(hidden)} item(s) hidden from this caller",
                                    hidden=hidden[:50])
                    kept.append({**m.raw, "result": result})
                else:
                    kept.append(m.raw)
            elif m.kind == "error":
                kept.append(m.raw)
            else:
                d = self._enforceable(ruleset.evaluate(identity, m, S2C, upstream))
                if not d.blocks:
                    _record(flow, "resp:policy", S2C, m, d)
                    if d.action == "mask":
                        _select_mask(flow, d)
                    kept.append(m.raw)
                    continue
                changed = True
                if m.kind == "request":
                    code = errors.DENIED if d.action == "deny" else errors.APPROVAL_REQUIRED
                    answers.append(errors.error_message(m.id, code, _message(m, d), {"rule": d.rule, "reason": d.reason}))
                    _record(flow, "resp:policy", S2C, m, d, answered="error sent to upstream")
                else:
                    _record(flow, "resp:policy", S2C, m, d)
        if answers:
            self._answer_upstream(flow, answers)
        return kept, changed

    def _answer_upstream(self, flow: http.HTTPFlow, answers: list[dict]) -> None:
        """POST each error answer to the upstream as the client would, off the event loop."""
        req = flow.request
        # The old HTTP+SSE transport takes the client's messages at the endpoint its stream announced.
        url = urljoin(req.url, fs.mcp_state(flow).get("endpoint") or req.url)
        headers = [(k, v) for k, v in req.headers.items(multi=True) if k.lower() not in _NOT_COPIED]
        verify = not ctx.options.ssl_insecure
        for answer in answers:
            self._answers.submit(post_answer, url, headers, answer, verify, ANSWER_TIMEOUT)


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
            conn: httpclient.HTTPConnection = httpclient.HTTPSConnection(parts.hostname, parts.port, timeout=timeout, context=context)
        else:
            conn = httpclient.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            conn.putrequest("POST", target, skip_host=any(k.lower() == "host" for k, _ in headers), skip_accept_encoding=True)
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
    logger.log(level, "mcp-bastion: answered the upstream's request #%s with a policy error (HTTP %s)", answer.get("id"), resp.status)
    return resp.status


# --- helpers -----------------------------------------------------------------


def _record(flow: http.HTTPFlow, stage: str, direction: str, m: Message, d: Decision, **extra: Any) -> None:
    if d.action == "allow" and len(flow.metadata.get(fs.DECISIONS, ())) >= MAX_RECORDED:
        state = fs.mcp_state(flow)
        state["unrecorded_allows"] = state.get("unrecorded_allows", 0) + 1
        return
    # A deny that carries a profile is a `mask` no loaded addon could apply (see _enforceable):
    # `ruled` keeps what the rule said, so what-if compares rules, not this gateway's addons.
    ruled = "mask" if d.action == "deny" and d.profile else None
    fs.add_decision(flow, stage=stage, direction=direction, id=m.id, method=m.method, target=m.target,
                    action=d.action, rule=d.rule, reason=None if d.action == "allow" else d.reason,
                    profile=d.profile, ruled=ruled, **extra)


def _select_mask(flow: http.HTTPFlow, d: Decision) -> None:
    mask = flow.metadata.setdefault(MASK, {"profile": d.profile, "rule": d.rule, "profiles": []})
    if d.profile not in mask["profiles"]:
        mask["profiles"].append(d.profile)


def _message(m: Message, d: Decision) -> str:
    if d.action == "approve":
        return f"{_label(m)} needs approval (rule '{d.rule}'): {d.reason}"
    return f"{_label(m)} denied by rule '{d.rule}': {d.reason}"


def _request_methods(flow: http.HTTPFlow) -> dict[Any, str]:
    """Request id -> normalised method, for the client's requests this flow carried."""
    body = fs.request_body(flow)
    if body is None:
        return {}
    return {m.id: normalize.name(m.method) for m in body.messages if m.kind == "request" and m.method}


def _answer(flow: http.HTTPFlow, body: Body | None, verdicts: list[tuple[Message, Decision]],
            action: str, code: int) -> None:
    """Answer the client for a body that is not forwarded because of `action` (deny or approve)."""
    culprit_msg, culprit = next((m, d) for m, d in verdicts if d.action == action)
    why = "denied" if action == "deny" else "held for approval"
    items = []
    for m, d in verdicts:
        if m.kind != "request" or m.id is None:
            continue
        if d.action == action:
            err = (code, _message(m, d), {"rule": d.rule, "reason": d.reason})
        else:
            err = (code, f"not forwarded: {_label(culprit_msg)} in the same batch was {why} by rule '{culprit.rule}'",
                   {"rule": culprit.rule, "reason": "batch"})
            # The member's own rule allowed it, but it was not forwarded: the record must say so.
            fs.add_decision(flow, stage="policy", direction=C2S, id=m.id, method=m.method, target=m.target,
                            action=action, rule=culprit.rule, reason=err[1], batch=True)
        items.append(errors.error_message(m.id, *err))
    if items:
        status, payload = 200, (items if body is not None and body.batch else items[0])
    else:  # only notifications or answers: there is no id to answer, so an HTTP error says it
        status = 403
        payload = errors.error_message(None, code, _message(culprit_msg, culprit), {"rule": culprit.rule, "reason": culprit.reason})
    flow.response = http.Response.make(status, dumps(payload), {"content-type": "application/json", "cache-control": "no-store"})
    flow.metadata["bastion.refused"] = True
