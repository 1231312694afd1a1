"""
Approvals: a call an approve rule holds waits for a second person's decision.

A message stage after Masking. The Policy hands it the requests an `approve`
rule with an `approval:` block matched (`Message.approval`); this stage:

- lets a call through without asking while the same identity holds a grant
  for the same rule and tool (`grant:` window of an earlier approval);
- `mode: wait` (default): holds the request (`Hold`): the client's request
  stays open, other flows go on, nothing reaches the upstream; approved, it is
  forwarded exactly once; denied, expired or cancelled, the client gets an
  error naming the rule, the reviewer's reason and the approval id;
- `mode: retry`: answers at once with `-31002` naming the approval id; the
  same call (identity, upstream, method, tool, canonical arguments) by the
  same identity passes once, after it was approved.

It also serves the approval API on the gateway's own listener, under
`/bastion/approvals` (the Auth addon has verified the reviewer's bearer
token, with the same issuers and keys as every MCP request):
`GET /bastion/approvals`, `GET /bastion/approvals/ID`,
`POST /bastion/approvals/ID/approve|deny` with `{"reason": "..."}`.
`scripts/approvals` is its command line. A reviewer sees the requests they
may decide. Every request and decision is a flow of its own, recorded and
audited like any other.

Approvals live in a `core.approvals.Store` (the embedded `MemoryStore`: a
restart forgets them; `done` cancels what is pending, so nothing runs
unapproved).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import queue
import re
import threading
import time
import urllib.request
import weakref
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.flow import Error

from mcp_bastion.core import errors
from mcp_bastion.core.approvals import (
    APPROVED,
    DENIED,
    RETRY,
    USED,
    Approval,
    MemoryStore,
    Person,
    Refused,
    Store,
    binding,
)
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.message import Message
from mcp_bastion.core.pipeline import Context, Hold, Outcome, Pass, Refuse, Verdict
from mcp_bastion.core.state import Backend, Hub, Table, Unavailable
from mcp_bastion.core.vocab import Action, Direction, Kind, Meta, StageName
from mcp_bastion.glue import api, approvals_page, replies
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.holding import FORWARD, TICKET_HEADER, HoldingServer, Ticket, expectation

logger = logging.getLogger("mcp_bastion")

API_PREFIX = "/bastion/approvals"
PROGRESS_EVERY = 5.0  # seconds between progress notifications to a client whose call waits
CONTINUED = "continued"  # a further round of an approved multi-round-trip call
MAX_CONTINUATIONS = 10_000
CONTINUATION_TTL = 24 * 3600.0  # seconds a multi-round-trip call's approval carries over to its next round


def person(identity: Any) -> Person:
    """The `Person` of a flow's identity (an `Identity` or its metadata form)."""
    if identity is None:
        return Person(None, None)
    get = identity.get if isinstance(identity, dict) else lambda k, d=None: getattr(identity, k, d)
    groups = get("groups") or ()
    return Person(get("sub"), get("iss"), tuple(groups) if not isinstance(groups, str) else (groups,),
                  get("name") or get("email") or get("sub"))


class Approvals:
    """The approval stage, and the approval API."""

    name = StageName.APPROVAL
    holds_approvals = True

    def __init__(self, store: Store | None = None, hub: Hub | None = None):
        self.hub = hub if hub is not None else Hub()
        self.store: Store
        self._continuations: Table  # digest of a requestState -> the approval whose call it continues

        def build(backend: Backend) -> None:  # at once (the embedded backend), and when State switches it
            self.store = store if store is not None else backend.approvals(on_change=self._changed)
            self._continuations = backend.table("continuations", idle_ttl=CONTINUATION_TTL,
                                                max_items=MAX_CONTINUATIONS)

        self.hub.watch(build)
        self.webhook: str | None = None
        self._posts: queue.Queue | None = None
        self._held: dict[str, str] = {}  # approval id -> the id of the flow it holds (wait mode)
        self._flows: weakref.WeakValueDictionary[str, http.HTTPFlow] = weakref.WeakValueDictionary()
        self.holding = HoldingServer()
        self._streamed: dict[str, tuple[Approval, Message, Any]] = {}  # flow id -> the call held on a stream
        self.progress_every = PROGRESS_EVERY
        self._tickets: dict[str, str] = {}  # flow id -> its holding ticket, until the request arrives there

    def load(self, loader) -> None:
        loader.add_option(
            "approval_webhook", str, "",
            """
            URL that hears of every approval request and decision: a Slack-compatible JSON POST
            ({"text": ...}) naming the call, the rule and the command that decides it. Empty: none.
            """,
        )

    def configure(self, updated: set[str]) -> None:
        if "approval_webhook" in updated:
            url = ctx.options.approval_webhook.strip()
            if url and not url.startswith(("http://", "https://")):
                raise exceptions.OptionsError(f"approval_webhook must be an http(s) URL: {url!r}")
            self.webhook = url or None

    def _changed(self, a: Approval, what: str) -> None:
        """Announce a request (and its fate) to the webhook, off the event loop; failures are logged only."""
        if self.webhook is None or what not in ("requested", "approved", "denied", "expired"):
            return
        if what == "requested":
            text = (f":hourglass: *{a.requester.shown()}* asks to run `{a.method} {a.tool or ''}` "
                    f"{json.dumps(a.arguments, ensure_ascii=False)[:300]} (rule `{a.rule}`: {a.reason}). "
                    f"Approvers: {', '.join(a.spec.approvers)}; expires {a.view()['expires']}.\n"
                    f"Decide: `scripts/approvals approve {a.id} --gateway <gateway URL>` or "
                    f"`scripts/approvals deny {a.id} --reason ... --gateway <gateway URL>`")
        else:
            who = f" by {a.decided_by.shown()}" if a.decided_by else ""
            text = f"{a.id} ({a.requester.shown()}: `{a.method} {a.tool or ''}`) {what}{who}" + (
                f": {a.decision_reason}" if a.decision_reason else "")
        body = json.dumps({"text": text, "approval": a.view()}).encode()
        if self._posts is None:  # one sender, so the channel hears of a request before its decision
            self._posts = queue.Queue(maxsize=1000)
            threading.Thread(target=_sender, args=(self._posts,), name="mcp-bastion approval webhook",
                             daemon=True).start()
        try:
            self._posts.put_nowait((self.webhook, body))
        except queue.Full:
            logger.warning("mcp-bastion: approval webhook is behind; a notice about %s was dropped", a.id)

    # --- the stage ------------------------------------------------------------------

    def check(self, m: Message, cx: Context) -> Outcome:
        if m.direction == Direction.S2C:
            self._learn_continuation(m, cx)
            return Pass()
        d = m.approval
        if d is None or d.approval is None or m.kind != Kind.REQUEST:
            return Pass()
        spec = d.approval
        who = person(cx.identity)
        tool = m.target.name if m.target is not None else None
        arguments = m.params.get("arguments") if isinstance(m.params, dict) and m.method == "tools/call" else m.params
        key = binding(who, cx.upstream, m.method, tool, arguments)
        continued = self._continued(m, key)
        if continued is not None:
            return Pass((Verdict(StageName.APPROVAL, Action.ALLOW, d.rule,
                                 f"a further round of the call approved in {continued.id} (its requestState)",
                                 {"approval": {**self._summary(continued), "status": CONTINUED}}),))
        grant = self.store.grant_for(who, d.rule, tool)
        if grant is not None:
            return Pass((Verdict(StageName.APPROVAL, Action.ALLOW, d.rule,
                                 f"within the grant window of approval {grant.approval}",
                                 {"approval": {"id": grant.approval, "rule": d.rule, "status": "granted"}}),))
        if spec.mode == RETRY:
            done = self.store.approved_for(key)
            if done is not None and self.store.use(done.id):  # one retry runs it, on whichever replica
                done.status = USED
                return Pass((self._approved_verdict(done),))
            a = self.store.pending_for(key) or self._create(m, d, who, cx.upstream, tool, arguments, key)
            return Refuse(self._refusal(a), (self._pending_verdict(a),), Action.APPROVE)
        flow = self._flows.get(cx.flow_id or "")
        token = _progress_token(m)
        streamed = (flow is not None and token is not None and self.holding.ready and _wants_events(flow)
                    and _holdable(flow))
        a = self._create(m, d, who, cx.upstream, tool, arguments, key, waiting=True)
        self._held[a.id] = cx.flow_id or ""
        if streamed:
            # The call goes on through the gateway's remaining checks, then to the holding server
            # (`divert`), which answers the client with progress while the decision is pending.
            self._streamed[flow.id] = (a, m, token)
            return Pass((self._pending_verdict(a),))

        async def decided() -> Outcome:
            try:
                done = await self._wait(a, spec.timeout, flow)
            finally:
                a.waiting = False
            if done.status == APPROVED and self.store.use(done.id):
                done.status = USED
                return Pass((self._approved_verdict(done),))
            return Refuse(self._refusal(done), (self._final_verdict(done),),
                          Action.DENY if done.status == DENIED else Action.APPROVE)

        return Hold(decided, f"waiting for approval {a.id}", (self._pending_verdict(a),))

    def _learn_continuation(self, m: Message, cx: Context) -> None:
        """A 2026-07-28 multi-round-trip call: the `requestState` an approved call's answer carries lets its
        next rounds (the same call, by the same caller, with that state) through without asking again."""
        if m.kind != Kind.RESPONSE or not isinstance(m.params, dict):
            return
        state = m.params.get("requestState")
        flow = self._flows.get(cx.flow_id or "")
        if not isinstance(state, str) or flow is None:
            return
        held = flow.metadata.get(Meta.APPROVAL) or {}
        if held.get("status") in ("used", CONTINUED) and isinstance(held.get("id"), str):
            self._continuations.put(_digest(state), held["id"])

    def _continued(self, m: Message, key: str) -> Approval | None:
        state = m.params.get("requestState") if isinstance(m.params, dict) else None
        if not isinstance(state, str):
            return None
        continues = self._continuations.get(_digest(state))
        a = self.store.get(continues) if continues is not None else None
        # The same call only: identity, upstream, method, tool and arguments as approved.
        return a if a is not None and a.status == "used" and a.binding == key else None

    async def _wait(self, a: Approval, timeout: float, flow: http.HTTPFlow | None) -> Approval:
        """The decision: through the API, or in mitmweb, where the held flow shows as intercepted
        (resume = approve, kill = deny, both the local operator's decisions)."""
        if flow is None:
            return await self.store.wait(a.id, timeout)
        flow.intercept()
        waiter = asyncio.ensure_future(self.store.wait(a.id, timeout))
        resumed = asyncio.ensure_future(flow.wait_for_resume())
        killed = asyncio.ensure_future(_until_killed(flow))  # kill() sets no event: it is watched for
        try:
            await asyncio.wait({waiter, resumed, killed}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done() and (resumed.done() or killed.done()):
                if flow.error is not None and flow.error.msg != Error.KILLED_MESSAGE:
                    self.store.cancel(a.id, f"the client went away ({flow.error.msg})")
                else:
                    dead = flow.error is not None or not flow.live
                    self.store.decide_locally(a.id, not dead, "killed in mitmweb" if dead else "resumed in mitmweb")
            return await waiter
        finally:
            resumed.cancel()
            killed.cancel()
            if flow.intercepted:
                flow.resume()

    # --- a held call answered with progress (the holding server) -----------------------

    async def running(self) -> None:
        try:
            await self.holding.start()
        except OSError as e:  # calls still wait, only without progress notifications
            logger.warning("mcp-bastion: approval progress is off (holding server: %s)", e)
        self._orphans()

    def _orphans(self) -> None:
        """A shared store may still list calls this replica held before it was killed: their clients are
        gone with it, so they are cancelled (a decision would otherwise approve a call nobody runs)."""
        if not self.hub.backend.shared:
            return
        try:
            for a in self.store.pending():
                if a.waiting and a.holder == self.hub.replica and a.id not in self._held:
                    self.store.cancel(a.id, f"the gateway replica {a.holder} holding the call restarted; "
                                            "it was not forwarded")
        except Unavailable as e:
            logger.warning("mcp-bastion: could not look for calls held before a restart: %s", e)

    def divert(self, flow: http.HTTPFlow, go: bool = True) -> None:
        """After every request stage passed: a call held on a stream goes to the holding server instead
        of the upstream. The Pipeline calls this last; the Gate refuses a pending call not diverted."""
        held = self._streamed.pop(flow.id, None)
        if held is None:
            return
        a, m, token = held
        if not go or flow.response or flow.error or not flow.live:
            self.store.cancel(a.id, "the call was answered or failed in the gateway before it could wait")
            self._held.pop(a.id, None)
            return
        if not self.holding.ready:
            raise RuntimeError("the holding server is not running")
        req = flow.request
        scheme, host, port = req.scheme, req.host, req.port
        state = {"forwarded": False}

        def received() -> None:  # the flow shows (and is recorded with) its real upstream again
            self._tickets.pop(flow.id, None)
            req.data.host, req.data.port, req.data.scheme = host, port, scheme.encode()
            req.headers.pop(TICKET_HEADER, None)

        def gone(why: str) -> None:
            self._tickets.pop(flow.id, None)
            self._held.pop(a.id, None)
            self.store.cancel(a.id, why)

        def forwarded(status: int) -> None:
            state["forwarded"] = True
            logger.info("mcp-bastion: approved call %s forwarded (upstream answered HTTP %s)", a.id, status)

        async def outcome() -> Any:
            try:
                # Not intercepted in mitmweb (mitmproxy would hold the stream's own hooks until resumed),
                # but killing it there is a denial, as for an intercepted one.
                waiter = asyncio.ensure_future(self.store.wait(a.id, a.spec.timeout))
                killed = asyncio.ensure_future(_until_killed(flow))
                try:
                    await asyncio.wait({waiter, killed}, return_when=asyncio.FIRST_COMPLETED)
                    if not waiter.done():
                        if flow.error is not None and flow.error.msg == Error.KILLED_MESSAGE:
                            self.store.decide_locally(a.id, False, "killed in mitmweb")
                        else:
                            self.store.cancel(a.id, "the client went away"
                                              + (f" ({flow.error.msg})" if flow.error is not None else ""))
                    done = await waiter
                finally:
                    killed.cancel()
            finally:
                a.waiting = False
                self._held.pop(a.id, None)
            if done.status == APPROVED and self.store.use(done.id):
                done.status = USED
                fs.record(flow, m, (self._approved_verdict(done),))
                return FORWARD
            fs.record(flow, m, (self._final_verdict(done),))
            flow.metadata[Meta.REFUSED] = True
            refusal = self._refusal(done)
            return errors.error_message(m.id, refusal.code, refusal.message, refusal.data)

        body = req.raw_content or b""
        req.headers["content-length"] = str(len(body))  # framed, whatever the client's HTTP version
        ticket = Ticket(scheme=scheme, host=host, port=port, request_id=m.id, outcome=outcome,
                        notices=lambda n: self._notices(a, m, token, flow, n), every=self.progress_every,
                        verify=not ctx.options.ssl_insecure, cafile=ctx.options.ssl_verify_upstream_trusted_ca,
                        capath=ctx.options.ssl_verify_upstream_trusted_confdir,
                        expect=expectation(req.method, req.path, body),
                        received=received, gone=gone, forwarded=forwarded)
        key = self._tickets[flow.id] = self.holding.issue(ticket)
        req.headers[TICKET_HEADER] = key
        flow.metadata[Meta.HELD] = {"approval": a.id, "upstream": f"{host}:{port}"}
        req.data.host, req.data.port, req.data.scheme = "127.0.0.1", self.holding.port, b"http"

    def response(self, flow: http.HTTPFlow) -> None:
        self._ended(flow, "the gateway answered the call before it reached the holding server")

    def error(self, flow: http.HTTPFlow) -> None:
        self._ended(flow, "the call failed before it reached the holding server"
                    + (f" ({flow.error.msg})" if flow.error is not None else ""))

    def _ended(self, flow: http.HTTPFlow, why: str) -> None:
        """A held call's flow that ends without its request reaching the holding server (a later addon
        refused it, mitmproxy could not send it): its ticket is withdrawn and the approval cancelled."""
        key = self._tickets.pop(flow.id, None)
        if key is not None:
            self.holding.withdraw(key, why)

    def _notices(self, a: Approval, m: Message, token: Any, flow: http.HTTPFlow, n: int) -> list[dict[str, Any]]:
        """What a client waiting on `a` hears at the n-th tick: a log message first, then progress."""
        now = time.time()
        left = max(0, round(a.expires - now))
        progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {
            "progressToken": token, "progress": n * self.progress_every, "total": a.spec.timeout,
            "message": f"waiting for approval {a.id} by {', '.join(a.spec.approvers)} ({left}s left)"}}
        if n:
            return [progress]
        where = f"{_origin(flow)}{API_PREFIX}/{a.id}"
        text = (f"{m.method} {a.tool or ''} waits for approval {a.id} (rule '{a.rule}'): a member of "
                f"{', '.join(a.spec.approvers)} decides at {where} or with `scripts/approvals approve {a.id} "
                f"--gateway {_origin(flow)}`; it expires in {left}s").replace("  ", " ")
        log = {"jsonrpc": "2.0", "method": "notifications/message", "params": {
            "level": "notice", "logger": "mcp-bastion",
            "data": {"message": text, "approval": a.id, "rule": a.rule, "approvers": list(a.spec.approvers),
                     "expires": a.view()["expires"], "url": where}}}
        return [log, progress]

    def _create(self, m: Message, d: Any, who: Person, upstream: str | None, tool: str | None, arguments: Any,
                key: str, waiting: bool = False) -> Approval:
        now = time.time()
        a = Approval(id=MemoryStore.new_id(), rule=d.rule, reason=d.reason, spec=d.approval, requester=who,
                     upstream=upstream, method=m.method, tool=tool, arguments=arguments, binding=key,
                     created=now, expires=now + d.approval.timeout, waiting=waiting,
                     holder=self.hub.replica if waiting else None)
        try:
            return self.store.create(a)
        except Refused as e:
            raise RuntimeError(str(e)) from None  # fails closed: never forwarded

    @staticmethod
    def _summary(a: Approval, **extra: Any) -> dict[str, Any]:
        out = {"id": a.id, "rule": a.rule, "status": a.status, "mode": a.spec.mode,
               "requester": a.requester.shown(), "approvers": list(a.spec.approvers)}
        if a.decided_by is not None:
            out["decided_by"] = a.decided_by.shown()
            out["decision_reason"] = a.decision_reason
        if a.decided_at is not None:
            out["waited_ms"] = round((a.decided_at - a.created) * 1000)
        out.update(extra)
        return out

    def _pending_verdict(self, a: Approval) -> Verdict:
        return Verdict(StageName.APPROVAL, "hold", a.rule,
                       f"held for approval {a.id} by {', '.join(a.spec.approvers)} ({a.spec.mode} mode)",
                       {"approval": self._summary(a)})

    def _approved_verdict(self, a: Approval) -> Verdict:
        why = f"approved by {a.decided_by.shown() if a.decided_by else '?'} ({a.id})"
        if a.decision_reason:
            why += f": {a.decision_reason}"
        return Verdict(StageName.APPROVAL, Action.ALLOW, a.rule, why, {"approval": self._summary(a)})

    def _final_verdict(self, a: Approval) -> Verdict:
        action = Action.DENY if a.status == DENIED else Action.APPROVE
        return Verdict(StageName.APPROVAL, action, a.rule, self._refusal(a).message, {"approval": self._summary(a)})

    @staticmethod
    def _refusal(a: Approval) -> Refusal:
        data = {"rule": a.rule, "approval": a.id, "status": a.status, "approvers": list(a.spec.approvers)}
        if a.status == "pending":
            how = ("retry the same call once it is approved" if a.spec.mode == RETRY else "it waits for a decision")
            return Refusal(403, errors.APPROVAL_REQUIRED,
                           f"{a.method} {a.tool or ''} needs approval (rule '{a.rule}'): request {a.id} is pending "
                           f"with {', '.join(a.spec.approvers)}; {how}".replace("  ", " "), data)
        if a.status == DENIED:
            data["reason"] = a.decision_reason
            data["decided_by"] = a.decided_by.shown() if a.decided_by else None
            return Refusal(403, errors.DENIED, f"approval {a.id} (rule '{a.rule}') was denied by "
                           f"{data['decided_by']}: {a.decision_reason}", data)
        return Refusal(403, errors.APPROVAL_REQUIRED,
                       f"approval {a.id} (rule '{a.rule}') {a.status} without a decision"
                       + (f": {a.decision_reason}" if a.decision_reason else ""), data)

    def done(self) -> None:
        self.holding.close()
        self._streamed.clear()
        # What this gateway holds; with the embedded store, every pending request (a restart forgets them).
        # A shared store keeps other replicas' requests, and retry-mode ones any replica may still serve.
        ids = dict.fromkeys(self._held)
        if not self.hub.backend.shared:
            ids.update(dict.fromkeys(a.id for a in self.store.pending()))
        for approval_id in ids:
            try:
                self.store.cancel(approval_id, "the gateway stopped; nothing held runs unapproved")
                a = self.store.get(approval_id)
            except Unavailable:
                logger.error("mcp-bastion: could not cancel %s: the shared state is unreachable (its call was "
                             "not forwarded; the request expires there unanswered)", approval_id)
                a = None
            flow = self._flows.get(self._held.pop(approval_id, ""))
            if flow is not None:  # before the AuditLog writes it (it comes later in the bundle)
                if a is not None:
                    flow.metadata[Meta.APPROVAL] = self._summary(a)
                fs.add_decision(flow, stage=StageName.APPROVAL, direction=Direction.C2S, action=Action.DENY,
                                rule=a.rule if a is not None else None,
                                reason=f"approval {approval_id} cancelled: the gateway stopped while "
                                       "the call waited; it was not forwarded")

    # --- the API ------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """After Auth: an API call is not MCP traffic (no message stage applies); `request` answers it."""
        self._flows[flow.id] = flow  # a held call's flow shows as intercepted in mitmweb
        api.claim(flow, API_PREFIX, "approval API")

    def request(self, flow: http.HTTPFlow) -> None:
        api.serve(flow, API_PREFIX, "approval API", self._serve, "nothing was decided")

    def _serve(self, flow: http.HTTPFlow) -> None:
        path = flow.request.path.split("?", 1)[0]
        if approvals_page.wanted(flow.request.method, path, flow.request.headers.get("accept", "")):
            page, headers = approvals_page.render()  # the same for everybody: it asks the API for the data
            flow.response = http.Response.make(200, page if flow.request.method == "GET" else b"", headers)
            flow.metadata[Meta.REFUSED] = True  # answered by the gateway, not the upstream
            return
        if fs.identity(flow).sub is None:
            replies.document(flow, 403, {"error": "approvals need a verified reviewer: identity checks are off "
                                                  "or the caller is anonymous"})
            return
        reviewer = person(flow.metadata.get(Meta.IDENTITY))
        parts = [p for p in path[len(API_PREFIX):].split("/") if p]
        method = flow.request.method
        try:
            if not parts and method == "GET":
                items = [{**a.view(), "can_decide": self._may_decide(a, reviewer)} for a in self.store.all()
                         if set(reviewer.groups) & set(a.spec.approvers) or a.requester.key == reviewer.key]
                replies.document(flow, 200, items)
            elif parts == ["me"] and method == "GET":
                replies.document(flow, 200, {"reviewer": reviewer.shown(), "groups": list(reviewer.groups)})
            elif len(parts) == 1 and method == "GET":
                a = self._visible(parts[0], reviewer)
                replies.document(flow, 200, a.view())
            elif len(parts) == 2 and method == "POST" and parts[1] in ("approve", "deny"):
                reason = _reason(flow.request.content)
                a = self.store.decide(parts[0], reviewer, parts[1] == "approve", reason)
                logger.warning("mcp-bastion: approval %s %s by %s (rule %s, requested by %s)", a.id, a.status,
                               reviewer.shown(), a.rule, a.requester.shown())
                fs.add_decision(flow, stage=StageName.APPROVAL, direction=Direction.C2S,
                                action=Action.ALLOW if a.status == APPROVED else Action.DENY, rule=a.rule,
                                reason=f"{reviewer.shown()} {a.status} {a.id} of {a.requester.shown()}"
                                       + (f": {a.decision_reason}" if a.decision_reason else ""))
                flow.metadata[Meta.APPROVAL] = self._summary(a)
                replies.document(flow, 200, a.view())
            else:
                replies.document(flow, 405 if len(parts) <= 2 else 404, {"error": "unknown approval API call"})
        except Refused as e:
            status = 404 if str(e).startswith("no approval request") else 409
            if method == "POST" and len(parts) == 2:  # a decision that could not be made is audited too
                flow.metadata[Meta.APPROVAL] = {"id": parts[0][:64], "status": "not decided", "refused": str(e)}
                fs.add_decision(flow, stage=StageName.APPROVAL, direction=Direction.C2S, action=Action.DENY,
                                rule=None, reason=f"{reviewer.shown()} could not {parts[1]} {parts[0][:64]}: {e}")
            replies.document(flow, status, {"error": str(e)})
        except ValueError as e:
            replies.document(flow, 400, {"error": str(e)})

    @staticmethod
    def _may_decide(a: Approval, reviewer: Person) -> bool:
        return a.status == "pending" and a.requester.key != reviewer.key and bool(
            set(reviewer.groups) & set(a.spec.approvers))

    def _visible(self, approval_id: str, reviewer: Person) -> Approval:
        a = self.store.get(approval_id)
        if a is None or not (set(reviewer.groups) & set(a.spec.approvers) or a.requester.key == reviewer.key):
            raise Refused(f"no approval request {approval_id}")
        return a


def _reason(content: bytes | None) -> str | None:
    if not content:
        return None
    try:
        body = json.loads(content)
    except ValueError:
        raise ValueError("the body must be JSON: {\"reason\": \"...\"}") from None
    reason = body.get("reason") if isinstance(body, dict) else None
    if reason is not None and not isinstance(reason, str):
        raise ValueError("reason must be a string")
    return reason[:1000] if reason else None


def _digest(state: str) -> str:
    return hashlib.sha256(state.encode("utf-8", "surrogatepass")).hexdigest()


def _progress_token(m: Message) -> Any:
    """The request's `_meta.progressToken` (a string or an integer), or None."""
    meta = m.params.get("_meta") if isinstance(m.params, dict) else None
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    return token if isinstance(token, str) or (isinstance(token, int) and not isinstance(token, bool)) else None


def _wants_events(flow: http.HTTPFlow) -> bool:
    """A single POSTed request whose client accepts an event stream in answer (Streamable HTTP)."""
    body = fs.request_body(flow)
    if flow.request.method != "POST" or body is None or body.batch or len(body.messages) != 1:
        return False
    return accepts_event_stream(flow.request.headers.get_all("accept"))


def accepts_event_stream(values: list[str]) -> bool:
    """Whether `Accept` header values allow `text/event-stream` (directly, `text/*` or `*/*`, with q > 0)."""
    best: dict[str, float] = {}
    for value in values:
        for item in value.split(","):
            kind, *params = [p.strip() for p in item.split(";")]
            q = 1.0
            for p in params:
                name, _, raw = p.partition("=")
                if name.strip().lower() == "q":
                    try:
                        q = float(raw.strip())
                    except ValueError:
                        q = 0.0
            kind = kind.lower()
            best[kind] = max(q, best.get(kind, 0.0)) if kind in best else q
    for kind in ("text/event-stream", "text/*", "*/*"):
        if kind in best:  # the most specific range present decides
            return best[kind] > 0
    return False


_PRINTABLE = re.compile(r"[\x21-\x7e]+")
_CLEAN_VALUE = re.compile(r"[^\r\n\x00]*")


def _holdable(flow: http.HTTPFlow) -> bool:
    """A call the holding server can forward exactly as mitmproxy would: a direct connection (reverse or
    regular mode, no upstream proxy, no client certificate), and a request head it reads the same way."""
    if fs.mode_name(flow) not in ("ReverseMode", "RegularMode") or flow.server_conn.via or ctx.options.client_certs:
        return False
    req = flow.request
    if not _PRINTABLE.fullmatch(req.path) or len(req.path) > 8192:
        return False
    size = 0
    for k, v in req.headers.items(multi=True):
        size += len(k) + len(v) + 4
        if not _PRINTABLE.fullmatch(k) or not _CLEAN_VALUE.fullmatch(v) or not v.isascii():
            return False
    return size < 32 * 1024


def _origin(flow: http.HTTPFlow) -> str:
    """The gateway's origin as this client addressed it."""
    host = flow.metadata.get(Meta.CLIENT_HOST) or flow.request.host_header or "localhost"
    return f"{'https' if flow.client_conn.tls_established else 'http'}://{host}"


def _sender(posts: queue.Queue) -> None:
    while True:
        url, body = posts.get()
        _post(url, body)


def _post(url: str, body: bytes) -> None:
    try:
        req = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()
    except Exception as e:  # the webhook is a notice, not a gate: the decision still happens through the API
        logger.warning("mcp-bastion: approval webhook %s failed: %s", url, e)


async def _until_killed(flow: http.HTTPFlow, every: float = 0.2) -> None:
    while flow.error is None and flow.live:
        await asyncio.sleep(every)
