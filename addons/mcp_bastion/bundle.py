"""
The one ordered list of mcp-bastion's addons.

`addons/bastion.py` (what `mitmdump -s` and `mitmweb -s` load), the demo, the
benchmark and every end-to-end test use `bundle()`; nothing else assembles
addons. mitmproxy sees them as one addon (`as_addon()`, `glue.dispatch`), which
calls each hook on them in this order, so the list is the order a flow meets them:

1. Gateway: claims MCP flows, checks Host/Origin, parses every body into messages, streams SSE.
2. Auth: verifies the bearer token, removes it, puts the identity on the flow.
   Approvals: serves the approval API (/bastion/approvals) to verified reviewers.
   Pinning: serves the pin API (/bastion/pins) to the pin_reviewers groups.
   Sessions: a presented session id must belong to this caller (404 otherwise).
3. Admission: refuses new requests while a required recording or audit write fails.
4. Policy: a message stage (the ruleset); it decides, the Pipeline applies.
5. Pipeline: runs the message stages over every message, both directions, every SSE event:
   Wire (2026-07-28 headers agree with the body), Tasks (a task is its creator's), Policy, Pinning
   (tool, prompt and template definitions pinned and scanned; a changed one hidden and refused), then
   Masking (the profiles `mask` rules chose, applied to the request and what comes back), then
   Approvals (a call an approve rule holds waits for a second person).
6. Gate: nothing leaves unless every enforcement stage above marked the flow.
7. UpstreamCheck, UpstreamToken: only for requests really forwarded: a JSON error for a
   dead upstream; the upstream's own credential.
8. Recorder, AuditLog: record what the client actually received.
9. DecisionLog, Metrics, Tracing: a JSON line and a console line per decision; Prometheus metrics and
   health probes on the admin listener; OpenTelemetry spans. They read finished flows, never change them.
10. Mitmweb, ContentView: what a reviewer sees in mitmweb and the console.
11. State: where what the gateway remembers about callers lives (`state_url`: this process, or Redis shared
    by replicas); last, so every other part has finished with it when the gateway stops.
12. Timing: with `stage_timing` on, the CPU time of every stage and hook above, for /metrics and the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence

from mcp_bastion.addons.admission import Admission
from mcp_bastion.addons.approvals import Approvals
from mcp_bastion.addons.auditlog import AuditLog
from mcp_bastion.addons.auth import Auth
from mcp_bastion.addons.contentview import ContentView
from mcp_bastion.addons.decisionlog import DecisionLog
from mcp_bastion.addons.gate import Gate
from mcp_bastion.addons.gateway import Gateway
from mcp_bastion.addons.masking import Masking
from mcp_bastion.addons.metrics import Metrics, Sources
from mcp_bastion.addons.mitmweb import Mitmweb
from mcp_bastion.addons.pinning import Pinning
from mcp_bastion.addons.pipeline import Pipeline
from mcp_bastion.addons.policy import Policy
from mcp_bastion.addons.recorder import Recorder
from mcp_bastion.addons.sessions import Sessions
from mcp_bastion.addons.state import State
from mcp_bastion.addons.tasks import Tasks
from mcp_bastion.addons.timing import Timing
from mcp_bastion.addons.tracing import Tracing
from mcp_bastion.addons.upstream import UpstreamCheck
from mcp_bastion.addons.upstream_token import UpstreamToken
from mcp_bastion.addons.wire import Wire
from mcp_bastion.core.pipeline import Stage
from mcp_bastion.core.state import Hub
from mcp_bastion.core.vocab import StageName
from mcp_bastion.glue.dispatch import Dispatch


def bundle(*, extra_stages: Sequence[Stage] = ()) -> list:
    """A fresh instance of every addon, wired together, in the order mitmproxy runs their hooks.

    `extra_stages` are message stages run after the shipped ones (tests use it to
    place a probe after the Policy); the Gate requires their marks too.
    """
    hub = Hub()  # what the gateway remembers about callers: in this process, or shared (State, `state_url`)
    recorder, auditlog = Recorder(), AuditLog()
    policy, auth = Policy(), Auth()
    masking = Masking(policy.ruleset)
    approvals = Approvals(hub=hub)
    pinning = Pinning(policy.ruleset, hub)
    stages = Pipeline([Wire(hub), Tasks(hub), policy, pinning, masking, approvals, *extra_stages])
    gate = Gate(
        request=[StageName.PARSE, StageName.AUTH, StageName.SESSION, StageName.ADMISSION, *stages.request_stages],
        response=[StageName.RESP_PARSE, *stages.response_stages],
    )
    metrics = Metrics(Sources(
        ruleset=lambda: policy.source.current() if policy.source is not None else None,
        approvals=lambda: approvals.store.all(),
        writers=[recorder.health, auditlog.health],
        issuers=lambda: auth.verifier.status() if auth.verifier is not None else None,
        state=hub.status,
    ))
    addons = [
        Gateway(hub),
        auth,
        approvals,
        pinning,
        Sessions(hub),
        Admission([recorder.health, auditlog.health]),
        policy,
        masking,
        stages,
        gate,
        UpstreamCheck(),
        UpstreamToken(),
        recorder,
        auditlog,
        DecisionLog(),
        metrics,
        Tracing(),
        Mitmweb(),
        ContentView(),
        State(hub),
    ]
    timing = Timing(addons)
    metrics.sources.timings = timing.clocks
    return [*addons, timing]


def as_addon(*, extra_stages: Sequence[Stage] = (), entry: str | None = None) -> Dispatch:
    """`bundle()` as the one addon mitmproxy loads: it calls each part's hooks in bundle order and fails
    closed when one raises (see `glue.dispatch`). `entry` is the script that loads it: it must be the
    first script mitmproxy loads."""
    return Dispatch(bundle(extra_stages=extra_stages), entry=entry)
