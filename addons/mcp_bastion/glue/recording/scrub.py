"""Credentials replaced with a marker in a flow's serialised state (the live flow is left as it is)."""

from __future__ import annotations

from typing import Any

from mitmproxy import http

ALWAYS_SECRET = ("authorization", "proxy-authorization", "cookie", "set-cookie",
                 "x-bastion-hold")  # the gateway's own single-use ticket for a held call
SECRET_PARAMS = ("access_token",)
REDACTED = "[redacted by mcp-bastion]"
_REDACTED_BYTES = REDACTED.encode()
_SECRET_PARAMS_BYTES = tuple(p.encode() for p in SECRET_PARAMS)


def scrub(state: dict[str, Any], secret_headers: Any = None) -> list[str]:
    """Replace credentials in a flow's state (from `get_state()`) with a marker; return what was redacted.

    Headers and trailers: Authorization, Proxy-Authorization, Cookie,
    Set-Cookie and every name in `secret_headers` (the flow's
    `Meta.SECRET_HEADERS`: the upstream credential the Auth addon
    injected), compared case-insensitively like mitmproxy's `Headers`;
    every value of such a field is replaced. Query: `access_token`.

    Only the state's own `request`/`response` dicts are changed (their header
    tuples and path are replaced, not mutated), so the live flow is untouched.
    """
    names = set(ALWAYS_SECRET)
    if isinstance(secret_headers, str):
        secret_headers = [secret_headers]
    names.update(n.lower() for n in secret_headers or () if isinstance(n, str))
    redacted = []
    for where in ("request", "response"):
        msg = state.get(where)
        if msg is None:
            continue
        for part, label in (("headers", "header"), ("trailers", "trailer")):
            fields = msg.get(part)
            if not fields:
                continue
            hits: list[str] = []
            out = []
            for key, value in fields:
                name = key.decode("utf-8", "surrogateescape").lower()
                if name in names:
                    value = _REDACTED_BYTES
                    if name not in hits:
                        hits.append(name)
                out.append((key, value))
            if hits:
                msg[part] = tuple(out)
                redacted += [f"{where} {label} {name}" for name in hits]
    redacted += _scrub_query(state["request"])
    backup = state.get("backup")
    if isinstance(backup, dict):
        # A flow edited in mitmweb or replayed keeps its earlier state, credentials included. It is
        # the live flow's own dict: scrub copies of it.
        backup = state["backup"] = dict(backup)
        for where in ("request", "response"):
            if isinstance(backup.get(where), dict):
                backup[where] = dict(backup[where])
        redacted += [f"backup {r}" for r in scrub(backup, secret_headers)]
    return redacted


def _scrub_query(request: dict[str, Any]) -> list[str]:
    """Redact SECRET_PARAMS in a request state's path, exactly as `Request.query` sees them."""
    path = request["path"]
    if b"?" not in path or (b"%" not in path and not any(p in path for p in _SECRET_PARAMS_BYTES)):
        return []  # no query, or none that could decode to a secret parameter's name
    req = http.Request.from_state(dict(request))
    query = req.query
    found = [p for p in SECRET_PARAMS if p in query]
    for param in found:
        query.set_all(param, [REDACTED] * len(query.get_all(param)))
    if found:
        request["path"] = req.data.path
    return [f"query {p}" for p in found]
