"""
Pinning: tool, prompt and template definitions pinned at first sight and scanned.

A message stage, after the Policy (which hides what a caller may not use, and
items whose names clash), before Masking:

- an answer to `tools/list`, `prompts/list` or `resources/templates/list`: each
  item is compared with its pin (`core.pins`); the first definition seen is
  pinned, one that differs is a change. Each new or changed definition is
  scanned (`core.toolscan`); the ruleset's `pinning.findings` says what a
  finding does (hide, refuse, warn). A changed item, and one a finding hides,
  is taken off the list;
- a call (`tools/call`, `prompts/get`, a `resources/read` of a URI a template
  makes) to a changed item, or to one a finding hides or refuses, is refused
  with an error that names the item and says why, until a reviewer accepts the
  new definition. Other items of the same upstream keep working.

It also serves `/bastion/pins` on the gateway's own listener to the members of
the `pin_reviewers` groups (the Auth addon verified their token): `GET` the
pins (`?name=&kind=&upstream=` narrows them, with a readable diff of a change),
`POST /bastion/pins/accept` and `/bastion/pins/forget` with
`{"name", "kind", "upstream"}`. `scripts/pins` is its command line.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, exceptions, http

from mcp_bastion.core import errors, normalize
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.message import Message
from mcp_bastion.core.pins import (
    CHANGED,
    CHANGED_NOW,
    LISTED,
    NEW,
    PROMPT,
    TEMPLATE,
    TOOL,
    Pin,
    PinError,
    PinStore,
    diff,
    name_of,
    template_matches,
)
from mcp_bastion.core.pipeline import Context, Outcome, Pass, Refuse, Replace, Verdict
from mcp_bastion.core.rules import PinningSpec, Ruleset
from mcp_bastion.core.toolscan import SHADOWING, Finding, scan
from mcp_bastion.core.vocab import Action, Direction, Kind, Meta, StageName
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue import replies

logger = logging.getLogger("mcp_bastion")

API_PREFIX = "/bastion/pins"
CALLS = {"tools/call": TOOL, "prompts/get": PROMPT}


class Pinning:
    name = StageName.PIN

    def __init__(self, ruleset: Callable[[], Ruleset]):
        self._ruleset = ruleset
        self.store = PinStore()
        self.enabled = True
        self.reviewers: frozenset[str] = frozenset()

    def load(self, loader) -> None:
        loader.add_option("pin_tools", bool, True,
                          "Pin each upstream's tool, prompt and template definitions when first seen; hide and "
                          "refuse an item whose definition changed until a reviewer accepts it (scripts/pins).")
        loader.add_option("pin_store", str, "",
                          "File keeping the pins across restarts (JSON). Empty: pins live as long as the process.")
        loader.add_option("pin_reviewers", str, "",
                          "Comma-separated groups whose members may accept or forget pins through /bastion/pins "
                          "(e.g. security). Empty: nobody, through the gateway.")

    def configure(self, updated: set[str]) -> None:
        if "pin_tools" in updated:
            self.enabled = bool(ctx.options.pin_tools)
        if "pin_reviewers" in updated:
            groups = [g.strip() for g in ctx.options.pin_reviewers.split(",") if g.strip()]
            self.reviewers = frozenset(groups)
        if "pin_store" in updated:
            path = ctx.options.pin_store.strip() or None
            try:
                store = PinStore(path)
                if path:
                    store.lock()
            except (PinError, OSError) as e:
                raise exceptions.OptionsError(f"pin_store: {e}") from None
            self.store.unlock()
            self.store = store
            if path:
                logger.info("mcp-bastion: %d pinned definitions from %s", len(store.all()), path)

    def done(self) -> None:
        self.store.unlock()

    # --- the stage -----------------------------------------------------------------

    def _spec(self) -> PinningSpec:
        return self._ruleset().pinning

    def check(self, m: Message, cx: Context) -> Outcome:
        if not self.enabled or m.carried:
            return Pass()
        if m.direction == Direction.S2C:
            if m.kind == Kind.RESPONSE and m.answers in LISTED and isinstance(m.params, dict):
                return self._listed(m, cx)
            return Pass()
        if m.kind != Kind.REQUEST:
            return Pass()
        blocked = self._blocked_target(m, cx.upstream or "")
        if blocked is None:
            return Pass()
        pin, why, reason = blocked
        refusal = Refusal(403, errors.DENIED, f"{pin.kind} {pin.name} refused: {why}",
                          {"reason": reason, "item": pin.name, "kind": pin.kind, "upstream": pin.upstream})
        return Refuse(refusal, (Verdict(StageName.PIN, Action.DENY, None, why,
                                        {"pin": {"item": pin.name, "kind": pin.kind, "status": reason}}),),
                      Action.DENY)

    def _blocked_target(self, m: Message, upstream: str) -> tuple[Pin, str, str] | None:
        params = m.params if isinstance(m.params, dict) else {}
        kind = CALLS.get(m.method or "")
        if kind is not None:
            name = params.get("name")
            pin = self.store.get(upstream, kind, name) if isinstance(name, str) else None
            return self._blocking(pin) if pin is not None else None
        if m.method == "resources/read" and isinstance(params.get("uri"), str):
            for pin in self.store.all():
                if pin.kind == TEMPLATE and pin.upstream == upstream and self._blocking(pin) is not None:
                    template = (pin.changed or {}).get("definition", pin.definition).get("uriTemplate")
                    if isinstance(template, str) and template_matches(template, params["uri"]):
                        return self._blocking(pin)
        return None

    def _blocking(self, pin: Pin) -> tuple[Pin, str, str] | None:
        """(pin, why, reason) if calls to the pinned item are refused."""
        if pin.changed is not None:
            return (pin, f"its definition changed since it was pinned ({pin.digest[:19]} -> "
                         f"{pin.changed['digest'][:19]}); a reviewer must accept the new one "
                         f"(scripts/pins diff {pin.name})", "pin_changed")
        actions = self._spec().findings
        for f in pin.findings:
            if actions.get(f["check"]) in ("hide", "refuse"):
                return pin, f"its definition has {f['check']} ({f['where']}): {f['detail']}", f"pin_{f['check']}"
        return None

    def _listed(self, m: Message, cx: Context) -> Outcome:
        key, kind = LISTED[m.answers]
        items = m.params.get(key)
        if not isinstance(items, list):
            return Pass()
        upstream = cx.upstream or ""
        spec = self._spec()
        others = {_fold(n): u for n, u in self.store.names(kind, exclude_upstream=upstream).items()}
        kept: list[Any] = []
        verdicts: list[Verdict] = []
        pinned = 0
        for item in items:
            name = name_of(kind, item)
            if name is None:
                kept.append(item)  # the Policy hides items without a readable name
                continue
            def findings(item: dict = item, name: str = name) -> list[dict[str, str]]:
                found = [f.record() for f in scan(item, spec.description_limit)]
                if kind != TEMPLATE and _fold(name) in others:
                    found.append(Finding(SHADOWING, "name", f"{name!r} is also a {kind} of "
                                                            f"{others[_fold(name)]}").record())
                return found

            status, pin = self.store.observe(upstream, kind, item, findings)  # scanned only if new or changed
            if pin is None:
                verdicts.append(Verdict(StageName.RESP_PIN, Action.FILTER, None,
                                        f"{kind} {name} hidden: the pin store is full", {"pin": {"item": name}}))
                continue
            if status == NEW:
                pinned += 1
            hide = status in (CHANGED, CHANGED_NOW)
            if hide:
                verdicts.append(Verdict(StageName.RESP_PIN, Action.FILTER, None,
                                        f"{kind} {name} hidden: its definition changed since it was pinned",
                                        {"pin": {"item": name, "kind": kind, "status": "changed",
                                                 "from": pin.digest, "to": pin.changed["digest"],
                                                 "findings": pin.changed_findings}}))
                if status == CHANGED_NOW:
                    logger.warning("mcp-bastion: %s %s of %s changed since it was pinned; hidden and refused until "
                                   "a reviewer accepts it (scripts/pins diff %s)", kind, name, upstream, name)
            for f in pin.findings if not hide else ():
                action = spec.findings.get(f["check"], "warn")
                hide = hide or action == "hide"
                if status == NEW or action != "warn":
                    verdicts.append(Verdict(StageName.RESP_PIN, Action.FILTER if action == "hide" else Action.ALLOW,
                                            None, f"{kind} {name}: {f['check']} in {f['where']} ({action}): "
                                                  f"{f['detail']}",
                                            {"pin": {"item": name, "kind": kind, "finding": f, "action": action}}))
            if not hide:
                kept.append(item)
        self.store.flush()  # once per list, before anything of it reaches the client
        if pinned:
            verdicts.append(Verdict(StageName.RESP_PIN, Action.ALLOW, None,
                                    f"pinned {pinned} new {kind} definition(s) of {upstream}"))
        if len(kept) == len(items):
            return Pass(tuple(verdicts))
        return Replace(m.replace({**m.raw, "result": {**m.params, key: kept}}), tuple(verdicts))

    # --- the API ---------------------------------------------------------------------

    @staticmethod
    def _is_api(flow: http.HTTPFlow) -> bool:
        path = flow.request.path.split("?", 1)[0]
        return path == API_PREFIX or path.startswith(API_PREFIX + "/")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """After Auth: an API call is not MCP traffic (no message stage applies); `request` answers it."""
        if self._is_api(flow) and not (flow.response or flow.error):
            flow.metadata.pop(Meta.MCP, None)
            flow.metadata[Meta.API] = True
            flow.comment = "pin API (served by mcp-bastion)"

    def request(self, flow: http.HTTPFlow) -> None:
        if not self._is_api(flow) or not flow.metadata.get(Meta.API) or flow.response or flow.error or not flow.live:
            return
        try:
            self._serve(flow)
        except Exception as e:  # an API call is answered, whatever happens
            logger.error("mcp-bastion: pin API failed on %s: %r", flow.request.path, e, exc_info=e)
            replies.document(flow, 500, {"error": "the pin API failed; nothing was changed"})

    def _serve(self, flow: http.HTTPFlow) -> None:
        who = fs.identity(flow)
        groups = set((flow.metadata.get(Meta.IDENTITY) or {}).get("groups") or ())
        if who.sub is None or not (groups & self.reviewers):
            replies.document(flow, 403, {"error": "only members of the pin_reviewers groups ("
                                                  + (", ".join(sorted(self.reviewers)) or "none configured")
                                                  + ") may see or accept pins"})
            return
        path = flow.request.path.split("?", 1)[0][len(API_PREFIX):].strip("/")
        method = flow.request.method
        try:
            if method == "GET" and not path:
                q = flow.request.query
                pins = [p for p in self.store.all()
                        if all(not q.get(k) or getattr(p, k) == q.get(k) for k in ("name", "kind", "upstream"))]
                replies.document(flow, 200, [{**p.view(), "diff": diff(p)} for p in pins])
            elif method == "POST" and path in ("accept", "forget"):
                body = json.loads(flow.request.content or b"{}")
                if not isinstance(body, dict) or not isinstance(body.get("name"), str):
                    raise ValueError('the body must be JSON: {"name": ..., "kind": ..., "upstream": ...}')
                pins = self.store.find(body["name"], body.get("kind"), body.get("upstream"))
                claims = flow.metadata.get(Meta.IDENTITY) or {}
                name = claims.get("name") or claims.get("email") or who.sub
                pin = self.store.accept(pins, name) if path == "accept" else self.store.forget(pins)
                logger.warning("mcp-bastion: %s %s the pin of %s %s of %s (%s)", name, "accepted" if path == "accept"
                               else "forgot", pin.kind, pin.name, pin.upstream, pin.digest[:19])
                fs.add_decision(flow, stage=StageName.PIN, direction=Direction.C2S, action=Action.ALLOW,
                                reason=f"{name} {path}ed the pin of {pin.kind} {pin.name} of {pin.upstream}",
                                target=f"{pin.kind} {pin.name}")
                replies.document(flow, 200, pin.view())
            else:
                replies.document(flow, 404, {"error": "unknown pin API call"})
        except PinError as e:
            replies.document(flow, 409 if "nothing to accept" in str(e) or "several" in str(e) else 404,
                             {"error": str(e)})
        except ValueError as e:
            replies.document(flow, 400, {"error": str(e)})


def _fold(name: str) -> str:
    try:
        return normalize.name(name) or name
    except normalize.TooCostly:
        return name
