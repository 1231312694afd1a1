"""
The Policy stage: every MCP message against the ruleset, per identity.

It decides; it never answers. `check()` returns an outcome (see
`core.pipeline`) and the Pipeline addon, with `glue.replies`, does the rest.

- Client to server: every message of the body (each batch member,
  notifications, the client's answers to server requests; body-less requests
  as the pseudo-methods `http:GET`, `http:DELETE`). allow and mask pass (a mask
  decision names its profile for the masking stage), deny and approve refuse.
- Server to client: list results (tools, prompts, resources, resource
  templates) are filtered per identity (`Replace`); server requests and
  notifications are evaluated: a denied request is refused (the client never
  sees it; the upstream gets an error on the client's behalf), a denied
  notification is dropped.
- The ruleset file is reloaded when it changes (checked about once a second);
  an invalid edit is logged and the previous ruleset stays in force.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Optional

from mitmproxy import ctx, exceptions
from mitmproxy.utils import asyncio_utils

from mcp_bastion.core import errors, normalize
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.message import Carrier, Message, TargetKind
from mcp_bastion.core.pipeline import Context, Drop, Outcome, Pass, Refuse, Replace, Verdict
from mcp_bastion.core.rules import Decision, ReloadingRuleset, Ruleset, RulesetError, name_clashes
from mcp_bastion.core.vocab import MALFORMED_RULE, Action, Direction, Kind, StageName
from mcp_bastion.core.wire import private

logger = logging.getLogger("mcp_bastion")

RELOAD_INTERVAL = 1.0
MAX_CLASHES = 10_000  # clashing names remembered across upstreams

NO_RULESET = Ruleset.deny_all(
    "mcp-bastion has no ruleset (option 'ruleset' is unset), so every message is denied"
)


def enforceable(d: Decision, profiles: frozenset[str]) -> Decision:
    """A `mask` decision whose profile no loaded masking stage applies becomes a denial.

    Forwarding unmasked data would be a bypass: refuse instead.
    """
    if d.action != Action.MASK or d.profile in profiles:
        return d
    return Decision("deny", d.rule, f"masking profile '{d.profile}' is not available in this gateway, "
                    "so the data is refused rather than sent unmasked", d.profile)


def verdict(stage: StageName, d: Decision) -> Verdict:
    extra = {}
    if d.profile:
        extra["profile"] = d.profile
        if d.action == Action.DENY:
            # A deny that carries a profile is a `mask` no loaded stage could apply (see enforceable):
            # `ruled` keeps what the rule said, so what-if compares rules, not this gateway's stages.
            extra["ruled"] = "mask"
    return Verdict(stage, d.action, d.rule, None if d.action == Action.ALLOW else d.reason, extra)


def refusal(m: Message, d: Decision) -> Refusal:
    """What the gateway answers for a message the ruleset stops."""
    if d.action == Action.APPROVE:
        return Refusal(403, errors.APPROVAL_REQUIRED, f"{m.what()} needs approval (rule '{d.rule}'): {d.reason}",
                       {"rule": d.rule, "reason": d.reason})
    return Refusal(403, errors.DENIED, f"{m.what()} denied by rule '{d.rule}': {d.reason}",
                   {"rule": d.rule, "reason": d.reason})


def _held(m: Message, d: Decision, cx: Context) -> bool:
    """An approve decision the approval stage will hold (it has approvers, and the stage is loaded)."""
    return d.action == Action.APPROVE and d.approval is not None and cx.approvals


def _masked(m: Message, d: Decision, decisions: tuple[Verdict, ...]) -> Outcome:
    """Let the message pass; a `mask` decision names the profile the masking stage applies to it (and,
    for a client's request, to everything that comes back for it: see `Context.mask_profiles`)."""
    if d.action == Action.MASK and d.profile:
        return Replace(m.with_masks(d.profile), decisions)
    return Pass(decisions)


class Policy:
    """Per-identity policy over every MCP message, in both directions."""

    name = StageName.POLICY

    def __init__(self) -> None:
        self.source: ReloadingRuleset | None = None
        self._watch: asyncio.Task | None = None
        self.clashes: dict[str, set[tuple[TargetKind, str]]] = {}  # upstream -> (kind, folded name) seen clashing

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
        logger.info("mcp-bastion: ruleset %s loaded (%d rule%s, default %s)", path, len(rs.rules),
                    "" if len(rs.rules) == 1 else "s", rs.default)
        for w in rs.warnings:
            logger.warning("mcp-bastion: %s", w)

    def running(self) -> None:
        normalize.prepare()  # its Unicode tables, before the first request rather than during it
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

    def ruleset(self) -> Ruleset:
        """The ruleset in force now (reloaded first if the file changed)."""
        return self.source.current() if self.source is not None else NO_RULESET

    # --- the stage ---------------------------------------------------------------

    def check(self, m: Message, cx: Context) -> Outcome:
        if m.direction == Direction.S2C:
            return self._server_message(m, cx)
        clash = self._clash(m, cx)
        if clash is not None:
            return clash
        d = enforceable(self.ruleset().evaluate(cx.identity, m, Direction.C2S, cx.upstream), cx.masking_profiles)
        v = verdict(StageName.POLICY, d)
        if _held(m, d, cx) and m.kind == Kind.REQUEST:
            return Replace(m.with_approval(d), (v,))  # the approval stage holds it for a person
        if d.blocks:
            return Refuse(refusal(m, d), (v,), Action(d.action))
        if m.request is not None and m.request.kind == Kind.REQUEST:
            # A task fetch (tasks/get, tasks/result, ...) linked to the call it runs: what the call
            # would get now is what the caller may fetch, under the ruleset in force now.
            call = enforceable(self.ruleset().evaluate(cx.identity, m.request, Direction.C2S, cx.upstream),
                               cx.masking_profiles)
            # A call an approval held created its task only once a person approved it: fetching its outcome
            # asks nobody again (the Tasks stage keeps the task its creator's).
            if call.blocks and not _held(m.request, call, cx):
                why = Refusal(403, errors.DENIED if call.action == Action.DENY else errors.APPROVAL_REQUIRED,
                              f"{m.method} refused: the call it belongs to, {m.request.what()}, is "
                              f"{'denied' if call.action == Action.DENY else 'held for approval'} by rule "
                              f"'{call.rule}': {call.reason}", {"rule": call.rule, "reason": call.reason})
                return Refuse(why, (v, verdict(StageName.POLICY, call)), Action(call.action))
            if call.action == Action.MASK:
                return Replace(m.with_masks(call.profile), (v, verdict(StageName.POLICY, call)))
            return _masked(m, d, (v,))
        return _masked(m, d, (v,))

    def _clash(self, m: Message, cx: Context) -> Outcome | None:
        """Refuse a call to a tool or prompt whose name another of the upstream's spells the same to rules."""
        target = m.target
        if target is None or m.kind != Kind.REQUEST or not self.clashes.get(cx.upstream or ""):
            return None
        try:
            folded = normalize.name(target.name)
        except normalize.TooCostly:
            return None  # the ruleset refuses it as malformed
        if (target.kind, folded) not in self.clashes[cx.upstream or ""]:
            return None
        why = (f"{target} refused: the upstream lists several {target.kind}s named {target.name!r} up to case or "
               "Unicode form, and no rule can tell them apart")
        v = Verdict(StageName.POLICY, Action.DENY, MALFORMED_RULE, why)
        return Refuse(Refusal(403, errors.DENIED, why, {"rule": MALFORMED_RULE, "reason": "name_clash"}), (v,),
                      Action.DENY)

    def _learn_clashes(self, upstream: str | None, result: object, method: str | None) -> None:
        clashes = name_clashes(result, method)
        if clashes:
            known = self.clashes.setdefault(upstream or "", set())
            new = clashes - known
            if new and sum(map(len, self.clashes.values())) < MAX_CLASHES:
                known.update(new)
                logger.warning("mcp-bastion: upstream %s lists items whose names differ only in case or Unicode "
                               "form: %s; they are hidden and calls to them refused",
                               upstream, ", ".join(sorted(f"{k} {n}" for k, n in new)))

    def _server_message(self, m: Message, cx: Context) -> Outcome:
        ruleset = self.ruleset()
        if m.kind == Kind.RESPONSE:
            # What a list answer lists comes from the request it answers; an answer to anything else
            # (or to no known request) is filtered by its shape, so a list cannot hide behind another method.
            method = m.answers if m.listing is not None else None
            self._learn_clashes(cx.upstream, m.params, method)
            result, hidden = ruleset.filter_list(cx.identity, cx.upstream, method, m.params, cx.masking_profiles)
            decisions: tuple[Verdict, ...] = ()
            if hidden:
                decisions = (Verdict(StageName.RESP_POLICY, Action.FILTER, None,
                                     f"{len(hidden)} item(s) hidden from this caller",
                                     {"hidden": hidden[:50], "method": m.answers}),)
            result = private(result)
            if result is m.params:
                return Pass()
            return Replace(m.replace({**m.raw, "result": result}), decisions)
        if m.kind == Kind.ERROR:
            return Pass()
        d = enforceable(ruleset.evaluate(cx.identity, m, Direction.S2C, cx.upstream), cx.masking_profiles)
        if not d.blocks:
            return _masked(m, d, (verdict(StageName.RESP_POLICY, d),))
        if m.kind == Kind.REQUEST:
            # On a 2025 stream the upstream gets an error in the client's place; inside an
            # input_required result the call itself ends with this refusal.
            extra = {"answered": "error sent to upstream"} if m.carrier is not Carrier.INPUT_REQUIRED else {}
            v = Verdict(StageName.RESP_POLICY, d.action, d.rule, d.reason, extra)
            return Refuse(refusal(m, d), (v,), Action(d.action))
        return Drop(f"denied by rule '{d.rule}'", (verdict(StageName.RESP_POLICY, d),))
