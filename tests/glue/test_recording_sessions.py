"""What a recording and its audit records are grouped under, in both eras."""

from __future__ import annotations

import calendar

from mitmproxy.test import tflow

from mcp_bastion.core.vocab import Meta, StageName
from mcp_bastion.glue.recording.sessions import session_key


def flow(headers=None, path="/mcp", **metadata):
    f = tflow.tflow()
    f.request.path = path
    f.request.headers.update(headers or {})
    f.metadata.update(metadata)
    return f


def test_a_session_the_sessions_stage_accepted_groups_the_flow():
    f = flow({"mcp-session-id": "s-1"}, **{Meta.STAGES: [StageName.SESSION]})
    assert session_key(f) == "s-1"


def test_a_flow_refused_before_its_session_was_accepted_is_not_filed_under_it():
    """A forged (or another caller's) session id cannot put flows into that session's recording."""
    for stages in ([], [StageName.PARSE], [StageName.PARSE, StageName.AUTH]):
        f = flow({"mcp-session-id": "victims-session"}, **{Meta.REFUSED: True, Meta.STAGES: stages})
        assert session_key(f) == f"conn-{f.client_conn.id}"
        legacy = flow(path="/messages?session_id=victims-session", **{Meta.REFUSED: True, Meta.STAGES: stages})
        assert session_key(legacy) == f"conn-{legacy.client_conn.id}"


def test_a_flow_refused_after_its_session_was_accepted_stays_in_it():
    f = flow({"mcp-session-id": "s-1"}, **{Meta.REFUSED: True, Meta.STAGES: [StageName.SESSION]})
    assert session_key(f) == "s-1"


def test_2026_flows_without_sessions_are_grouped_per_caller_and_day():
    f = flow(**{Meta.MCP: {"era": "2026"}})
    f.request.timestamp_start = calendar.timegm((2026, 11, 30, 23, 59, 0))
    assert session_key(f) == "day-2026-11-30"
    old = flow(**{Meta.MCP: {"era": "2025"}})
    assert session_key(old) == f"conn-{old.client_conn.id}"
