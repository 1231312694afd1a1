"""The Mitmweb addon: the comment column a reviewer reads, in mitmweb only."""

from __future__ import annotations

from mitmproxy.test import taddons
from mitmproxy.tools.web.webaddons import WebAddon

from mcp_bastion.addons.mitmweb import REVIEWER_COLUMNS, Mitmweb


def test_mitmweb_defaults_become_the_reviewer_layout():
    m = Mitmweb()
    with taddons.context(WebAddon(), m) as tctx:
        m.running()
        assert tuple(tctx.options.web_columns) == REVIEWER_COLUMNS
        assert "comment" in tctx.options.web_columns


def test_columns_the_user_chose_keep_their_order_and_gain_the_comment():
    m = Mitmweb()
    with taddons.context(WebAddon(), m) as tctx:
        tctx.configure(m, web_columns=["path", "status"])
        assert list(tctx.options.web_columns) == ["path", "status", "comment"]
        tctx.configure(m, web_columns=["comment", "path"])
        assert list(tctx.options.web_columns) == ["comment", "path"]


def test_without_mitmweb_nothing_happens():
    m = Mitmweb()
    with taddons.context(m) as tctx:
        m.running()
        assert "web_columns" not in tctx.options
