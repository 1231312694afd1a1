"""
scripts/load in a tiny run: a few clients through the real gateway, and every check named in its table.
Structure and verdict only: no speed is compared here.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from bastion_dev import load

from harness import ROOT

pytestmark = pytest.mark.e2e


def test_a_tiny_load_run_passes_every_check():
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([str(ROOT / "scripts" / "load"), "--clients", "4", "--calls", "5"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-3000:]
    for name in load.CHECKS:
        assert name in out, f"the table does not name the check {name!r}"
    for cls in load.CLASSES:
        assert f"│ {cls} " in out, f"no row for the class {cls!r}"
    assert "all checks passed" in out
    # 4 clients × 5 calls: every class is sent, and the mask class says what became of it.
    assert "20 sent" in out
    assert "mask: " in out
