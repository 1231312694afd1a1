"""
The Pipeline addon: runs the message stages over every MCP message, in both
directions, in JSON bodies, batches and each SSE event.

The stages (Policy today; masking, approval and tool pinning next) are given
by `bundle()` in order. For each message the pipeline hands every stage the
current message, records each stage's decisions on the flow, and applies the
outcome (see `core.pipeline`); a body is serialised once, after all stages.

- Request (`request`, async: a stage may hold a message while other flows go
  on): a refusal of any message answers the whole body (`replies.refuse_request`);
  otherwise the request goes on with the stages' messages, and each stage is
  marked for the Gate.
- Buffered response (`response`, async): refused server requests are answered
  to the upstream on the client's behalf, dropped messages removed, refused
  answers replaced by an error; nothing left means 202 Accepted.
- Event stream (`responseheaders`): the pipeline attaches itself to the
  Gateway's `SSEStream`, which calls it for every event; nothing can wait
  inside a stream, so a hold there is a refusal.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Sequence
from typing import Any

from mitmproxy import ctx, http

from mcp_bastion.core import errors, pipeline
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.jsonrpc import Body, dumps
from mcp_bastion.core.message import Message, http_request
from mcp_bastion.core.pipeline import Context, Drop, Hold, Refuse, Result, Run, Stage, StageError
from mcp_bastion.core.vocab import Direction, Kind, Meta, StageName
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue import replies
from mcp_bastion.glue.failclosed import fail_closed
from mcp_bastion.glue.stream import SSEStream

logger = logging.getLogger("mcp_bastion")


class _Guarded:
    """A stage whose exceptions name it (so a failure says which stage failed)."""

    def __init__(self, stage: Stage):
        self.stage = stage
        self.name = stage.name

    def check(self, m: Message, cx: Context) -> pipeline.Outcome:
        try:
            return self.stage.check(m, cx)
        except Exception as exc:
            name = self.name if m.direction != Direction.S2C else self.name.response
            raise StageError(name, f"{type(exc).__name__}: {exc}") from exc


class Pipeline:
    """Every message through the message stages, in order."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"a stage is listed twice: {names}")
        self.stages = tuple(stages)
        self._guarded = tuple(_Guarded(s) for s in stages)
        self._streams: weakref.WeakKeyDictionary[http.HTTPFlow, Context] = weakref.WeakKeyDictionary()
        self.answers = replies.UpstreamAnswers()
        # The stages are fixed: their names, and whether one holds for approval, are worked out once.
        self._request_names = tuple(str(s.name) for s in self.stages)
        self._response_names = tuple(str(s.name.response) for s in self.stages)
        self.approvals = any(getattr(s, "holds_approvals", False) for s in self.stages)
        """A stage holds calls for approval (`holds_approvals`): an approve rule with approvers waits for it."""

    @property
    def request_stages(self) -> list[StageName]:
        return [s.name for s in self.stages]

    @property
    def response_stages(self) -> list[StageName]:
        return [s.name.response for s in self.stages]

    def _context(self, flow: http.HTTPFlow) -> Context:
        return fs.context(flow, self.masking_profiles(), self.approvals)

    def masking_profiles(self) -> frozenset[str]:
        """The masking profiles the stages can apply now (a `mask` rule needs one): a stage declares
        them as `masking_profiles` (the Masking stage's follow the ruleset in force)."""
        return frozenset().union(*(getattr(s, "masking_profiles", ()) or () for s in self.stages))

    def done(self) -> None:
        self.answers.close()

    # --- client to server --------------------------------------------------------

    @fail_closed(StageName.POLICY)
    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not fs.is_mcp(flow):
            return
        body = fs.request_body(flow)
        messages = body.messages if body is not None else [http_request(flow.request.method)]
        run = await pipeline.run(self._guarded, messages, self._context(flow),
                                 on_hold=lambda m, hold: _held(flow, hold))
        finished = False
        try:
            self._finish(flow, run, body)
            finished = True
        finally:
            # Last: a call held on a stream leaves for the holding server (or, answered or failed, stops waiting).
            for stage in self.stages:
                divert = getattr(stage, "divert", None)
                if divert is not None:
                    divert(flow, finished)

    def _finish(self, flow: http.HTTPFlow, run: Run, body: Body | None) -> None:
        self._record(flow, run)
        if flow.response or flow.error:  # the client went away (or was answered) while a stage held
            return
        _requests_are_answered(run)
        if run.refused:
            replies.refuse_request(flow, run, batch=body is not None and body.batch)
            return
        if body is not None and run.changed:
            kept = run.messages
            if not kept:  # only notifications or answers, every one dropped: nothing to forward
                replies.accepted(flow)
                return
            flow.request.content = dumps([m.raw for m in kept] if body.batch else kept[0].raw)
            fs.set_request_body(flow, Body(kept, body.batch, None))
            self._rewrite_headers(flow, run)
        fs.mark_stages(flow, self._request_names)

    def _rewrite_headers(self, flow: http.HTTPFlow, run: Run) -> None:
        """A request a stage rewrote keeps its routing headers in agreement with it (`Mcp-Param-*`
        follow the arguments they copy): stages that know the headers say how (`rewrite_headers`)."""
        for r in run.results:
            if r.message is None or not r.changed or not r.original.headers:
                continue
            for stage in self.stages:
                rewrite = getattr(stage, "rewrite_headers", None)
                if rewrite is None:
                    continue
                for name, value in rewrite(r.original, r.message, flow.metadata.get(Meta.UPSTREAM)).items():
                    if value is None:
                        flow.request.headers.pop(name, None)
                    else:
                        flow.request.headers[name] = value

    # --- server to client --------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if not fs.is_mcp(flow) or fs.refused(flow) or flow.response is None:
            return
        if isinstance(flow.response.stream, SSEStream):
            cx = self._streams[flow] = self._context(flow)  # who and where do not change mid-stream
            flow.response.stream.stages = self.on_event
            if cx.mask_profiles:
                # A masked call's stream: what no stage reads (comments, `id:`, `retry:`) must not carry
                # what the masking stage would have masked.
                for stage in self.stages:
                    sensitive = getattr(stage, "sensitive", None)
                    if sensitive is not None:
                        flow.response.stream.sensitive = functools.partial(sensitive, cx.mask_profiles)
            fs.mark_stages(flow, self._response_names)

    @fail_closed(StageName.RESP_POLICY)
    async def response(self, flow: http.HTTPFlow) -> None:
        if not fs.is_mcp(flow) or fs.refused(flow) or flow.response is None:
            return
        resp = flow.response
        if callable(resp.stream) or resp.stream:
            return  # streamed: handled event by event
        body = fs.response_body(flow)
        if body is not None:
            run = await pipeline.run(self._guarded, body.messages, self._context(flow))
            self._record(flow, run)
            if run.changed:
                values = self._deliver(flow, run)
                if values:
                    resp.content = dumps(values if body.batch else values[0])
                    fs.set_response_body(flow, Body(run.messages, body.batch, None))
                else:
                    resp.status_code = 202
                    resp.content = b""
                    fs.set_response_body(flow, None)
        fs.mark_stages(flow, self._response_names)

    def on_event(self, flow: http.HTTPFlow, messages: list[Message], batch: bool) -> list[Any]:
        """The stages over one SSE event's messages; returns the JSON values the client gets."""
        cx = self._streams.get(flow) or self._context(flow)
        run = pipeline.run_now(self._guarded, messages, cx)
        self._record(flow, run)
        if not run.changed:
            return [m.raw for m in messages]
        return self._deliver(flow, run)

    def _deliver(self, flow: http.HTTPFlow, run: Run) -> list[Any]:
        """What the client gets of the server's messages; refused server requests are answered upstream."""
        to_client: list[Any] = []
        to_upstream: list[dict] = []
        for r in run.results:
            if r.message is not None:
                to_client.append(r.message.raw)
                continue
            # Refused or dropped: whoever waits for an answer still gets one. The server's request is
            # answered upstream on the client's behalf; the client's request gets an error for its id.
            refusal = r.outcome.refusal if isinstance(r.outcome, Refuse) else _withheld(r)
            if r.original.kind == Kind.REQUEST:
                to_upstream.append(replies.server_answer(r.original, refusal))
            elif r.original.kind in (Kind.RESPONSE, Kind.ERROR):
                to_client.append(replies.client_error(r.original, refusal))
        if to_upstream:
            self.answers.send(flow, to_upstream, verify=not ctx.options.ssl_insecure)
        return to_client

    @staticmethod
    def _record(flow: http.HTTPFlow, run: Run) -> None:
        pending = list(run.results)
        while pending:
            r = pending.pop(0)
            if r.decisions:
                fs.record(flow, r.original, r.decisions)
            pending[:0] = r.inner  # then the messages it carried, in order


def _held(flow: http.HTTPFlow, hold: Hold) -> None:
    """A request waits: say so on the flow now (`bastion.approval`), for mitmweb and for a shutdown record."""
    for v in hold.decisions:
        if isinstance(v.extra.get("approval"), dict):
            flow.metadata[Meta.APPROVAL] = {**(flow.metadata.get(Meta.APPROVAL) or {}), **v.extra["approval"]}
    fs.annotate(flow)


def _requests_are_answered(run: Run) -> None:
    """A client's request a stage dropped is refused instead: the client must get an answer for its id."""
    for r in run.results:
        if isinstance(r.outcome, Drop) and r.original.kind == Kind.REQUEST:
            reason = r.outcome.reason
            r.outcome = Refuse(Refusal(403, errors.DENIED, f"{r.original.what()} was not forwarded: {reason}",
                                       {"reason": reason}), r.outcome.decisions)


def _withheld(r: Result) -> Refusal:
    """The error standing in for a server message a stage dropped, for whoever waits on its id."""
    reason = r.outcome.reason if isinstance(r.outcome, Drop) else "withheld"
    return Refusal(502, errors.GATEWAY_ERROR, f"mcp-bastion withheld {r.original.what()}: {reason}",
                   {"reason": reason})
