"""
The bundle as one mitmproxy addon: every hook of every part, in bundle order, failing closed.

mitmproxy finds a script's addons by walking nested `addons` lists and runs a
hook by trying every addon it walks, for every event, with generators and a
context manager per step: with the bundle's twenty parts nested under the
script, that walk cost more than some of the parts' own work. And when one of
them raised, mitmproxy logged it and skipped *the rest of the list* for that
event, Gate included, then forwarded the flow: a bug in any hook placed before
the Gate was a bypass.

`Dispatch` is the one addon mitmproxy sees. For each hook some part has, it
holds the parts' hooks in bundle order (rebuilt after each `configure`, so a
hook wrapped then, e.g. by Timing, is the one called) and calls them itself:

- an exception in a flow hook on the request or response path answers the
  client with an error naming the part (`failclosed.refuse_for`), and the
  parts after it still run (the Gate, the recording and the audit log see
  the refusal); one in `responseheaders` makes the response buffered and
  refused in `response`; one in any other hook, or in a part that only
  observes finished flows (`observes = True`: the decision log, metrics,
  traces, what mitmweb shows; they come after the recording, which must not
  be contradicted), is logged;
- `load` and `configure` go to each part in order; whatever a part raises in
  `configure` refuses the options (mitmdump stops at start, `set` is undone),
  never leaving a gateway half configured; `running` and `done` reach every
  part even if one fails (so recordings are closed at stop).

The parts are kept in `parts`, not `addons`: mitmproxy would walk an `addons`
attribute itself. mitmproxy treats all scripts as one such list too, so the
bundle refuses to start behind another script (`-s`) that has flow hooks: one
raising there would skip it.
"""

from __future__ import annotations

import inspect
import logging
import os
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import mitmproxy.proxy.layers
import mitmproxy.proxy.server_hooks  # noqa: F401
from mitmproxy import addonmanager, ctx, exceptions, hooks, http

from mcp_bastion.glue.failclosed import refuse_for

logger = logging.getLogger("mcp_bastion")

LIFECYCLE = frozenset({"load", "configure", "running", "done"})
FLOW_HOOKS = frozenset(hooks.all_hooks) - LIFECYCLE  # what runs per flow or connection
# Hooks whose failure must keep the flow from going on: the request is refused, the response withheld.
ENFORCING = frozenset({"requestheaders", "request", "response"})
Hook = tuple[str, Callable[..., Any], bool]  # (part.hook, the callable, whether the part only observes)


class Dispatch:
    def __init__(self, parts: Sequence[object], entry: str | None = None):
        self.parts = list(parts)
        self.entry = entry  # the script file that loads it (addons/bastion.py): it must come first
        self.tables: dict[str, tuple[Hook, ...]] = {}
        self._failed_headers: weakref.WeakKeyDictionary[http.HTTPFlow, tuple[str, BaseException]] = (
            weakref.WeakKeyDictionary())
        self.rebuild()

    @property
    def name(self) -> str:  # mitmproxy's name for the addon (one per process, like any addon)
        return "mcp-bastion"

    # --- the tables ------------------------------------------------------------------

    def rebuild(self) -> None:
        """Read each part's hooks again (after `configure`: a part may wrap its hooks then)."""
        for name in list(self.tables):
            self.__dict__.pop(name, None)
        self.tables = {}
        for name in hooks.all_hooks:
            if name in LIFECYCLE:
                continue
            table = tuple((f"{type(p).__name__.lower()}.{name}", fn, bool(getattr(p, "observes", False)))
                          for p in self.parts if callable(fn := getattr(p, name, None)))
            if table:
                self.tables[name] = table
                setattr(self, name, self._caller(name, table))

    def _caller(self, name: str, table: tuple[Hook, ...]) -> Callable[..., Any]:
        if any(inspect.iscoroutinefunction(fn) for _, fn, _ in table):

            async def call_async(*args: Any) -> None:
                if name == "response":
                    self._refuse_failed_headers(args)
                for label, fn, observes in table:
                    try:
                        res = fn(*args)
                        if res is not None and inspect.isawaitable(res):
                            await res
                    except exceptions.AddonHalt:
                        raise
                    except Exception as exc:
                        self._failed(name, label, args, exc, observes)

            return call_async

        def call(*args: Any) -> None:
            if name == "response":
                self._refuse_failed_headers(args)
            for label, fn, observes in table:
                try:
                    fn(*args)
                except exceptions.AddonHalt:
                    raise
                except Exception as exc:
                    self._failed(name, label, args, exc, observes)

        return call

    def remove(self, part: object) -> None:
        """Take `part` out (its `done` runs): what unloading an addon is for mitmproxy."""
        self.parts.remove(part)
        if callable(fn := getattr(part, "done", None)):
            fn()
        self.rebuild()

    # --- failures ----------------------------------------------------------------------

    def _failed(self, hook: str, label: str, args: tuple[Any, ...], exc: Exception, observes: bool) -> None:
        flow = args[0] if args and isinstance(args[0], http.HTTPFlow) else None
        if flow is None or observes or hook not in ENFORCING | {"responseheaders"}:
            logger.error("mcp-bastion: %s failed: %r", label, exc, exc_info=exc)
            return
        where = label if hook.startswith("request") else f"resp:{label}"
        if hook == "responseheaders":
            logger.error("mcp-bastion: %s failed on %s: %r; the response will be withheld", label,
                         flow.request.pretty_url, exc, exc_info=exc)
            if flow.response is not None:
                flow.response.stream = False  # nothing sent yet: buffer it, so `response` can withhold it
            self._failed_headers[flow] = (where, exc)
            return
        refuse_for(flow, where, exc)

    def _refuse_failed_headers(self, args: tuple[Any, ...]) -> None:
        flow = args[0] if args else None
        failed = self._failed_headers.pop(flow, None) if isinstance(flow, http.HTTPFlow) else None
        if failed is not None:
            refuse_for(flow, *failed)

    # --- the lifecycle -----------------------------------------------------------------

    def load(self, loader) -> None:
        for p in self.parts:
            if callable(fn := getattr(p, "load", None)):
                fn(loader)

    def configure(self, updated: set[str]) -> None:
        """Each part's `configure`; any failure refuses the options (mitmdump stops at start; `set` is undone),
        never leaves a gateway running half configured."""
        self._check_first()
        try:
            for p in self.parts:
                if callable(fn := getattr(p, "configure", None)):
                    try:
                        fn(updated)
                    except exceptions.OptionsError:
                        raise
                    except Exception as exc:
                        logger.error("mcp-bastion: %s.configure failed: %r", type(p).__name__.lower(), exc,
                                     exc_info=exc)
                        raise exceptions.OptionsError(f"mcp-bastion could not configure {type(p).__name__}: "
                                                      f"{type(exc).__name__}: {exc}") from exc
        finally:
            self.rebuild()

    def _check_first(self) -> None:
        """Refuse to run behind a script whose addons have flow hooks. mitmproxy runs every script's addons
        as one chain entry: when a hook of an earlier script raises, it skips the scripts after it for that
        event, so a bug there would let flows through unchecked. (A script with no flow hooks, e.g. one that
        only adds a log handler, cannot skip anything and may come first.)"""
        loader = ctx.master.addons.get("scriptloader") if self.entry else None
        if loader is None:
            return
        mine = os.path.realpath(self.entry)
        for script in getattr(loader, "addons", ()):
            if os.path.realpath(getattr(script, "fullpath", "") or "") == mine:
                return
            hooked = sorted({name for a in addonmanager.traverse(getattr(script, "addons", ()))
                             for name in FLOW_HOOKS if callable(getattr(a, name, None))})
            if hooked:
                raise exceptions.OptionsError(
                    f"load {self.entry} before {script.path}, whose addons have flow hooks ({', '.join(hooked)}): "
                    "mitmproxy skips every script after one whose hook raises, so a bug there would let flows "
                    "through mcp-bastion unchecked")

    async def running(self) -> None:
        """Every part's `running`, each whatever the others did."""
        for p in self.parts:
            if not callable(fn := getattr(p, "running", None)):
                continue
            try:
                res = fn()
                if res is not None and inspect.isawaitable(res):
                    await res
            except Exception as exc:
                logger.error("mcp-bastion: %s.running failed: %r", type(p).__name__.lower(), exc, exc_info=exc)

    def done(self) -> None:
        """Every part's `done` (all synchronous: mitmproxy may call it from synchronous code), each whatever
        the others did: a part that fails to stop must not keep the recording and the audit log open."""
        for p in self.parts:
            if not callable(fn := getattr(p, "done", None)):
                continue
            try:
                fn()
            except Exception as exc:
                logger.error("mcp-bastion: %s.done failed: %r", type(p).__name__.lower(), exc, exc_info=exc)
