"""The one message model: the target vocabulary, new values, and what people read."""

from __future__ import annotations

import dataclasses

import pytest

from mcp_bastion.core.jsonrpc import parse_body, placed
from mcp_bastion.core.message import (
    LISTS,
    TARGETS,
    Carrier,
    Target,
    TargetKind,
    classify,
    embedded,
    http_request,
    routing_headers,
    summary_label,
    summary_target,
    with_embedded,
)
from mcp_bastion.core.vocab import Direction, Kind


def rpc(method: str, params=None, msg_id=1) -> dict:
    m: dict = {"jsonrpc": "2.0", "method": method}
    if msg_id is not None:
        m["id"] = msg_id
    if params is not None:
        m["params"] = params
    return m


def answer(msg_id, result) -> dict:
    return {"jsonrpc": "2.0", "id": msg_id, "result": result}


# --- the target vocabulary ------------------------------------------------------------


@pytest.mark.parametrize(
    "method, param, kind",
    [
        ("tools/call", "name", TargetKind.TOOL),
        ("prompts/get", "name", TargetKind.PROMPT),
        ("resources/read", "uri", TargetKind.RESOURCE),
        ("resources/subscribe", "uri", TargetKind.RESOURCE),
        ("resources/unsubscribe", "uri", TargetKind.RESOURCE),
        ("tasks/get", "taskId", TargetKind.TASK),
        ("tasks/result", "taskId", TargetKind.TASK),
        ("tasks/cancel", "taskId", TargetKind.TASK),
        ("tasks/update", "taskId", TargetKind.TASK),
    ],
)
def test_each_method_names_its_target(method, param, kind):
    m = classify(rpc(method, {param: "x-1"}))
    assert m.target == Target(kind, "x-1")
    assert m.names_target
    assert str(m.target) == f"{kind} x-1"


def test_the_table_covers_exactly_the_methods_with_a_target():
    assert {m for m, (k, _) in TARGETS.items() if k is TargetKind.TOOL} == {"tools/call"}
    assert {m for m, (k, _) in TARGETS.items() if k is TargetKind.PROMPT} == {"prompts/get"}
    assert {m for m, (k, _) in TARGETS.items() if k is TargetKind.RESOURCE} == {
        "resources/read", "resources/subscribe", "resources/unsubscribe", "notifications/resources/updated"}
    assert all(m.startswith("tasks/") for m, (k, _) in TARGETS.items() if k is TargetKind.TASK)


@pytest.mark.parametrize(
    "params",
    [None, {}, {"name": 5}, {"name": None}, {"name": ["deploy"]}, {"name": {"x": 1}}, ["deploy"], {"tool": "deploy"}],
)
def test_an_unreadable_name_gives_no_target(params):
    m = classify(rpc("tools/call", params))
    assert m.kind == Kind.REQUEST
    assert m.target is None
    assert m.names_target  # the method acts on a target: rules treat the missing name as malformed
    assert m.tool_name is None and m.arguments is None


def test_methods_without_a_target_and_answers_have_none():
    for method in ("tools/list", "initialize", "notifications/progress", "sampling/createMessage"):
        m = classify(rpc(method, {"name": "deploy", "uri": "file:///x"}))
        assert m.target is None and not m.names_target
    # a response or error carries a result/error, not a target, whatever it contains
    assert classify(answer(1, {"name": "deploy"})).target is None
    assert classify({"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "x", "name": "deploy"}}).target is None


def test_a_notification_on_a_target_method_names_it():
    m = classify(rpc("resources/read", {"uri": "file:///etc/passwd"}, msg_id=None))
    assert m.kind == Kind.NOTIFICATION
    assert m.target == Target(TargetKind.RESOURCE, "file:///etc/passwd")


def test_typed_accessors_follow_the_target_kind():
    tool = classify(rpc("tools/call", {"name": "deploy", "arguments": {"env": "prod"}}))
    assert (tool.tool_name, tool.prompt_name, tool.resource_uri, tool.arguments) == (
        "deploy", None, None, {"env": "prod"})
    prompt = classify(rpc("prompts/get", {"name": "greet", "arguments": {"who": "x"}}))
    assert (prompt.tool_name, prompt.prompt_name, prompt.resource_uri, prompt.arguments) == (
        None, "greet", None, {"who": "x"})
    res = classify(rpc("resources/read", {"uri": "file:///a", "arguments": {"x": 1}}))
    assert (res.tool_name, res.prompt_name, res.resource_uri, res.arguments) == (None, None, "file:///a", None)
    task = classify(rpc("tasks/get", {"taskId": "7f3c"}))
    assert (task.tool_name, task.prompt_name, task.resource_uri) == (None, None, None)
    assert task.target == Target(TargetKind.TASK, "7f3c")


# --- new values --------------------------------------------------------------------------


def test_a_message_is_frozen():
    m = classify(rpc("tools/call", {"name": "deploy"}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.method = "tools/list"  # type: ignore[misc]


def test_replace_keeps_direction_carrier_request_and_headers():
    asked = classify(rpc("tools/list", {}, msg_id=4)).placed(direction=Direction.C2S)
    original = dataclasses.replace(
        classify(answer(4, {"tools": [{"name": "a"}, {"name": "b"}]})),
        headers={"mcp-method": "tools/list"},
    ).placed(direction=Direction.S2C, carrier=Carrier.EVENT, request=asked)
    new = original.replace(answer(4, {"tools": [{"name": "a"}]}))
    assert new is not original
    assert (new.direction, new.carrier, new.request, new.headers) == (
        Direction.S2C, Carrier.EVENT, asked, {"mcp-method": "tools/list"})
    assert new.request is asked
    assert new.params == {"tools": [{"name": "a"}]} and new.raw == answer(4, {"tools": [{"name": "a"}]})
    assert new.listing is LISTS["tools/list"]
    # the original is untouched
    assert original.params == {"tools": [{"name": "a"}, {"name": "b"}]}


def test_replace_reclassifies_the_new_content():
    m = classify(rpc("tools/call", {"name": "deploy"}, msg_id=3)).placed(direction=Direction.C2S, carrier=Carrier.BATCH)
    new = m.replace(rpc("tools/call", {"name": "read_file"}, msg_id=3))
    assert (new.kind, new.id, new.tool_name, new.direction, new.carrier) == (
        Kind.REQUEST, 3, "read_file", Direction.C2S, Carrier.BATCH)
    err = m.replace({"jsonrpc": "2.0", "id": 3, "error": {"code": -1, "message": "no"}})
    assert (err.kind, err.id, err.target, err.carrier) == (Kind.ERROR, 3, None, Carrier.BATCH)
    bad = m.replace({"not": "json-rpc"})
    assert bad.kind == Kind.INVALID and bad.direction == Direction.C2S


def test_placed_fills_in_where_it_travels():
    asked = classify(rpc("tools/list", {}, msg_id=9))
    m = classify(answer(9, {"tools": []}))
    assert (m.direction, m.carrier, m.request) == (None, Carrier.BODY, None)
    p = m.placed(direction=Direction.S2C, carrier=Carrier.EVENT, request=asked)
    assert (p.direction, p.carrier, p.request) == (Direction.S2C, Carrier.EVENT, asked)
    assert p.placed().request is asked  # nothing given: nothing lost
    assert p.answers == "tools/list"


def test_http_request_is_the_pseudo_message_of_a_bodyless_request():
    m = http_request("get")
    assert (m.kind, m.method, m.direction, m.carrier, m.id) == (
        Kind.REQUEST, "http:GET", Direction.C2S, Carrier.HTTP, None)
    assert m.raw == {"method": "http:GET"}
    assert m.target is None and not m.names_target
    assert http_request("DELETE").label() == "http:DELETE"


# --- for people --------------------------------------------------------------------------


def test_summary_label_and_what_of_a_call():
    m = classify(rpc("tools/call", {"name": "deploy", "arguments": {"env": "prod"}}, msg_id=3))
    assert m.summary() == {"kind": "request", "id": 3, "method": "tools/call", "tool": "deploy"}
    assert m.label() == "tools/call deploy #3"
    assert m.what() == "tools/call deploy"
    assert summary_label(m.summary()) == "tools/call deploy"
    assert summary_target(m.summary()) == "deploy"


@pytest.mark.parametrize(
    "raw, summary, label, what",
    [
        (rpc("resources/read", {"uri": "file:///a"}, msg_id="r"),
         {"kind": "request", "id": "r", "method": "resources/read", "uri": "file:///a"},
         "resources/read file:///a #r", "resources/read file:///a"),
        (rpc("prompts/get", {"name": "greet"}, msg_id=2),
         {"kind": "request", "id": 2, "method": "prompts/get", "prompt": "greet"},
         "prompts/get greet #2", "prompts/get greet"),
        (rpc("tasks/cancel", {"taskId": "7f3c"}, msg_id=5),
         {"kind": "request", "id": 5, "method": "tasks/cancel", "task": "7f3c"},
         "tasks/cancel 7f3c #5", "tasks/cancel 7f3c"),
        (rpc("notifications/progress", {"progress": 1}, msg_id=None),
         {"kind": "notification", "method": "notifications/progress"},
         "notifications/progress", "notifications/progress"),
        (rpc("tools/call", {"name": 7}, msg_id=0),
         {"kind": "request", "id": 0, "method": "tools/call"},
         "tools/call #0", "tools/call"),
        (answer(3, {}), {"kind": "response", "id": 3}, "response #3", "response"),
        ({"jsonrpc": "2.0", "id": 4, "error": {"code": 1, "message": "x"}},
         {"kind": "error", "id": 4}, "error #4", "error"),
    ],
)
def test_summary_label_and_what(raw, summary, label, what):
    m = classify(raw)
    assert m.summary() == summary
    assert m.label() == label
    assert m.what() == what


def test_summary_label_of_a_summary_without_target_or_method():
    assert summary_label({"kind": "http", "method": "GET"}) == "GET"
    assert summary_label({"kind": "response", "id": 1}) == "response"
    assert summary_label({}) == "?"
    assert summary_target({"kind": "request", "uri": "file:///a"}) == "file:///a"
    assert summary_target({"kind": "request", "tool": 5}) is None


# --- listings ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(LISTS))
def test_the_answer_to_a_list_request_knows_what_it_lists(method):
    asked = classify(rpc(method, {}, msg_id=4))
    m = classify(answer(4, {LISTS[method].key: []})).placed(direction=Direction.S2C, request=asked)
    assert m.listing is LISTS[method]
    assert m.answers == method


def test_listing_of_a_tools_list_answer():
    asked = classify(rpc("tools/list", {}, msg_id=4))
    m = classify(answer(4, {"tools": [{"name": "deploy"}]})).placed(direction=Direction.S2C, request=asked)
    listing = m.listing
    assert listing is not None
    assert (listing.key, listing.field, listing.kind, listing.template) == ("tools", "name", TargetKind.TOOL, False)
    assert LISTS["resources/templates/list"].template and LISTS["resources/list"].field == "uri"


def test_no_listing_without_the_request_or_for_other_answers():
    bare = classify(answer(4, {"tools": [{"name": "deploy"}]}))
    assert bare.listing is None and bare.answers is None  # the shape alone does not make a listing
    call = classify(rpc("tools/call", {"name": "deploy"}, msg_id=4))
    assert classify(answer(4, {"tools": []})).placed(request=call).listing is None
    asked = classify(rpc("tools/list", {}, msg_id=4))
    err = classify({"jsonrpc": "2.0", "id": 4, "error": {"code": 1, "message": "x"}}).placed(request=asked)
    assert err.listing is None and err.answers == "tools/list"
    assert classify(rpc("tools/list", {}, msg_id=5)).listing is None  # the request itself lists nothing


# --- classification ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, kind",
    [
        (rpc("tools/list", {}), Kind.REQUEST),
        (rpc("notifications/initialized", None, msg_id=None), Kind.NOTIFICATION),
        (answer(1, {}), Kind.RESPONSE),
        ({"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "x"}}, Kind.ERROR),
        ({"jsonrpc": "1.0", "id": 1, "method": "x"}, Kind.INVALID),
        ({"jsonrpc": "2.0", "id": True, "method": "x"}, Kind.INVALID),
        ({"jsonrpc": "2.0", "id": 1.5, "method": "x"}, Kind.INVALID),
        ({"jsonrpc": "2.0", "id": None, "method": "x"}, Kind.INVALID),
        ({"jsonrpc": "2.0", "id": 1, "method": 5}, Kind.INVALID),
        ({"jsonrpc": "2.0", "id": 1, "method": "x", "params": "s"}, Kind.INVALID),
        ({"jsonrpc": "2.0", "id": 1, "method": "x", "result": {}}, Kind.INVALID),
        ({"jsonrpc": "2.0", "id": 1, "result": {}, "error": {}}, Kind.INVALID),
        ({"jsonrpc": "2.0", "id": 1}, Kind.INVALID),
        ([rpc("x")], Kind.INVALID),
        ("text", Kind.INVALID),
    ],
)
def test_classify(raw, kind):
    m = classify(raw)
    assert m.kind == kind
    assert m.raw is raw


# --- room for the 2026-07-28 wire: Mcp-* headers travel with the client's message ------------------


def test_routing_headers_keep_mcp_routing_names_only():
    pairs = [("Mcp-Method", "tools/call"), ("MCP-Name", "deploy"), ("Mcp-Param-Env", "prod"),
             ("Mcp-Session-Id", "s1"), ("MCP-Protocol-Version", "2026-07-28"), ("Content-Type", "x"),
             ("mcp-param-env", "staging")]
    assert routing_headers(pairs) == {"mcp-method": "tools/call", "mcp-name": "deploy",
                                      "mcp-param-env": "prod, staging"}


def test_placed_messages_carry_the_headers_and_replace_keeps_them():
    body = parse_body(b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add"}}')
    (m,) = placed(body, Direction.C2S, headers={"mcp-name": "add"})
    assert m.headers == {"mcp-name": "add"}
    assert m.replace({**m.raw, "params": {"name": "sub"}}).headers == {"mcp-name": "add"}


# --- messages carried inside another: 2026-07-28 multi-round-trip requests --------------------------


def test_input_requests_inside_a_result_are_server_requests():
    call = classify({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "deploy"}})
    answer = classify({"jsonrpc": "2.0", "id": 3, "result": {
        "resultType": "input_required", "requestState": "s",
        "inputRequests": {"who": {"method": "elicitation/create", "params": {"message": "?"}},
                          "bad": {"params": {}}}}})
    answer = answer.placed(direction=Direction.S2C, request=call, ref="response/0")
    who, bad = embedded(answer)
    assert (who.kind, who.method, who.id, who.direction, who.carrier) == (
        Kind.REQUEST, "elicitation/create", "who", Direction.S2C, Carrier.INPUT_REQUIRED)
    assert who.ref == "response/0/inputRequests/who" and who.request is call
    assert bad.kind == Kind.INVALID
    masked = who.replace({**who.raw, "params": {"message": "[MASKED]"}})
    assert masked.kind == Kind.REQUEST and masked.carrier is Carrier.INPUT_REQUIRED
    rebuilt = with_embedded(answer, [masked, bad])
    assert rebuilt.params["inputRequests"]["who"]["params"] == {"message": "[MASKED]"}
    assert rebuilt.params["requestState"] == "s" and rebuilt.id == 3


def test_input_responses_in_a_retry_are_client_answers():
    retry = classify({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {
        "name": "deploy", "inputResponses": {"who": {"action": "accept"}}}}).placed(direction=Direction.C2S)
    (who,) = embedded(retry)
    assert (who.kind, who.id, who.params, who.direction) == (Kind.RESPONSE, "who", {"action": "accept"},
                                                             Direction.C2S)


def test_nothing_is_carried_by_ordinary_messages():
    assert embedded(classify({"jsonrpc": "2.0", "id": 1, "result": {"content": []}})) == []
    assert embedded(classify({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}})) == []
    (odd,) = embedded(classify({"jsonrpc": "2.0", "id": 1, "result": {"resultType": "input_required",
                                                                       "inputRequests": ["not", "a", "map"]}}))
    assert odd.kind == Kind.INVALID  # refused by the stages, never passed over
