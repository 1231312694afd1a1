"""Scrubbing credentials from a flow's state before it is written (recordings, saved replays)."""

from __future__ import annotations

from mitmproxy.test import tflow

from mcp_bastion.glue.recording.scrub import REDACTED, scrub


def test_an_edited_flows_backup_is_scrubbed_and_the_live_flow_left_alone():
    """A flow edited in mitmweb (or replayed) keeps its earlier state in `backup`, credentials included."""
    f = tflow.tflow(resp=True)
    f.request.headers["authorization"] = "Bearer before-edit"
    f.request.headers["x-upstream-key"] = "k-1"
    f.backup()
    f.request.headers["authorization"] = "Bearer after-edit"
    state = f.get_state()
    redacted = scrub(state, ["X-Upstream-Key"])
    assert "request header authorization" in redacted
    assert "backup request header authorization" in redacted and "backup request header x-upstream-key" in redacted
    backup_headers = dict(state["backup"]["request"]["headers"])
    assert backup_headers[b"authorization"] == REDACTED.encode()
    assert backup_headers[b"x-upstream-key"] == REDACTED.encode()
    assert dict(state["request"]["headers"])[b"authorization"] == REDACTED.encode()
    # the live flow, and its own backup, are untouched
    assert f.request.headers["authorization"] == "Bearer after-edit"
    f.revert()
    assert f.request.headers["authorization"] == "Bearer before-edit"


def test_a_flow_without_backup_has_none_added():
    f = tflow.tflow()
    state = f.get_state()
    scrub(state)
    assert state.get("backup") is None
