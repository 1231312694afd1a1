"""Tool pinning end to end: a real SDK server changes a tool at run time; real mitmdump, tokens, SDK client."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from bastion_dev.issuer import DevIssuer

from harness import ROOT, free_port, mitmdump_args, running, sdk_server

pytestmark = pytest.mark.e2e
TIMEOUT = 60


@pytest.fixture
def stack(tmp_path):
    port = free_port()
    with DevIssuer(audience=f"http://127.0.0.1:{port}") as issuer, sdk_server() as server:
        options = {"oidc_issuer": issuer.url, "pin_reviewers": "sre", "pin_store": str(tmp_path / "pins.json"),
                   "audit_log": str(tmp_path / "audit.jsonl"), "record_dir": str(tmp_path / "sessions")}
        with running(mitmdump_args(server.url, port, options), port, env={"BASTION_AUDIT_KEY": "k" * 32}) as gw:
            yield gw, issuer, tmp_path


def pins(gw, token: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "pins"), *args, "--gateway", gw.url], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "BASTION_APPROVER_TOKEN": token})


async def rug_pull(gw, token: str, mode: str, to: str) -> dict:
    """List, call, have the server change `weather` and announce it, list and call again."""
    seen: dict = {"notices": []}

    async def on_message(message) -> None:
        method = getattr(getattr(message, "root", message), "method", None)
        if method:
            seen["notices"].append(method)

    async with httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=30) as http:
        async with Client(streamable_http_client(f"{gw.url}/mcp", http_client=http), mode=mode, cache=None,
                          message_handler=on_message) as c:
            seen["before"] = sorted(t.name for t in (await c.list_tools()).tools)
            seen["weather"] = (await c.call_tool("weather", {"city": "Oslo"})).content[0].text
            seen["changed"] = (await c.call_tool("rug_pull", {"to": to})).content[0].text
            seen["after"] = sorted(t.name for t in (await c.list_tools()).tools)
            try:
                result = await c.call_tool("weather", {"city": "Oslo"})
                seen["weather_after"] = result.content[0].text if not result.is_error else f"error: {result}"
            except Exception as e:  # a JSON-RPC error
                seen["weather_after"] = f"error: {e}"
            seen["add_after"] = (await c.call_tool("add", {"a": 1, "b": 2})).content[0].text
    return seen


async def listed(gw, token: str, mode: str) -> list[str]:
    async with httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=30) as http:
        async with Client(streamable_http_client(f"{gw.url}/mcp", http_client=http), mode=mode, cache=None) as c:
            tools = sorted(t.name for t in (await c.list_tools()).tools)
            text = (await c.call_tool("weather", {"city": "Oslo"})).content[0].text if "weather" in tools else None
            return [*tools, text]


@pytest.mark.parametrize("mode", ["legacy", "auto"], ids=["2025", "2026"])
def test_a_tool_changed_at_run_time_is_hidden_and_refused_until_a_reviewer_accepts_it(stack, mode):
    gw, issuer, tmp = stack
    alice, bob = issuer.mint("alice"), issuer.mint("bob")
    seen = asyncio.run(asyncio.wait_for(rug_pull(gw, alice, mode, "benign"), TIMEOUT))
    assert "weather" in seen["before"] and seen["weather"] == "sunny in Oslo"
    if mode == "legacy":
        assert "notifications/tools/list_changed" in seen["notices"]  # announced (the 2026 wire has no session)
    assert "weather" not in seen["after"] and "add" in seen["after"]  # the others keep working
    assert seen["weather_after"].startswith("error") and "changed" in seen["weather_after"]
    assert seen["add_after"] == "3"
    # the reviewer sees what changed, as a diff, and accepts it
    listing = pins(gw, bob, "list")
    assert listing.returncode == 0 and "changed" in listing.stdout and "weather" in listing.stdout
    shown = pins(gw, bob, "diff", "weather")
    assert shown.returncode == 0
    assert "-  \"description\": \"Current weather for a city.\"" in shown.stdout
    assert "three-day forecast" in shown.stdout
    assert pins(gw, alice, "accept", "weather").returncode == 1  # not in pin_reviewers
    stale = pins(gw, bob, "accept", "weather", "--digest", "sha256:" + "0" * 64)
    assert stale.returncode == 1 and "changed again" in stale.stderr  # not the change bob looked at
    digest = shown.stdout.rsplit("--digest ", 1)[1].split(")")[0]
    accepted = pins(gw, bob, "accept", "weather", "--digest", digest)
    assert accepted.returncode == 0, accepted.stderr
    assert pins(gw, bob, "accept", "weather").returncode == 1  # nothing left to accept
    after = asyncio.run(asyncio.wait_for(listed(gw, alice, mode), TIMEOUT))
    assert "weather" in after and after[-1] == "sunny in Oslo"
    records = [json.loads(line) for line in (tmp / "audit.jsonl").read_text().splitlines()]
    hidden = [r for r in records if r.get("method") == "tools/list" and "tool weather changed" in r.get("pins", [])]
    assert hidden and any("changed since it was pinned" in d.get("reason", "") for d in hidden[0]["decisions"])
    sessions = [str(p) for p in (tmp / "sessions").rglob("*.mitm")]
    timeline = subprocess.run([str(ROOT / "scripts" / "replay"), "timeline", "--json", *sessions],
                              capture_output=True, text=True, timeout=60)
    assert timeline.returncode == 0, timeline.stderr
    rows = [json.loads(line) for line in timeline.stdout.splitlines()]
    assert any("tool weather changed" in (r.get("pins") or []) for r in rows), rows[:3]


def test_a_poisoned_change_stays_hidden_after_it_is_accepted_and_the_store_is_readable_offline(stack):
    gw, issuer, tmp = stack
    alice, bob = issuer.mint("alice"), issuer.mint("bob")
    seen = asyncio.run(asyncio.wait_for(rug_pull(gw, alice, "legacy", "poison"), TIMEOUT))
    assert "weather" not in seen["after"]
    shown = pins(gw, bob, "diff", "weather")
    assert "finding in the new definition: instructions" in shown.stdout
    assert pins(gw, bob, "accept", "weather").returncode == 0
    after = asyncio.run(asyncio.wait_for(listed(gw, alice, "legacy"), TIMEOUT))
    assert "weather" not in after  # accepted as the pin, but a finding still hides it
    busy = subprocess.run([str(ROOT / "scripts" / "pins"), "list", "--store", str(tmp / "pins.json")],
                          capture_output=True, text=True, timeout=60)
    assert busy.returncode == 0 and "weather" in busy.stdout and "instructions" in busy.stdout
    locked = subprocess.run([str(ROOT / "scripts" / "pins"), "forget", "weather", "--store", str(tmp / "pins.json")],
                            capture_output=True, text=True, timeout=60)
    assert locked.returncode == 2 and "in use" in locked.stderr  # the running gateway owns the file
