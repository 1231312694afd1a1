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

import contextlib
import functools
import ipaddress
import json
import logging
import socket
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
    fold,
    name_of,
    template_matches,
)
from mcp_bastion.core.pipeline import Context, Outcome, Pass, Refuse, Replace, Verdict
from mcp_bastion.core.rules import PinningSpec, Ruleset
from mcp_bastion.core.state import Backend, Hub
from mcp_bastion.core.toolscan import SHADOWING, Finding, scan
from mcp_bastion.core.vocab import Action, Direction, Kind, Meta, StageName
from mcp_bastion.glue import api, replies
from mcp_bastion.glue import flowstate as fs

logger = logging.getLogger("mcp_bastion")

API_PREFIX = "/bastion/pins"
CALLS = {"tools/call": TOOL, "prompts/get": PROMPT}


class Pinning:
    name = StageName.PIN

    def __init__(self, ruleset: Callable[[], Ruleset], hub: Hub | None = None):
        self._ruleset = ruleset
        self.store = PinStore()
        self.enabled = True
        self.reviewers: frozenset[str] = frozenset()
        self.hub = hub if hub is not None else Hub()
        self.hub.watch(self._shared)

    def _shared(self, backend: Backend) -> None:
        """Replicas sharing state share their pins (in place of `pin_store`, one gateway's file)."""
        shared = backend.pins()
        if shared is None:
            return
        if self.store.path:
            raise exceptions.OptionsError("pin_store keeps one gateway's pins in a file; with state_url the pins "
                                          "are shared by the replicas: leave pin_store empty")
        self.store.unlock()
        self.store = shared

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
        if "pin_store" in updated and self.hub.backend.shared:
            if ctx.options.pin_store.strip():
                raise exceptions.OptionsError("pin_store cannot be set while the pins are shared (state_url)")
        elif "pin_store" in updated:
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
        upstream = canonical_upstream(cx.upstream)
        if m.direction == Direction.S2C:
            if m.kind != Kind.RESPONSE or not isinstance(m.params, dict):
                return Pass()
            # What a list answer lists comes from the request it answers; an answer to anything else (or to
            # no known request: another id spelling, a GET stream, a task) is read by its shape, as the Policy
            # does, so a list cannot slip by under another method.
            lists = [LISTED[m.answers]] if m.answers in LISTED else [
                (key, kind) for key, kind in LISTED.values() if isinstance(m.params.get(key), list)]
            out: Outcome = Pass()
            if lists:
                self.store.refresh()  # a shared store: what other replicas pinned or reviewers accepted
            for key, kind in lists:
                out = self._listed(out.message if isinstance(out, Replace) else m, upstream, key, kind,
                                   out.decisions)
            return out
        if m.kind != Kind.REQUEST:
            return Pass()
        blocked = self._blocked_target(m, upstream)
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
        if kind is not None or m.method in ("resources/read", "resources/subscribe"):
            self.store.refresh()  # only what a pin can refuse asks a shared store
        if kind is not None:
            name = params.get("name")
            if not isinstance(name, str):
                return None  # the Policy refuses a call without a readable name
            # Every pin whose name reads the same to rules (case, Unicode form, invisible characters).
            for pin in self.store.find_folded(upstream, kind, _fold(name)):
                blocked = self._blocking(pin)
                if blocked is not None:
                    return blocked
            if self.store.full and not self.store.find_folded(upstream, kind, _fold(name)):
                return self._unpinned(upstream, kind, name)
            return None
        uri = params.get("uri") if m.method in ("resources/read", "resources/subscribe") else None
        if isinstance(uri, str):
            spellings = {uri}
            with contextlib.suppress(Exception):
                spellings.add(normalize.uri(uri))
            for pin in self.store.of(upstream, TEMPLATE):
                if self._blocking(pin) is None:
                    continue
                templates = {pin.definition.get("uriTemplate"), (pin.changed or {}).get("definition", {})
                             .get("uriTemplate")}
                for template in templates:
                    if isinstance(template, str) and any(template_matches(t, u) for t in _template_forms(template)
                                                         for u in spellings):
                        return self._blocking(pin)
        return None

    @staticmethod
    def _unpinned(upstream: str, kind: str, name: str) -> tuple[Pin, str, str]:
        pin = Pin(upstream, kind, name, "", {}, 0.0)
        return pin, "the pin store is full, and this item was never pinned", "pin_store_full"

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

    def _listed(self, m: Message, upstream: str, key: str, kind: str,
                earlier: tuple[Verdict, ...] = ()) -> Outcome:
        items = m.params.get(key)
        if not isinstance(items, list):
            return Pass(earlier)
        spec = self._spec()
        shadowed: dict[str, str] | None = None  # other upstreams' names, read only if something is new

        def others() -> dict[str, str]:
            nonlocal shadowed
            if shadowed is None:
                shadowed = {_fold(n): u for n, u in self.store.names(kind, exclude_upstream=upstream).items()}
            return shadowed
        kept: list[Any] = []
        verdicts: list[Verdict] = []
        pinned = 0
        for item in items:
            name = name_of(kind, item)
            if name is None:  # nothing to pin it by, or to call it by: a model must not read it
                verdicts.append(Verdict(StageName.RESP_PIN, Action.FILTER, None, f"a {kind} without a name hidden",
                                        {"pin": {"item": "", "kind": kind}}))
                continue
            def findings(item: dict = item, name: str = name) -> list[dict[str, str]]:
                found = [f.record() for f in scan(item, spec.description_limit)]
                if kind != TEMPLATE and _fold(name) in others():
                    found.append(Finding(SHADOWING, "name", f"{name!r} is also a {kind} of "
                                                            f"{others()[_fold(name)]}").record())
                twins = [p.name for p in self.store.find_folded(upstream, kind, _fold(name)) if p.name != name]
                if kind != TEMPLATE and twins:  # no rule can tell them apart
                    found.append(Finding(SHADOWING, "name", f"{name!r} reads the same to rules as this upstream's "
                                                            f"{kind} {twins[0]!r}").record())
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
            return Pass((*earlier, *verdicts))
        return Replace(m.replace({**m.raw, "result": {**m.params, key: kept}}), (*earlier, *verdicts))

    # --- the API ---------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """After Auth: an API call is not MCP traffic (no message stage applies); `request` answers it."""
        api.claim(flow, API_PREFIX, "pin API")

    def request(self, flow: http.HTTPFlow) -> None:
        api.serve(flow, API_PREFIX, "pin API", self._serve, "nothing was changed")

    def _serve(self, flow: http.HTTPFlow) -> None:
        self.store.refresh()
        who = fs.identity(flow)
        groups = set(who.groups)
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
                for k in ("kind", "upstream", "digest"):
                    if body.get(k) is not None and not isinstance(body[k], str):
                        raise ValueError(f"{k} must be a string")
                if body.get("kind") is not None and body["kind"] not in ("tool", "prompt", "template"):
                    raise ValueError("kind must be tool, prompt or template")
                upstream = canonical_upstream(body["upstream"]) if body.get("upstream") else None
                pins = self.store.find(body["name"], body.get("kind"), upstream)
                claims = flow.metadata.get(Meta.IDENTITY) or {}
                name = claims.get("name") or claims.get("email") or who.sub
                pin = (self.store.accept(pins, name, expect=body.get("digest")) if path == "accept"
                       else self.store.forget(pins))
                logger.warning("mcp-bastion: %s %s the pin of %s %s of %s (%s)", name, "accepted" if path == "accept"
                               else "forgot", pin.kind, pin.name, pin.upstream, pin.digest[:19])
                fs.add_decision(flow, stage=StageName.PIN, direction=Direction.C2S, action=Action.ALLOW,
                                reason=f"{name} {path}ed the pin of {pin.kind} {pin.name} of {pin.upstream}",
                                target=f"{pin.kind} {pin.name}")
                replies.document(flow, 200, pin.view())
            else:
                replies.document(flow, 404, {"error": "unknown pin API call"})
        except PinError as e:
            replies.document(flow, 404 if str(e).startswith("no such") else 409, {"error": str(e)})
        except ValueError as e:
            replies.document(flow, 400, {"error": str(e)})


@functools.lru_cache(maxsize=1024)
def canonical_upstream(upstream: str | None) -> str:
    """One spelling per upstream: lower case, no trailing dot, IP literals in their usual form (127.1,
    2130706433 and 127.0.0.1 are one host; so are localhost and 127.0.0.1)."""
    if not upstream:
        return ""
    host, sep, port = upstream.rpartition(":") if not upstream.endswith("]") else (upstream, "", "")
    if not sep or not port.isdigit():
        host, port = upstream, ""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        with contextlib.suppress(OSError, UnicodeError):
            if host and all(c.isdigit() or c in ".xX" or c in "abcdefABCDEF" for c in host):
                host = socket.inet_ntoa(socket.inet_aton(host))  # 127.1, 0x7f.1, 2130706433
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}" if port else host


def _template_forms(template: str) -> set[str]:
    """A template and its form with the scheme and host in lower case (they compare case-insensitively)."""
    scheme, sep, rest = template.partition("://")
    return {template, f"{scheme.lower()}{sep}{rest}"} if sep else {template}


def _fold(name: str) -> str:
    return fold(name)
