"""The seams of the Recorder and the AuditLog: the command-line tools and the glue import no addon."""

from __future__ import annotations

import subprocess
import sys

import pytest


def loaded_by(module: str) -> list[str]:
    """The mcp_bastion modules a fresh interpreter has loaded after importing `module`."""
    code = f"import sys, {module}; print('\\n'.join(m for m in sys.modules if m.startswith('mcp_bastion')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.split()


@pytest.mark.parametrize("module", [
    "mcp_bastion.cli.forensics",
    "mcp_bastion.glue.recording.sessions",
    "mcp_bastion.glue.recording.scrub",
    "mcp_bastion.glue.recording.spool",
    "mcp_bastion.glue.recording.tnet",
    "mcp_bastion.glue.recording.files",
    "mcp_bastion.glue.recording.flowfile",
    "mcp_bastion.glue.recording.facts",
    "mcp_bastion.glue.recording.audit_writer",
])
def test_imports_no_addon(module):
    assert [m for m in loaded_by(module) if m.startswith("mcp_bastion.addons")] == []


def test_the_audit_log_does_not_import_the_recorder():
    assert "mcp_bastion.addons.recorder" not in loaded_by("mcp_bastion.addons.auditlog")
