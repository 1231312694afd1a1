"""
Mitmweb: the flow list a reviewer reads.

Every flow's comment says who called, what, the decision and the rule
(`alice: tools/call deploy -> deny [no-deploy]: ...`, see `flowstate.annotate`),
and its mark says how severe (text symbols, no emoji font needed). mitmweb
hides the comment column by default; with the bundle loaded it is shown,
whatever else the user chose for `web_columns`.
"""

from __future__ import annotations

from mitmproxy import ctx

COMMENT = "comment"


class Mitmweb:
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
        if COMMENT not in columns:
            ctx.options.update(web_columns=[*columns, COMMENT])
