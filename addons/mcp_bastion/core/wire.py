"""
The 2026-07-28 wire beside the 2025 era: which revision a request speaks, and
whether its routing headers say what its body says.

A 2026-07-28 request carries its protocol version twice (the `MCP-Protocol-Version`
header and `_meta["io.modelcontextprotocol/protocolVersion"]`) and what it asks in
headers as well as in the body: `Mcp-Method` (the method), `Mcp-Name` (the tool,
prompt, resource or task) and `Mcp-Param-{Name}` (tool arguments whose input schema
property is annotated `"x-mcp-header": "{Name}"`). An upstream may dispatch on either,
so the gateway, which checks the body, refuses any disagreement before a rule is
evaluated: HTTP 400 with JSON-RPC `-32020` (`HeaderMismatch`), as the spec asks.

`Mcp-Param-*` headers are checked against the schema the upstream announced in its
`tools/list` (learned by `ParamHeaders` as lists pass through). A header the gateway
cannot check (no schema seen for the tool, or a header the tool does not declare)
is refused the same way: the client then lists the tools again and retries, as the
spec tells it to.

Pure: no mitmproxy import.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .message import Message, TargetKind
from .state import MemoryTable, Table

MODERN = "2026-07-28"  # the first revision of the stateless wire
VERSION_META = "io.modelcontextprotocol/protocolVersion"
VERSION_HEADER = "mcp-protocol-version"
METHOD_HEADER = "mcp-method"
NAME_HEADER = "mcp-name"
PARAM_PREFIX = "mcp-param-"
SCHEMA_KEY = "x-mcp-header"

# Which param Mcp-Name copies, by method (the tasks extension adds taskId).
NAME_PARAMS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri",
               "tasks/get": "taskId", "tasks/update": "taskId", "tasks/cancel": "taskId"}

# Methods the 2026-07-28 revision removed: a request of that era naming one is answered as a
# server of that era answers it (404, -32601), whatever a rule says of the 2025 method.
REMOVED_2026 = frozenset({"initialize", "ping", "logging/setLevel", "resources/subscribe",
                          "resources/unsubscribe", "tasks/result", "tasks/list"})

_BASE64 = re.compile(r"=\?base64\?(.*)\?=", re.S)
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class Mismatch(ValueError):
    """A request whose headers and body disagree (or cannot be compared)."""


def decode(value: str) -> str:
    """A header value as the client meant it: `=?base64?...?=` decoded (strictly), else as is."""
    match = _BASE64.fullmatch(value)
    if match is None:
        return value
    try:
        raw = base64.b64decode(match.group(1), validate=True)
        if base64.b64encode(raw).decode("ascii") != match.group(1):
            raise ValueError("not canonical")
        return raw.decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise Mismatch("a header's base64 value is not valid base64 of UTF-8 text") from None


def request_version(m: Message) -> str | None:
    """The protocol version a request's `_meta` names, if it names one."""
    params = m.params if isinstance(m.params, dict) else None
    meta = params.get("_meta") if params is not None else None
    value = meta.get(VERSION_META) if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def era(header_version: str | None, meta_version: str | None) -> str:
    """`2026` when either signal names 2026-07-28 or later (or `_meta` carries a version at all), else `2025`.

    Raises Mismatch when the header and `_meta` both name a version and disagree.
    """
    if header_version is not None and meta_version is not None and header_version.strip() != meta_version:
        raise Mismatch(f"MCP-Protocol-Version header {header_version!r} does not match the request's "
                       f"_meta protocolVersion {meta_version!r}")
    if meta_version is not None:
        return "2026"
    if header_version is not None and _DATE.fullmatch(header_version.strip()) and header_version.strip() >= MODERN:
        return "2026"
    return "2025"


def _as_header(value: Any) -> str | None:
    """An argument as a header carries it (strings as is, integers in decimal, booleans lower case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    return None


def _same(header: str, value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(header) == value  # integers compare numerically: "42.0" is 42
        except ValueError:
            return False
    return header == _as_header(value)


MAX_TOOLS = 10_000  # tools whose declared headers are remembered


class ParamHeaders:
    """Which `Mcp-Param-*` headers each tool of an upstream declares, learned from `tools/list` results.

    Kept in a `core.state.Table`: this process's (the default), or one replicas share, since a client may
    list the tools through one replica and call through another. A lookup asks the table (only calls that
    carry `Mcp-Param-*` headers look). A list writes what differs from what this process last wrote, and
    rewrites the rest once half their idle time has passed, so a declaration in use never lapses."""

    def __init__(self, max_tools: int = MAX_TOOLS, table: Table | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.max_tools = max_tools
        self.table = table if table is not None else MemoryTable("param_headers", 24 * 3600.0, max_tools, clock)
        self._clock = clock
        self._written: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()  # key -> (value, when)

    def learn(self, upstream: str | None, result: Any) -> int:
        """Read the tools of a `tools/list` result; returns how many were learned."""
        tools = result.get("tools") if isinstance(result, dict) else None
        if not isinstance(tools, list):
            return 0
        n, now = 0, self._clock()
        for tool in tools:
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                continue
            key = (upstream or "", tool["name"])
            value = json.dumps(declared(tool.get("inputSchema")), sort_keys=True)
            n += 1
            written = self._written.get(key)
            if written is None or written[0] != value or now - written[1] > self.table.idle_ttl / 2:
                self.table.put(_table_key(key), value)
                self._written[key] = (value, now)
                self._written.move_to_end(key)
                while len(self._written) > self.max_tools:
                    self._written.popitem(last=False)
        return n

    def of(self, upstream: str | None, tool: str) -> dict[str, list[str]] | None:
        """Header name (lower case, without `mcp-param-`) -> property path, or None if the tool is unknown."""
        value = self.table.get(_table_key((upstream or "", tool)))
        if value is None:
            return None
        try:
            known = json.loads(value)
        except ValueError:
            return None  # unreadable: unknown, so its headers are refused
        return {str(k): [str(p) for p in v] for k, v in known.items()} if isinstance(known, dict) else None


def _table_key(key: tuple[str, str]) -> str:
    return json.dumps(list(key))


def declared(schema: Any, path: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """The `x-mcp-header` annotations of an input schema, reachable through `properties` only."""
    out: dict[str, list[str]] = {}
    props = schema.get("properties") if isinstance(schema, dict) else None
    if not isinstance(props, dict):
        return out
    for name, prop in props.items():
        if not isinstance(prop, dict):
            continue
        header = prop.get(SCHEMA_KEY)
        if isinstance(header, str) and header:
            out[header.lower()] = [*path, name]
        out.update(declared(prop, (*path, name)))
    return out


def _lookup(arguments: Any, path: list[str]) -> Any:
    value = arguments
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def encode(value: str) -> str:
    """A value as a header carries it: as is, or `=?base64?...?=` when it is not plain printable ASCII
    without surrounding space (or would itself read as the base64 form)."""
    plain = value.isascii() and value.isprintable() and value == value.strip() and not _BASE64.fullmatch(value)
    return value if plain else "=?base64?" + base64.b64encode(value.encode("utf-8")).decode("ascii") + "?="


def rewritten_params(before: Message, after: Message, params: ParamHeaders | None,
                     upstream: str | None) -> dict[str, str | None]:
    """The `Mcp-Param-*` headers to set (or, None, remove) when a stage replaced `before` by `after`:
    each header the request carried follows its argument's new value."""
    target = before.target
    known = params.of(upstream, target.name) if params is not None and target is not None else None
    changes: dict[str, str | None] = {}
    for name in before.headers:
        if not name.startswith(PARAM_PREFIX):
            continue
        path = known.get(name[len(PARAM_PREFIX):]) if known is not None else None
        value = _as_header(_lookup(after.arguments, path)) if path is not None else None
        old = _as_header(_lookup(before.arguments, path)) if path is not None else None
        if value != old:
            changes[name] = encode(value) if value is not None else None
    return changes


def check_headers(m: Message, headers: dict[str, str], params: ParamHeaders | None = None,
                  upstream: str | None = None) -> None:
    """Raise Mismatch if a client request's routing headers do not say what its body says.

    `headers` are the request's `Mcp-*` headers (lower-case names, see `routing_headers`).
    An absent header is not a mismatch (the upstream itself refuses a request missing one it
    requires); a present one must agree.
    """
    method = headers.get(METHOD_HEADER)
    if method is not None and method != m.method:
        raise Mismatch(f"Mcp-Method header {method!r} does not match the request's method {m.method!r}")
    name = headers.get(NAME_HEADER)
    if name is not None:
        field = NAME_PARAMS.get(m.method or "")
        body = m.params.get(field) if field and isinstance(m.params, dict) else None
        if not isinstance(body, str) or decode(name) != body:
            raise Mismatch(f"Mcp-Name header does not match the request's {field or 'target'}")
    sent = {k[len(PARAM_PREFIX):]: v for k, v in headers.items() if k.startswith(PARAM_PREFIX)}
    if not sent:
        return
    target = m.target
    if m.method != "tools/call" or target is None or target.kind is not TargetKind.TOOL:
        raise Mismatch("Mcp-Param headers are only for tools/call")
    known = params.of(upstream, target.name) if params is not None else None
    if known is None:
        raise Mismatch(f"Mcp-Param headers for tool {target.name!r}, whose schema the gateway has not seen: "
                       "list the tools again")
    for header, value in sent.items():
        path = known.get(header)
        if path is None:
            raise Mismatch(f"Mcp-Param-{header} is not a header tool {target.name!r} declares")
        argument = _lookup(m.arguments, path)
        if argument is None or not _same(decode(value), argument):
            raise Mismatch(f"Mcp-Param-{header} header does not match the request's argument {'.'.join(path)!r}")


def private(result: object) -> object:
    """A 2026-07-28 result as the client may cache it: for this caller only.

    What passed the policy depends on who asked (a list filtered for this caller,
    a result another caller would be refused), so a shared cache must not serve it
    to anyone else: `cacheScope: "public"` (or any value but "private") becomes
    "private". A result without the field (the 2025 era) is left as it is.
    """
    if isinstance(result, dict) and "cacheScope" in result and result["cacheScope"] != "private":
        return {**result, "cacheScope": "private"}
    return result
