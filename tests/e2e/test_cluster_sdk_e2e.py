"""The Python SDK's own client and server through two replicas behind HAProxy, both eras.

2026-07-28 requests carry no session, so HAProxy spreads them round robin: a client lists the tools
through one replica and calls through the other, and a multi-round-trip call's rounds land on different
replicas. That works only because the replicas share what they learn (pins, `Mcp-Param-*` declarations,
`requestState` bindings). A 2025 session sticks to one replica.
"""

from __future__ import annotations

import asyncio
import shutil

import pytest
from mcp import Client
from mitmproxy import io

from bastion_dev.cluster import Cluster

from harness import REDIS_SERVER, ROOT, sdk_server

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(not (shutil.which(REDIS_SERVER) and shutil.which("haproxy")),
                                 reason="redis-server and haproxy are not installed")]

TIMEOUT = 60


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdk-cluster")
    with sdk_server("streamable-http") as srv, \
            Cluster(srv.endpoint or f"{srv.url}/mcp", replicas=2, dir=tmp,
                    options={"ruleset": str(ROOT / "rulesets" / "allow-all.yaml")},
                    env={"BASTION_AUDIT_KEY": "k" * 32}) as c:
        c.upstream_endpoint = srv.endpoint or f"{srv.url}/mcp"
        yield c


def served_by(c: Cluster) -> dict[str, set[str]]:
    """Which replica recorded which methods (the recording file names carry the replica)."""
    out: dict[str, set[str]] = {}
    for path in (c.dir / "sessions").glob("*.mitm"):
        replica = path.name.split("_")[1]
        with open(path, "rb") as f:
            for flow in io.FlowReader(f).stream():
                method = flow.request.headers.get("mcp-method") or flow.request.method
                out.setdefault(replica, set()).add(method)
    return out


async def session(url: str, mode: str) -> tuple[list[str], str, str]:
    async with Client(url, mode=mode) as c:
        tools = [t.name for t in (await c.list_tools()).tools]
        added = []
        for i in range(4):  # several calls: round robin takes them to both replicas
            added.append((await c.call_tool("add", {"a": i, "b": 1})).content[0].text)
        readme = (await c.read_resource("notes://readme")).contents[0].text
        return tools, added, readme


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_both_eras_through_the_cluster(front, mode):
    tools, added, readme = asyncio.run(asyncio.wait_for(session(front.front_url, mode), TIMEOUT))
    assert "add" in tools and added == ["1", "2", "3", "4"] and "readme" in readme


def test_2026_calls_are_spread_over_both_replicas(front):
    asyncio.run(asyncio.wait_for(session(front.front_url, "auto"), TIMEOUT))
    served = served_by(front)
    assert {"r1", "r2"} <= set(served) and all("tools/call" in m for m in served.values()), served


def test_a_multi_round_trip_call_goes_through_whichever_replica_each_round_reaches(front):
    from test_wire_2026 import confirm  # the same three rounds as through one gateway

    asked: list[str] = []
    text = asyncio.run(asyncio.wait_for(confirm(front.front_url, asked), TIMEOUT))
    assert text == "deployed to staging" and asked == ["Who deploys to staging?", "Sure?"]


@pytest.mark.parametrize(("revision", "least"), [("2026-07-28", 100), ("2025-11-25", 40)])
def test_no_conformance_check_that_passes_directly_fails_through_the_cluster(front, tmp_path, revision, least):
    """The conformance suite's frozen requirement sets, through HAProxy and two replicas sharing Redis."""
    from test_conformance import run_requirements

    direct = run_requirements(revision, front.upstream_endpoint, tmp_path / "direct")
    through = run_requirements(revision, front.front_url, tmp_path / "cluster")
    assert sum(map(len, direct.values())) >= least, "too few checks pass directly for the comparison to mean anything"
    lost = {s: sorted(checks - through.get(s, set())) for s, checks in direct.items() if checks - through.get(s, set())}
    assert lost == {}
