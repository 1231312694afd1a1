"""
Timing: CPU time per pipeline stage and per addon hook (option `stage_timing`).

Off by default. On, every message stage's `check` (`core.pipeline`) and every
flow hook of the bundle's addons is timed with the thread's CPU clock
(`core.timing`); the Metrics addon exposes the totals on the admin listener as
`bastion_stage_cpu_seconds_total{stage}` / `bastion_stage_checks_total{stage}`
and `bastion_hook_cpu_seconds_total{hook}` / `bastion_hook_calls_total{hook}`
(`hook` is `addon.hook`, e.g. `auditlog.response`). `scripts/bench` reads them
to say where a call's CPU goes. Off again, the hooks are the plain methods.

The hooks are wrapped on the instances (mitmproxy finds a hook with getattr),
so the addons' code is unchanged and costs nothing when timing is off.
"""

from __future__ import annotations

from collections.abc import Sequence

from mitmproxy import ctx

from mcp_bastion.core import timing
from mcp_bastion.glue.dispatch import FLOW_HOOKS  # every hook but the lifecycle ones: those are not timed


class Timing:
    observes = True  # reads finished flows, never changes them (glue.dispatch: a failure is only logged)

    def __init__(self, targets: Sequence[object] = ()) -> None:
        # the addons to time, set by bundle() (not named `addons`: mitmproxy would take them for children)
        self.targets = list(targets)

    def load(self, loader) -> None:
        loader.add_option("stage_timing", bool, False,
                          "Count the CPU time of every message stage and addon hook, exposed on the admin "
                          "listener's /metrics (bastion_stage_cpu_seconds_total, bastion_hook_cpu_seconds_total). "
                          "Costs a few microseconds per call; for measuring, e.g. with scripts/bench.")

    def configure(self, updated: set[str]) -> None:
        if "stage_timing" in updated:
            self.switch(ctx.options.stage_timing)

    def switch(self, on: bool) -> None:
        timing.STAGES.enabled = on
        for addon in self.targets:
            label = type(addon).__name__.lower()
            for hook in FLOW_HOOKS:
                if on and hook not in vars(addon) and callable(getattr(addon, hook, None)):
                    setattr(addon, hook, timing.timed(getattr(addon, hook), f"{label}.{hook}"))
                elif not on and hook in vars(addon):
                    delattr(addon, hook)  # the class's own method again

    def clocks(self) -> dict[str, dict[str, tuple[int, float]]] | None:
        """{"stage": {name: (checks, CPU s)}, "hook": {addon.hook: (calls, CPU s)}}, or None when off."""
        if not timing.STAGES.enabled:
            return None
        return {"stage": timing.STAGES.snapshot(), "hook": timing.HOOKS.snapshot()}

    def done(self) -> None:
        self.switch(False)
