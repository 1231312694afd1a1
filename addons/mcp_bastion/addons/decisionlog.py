"""
DecisionLog: one JSON line per message decision, for log shippers and SIEMs; one readable console line.

When a flow ends, each of its messages' decisions (the same per-message view
the audit log records, from `core.audit.build_records`) becomes one JSON line:
time, identity, upstream, method, target, action, rule, reason, latency. The
option `decision_log` sends them to a file (appended, one line per write) or
to standard output (`-`). Unlike the audit log it is not chained or MACed:
it is a feed, and a write that fails is logged, not refused.

At mitmdump's default verbosity the console shows, instead of mitmproxy's bare
`POST /mcp << 200 OK`, one line per decision:
`alice  tools/call deploy  -> approve [prod-deploys] 12 ms`. At `flow_detail`
0 (`mitmdump -q`, or set by the user) it shows none, like mitmproxy.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import IO

from mitmproxy import ctx, exceptions, http

from mcp_bastion.glue.decisions import console_line, lines

logger = logging.getLogger("mcp_bastion")

class DecisionLog:
    observes = True  # reads finished flows, never changes them (glue.dispatch: a failure is only logged)

    def __init__(self) -> None:
        self.out: IO[str] | None = None
        self.console = True  # the option's default (configure decides, with mitmdump's flow_detail)
        self._quieted = False  # we set flow_detail from 1 to 0 (our lines stand in for mitmproxy's)
        self.done_flows: set[str] = set()

    def load(self, loader) -> None:
        loader.add_option("decision_log", str, "",
                          "Write one JSON line per message decision (identity, upstream, method, target, action, "
                          "rule, latency) to this file, or to standard output with '-'. Empty: off.")
        loader.add_option("decision_console", bool, True,
                          "At the default verbosity (flow_detail 1), show one readable line per decision on the "
                          "console instead of mitmproxy's bare request line.")

    def configure(self, updated: set[str]) -> None:
        if "decision_log" in updated:
            self._close()
            target = ctx.options.decision_log.strip()
            if target == "-":
                self.out = sys.stdout
            elif target:
                try:
                    self.out = open(target, "a", encoding="utf-8", buffering=1)
                except OSError as e:
                    raise exceptions.OptionsError(f"decision_log: cannot open {target}: {e.strerror or e}") from None
        if {"decision_console", "flow_detail"} & updated:
            detail = getattr(ctx.options, "flow_detail", None)  # mitmdump's; mitmweb has none
            # At flow_detail 0 (set by the user, e.g. `-q` or `--set flow_detail=0`) the console shows no
            # per-flow lines, and neither do we; at 1 our lines stand in for mitmproxy's bare request lines.
            quieted_by_us = detail == 0 and self._quieted
            self.console = bool(ctx.options.decision_console) and (detail in (None, 1) or quieted_by_us)
            if self.console and detail == 1:
                self._quieted = True
                ctx.options.flow_detail = 0
            elif quieted_by_us and not self.console:  # decision_console turned off: mitmproxy's lines again
                self._quieted = False
                ctx.options.flow_detail = 1
            elif detail != 0:
                self._quieted = False

    def response(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._finish(flow)

    def _finish(self, flow: http.HTTPFlow) -> None:
        if (self.out is None and not self.console) or flow.id in self.done_flows:
            return
        self.done_flows.add(flow.id)
        if len(self.done_flows) > 10_000:
            self.done_flows.clear()
        try:
            entries = lines(flow)
        except Exception as e:  # a feed: never in the way of the flow
            logger.error("mcp-bastion: decision log could not read %s: %r", flow.request.pretty_url, e)
            return
        for entry in entries:
            if self.console:
                logger.info("%s", console_line(entry))
            if self.out is not None:
                try:
                    self.out.write(json.dumps(entry, ensure_ascii=False, sort_keys=False) + "\n")
                except (OSError, ValueError) as e:
                    logger.error("mcp-bastion: decision log write failed: %s", e)
        if self.out is not None:
            try:
                self.out.flush()
            except (OSError, ValueError) as e:
                logger.error("mcp-bastion: decision log write failed: %s", e)

    def done(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.out is not None and self.out is not sys.stdout:
            try:
                self.out.close()
            except OSError:
                pass
        self.out = None
