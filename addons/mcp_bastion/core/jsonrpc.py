"""
A strict JSON-RPC 2.0 body parser (the message model is `core.message`).

Pure: no mitmproxy import. Everything the gateway decides is decided on the
values produced here, so the parser refuses what it cannot read unambiguously
(duplicate keys, invalid UTF-8, NaN/Infinity, excessive nesting, oversized
bodies) instead of guessing the way one of the two peers might.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .message import Carrier, Message, classify
from .vocab import Direction, Kind

DEFAULT_MAX_BODY = 4 * 1024 * 1024
DEFAULT_MAX_DEPTH = 64


class ParseError(ValueError):
    """A body that cannot be read unambiguously. `reason` is a short stable slug."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Body:
    """A parsed HTTP body: one message or a batch of them."""

    messages: list[Message]
    batch: bool = False
    data: Any = field(default=None, repr=False)

    @property
    def requests(self) -> list[Message]:
        return [m for m in self.messages if m.kind == "request"]

    @property
    def request_ids(self) -> list[str | int]:
        return [m.id for m in self.messages if m.kind == "request" and m.id is not None]


def _reject_constant(name: str) -> Any:
    raise ParseError("invalid_json", f"non-standard number {name}")


def _finite(text: str) -> float:
    """A JSON number with a fraction or exponent; one too large for a float (`1e400`) is refused:
    it would be read as infinity here and as something else by a peer, and cannot be written back."""
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ParseError("invalid_json", f"number {text[:40]} is out of range")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ParseError("duplicate_key", f"duplicate JSON object key {key!r}")
        out[key] = value
    return out


def depth_of(value: Any) -> int:
    """Nesting depth of a decoded JSON value (scalars are 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((c, depth) for c in children)
    return deepest


def loads_strict(
    data: bytes | str,
    *,
    max_bytes: int = DEFAULT_MAX_BODY,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Any:
    """Decode one JSON document, refusing anything two parsers might read differently."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) > max_bytes:
            raise ParseError("too_large", f"body of {len(data)} bytes exceeds {max_bytes}")
        try:
            text = bytes(data).decode("utf-8", errors="strict")
        except UnicodeDecodeError as e:
            raise ParseError("invalid_utf8", f"invalid UTF-8 at byte {e.start}") from None
    else:
        text = data
        if len(text) > max_bytes:
            raise ParseError("too_large", f"body of {len(text)} characters exceeds {max_bytes}")
    if text.startswith("\ufeff"):
        raise ParseError("invalid_json", "byte order mark before JSON")
    # Reject unpaired surrogate escapes (\ud800): they decode to strings that cannot be re-encoded.
    try:
        value = json.loads(
            text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant, parse_float=_finite
        )
    except ParseError:
        raise
    except RecursionError:
        raise ParseError("too_deep", "nesting too deep to decode") from None
    except json.JSONDecodeError as e:
        raise ParseError("invalid_json", f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits (Python's int conversion limit)
        raise ParseError("invalid_json", f"unreadable number: {str(e)[:120]}") from None
    # Both checks walk the whole value; the text says when neither can find anything: nesting needs
    # as many brackets, and an unpaired surrogate can only come from a \uD800-\uDFFF escape.
    if text.count("{") + text.count("[") > max_depth and depth_of(value) > max_depth:
        raise ParseError("too_deep", f"nesting deeper than {max_depth}")
    if _SURROGATE_ESCAPE.search(text):
        _check_surrogates(value)
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _check_surrogates(value: Any) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ParseError("invalid_utf8", "unpaired surrogate escape in string") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_body(
    data: bytes | str,
    *,
    max_bytes: int = DEFAULT_MAX_BODY,
    max_depth: int = DEFAULT_MAX_DEPTH,
    allow_batch: bool = True,
) -> Body:
    """Parse an HTTP body (or one SSE event's data) into JSON-RPC messages.

    Raises ParseError for undecodable input, empty batches, and batches when
    `allow_batch` is false. Individually malformed batch members come back as
    `invalid` messages so that the caller can refuse the whole body.
    """
    value = loads_strict(data, max_bytes=max_bytes, max_depth=max_depth)
    if isinstance(value, list):
        if not allow_batch:
            raise ParseError("batch_refused", "JSON-RPC batches are not accepted here")
        if not value:
            raise ParseError("invalid_request", "empty batch")
        return Body(messages=[classify(v) for v in value], batch=True, data=value)
    return Body(messages=[classify(value)], batch=False, data=value)


def repeated_ids(body: Body) -> list[str | int]:
    """Request ids that more than one request of a body carries.

    Answers are matched to requests by id: with a repeat, which answer belongs to
    which request (and so which answer is a list to filter) is ambiguous. `1` and
    `"1"` count as the same here, since some clients and servers compare them so.
    """
    seen: set[str] = set()
    repeats: list[str | int] = []
    for m in body.messages:
        if m.kind == Kind.REQUEST and m.id is not None:
            key = str(m.id)
            if key in seen and m.id not in repeats:
                repeats.append(m.id)
            seen.add(key)
    return repeats


def placed(body: Body, direction: Direction, carrier: Carrier | None = None,
           asked: dict[Any, Message] | None = None, summaries: str | None = None, base: int = 0,
           headers: dict[str, str] | None = None) -> list[Message]:
    """The body's messages with their direction and carrier filled in; a response or error
    is linked to the request of `asked` (request id -> request) that it answers, and a
    client's message carries the `Mcp-*` request `headers` that travelled with it.

    `summaries` names the list of the flow's summaries they belong to ("request",
    "response", "events"), from position `base`: each message's `ref` says where,
    so its decisions link to it exactly (also past the summaries a flow keeps).
    """
    where = carrier or (Carrier.BATCH if body.batch else Carrier.BODY)
    out = []
    for i, m in enumerate(body.messages):
        request = asked.get(m.id) if asked and m.kind in (Kind.RESPONSE, Kind.ERROR) and m.id is not None else None
        at = base + i
        ref = f"{summaries}/{at}" if summaries else None
        out.append(m.placed(direction=direction, carrier=where, request=request, ref=ref, headers=headers))
    return out


def dumps(value: Any) -> bytes:
    """Compact, UTF-8 JSON (what the gateway writes when it answers or rewrites)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
