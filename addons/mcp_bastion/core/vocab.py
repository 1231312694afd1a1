"""
The words every part of mcp-bastion shares, each defined once.

- `Direction`, `Kind`: of a JSON-RPC message.
- `Action`: what a stage decided about a message (rules speak allow/deny/mask/approve;
  the gateway adds filter, drop and error).
- `StageName`: every enforcement stage, in the order a request meets them.
- `Meta`: the keys under which a flow carries its state in `flow.metadata` (saved in
  recordings, shown in mitmweb). Values are plain JSON-like data.

Pure: no mitmproxy import.
"""

from __future__ import annotations

import functools
from enum import StrEnum


class Direction(StrEnum):
    C2S = "client_to_server"
    S2C = "server_to_client"


class Kind(StrEnum):
    REQUEST = "request"
    NOTIFICATION = "notification"
    RESPONSE = "response"
    ERROR = "error"
    INVALID = "invalid"
    HTTP = "http"  # a body-less HTTP request on the MCP endpoint (GET, DELETE, ...)


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    MASK = "mask"
    APPROVE = "approve"
    HOLD = "hold"  # a request waiting for a stage (a person's approval) while other flows go on
    FILTER = "filter"  # list items hidden from this caller
    DROP = "drop"  # a server message the client never saw (e.g. a denied notification)
    ERROR = "error"  # an enforcement step failed and the gateway failed closed


class StageName(StrEnum):
    """Every enforcement stage. Request stages are marked on a flow as they pass;
    the Gate refuses a flow that misses one. Response stages carry a `resp:` prefix."""

    PARSE = "parse"  # Gateway: scope, Host/Origin, strict parsing
    AUTH = "auth"  # Auth: bearer token verified, identity on the flow
    SESSION = "session"  # Sessions: a presented session id belongs to this caller
    POLICY = "policy"  # Policy: the ruleset over each message
    MASK = "mask"  # Masking: the profiles rules chose, applied
    APPROVAL = "approval"  # Approvals: a call an approve rule holds waits for a person's decision
    PIN = "pin"  # Pinning: a tool, prompt or template changed since pinned, or with a finding, is refused
    ADMISSION = "admission"  # recording and audit can write (else 503)
    WIRE = "wire"  # Wire: a 2026-07-28 request's headers say what its body says
    TASKS = "tasks"  # Tasks: a task belongs to the caller whose call created it
    GATE = "gate"  # the last check before a flow leaves
    UPSTREAM = "upstream"  # UpstreamCheck: the upstream is reachable
    UPSTREAM_TOKEN = "upstream-token"  # UpstreamToken: the upstream's own credential set
    RESP_PARSE = "resp:parse"
    RESP_WIRE = "resp:wire"
    RESP_TASKS = "resp:tasks"
    RESP_POLICY = "resp:policy"
    RESP_MASK = "resp:mask"
    RESP_APPROVAL = "resp:approval"
    RESP_PIN = "resp:pin"
    RESP_SSE = "resp:sse"
    RESP_RECORD = "resp:record"
    RECORD = "record"  # Recorder: what is forwarded is journalled first (else 503)
    AUDIT = "audit"  # AuditLog: what is forwarded is audited first (else 503)
    TRANSPORT = "transport"  # not a stage: a connection failed (client gone, upstream reset)

    @property
    def response(self) -> StageName:
        """The response-side name of a message stage (`policy` -> `resp:policy`)."""
        return _response_name(self)

    @property
    def is_response(self) -> bool:
        return self.value.startswith("resp:")


@functools.cache
def _response_name(stage: StageName) -> StageName:
    return StageName(f"resp:{stage.value}") if not stage.value.startswith("resp:") else stage


class Meta:
    """Keys of `flow.metadata`."""

    MCP = "bastion.mcp"  # {"transport", "session", "request": [summaries], "response": [...], "events": [...], ...}
    IDENTITY = "bastion.identity"  # {"sub", "email", "name", "groups", "iss", "client_id", "scopes"} or None
    UPSTREAM = "bastion.upstream"  # "host:port" of the upstream MCP server
    DECISIONS = "bastion.decisions"  # [{"stage", "direction", "id", "method", "target", "action", "rule", "reason"}]
    STAGES = "bastion.stages"  # enforcement stages this flow passed, as StageName values
    ERROR = "bastion.error"  # set when an enforcement step failed and the gateway failed closed
    STARTED = "bastion.t0"  # time.monotonic() when the gateway first saw the request
    API = "bastion.api"  # the gateway's own API answers this flow (approvals), not the upstream
    CLIENT_HOST = "bastion.client_host"  # the Host the client addressed, before reverse mode rewrites it
    SECRET_HEADERS = "bastion.secret_headers"  # request header names carrying credentials (scrubbed when recorded)
    REFUSED = "bastion.refused"  # the gateway answered instead of the upstream
    PASSTHROUGH = "bastion.passthrough"  # regular mode: a host outside mcp_hosts, forwarded unenforced
    MASK = "bastion.mask"  # {"profile", "rule", "profiles": [...]}: what the masking stage must apply
    APPROVAL = "bastion.approval"  # {"rule", "status", "ids"}: a call held for a person
    PINS = "bastion.pins"  # ["tool add changed", "tool x instructions"]: definitions a listing hid or flagged
    HELD = "bastion.held"  # {"approval", "upstream"}: a held call answered with progress by the holding server
    RECORD = "bastion.record"  # on a recorded flow: {"session", "subject", "latency_ms", "stream", ...}
    LEGACY_SESSION = "bastion.legacy_session"  # session id announced in an HTTP+SSE `endpoint` event
    REPLAY_SESSION = "bastion.replay.session"  # on a flow queued for client replay: its recorded session id
    REPLAY_OF = "bastion.replay.of"  # ... and the id of the recorded flow it re-sends


# Rule ids the gateway itself uses in decisions.
DEFAULT_RULE = "bastion:default"
MALFORMED_RULE = "bastion:malformed"
NO_RULESET_RULE = "bastion:no-ruleset"
