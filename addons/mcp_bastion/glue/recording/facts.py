"""The plain facts of a flow that the audit records are built from (`core.audit.build_records`)."""

from __future__ import annotations

import time

from mitmproxy import http

from mcp_bastion.core import audit
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.recording.sessions import session_key


def flow_facts(flow: http.HTTPFlow, incomplete: str | None = None,
               latency_ms: float | None = None) -> audit.FlowFacts:
    """The plain facts of a flow that the audit records are built from."""
    error = incomplete or (flow.error.msg if flow.error else None)
    return audit.FlowFacts(
        flow_id=flow.id,
        started=flow.request.timestamp_start or time.time(),
        http_method=flow.request.method,
        metadata=flow.metadata,
        session=session_key(flow),
        status=flow.response.status_code if flow.response is not None else None,
        error=error,
        latency_ms=fs.elapsed_ms(flow) if latency_ms is None else latency_ms,
    )
