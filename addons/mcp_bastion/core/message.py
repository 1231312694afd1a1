"""
The one message model: every JSON-RPC message the gateway sees, in either
direction, in a JSON body, a batch, or an SSE event, is a `Message`.

A `Message` is a value: stages never change one, they return a new one
(`Message.replace`). It carries what every stage, rule, label and audit
record needs, computed once:

- `kind`, `id`, `method`, `params`, `direction`, and `raw` (the decoded JSON);
- `target`: the one vocabulary for "what does this message act on" - a tool,
  prompt, resource or task, with its name (see `TARGETS`);
- `request`: for a response or error, the request of the same flow it answers
  (so a `tools/list` result knows it lists tools);
- `carrier`: where it travelled (a JSON body, a batch member, an SSE event, a
  body-less HTTP request).

Room for the 2026-07-28 wire: `carrier` also names `input_required` (a request
the server makes inside a result) and `task` (a task result that belongs to an
earlier call); `headers` holds the `Mcp-Method`/`Mcp-Name`/`Mcp-Param-*` request
headers that must agree with the body.

Pure: no mitmproxy import.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from .vocab import Direction, Kind


class TargetKind(StrEnum):
    TOOL = "tool"
    PROMPT = "prompt"
    RESOURCE = "resource"
    TASK = "task"


class Carrier(StrEnum):
    BODY = "body"  # the single message of a JSON body
    BATCH = "batch"  # one member of a JSON-RPC batch
    EVENT = "event"  # an SSE event
    HTTP = "http"  # a body-less HTTP request (GET opens a stream, DELETE ends a session)
    INPUT_REQUIRED = "input_required"  # 2026-07-28: a server request inside an `input_required` result
    SUBSCRIPTION = "subscription"  # 2026-07-28: what a `subscriptions/listen` request subscribes to
    TASK = "task"  # a task's result, fetched by a later call


# Which request methods act on which target, and the param that names it. The one table
# rules, list filtering, labels and audit records read.
TARGETS: dict[str, tuple[TargetKind, str]] = {
    "tools/call": (TargetKind.TOOL, "name"),
    "prompts/get": (TargetKind.PROMPT, "name"),
    "resources/read": (TargetKind.RESOURCE, "uri"),
    "resources/subscribe": (TargetKind.RESOURCE, "uri"),
    "resources/unsubscribe": (TargetKind.RESOURCE, "uri"),
    "tasks/get": (TargetKind.TASK, "taskId"),
    "tasks/result": (TargetKind.TASK, "taskId"),
    "tasks/cancel": (TargetKind.TASK, "taskId"),
    "tasks/update": (TargetKind.TASK, "taskId"),
    "notifications/resources/updated": (TargetKind.RESOURCE, "uri"),
}
# Methods whose params carry `arguments` for their target.
WITH_ARGUMENTS = frozenset({"tools/call", "prompts/get"})


@dataclass(frozen=True, slots=True)
class Listing:
    """A list method: the result key holding the items, the field naming each, and what they are."""

    key: str
    field: str
    kind: TargetKind
    template: bool = False


LISTS: dict[str, Listing] = {
    "tools/list": Listing("tools", "name", TargetKind.TOOL),
    "prompts/list": Listing("prompts", "name", TargetKind.PROMPT),
    "resources/list": Listing("resources", "uri", TargetKind.RESOURCE),
    "resources/templates/list": Listing("resourceTemplates", "uriTemplate", TargetKind.RESOURCE, template=True),
}


@dataclass(frozen=True, slots=True)
class Target:
    """What a message acts on: `tool deploy`, `resource file:///etc/passwd`, `task 7f3c`."""

    kind: TargetKind
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


def target_of(method: str | None, params: Any) -> Target | None:
    """The target a request names, if its method has one and the param is a string."""
    spec = TARGETS.get(method) if method is not None else None
    if spec is None or not isinstance(params, dict):
        return None
    name = params.get(spec[1])
    return Target(spec[0], name) if isinstance(name, str) else None


@dataclass(frozen=True, slots=True, eq=False)
class Message:
    """One JSON-RPC message, as it travels (request, notification, response, error or invalid)."""

    kind: Kind | str
    raw: Any
    id: str | int | None = None
    method: str | None = None
    params: Any = None
    direction: Direction | None = None
    carrier: Carrier = Carrier.BODY
    request: Message | None = field(default=None, repr=False)  # what a response answers
    headers: dict[str, str] = field(default_factory=dict, repr=False)  # Mcp-* request headers (2026-07-28)
    ref: str | None = None  # where its summary is kept on the flow ("request/0", "events/3"): links decisions to it
    masks: tuple[str, ...] = ()  # masking profiles a rule chose for this message (the masking stage applies them)
    approval: Any = field(default=None, repr=False)  # the approve rule's decision that holds it (the approval stage)

    # --- what it is about ---

    @property
    def target(self) -> Target | None:
        if self.kind in (Kind.REQUEST, Kind.NOTIFICATION):
            return target_of(self.method, self.params)
        return None

    @property
    def names_target(self) -> bool:
        """True for a request whose method acts on a target (whether or not it names one readably)."""
        return self.method in TARGETS

    @property
    def tool_name(self) -> str | None:
        t = self.target
        return t.name if t is not None and t.kind is TargetKind.TOOL else None

    @property
    def prompt_name(self) -> str | None:
        t = self.target
        return t.name if t is not None and t.kind is TargetKind.PROMPT else None

    @property
    def resource_uri(self) -> str | None:
        t = self.target
        return t.name if t is not None and t.kind is TargetKind.RESOURCE else None

    @property
    def arguments(self) -> Any:
        if self.method in WITH_ARGUMENTS and isinstance(self.params, dict):
            return self.params.get("arguments")
        return None

    @property
    def answers(self) -> str | None:
        """For a response or error: the method of the request it answers, when known."""
        return self.request.method if self.request is not None else None

    @property
    def listing(self) -> Listing | None:
        """For the result of a list request: what it lists."""
        return LISTS.get(self.answers) if self.kind == Kind.RESPONSE and self.answers else None

    @property
    def carried(self) -> bool:
        """Whether it travels inside another message (see `embedded`)."""
        return self.carrier in (Carrier.INPUT_REQUIRED, Carrier.SUBSCRIPTION)

    @property
    def has_id(self) -> bool:
        return self.kind in (Kind.REQUEST, Kind.RESPONSE, Kind.ERROR)

    # --- new values ---

    def replace(self, raw: Any) -> Message:
        """A new message with `raw` as its content, keeping where it travels and what it answers."""
        fresh = _bare(raw, self.kind, self.id) if self.carried else classify(raw)
        return replace(fresh, direction=self.direction, carrier=self.carrier, request=self.request,
                       headers=self.headers, ref=self.ref, masks=self.masks, approval=self.approval)

    def with_approval(self, decision: Any) -> Message:
        """The same message, held by an approve rule's decision (content unchanged)."""
        return replace(self, approval=decision)

    def with_masks(self, *profiles: str) -> Message:
        """The same message, with masking profiles to apply (content unchanged)."""
        return replace(self, masks=tuple(dict.fromkeys((*self.masks, *profiles))))

    def placed(self, *, direction: Direction | None = None, carrier: Carrier | None = None,
               request: Message | None = None, ref: str | None = None,
               headers: dict[str, str] | None = None) -> Message:
        """The same content, with where it travels filled in."""
        return replace(self, direction=direction or self.direction, carrier=carrier or self.carrier,
                       request=request if request is not None else self.request, ref=ref or self.ref,
                       headers=dict(headers) if headers else self.headers)

    # --- for people ---

    def summary(self) -> dict[str, Any]:
        """A small, serialisable description (flow.metadata, audit records, labels)."""
        out: dict[str, Any] = {"kind": str(self.kind)}
        if self.id is not None:
            out["id"] = self.id
        if self.method is not None:
            out["method"] = self.method
        t = self.target
        if t is not None:
            out[SUMMARY_KEYS[t.kind]] = t.name
        return out

    def what(self) -> str:
        """`tools/call deploy`: the method (or kind) and its target."""
        t = self.target
        return f"{self.method or self.kind} {t.name}" if t is not None else str(self.method or self.kind)

    def label(self) -> str:
        """One line: `tools/call deploy #3`."""
        parts = [self.method or str(self.kind)]
        t = self.target
        if t is not None:
            parts.append(t.name)
        if self.id is not None:
            parts.append(f"#{self.id}")
        return " ".join(parts)


# The key a target is kept under in a summary (and an audit record).
SUMMARY_KEYS = {TargetKind.TOOL: "tool", TargetKind.PROMPT: "prompt", TargetKind.RESOURCE: "uri",
                TargetKind.TASK: "task"}


def summary_target(summary: dict[str, Any]) -> str | None:
    """The target name in a summary made by `Message.summary`."""
    for key in SUMMARY_KEYS.values():
        if isinstance(summary.get(key), str):
            return summary[key]
    return None


def summary_label(summary: dict[str, Any]) -> str:
    """`tools/call deploy` from a summary (flow comments, timelines)."""
    out = summary.get("method") or summary.get("kind", "?")
    target = summary_target(summary)
    return f"{out} {target}" if target else str(out)


# Request headers that carry what a 2026-07-28 client also says in the body (`Mcp-Method`,
# `Mcp-Name`, `Mcp-Param-*`): kept on each client message, so a stage can hold the two together.
ROUTING_HEADER_PREFIX = "mcp-"
NOT_ROUTING = frozenset({"mcp-session-id", "mcp-protocol-version"})


def routing_headers(pairs: Any) -> dict[str, str]:
    """The `Mcp-*` routing headers among (name, value) pairs, names lower-cased; repeats joined by ", "."""
    out: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        if key.startswith(ROUTING_HEADER_PREFIX) and key not in NOT_ROUTING:
            out[key] = f"{out[key]}, {value}" if key in out else value
    return out


# --- messages carried inside another (2026-07-28 multi-round-trip requests) ------------------------

INPUT_REQUIRED = "input_required"


def _bare(value: Any, kind: Kind | str, key: str | int | None) -> Message:
    """A message as the 2026 wire embeds it: `{method, params}` for a request, the bare result for an
    answer (no `jsonrpc`, no `id`: the key in its map stands for the id)."""
    if kind == Kind.REQUEST:
        method = value.get("method") if isinstance(value, dict) else None
        params = value.get("params") if isinstance(value, dict) else None
        if not isinstance(method, str) or (params is not None and not isinstance(params, dict)):
            return Message(kind=Kind.INVALID, raw=value, id=key)
        return Message(kind=Kind.REQUEST, raw=value, id=key, method=method, params=params)
    return Message(kind=Kind.RESPONSE, raw=value, id=key, params=value)


def embedded(m: Message) -> list[Message]:
    """The messages a message carries inside it, each a `Message` of its own for the stages.

    - A server's `input_required` result: each of its `inputRequests` is a request the server
      makes of the client (`elicitation/create`, `sampling/createMessage`, `roots/list`), server
      to client, exactly as the same request on a 2025 event stream.
    - A client's retry: each of its `inputResponses` is the client's answer to one of them.

    Their `id` is their key in the map; `carrier` says they travel inside another message.
    """
    if m.kind in (Kind.REQUEST, Kind.NOTIFICATION) and m.method == "subscriptions/listen" \
            and isinstance(m.params, dict):
        return _subscriptions(m)
    if m.kind == Kind.RESPONSE and isinstance(m.params, dict) and m.params.get("resultType") == INPUT_REQUIRED:
        member, kind = "inputRequests", Kind.REQUEST
    elif m.kind == Kind.REQUEST and isinstance(m.params, dict) and "inputResponses" in m.params:
        member, kind = "inputResponses", Kind.RESPONSE
    else:
        return []
    inner = m.params.get(member)
    if not isinstance(inner, dict):
        return [Message(kind=Kind.INVALID, raw=inner, direction=m.direction, carrier=Carrier.INPUT_REQUIRED,
                        request=m.request, ref=f"{m.ref}/{member}" if m.ref else None)]
    return [replace(_bare(value, kind, key), direction=m.direction, carrier=Carrier.INPUT_REQUIRED,
                    request=m.request if kind == Kind.REQUEST else None,
                    ref=f"{m.ref}/{member}/{key}" if m.ref else None)
            for key, value in inner.items()]


# What a listen request subscribes to, as the request of the 2025 era that asks the same.
_SUBSCRIBES = {"resourceSubscriptions": ("resources/subscribe", "uri"), "taskIds": ("tasks/get", "taskId")}


def _subscriptions(m: Message) -> list[Message]:
    """A `subscriptions/listen` request's resource URIs and task ids, each as the request that asks the
    same in the 2025 era (`resources/subscribe {uri}`, `tasks/get {taskId}`), so the same rules hold."""
    wanted = m.params.get("notifications")
    if wanted is None:
        return []
    out: list[Message] = []
    if not isinstance(wanted, dict):
        return [Message(kind=Kind.INVALID, raw=wanted, direction=m.direction, carrier=Carrier.SUBSCRIPTION)]
    for member, (method, param) in _SUBSCRIBES.items():
        values = wanted.get(member)
        if values is None:
            continue
        for i, value in enumerate(values if isinstance(values, list) else [values]):
            raw = {"method": method, "params": {param: value}}
            bare = _bare(raw, Kind.REQUEST, f"{member}/{i}") if isinstance(value, str) else \
                Message(kind=Kind.INVALID, raw=value, id=f"{member}/{i}")
            out.append(replace(bare, direction=m.direction, carrier=Carrier.SUBSCRIPTION,
                               ref=f"{m.ref}/{member}/{i}" if m.ref else None))
    return out


def with_embedded(m: Message, inner: list[Message]) -> Message:
    """`m` carrying `inner` (as `embedded` gave them, some replaced by a stage) in place of its own."""
    if m.method == "subscriptions/listen":
        return m  # a replacement cannot change what it subscribes to (its target): nothing to carry back
    member = "inputRequests" if m.kind == Kind.RESPONSE else "inputResponses"
    values = {e.id: e.raw for e in inner}
    return m.replace({**m.raw, ("result" if m.kind == Kind.RESPONSE else "params"): {**m.params, member: values}})


def http_request(verb: str) -> Message:
    """The pseudo-message for a body-less HTTP request on the MCP endpoint.

    GET (open the server's event stream), DELETE (end the session) and the like
    carry no JSON-RPC message; rules see them as method `http:GET`, `http:DELETE`.
    """
    method = f"http:{verb.upper()}"
    return Message(kind=Kind.REQUEST, raw={"method": method}, method=method, direction=Direction.C2S,
                   carrier=Carrier.HTTP, ref="request/0")


def classify(obj: Any) -> Message:
    """Turn one decoded JSON value into a Message; shapes that are not JSON-RPC are `invalid`."""
    if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
        return Message(kind=Kind.INVALID, raw=obj)
    msg_id = obj.get("id")
    if msg_id is not None and (isinstance(msg_id, bool) or not isinstance(msg_id, (str, int))):
        return Message(kind=Kind.INVALID, raw=obj)
    method = obj.get("method")
    if "method" in obj:
        if not isinstance(method, str) or "result" in obj or "error" in obj:
            return Message(kind=Kind.INVALID, raw=obj, id=msg_id)
        params = obj.get("params")
        if params is not None and not isinstance(params, (dict, list)):
            return Message(kind=Kind.INVALID, raw=obj, id=msg_id, method=method)
        if "id" in obj and msg_id is not None:
            return Message(kind=Kind.REQUEST, raw=obj, id=msg_id, method=method, params=params)
        if "id" in obj:  # "id": null on a request is not allowed by MCP
            return Message(kind=Kind.INVALID, raw=obj, method=method, params=params)
        return Message(kind=Kind.NOTIFICATION, raw=obj, method=method, params=params)
    if ("result" in obj) == ("error" in obj):
        return Message(kind=Kind.INVALID, raw=obj, id=msg_id)
    if "error" in obj:
        return Message(kind=Kind.ERROR, raw=obj, id=msg_id, params=obj["error"])
    return Message(kind=Kind.RESPONSE, raw=obj, id=msg_id, params=obj["result"])


def to_record(m: Message) -> dict[str, Any]:
    """What a shared store keeps of a message to rebuild it on another replica (`from_record`): its content,
    kind and id, where it travelled, and its `Mcp-*` headers. Not what it answers, its masks or its approval."""
    out: dict[str, Any] = {"raw": m.raw, "kind": str(m.kind), "carrier": str(m.carrier)}
    if m.id is not None:
        out["id"] = m.id
    if m.direction is not None:
        out["direction"] = str(m.direction)
    if m.headers:
        out["headers"] = dict(m.headers)
    return out


def from_record(record: dict[str, Any]) -> Message:
    """The message `to_record` kept, classified again from its content (a stored kind is not trusted)."""
    carrier = Carrier(record.get("carrier", Carrier.BODY))
    if carrier in (Carrier.INPUT_REQUIRED, Carrier.SUBSCRIPTION):
        fresh = _bare(record.get("raw"), record.get("kind", Kind.REQUEST), record.get("id"))
    else:
        fresh = classify(record.get("raw"))
    direction = record.get("direction")
    headers = record.get("headers") or {}
    return replace(fresh, carrier=carrier, direction=Direction(direction) if direction else None,
                   headers={str(k): str(v) for k, v in headers.items()})
