"""The reviewer's page at the approval API's root, in headless Chromium, with real mitmdump, tokens and server."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from bastion_dev.issuer import DevIssuer

from browser import CHROMIUM, Browser
from harness import free_port, mitmdump_args, running, sdk_server

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup as root does)")]

HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json",
           "mcp-protocol-version": "2025-06-18"}
RULES = """\
version: 1
default: allow
rules:
  - id: big-sums
    match: {tools: [add], arguments: [{path: a, ge: 1000}]}
    action: approve
    reason: big sums need a second engineer
    approval: {approvers: [sre], timeout: 1m}
  - id: customer-notes
    match: {tools: [customer]}
    action: approve
    approval: {approvers: [sre], timeout: 1m}
"""
XSS = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>'


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("page")
    (tmp / "rules.yaml").write_text(RULES)
    port = free_port()
    with DevIssuer(audience=f"http://127.0.0.1:{port}") as issuer, sdk_server() as server:
        options = {"ruleset": str(tmp / "rules.yaml"), "oidc_issuer": issuer.url}
        with running(mitmdump_args(server.url, port, options), port) as gw:
            yield gw, issuer


def session(gw, token: str) -> dict:
    headers = {**HEADERS, "authorization": f"Bearer {token}"}
    r = httpx.post(f"{gw.url}/mcp", headers=headers, timeout=30, json={
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}})
    assert r.status_code == 200, r.text
    headers["mcp-session-id"] = r.headers["mcp-session-id"]
    httpx.post(f"{gw.url}/mcp", headers=headers, json={"jsonrpc": "2.0", "method": "notifications/initialized"})
    return headers


def call_in_background(gw, headers: dict, id_: int, name: str, arguments: dict, got: dict) -> threading.Thread:
    def run() -> None:
        r = httpx.post(f"{gw.url}/mcp", headers=headers, timeout=90, json={
            "jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": name, "arguments": arguments}})
        text = r.text
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            text = next(line[5:] for line in text.splitlines() if line.startswith("data:") and f'"id":{id_}' in line)
        got[id_] = json.loads(text)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


ROWS = "[...document.querySelectorAll('#rows tr')]"


def row_text(browser: Browser, approval_fragment: str) -> str:
    return browser.evaluate(f"({ROWS}.find(r => r.innerText.includes({json.dumps(approval_fragment)})) || {{}})"
                            ".innerText || ''")


def test_the_page_holds_no_data_and_locks_itself_down(stack):
    gw, _ = stack
    r = httpx.get(f"{gw.url}/bastion/approvals", headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'nonce-" in csp and "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    assert "apr-" not in r.text
    # a program (JSON) without a token is still refused, and the page never answers a non-GET
    assert httpx.get(f"{gw.url}/bastion/approvals", headers={"accept": "application/json"}).status_code == 401
    assert httpx.post(f"{gw.url}/bastion/approvals/x/approve", headers={"accept": "text/html"}).status_code == 401


def test_a_reviewer_signs_in_sees_what_waits_and_decides_in_a_real_browser(stack):
    gw, issuer = stack
    alice, bob = issuer.mint("alice"), issuer.mint("bob")
    headers = session(gw, alice)
    got: dict = {}
    add = call_in_background(gw, headers, 21, "add", {"a": 1000, "b": 2}, got)
    note = call_in_background(gw, headers, 22, "customer", {"id": 1, "note": XSS}, got)
    with Browser() as browser:
        browser.open(f"{gw.url}/bastion/approvals")
        browser.wait_for("!document.getElementById('signin').hidden")
        assert browser.evaluate(f"{ROWS}.length") == 0
        browser.evaluate(f"document.getElementById('token').value = {json.dumps(bob)}; "
                         "document.getElementById('signin-button').click(); true")
        browser.wait_for(f"{ROWS}.filter(r => r.innerText.includes('pending')).length >= 2")
        assert "Signed in as Bob Okafor" in browser.evaluate("document.getElementById('who').innerText")
        big = row_text(browser, "1000")
        assert "Alice Martin" in big and "tools/call add" in big and "big-sums" in big
        notes = row_text(browser, "customer")
        assert "onerror" in notes  # shown as text ...
        assert browser.evaluate("document.querySelectorAll('#rows img, #rows script').length") == 0
        assert browser.evaluate("window.pwned === undefined")  # ... never run
        browser.evaluate(f"{ROWS}.find(r => r.innerText.includes('1000')).querySelector('button.approve').click(); "
                         "true")
        add.join(30)
        assert got[21]["result"]["content"][0]["text"] == "1002"
        browser.wait_for(f"{ROWS}.some(r => r.innerText.includes('1000') && r.innerText.includes('Bob Okafor'))")
        # a denial needs a reason: the page says so and decides nothing
        deny = f"{ROWS}.find(r => r.innerText.includes('customer'))"
        browser.evaluate(f"{deny}.querySelector('button.deny').click(); true")
        assert "reason" in browser.wait_for("document.getElementById('status').innerText")
        assert note.is_alive()
        browser.evaluate(f"{deny}.querySelector('input.reason').value = 'no notes today'; "
                         f"{deny}.querySelector('button.deny').click(); true")
        note.join(30)
        err = got[22]["error"]
        assert "no notes today" in err["message"] and err["data"]["rule"] == "customer-notes"
        # signed out, the page shows nothing again
        browser.evaluate("document.getElementById('signout').click(); true")
        browser.wait_for(f"!document.getElementById('signin').hidden && {ROWS}.length === 0 || "
                         "document.getElementById('requests').hidden")


def test_the_requester_sees_their_own_request_but_cannot_decide_it(stack):
    gw, issuer = stack
    alice = issuer.mint("alice")
    headers = session(gw, alice)
    got: dict = {}
    t = call_in_background(gw, headers, 23, "add", {"a": 3000, "b": 3}, got)
    with Browser() as browser:
        browser.open(f"{gw.url}/bastion/approvals")
        browser.wait_for("!document.getElementById('signin').hidden")
        browser.evaluate(f"document.getElementById('token').value = {json.dumps(alice)}; "
                         "document.getElementById('signin-button').click(); true")
        browser.wait_for(f"{ROWS}.some(r => r.innerText.includes('3000') && r.innerText.includes('pending'))")
        mine = f"{ROWS}.find(r => r.innerText.includes('3000'))"
        assert browser.evaluate(f"{mine}.querySelectorAll('button').length") == 0
    bob = issuer.mint("bob")
    items = httpx.get(f"{gw.url}/bastion/approvals", headers={"authorization": f"Bearer {bob}"}).json()
    (item,) = [i for i in items if i["arguments"] == {"a": 3000, "b": 3}]
    assert item["can_decide"] is True
    httpx.post(f"{gw.url}/bastion/approvals/{item['id']}/deny", headers={"authorization": f"Bearer {bob}"},
               json={"reason": "cleanup"})
    t.join(30)
    assert got[23]["error"]["data"]["approval"] == item["id"]
