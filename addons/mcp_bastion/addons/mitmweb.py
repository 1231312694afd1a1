"""
Mitmweb: the flow list a reviewer reads.

Every flow's comment says who called, what, the decision and the rule
(`alice: tools/call deploy -> deny [no-deploy]: ...`, see `flowstate.annotate`).
mitmweb hides the comment column by default and gives the URL column all the
spare width, which for MCP is the same endpoint on every row. So, with the
bundle loaded:

- if `web_columns` is still mitmweb's default, the reviewer's layout replaces it:
  method, status, the path (where mitmweb draws a flow's mark: ✖ denied, ☝ held,
  ⚠ error, ▪ masked, so a denial stands out from an allowed call at a glance),
  the comment (sharing the row's width), size and time;
- if the user chose columns, the comment column is added to them if missing.
"""

from __future__ import annotations

from mitmproxy import ctx

COMMENT = "comment"
REVIEWER_COLUMNS = ("tls", "icon", "method", "status", "path", COMMENT, "size", "time")


class Mitmweb:
    observes = True  # reads finished flows, never changes them (glue.dispatch: a failure is only logged)

    def running(self) -> None:
        self._show_comments()

    def configure(self, updated: set[str]) -> None:
        if "web_columns" in updated:
            self._show_comments()

    @staticmethod
    def _show_comments() -> None:
        if "web_columns" not in ctx.options:  # not mitmweb
            return
        columns = list(ctx.options.web_columns)
        if columns == list(ctx.options.default("web_columns")):
            ctx.options.update(web_columns=list(REVIEWER_COLUMNS))
        elif COMMENT not in columns:
            ctx.options.update(web_columns=[*columns, COMMENT])
