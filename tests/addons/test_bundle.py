"""The one bundle: which addon handles which hook, in which order, and what runs before the Gate."""

from __future__ import annotations

import runpy

import pytest

from mcp_bastion.addons.admission import Admission
from mcp_bastion.addons.auditlog import AuditLog
from mcp_bastion.addons.gate import Gate
from mcp_bastion.addons.pipeline import Pipeline
from mcp_bastion.addons.policy import Policy
from mcp_bastion.addons.recorder import Recorder
from mcp_bastion.bundle import bundle
from mcp_bastion.core.vocab import Meta, StageName

from bundled import bundled, call, error_of, forwarded
from harness import BUNDLE

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


ORDER = ["Gateway", "Auth", "Approvals", "Pinning", "Sessions", "Admission", "Policy", "Masking", "Pipeline", "Gate",
         "UpstreamCheck",
         "UpstreamToken",
         "Recorder", "AuditLog", "DecisionLog", "Metrics", "Tracing", "Mitmweb", "ContentView", "State", "Timing"]

# mitmproxy calls each hook on the addons in bundle order: this table is the pipeline as it runs.
HOOKS = {
    "requestheaders": ["Gateway", "Auth", "Approvals", "Pinning", "Recorder", "AuditLog"],
    "request": ["Gateway", "Approvals", "Pinning", "Sessions", "Admission", "Pipeline", "Gate", "UpstreamCheck",
                "UpstreamToken", "Recorder", "AuditLog"],
    "responseheaders": ["Gateway", "Sessions", "Pipeline", "UpstreamToken", "Recorder"],
    "response": ["Gateway", "Approvals", "Pipeline", "Gate", "Recorder", "AuditLog", "DecisionLog", "Metrics",
                 "Tracing"],
    "error": ["Gateway", "Approvals", "UpstreamCheck", "UpstreamToken", "Recorder", "AuditLog", "DecisionLog",
              "Metrics", "Tracing"],
}


def names(addons) -> list[str]:
    return [type(a).__name__ for a in addons]


def test_bundle_order():
    assert names(bundle()) == ORDER


@pytest.mark.parametrize("hook", list(HOOKS))
def test_which_addon_handles_which_hook_in_which_order(hook):
    assert [type(a).__name__ for a in bundle() if hasattr(a, hook)] == HOOKS[hook]


def test_the_entry_script_loads_exactly_the_bundle_as_one_addon():
    loaded = runpy.run_path(BUNDLE)["addons"]
    assert names(loaded) == ["Dispatch"]
    assert names(loaded[0].parts) == ORDER
    assert not hasattr(loaded[0], "addons")  # mitmproxy must not walk the parts itself


@pytest.mark.parametrize("hook", list(HOOKS))
def test_the_one_addon_calls_each_hook_on_the_parts_in_bundle_order(hook):
    from mcp_bastion.bundle import as_addon

    addon = as_addon()
    assert [label.split(".")[0] for label, *_ in addon.tables[hook]] == [n.lower() for n in HOOKS[hook]]


def test_each_call_builds_fresh_addons():
    a, b = bundle(), bundle()
    assert all(x is not y for x, y in zip(a, b, strict=True))


def test_the_gate_requires_every_stage_placed_before_it():
    addons = bundle()
    gate = next(a for a in addons if isinstance(a, Gate))
    pipeline = next(a for a in addons if isinstance(a, Pipeline))
    assert gate.request_stages == (StageName.PARSE, StageName.AUTH, StageName.SESSION, StageName.ADMISSION,
                                   *pipeline.request_stages)
    assert gate.response_stages == (StageName.RESP_PARSE, *pipeline.response_stages)
    assert [s.name for s in pipeline.stages] == [StageName.WIRE, StageName.TASKS, StageName.POLICY, StageName.PIN,
                                                 StageName.MASK, StageName.APPROVAL]
    assert any(isinstance(s, Policy) for s in pipeline.stages)


def test_after_the_gate_only_the_upstream_and_the_write_ahead_handle_requests():
    """A failing writer is refused by Admission before any stage runs; after the Gate, the Recorder and
    the AuditLog write what is about to be forwarded (and refuse only if that very write fails), last."""
    addons = bundle()
    gate = names(addons).index("Gate")
    after = [type(a).__name__ for a in addons[gate + 1:] if hasattr(a, "request")]
    assert after == ["UpstreamCheck", "UpstreamToken", "Recorder", "AuditLog"]
    assert names(addons).index("Admission") < gate


def still_full() -> None:
    raise OSError(28, "No space left on device")


async def test_a_failing_recorder_is_refused_by_admission_before_the_gate(tmp_path):
    with bundled(record_dir=str(tmp_path)) as b:
        recorder = b.addon(Recorder)
        recorder.health.failed("disk full")
        recorder.health.probe = still_full
        f = b.flow("POST", call("tools/call", name="add"))
        await b.request(f)
        assert not forwarded(f) and f.response.status_code == 503
        assert error_of(f)["data"] == {"reason": "record"}
        assert f.response.headers["retry-after"]
        refusal = [d for d in f.metadata[Meta.DECISIONS] if d.get("status") == 503]
        assert [d["stage"] for d in refusal] == [StageName.ADMISSION]
        assert StageName.POLICY not in f.metadata[Meta.STAGES]  # refused before any message stage ran


async def test_a_failing_audit_log_is_refused_by_admission(tmp_path, monkeypatch):
    monkeypatch.setenv("BASTION_AUDIT_KEY", "k" * 32)
    with bundled(audit_log=str(tmp_path / "audit.jsonl")) as b:
        b.addon(AuditLog).health.failed("disk full")
        b.addon(AuditLog).health.probe = still_full
        f = b.flow("POST", call("tools/call", name="add"))
        await b.request(f)
        assert f.response.status_code == 503 and error_of(f)["data"] == {"reason": "audit"}


async def test_admission_lets_traffic_through_when_writers_are_healthy(tmp_path):
    with bundled(record_dir=str(tmp_path)) as b:
        f = b.flow("POST", call("tools/call", name="add"))
        await b.request(f)
        assert forwarded(f)
        assert StageName.ADMISSION in f.metadata[Meta.STAGES]
        assert b.addon(Admission).writers == (b.addon(Recorder).health, b.addon(AuditLog).health)
