"""
Content types as a peer reads them: the media type, and whether the text is UTF-8.

The gateway decodes every body as UTF-8. A peer that honours a declared
`charset` (the TypeScript SDK's Express helper does) would read different text
than the gateway checked, so a body that declares anything but UTF-8, or
declares it ambiguously (twice, or unparseably), is refused rather than guessed.

Pure: no mitmproxy import.
"""

from __future__ import annotations

UTF8 = frozenset({"utf-8", "utf8"})


def media_type(value: str | None) -> str:
    """`application/json` from `Application/JSON; charset=utf-8` (empty when absent)."""
    return (value or "").split(";", 1)[0].strip().lower()


def charset_problem(value: str | None) -> str | None:
    """Why a Content-Type's charset is not plainly UTF-8, or None (no charset means UTF-8 for JSON and SSE)."""
    if not value or ";" not in value:
        return None
    found: list[str] = []
    for param in value.split(";")[1:]:
        name, sep, raw = param.partition("=")
        if name.strip().lower() != "charset":
            continue
        if not sep:
            return "a charset parameter without a value"
        charset = raw.strip()
        if len(charset) >= 2 and charset[0] == charset[-1] == '"':
            charset = charset[1:-1]
        found.append(charset.strip().lower())
    if len(found) > 1:
        return f"{len(found)} charset parameters"
    if found and found[0] not in UTF8:
        return f"charset {found[0][:40]!r} (only UTF-8 is read)"
    return None
