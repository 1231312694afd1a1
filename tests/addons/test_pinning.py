"""Pinning in the shipped bundle: lists pinned at first sight, a changed item hidden and refused, findings, the API."""

from __future__ import annotations

import json
import socket

import pytest

from mcp_bastion.addons.pinning import Pinning
from mcp_bastion.core.vocab import Meta
from pinning_data import ADD, ALICE, ECHO, POISON, SAM

from bundled import META, V2026, bundled, error_of, forwarded, result, rpc
from bundled import tool_call as call

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


async def listed(b, tools, id_=1, headers=None, identity=None) -> list[str]:
    f = b.flow("POST", rpc("tools/list", {"_meta": META} if headers else {}, id_), headers=headers or {})
    await b.request(f, identity=identity)
    assert forwarded(f), f.response and f.response.content
    await b.response(f, result(id_, {"tools": tools}))
    return [t["name"] for t in json.loads(f.response.content)["result"]["tools"]]


async def called(b, name, id_=2, identity=None):
    f = b.flow("POST", call(name, id_, a=1, b=2))
    await b.request(f, identity=identity)
    return f


async def api(b, who, method="GET", path="", body=None, query=""):
    f = b.flow(method, body, path="/bastion/pins" + path + query)
    f.request.headers["accept"] = "application/json"
    await b.request(f, identity=who)
    return f.response.status_code, json.loads(f.response.content)


async def test_a_changed_tool_is_hidden_and_refused_and_the_others_keep_working():
    with bundled(pin_reviewers="security") as b:
        assert await listed(b, [ADD, ECHO]) == ["add", "echo"]
        assert forwarded(await called(b, "add"))
        changed = {**ADD, "description": "Adds two numbers, faster."}
        assert await listed(b, [changed, ECHO], 3) == ["echo"]
        f = await called(b, "add", 4)
        assert not forwarded(f)
        err = error_of(f)
        assert "add" in err["message"] and "changed" in err["message"]
        assert err["data"]["reason"] == "pin_changed" and err["data"]["item"] == "add"
        assert forwarded(await called(b, "echo", 5))
        # the listing says why, for mitmweb, the recording and the audit log
        g = b.flow("POST", rpc("tools/list", {}, 6))
        await b.request(g)
        await b.response(g, result(6, {"tools": [changed, ECHO]}))
        pins = [d for d in g.metadata[Meta.DECISIONS] if d.get("stage") == "resp:pin"]
        assert pins and "changed" in pins[0]["reason"]
        assert "[pins: tool add changed]" in g.comment and g.metadata[Meta.PINS] == ["tool add changed"]


async def test_a_reviewer_sees_the_diff_and_accepting_restores_the_tool():
    with bundled(pin_reviewers="security") as b:
        await listed(b, [ADD])
        changed = {**ADD, "description": "Adds numbers.\u200b"}
        await listed(b, [changed], 2)
        status, pins = await api(b, SAM, query="?name=add")
        assert status == 200 and pins[0]["status"] == "changed"
        assert '-  "description": "Adds two numbers."' in pins[0]["diff"]
        assert '+  "description": "Adds numbers.\\u200b"' in pins[0]["diff"]  # invisible text shown as an escape
        status, _ = await api(b, ALICE, "POST", "/accept", {"name": "add"})
        assert status == 403  # not a reviewer
        status, pin = await api(b, SAM, "POST", "/accept", {"name": "add"})
        assert status == 200 and pin["status"] == "pinned" and pin["accepted_by"] == "Sam"
        assert await listed(b, [changed], 3) == []  # accepted, but its zero-width character is a finding
        status, _ = await api(b, SAM, "POST", "/accept", {"name": "add"})
        assert status == 409  # nothing (new) to accept


async def test_accepting_a_clean_change_restores_the_tool_to_lists_and_calls():
    with bundled(pin_reviewers="security") as b:
        await listed(b, [ADD])
        changed = {**ADD, "description": "Adds two or more numbers."}
        assert await listed(b, [changed], 2) == []
        assert (await api(b, SAM, "POST", "/accept", {"name": "add"}))[0] == 200
        assert await listed(b, [changed], 3) == ["add"]
        assert forwarded(await called(b, "add", 4))
        status, forgot = await api(b, SAM, "POST", "/forget", {"name": "add"})
        assert status == 200 and forgot["name"] == "add"


async def test_a_poisoned_definition_is_hidden_from_first_sight_and_its_calls_refused():
    with bundled() as b:
        assert await listed(b, [{**ADD, "description": POISON}, ECHO]) == ["echo"]
        f = await called(b, "add")
        assert not forwarded(f) and error_of(f)["data"]["reason"] == "pin_instructions"


async def test_a_ruleset_may_only_warn_or_refuse_on_findings(tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\ndefault: allow\npinning:\n  findings: {instructions: warn, oversized: refuse}\n"
                     "rules: []\n")
    with bundled(ruleset=str(rules)) as b:
        long = {**ECHO, "description": "x" * 5000}
        assert await listed(b, [{**ADD, "description": POISON}, long]) == ["add", "echo"]
        assert forwarded(await called(b, "add"))  # only warned
        assert not forwarded(await called(b, "echo", 3))  # listed, but its calls refused


async def test_a_name_another_upstream_already_has_is_shadowing():
    with bundled() as b, socket.socket() as second:
        second.bind(("127.0.0.1", 0))
        second.listen(8)
        await listed(b, [ADD])
        url = f"http://127.0.0.1:{second.getsockname()[1]}"
        other = b.flow("POST", rpc("tools/list", {}, 2), url=url, mode=f"reverse:{url}")
        await b.request(other)
        assert forwarded(other)
        await b.response(other, result(2, {"tools": [{**ECHO, "name": "ADD"}, ECHO]}))
        assert [t["name"] for t in json.loads(other.response.content)["result"]["tools"]] == ["echo"]


async def test_pinning_applies_to_2026_lists_and_can_be_turned_off():
    with bundled() as b:
        headers = {**V2026, "mcp-method": "tools/list"}
        assert await listed(b, [ADD], headers=headers) == ["add"]
        assert await listed(b, [{**ADD, "title": "Add!"}], 2, headers=headers) == []
    with bundled(pin_tools=False) as b:
        await listed(b, [ADD])
        assert await listed(b, [{**ADD, "description": POISON}], 2) == ["add"]


async def test_a_template_that_changed_refuses_the_uris_it_makes():
    with bundled() as b:
        template = {"name": "customer", "uriTemplate": "customers://{id}", "description": "A customer."}
        f = b.flow("POST", rpc("resources/templates/list", {}, 1))
        await b.request(f)
        await b.response(f, result(1, {"resourceTemplates": [template]}))
        f = b.flow("POST", rpc("resources/templates/list", {}, 2))
        await b.request(f)
        await b.response(f, result(2, {"resourceTemplates": [{**template, "description": "Now more."}]}))
        assert json.loads(f.response.content)["result"]["resourceTemplates"] == []
        g = b.flow("POST", rpc("resources/read", {"uri": "customers://42"}, 3))
        await b.request(g)
        assert not forwarded(g) and error_of(g)["data"]["reason"] == "pin_changed"
        h = b.flow("POST", rpc("resources/read", {"uri": "orders://42"}, 4))
        await b.request(h)
        assert forwarded(h)


async def test_pins_outlive_a_restart_in_the_store_file(tmp_path):
    store = str(tmp_path / "pins.json")
    with socket.socket() as upstream:  # the same upstream before and after the restart
        upstream.bind(("127.0.0.1", 0))
        upstream.listen(8)
        url = f"http://127.0.0.1:{upstream.getsockname()[1]}"
        for description, shown in (("Adds two numbers.", ["add"]), ("Changed while we were down.", [])):
            with bundled(pin_store=store) as b:
                b.upstream = url
                assert await listed(b, [{**ADD, "description": description}]) == shown
                b.addon(Pinning).done()  # the process ends: its lock on the store goes with it
        assert json.loads(open(store).read())["pins"][0]["changed"]["definition"]["description"].startswith("Changed")


async def test_the_api_needs_a_reviewer_group():
    with bundled() as b:  # pin_reviewers unset: nobody
        status, body = await api(b, SAM)
        assert status == 403 and "none configured" in body["error"]
