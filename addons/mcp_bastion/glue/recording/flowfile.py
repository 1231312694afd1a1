"""One finished flow, secrets scrubbed and annotated with `Meta.RECORD`, appended to its session file."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from mitmproxy import http

from mcp_bastion.core.vocab import Action, Meta, StageName
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.recording.files import SessionFiles
from mcp_bastion.glue.recording.scrub import scrub
from mcp_bastion.glue.recording.sessions import session_key, subject_of
from mcp_bastion.glue.recording.spool import Spool
from mcp_bastion.glue.recording.tnet import (
    Blob,
    ConnectionStates,
    flow_state,
    tnet_parts,
)


def append_flow(files: SessionFiles, conns: ConnectionStates, flow: http.HTTPFlow, spool: Spool | None = None,
                incomplete: str | None = None) -> Path:
    """Append `flow`, secrets scrubbed, to its session file; return the file's path."""
    pieces, subject, session = encode_flow(files.directory, conns, flow, spool, incomplete, files.replica)
    target = files.get(subject, session, flow.request.timestamp_start or time.time())
    target.append(pieces)
    return target.path


def encode_flow(directory: Path, conns: ConnectionStates, flow: http.HTTPFlow, spool: Spool | None = None,
                incomplete: str | None = None, replica: str = "") -> tuple[list[bytes | Blob], str, str]:
    """`flow`, secrets scrubbed, as the pieces of one flow-file record; and its subject and session.

    The flow is serialised once (`flow_state`: fresh containers, the
    connections' states reused while unchanged) and the secrets are
    replaced in that state, so the live flow is never changed or copied.
    The bytes the client received on an event stream come from `spool`
    (written from disk if it spooled there); `incomplete` says why the
    exchange has no end; `replica` names the gateway that served it (`replica_id`).
    """
    subject = subject_of(flow) or "anonymous"
    session = session_key(flow)
    note: dict[str, Any] = {"session": session, "subject": subject, "latency_ms": fs.elapsed_ms(flow)}
    if replica:
        note["replica"] = replica
    state = flow_state(flow, conns)
    if flow.metadata.get(Meta.MCP, {}).get("closed"):
        # The client closed an event stream after its answer arrived (the Gateway notes it in
        # Meta.MCP "closed"): not an error, and mitmproxy would list the flow twice for one.
        state["error"] = None
    redacted = scrub(state, flow.metadata.get(Meta.SECRET_HEADERS))
    if redacted:
        note["redacted"] = redacted
    if not authenticated(flow):
        cut = _keep_head(state["request"])
        if cut:
            note["request_body"] = cut
    if incomplete:
        note["incomplete"] = incomplete
    response = state["response"]
    if spool is None and response is not None and callable(flow.response.stream):
        spool = Spool(directory, 0)  # a stream that sent nothing: record an empty body
    blob = None
    if spool is not None and response is not None:
        note["stream"] = spool.summary()
        if spool.in_memory:
            response["content"] = spool.getvalue()
        else:
            response["content"] = blob = Blob(spool)
    state["metadata"][Meta.RECORD] = note
    parts, _ = tnet_parts(state)
    if blob is None:
        pieces: list[bytes | Blob] = [b"".join(parts)]  # type: ignore[arg-type]
    else:  # the spooled body is copied from disk between the two halves
        at = parts.index(blob)
        pieces = [b"".join(parts[:at]), blob, b"".join(parts[at + 1:])]  # type: ignore[arg-type]
    return pieces, subject, session


UNAUTHENTICATED_KEEP = 1024  # bytes of the body kept in the recording of a request from an unknown caller


def authenticated(flow: http.HTTPFlow) -> bool:
    """The Auth stage let this caller in (a verified token, or identity checks off)."""
    return any(d.get("stage") == StageName.AUTH and d.get("action") == Action.ALLOW
               for d in flow.metadata.get(Meta.DECISIONS) or () if isinstance(d, dict))


def _keep_head(request: dict[str, Any] | None) -> dict[str, Any] | None:
    """Keep only the first bytes of a request body (and its size and SHA-256): what it was, not all of it.

    A caller the gateway could not identify is refused, and its request is
    recorded as evidence; but anyone who can connect could otherwise fill the
    disk with it, one full body per refused request.
    """
    content = request.get("content") if request else None
    if not isinstance(content, bytes) or len(content) <= UNAUTHENTICATED_KEEP:
        return None
    request["content"] = content[:UNAUTHENTICATED_KEEP]
    return {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest(), "kept": UNAUTHENTICATED_KEEP,
            "why": "refused before the caller was identified: only the first bytes are kept"}
