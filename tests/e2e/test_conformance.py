"""
The MCP conformance suite (npm @modelcontextprotocol/conformance, server
mode, its default "active" suite) against @modelcontextprotocol/server-everything,
once directly and once through the gateway with the allow-all bundle: every
check of every scenario must come out the same.

server-everything is not the suite's reference server, so some scenarios fail
directly (their tools are missing); what matters is that the gateway changes
nothing. One exception is expected and asserted: `dns-rebinding-protection`,
which server-everything fails on its own and the gateway fixes (it checks
Host/Origin itself), so through the gateway all its checks must pass.
A full run takes a few seconds.

The suite's 0.2.0-alpha line (installed beside it as `conformance-2026`) has frozen
requirement sets per spec revision: `--requirements 2026-07-28` and `2025-11-25` run
against the Python SDK's own server (it speaks both eras), directly and through the
gateway; no check that passes directly may fail through it.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from harness import NODE22, PEERS, everything_server, gateway, sdk_server

pytestmark = pytest.mark.e2e

CONFORMANCE = str(PEERS / "@modelcontextprotocol" / "conformance" / "dist" / "index.js")
GATEWAY_FIXES = "dns-rebinding-protection"

Checks = dict[str, list[tuple[str, str, str]]]  # scenario -> [(check id, status, error message)]


def run_suite(url: str, out: Path, ports: tuple[int, ...]) -> Checks:
    """Run the suite against `url`; return each scenario's checks, ports in messages replaced by PORT."""
    done = subprocess.run([NODE22, CONFORMANCE, "server", "--url", url, "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    results: Checks = {}
    for path in sorted(out.glob("server-*/checks.json")):
        scenario = re.sub(r"^server-(.+)-\d{4}-\d\d-\d\dT[\d-]+Z$", r"\1", path.parent.name)
        checks = json.loads(path.read_text())
        results[scenario] = [(c["id"], c["status"], _portless(c.get("errorMessage") or "", ports)) for c in checks]
    assert results, f"the suite produced no results:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return results


def _portless(text: str, ports: tuple[int, ...]) -> str:
    for port in ports:
        text = text.replace(str(port), "PORT")
    return text


def passing(results: Checks) -> list[str]:
    return [s for s, checks in results.items() if all(status == "SUCCESS" for _, status, _ in checks)]


def test_conformance_results_are_the_same_through_the_gateway(tmp_path):
    with everything_server() as srv:
        direct = run_suite(srv.endpoint, tmp_path / "direct", (srv.port,))
    with everything_server() as srv, gateway(srv.url) as gw:
        proxied = run_suite(f"{gw.url}/mcp", tmp_path / "gateway", (srv.port, gw.port))

    assert len(direct) >= 25 and set(proxied) == set(direct)
    assert len(passing(direct)) >= 10, "too few scenarios pass directly for the comparison to mean anything"
    for scenario in sorted(direct):
        if scenario == GATEWAY_FIXES:
            continue
        assert proxied[scenario] == direct[scenario], scenario
    assert GATEWAY_FIXES in passing(proxied), proxied[GATEWAY_FIXES]


# --- both protocol eras: the frozen requirement sets of conformance 0.2.0-alpha ------------------

CONFORMANCE_NEXT = str(PEERS / "conformance-2026" / "dist" / "index.js")


def run_requirements(revision: str, url: str, out: Path) -> dict[str, set[str]]:
    """`server --requirements REVISION` against `url`: each scenario's passing checks."""
    done = subprocess.run([NODE22, CONFORMANCE_NEXT, "server", "--url", url, "--requirements", revision,
                           "-o", str(out), "--timeout", "15000"], capture_output=True, text=True, timeout=600)
    passed: dict[str, set[str]] = {}
    for path in sorted(out.glob("*/checks.json")):
        scenario = re.sub(r"-\d{4}-\d\d-\d\dT[\d-]+Z$", "", path.parent.name)
        passed[scenario] = {c["id"] for c in json.loads(path.read_text()) if c["status"] == "SUCCESS"}
    assert passed, f"the suite produced no results:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return passed


@pytest.mark.parametrize(("revision", "least"), [("2026-07-28", 100), ("2025-11-25", 40)])
def test_no_check_that_passes_directly_fails_through_the_gateway(tmp_path, revision, least):
    """The Python SDK's own server speaks both eras; the gateway (allow-all) must not lose a passing check."""
    with sdk_server("streamable-http") as srv:
        direct = run_requirements(revision, srv.endpoint, tmp_path / "direct")
        with gateway(srv.url) as gw:
            proxied = run_requirements(revision, f"{gw.url}/mcp", tmp_path / "gateway")
    assert sum(map(len, direct.values())) >= least, "too few checks pass directly for the comparison to mean anything"
    lost = {s: sorted(checks - proxied.get(s, set())) for s, checks in direct.items() if checks - proxied.get(s, set())}
    assert lost == {}


def test_server_everything_loses_no_check_of_the_2025_requirements_through_the_gateway(tmp_path):
    """npm server-everything (the TypeScript SDK, 2025-11-25) on the suite's frozen 2025 set."""
    with everything_server() as srv:
        direct = run_requirements("2025-11-25", srv.endpoint, tmp_path / "direct")
        with gateway(srv.url) as gw:
            proxied = run_requirements("2025-11-25", f"{gw.url}/mcp", tmp_path / "gateway")
    assert sum(map(len, direct.values())) >= 20, "too few checks pass directly for the comparison to mean anything"
    lost = {s: sorted(checks - proxied.get(s, set())) for s, checks in direct.items() if checks - proxied.get(s, set())}
    assert lost == {}
