"""
Unicode normalisation of decoded JSON strings before rules look at them.

Pure: no mitmproxy import. Rules compare what a peer will understand, not how
the bytes were spelled: JSON escapes (`\\u0041`) are already resolved by the
parser, and here

- NFKC folds compatibility forms (full-width `ｄｒｏｐ`, ligatures, superscripts)
  into their plain letters;
- format characters (Unicode category Cf: zero-width space and joiners, bidi
  controls, soft hyphen) are removed, so `dr\\u200bop` reads as `drop`;
- case folding (`str.casefold`, then NFKC again) is applied where asked.

ASCII strings skip all of it: they are already in normal form.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

_format_chars: dict[int, None] | None = None
_SPACE_RUN = re.compile(r"\s+")


def _cf_table() -> dict[int, None]:
    """Translation table deleting every Cf code point (built once, on first non-ASCII text)."""
    global _format_chars
    if _format_chars is None:
        _format_chars = {
            cp: None for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) == "Cf"
        }
    return _format_chars


def text(value: str, fold: bool = False) -> str:
    """NFKC, without format characters, case-folded if `fold`."""
    if not value.isascii():
        value = unicodedata.normalize("NFKC", value).translate(_cf_table())
        if fold:
            value = unicodedata.normalize("NFKC", value.casefold())
        return value
    return value.lower() if fold else value


def name(value: str) -> str:
    """A method, tool or prompt name as rules compare it: normalised and always case-folded."""
    return text(value, fold=True).strip()


def spaced(value: str, fold: bool = False) -> str:
    """`text()` with every run of white space made one space (for keyword scans)."""
    return _SPACE_RUN.sub(" ", text(value, fold))


def uri(value: str, fold: bool = False) -> str:
    """A resource URI as rules compare it.

    Percent-escapes are decoded (`%2e%2e` is `..`) and dot segments removed
    (RFC 3986, 5.2.4), so `file:///srv/app/../../etc/passwd` is compared as
    `file:///etc/passwd` and cannot slip past a glob on `file:///srv/app/*`.
    """
    decoded = text(unquote(text(value)), fold)
    scheme, sep, rest = decoded.partition(":")
    if not sep or "/" in scheme:
        return remove_dot_segments(decoded)
    if rest.startswith("//"):
        authority, slash, path = rest[2:].partition("/")
        return f"{scheme}://{authority}{slash and remove_dot_segments('/' + path)}"
    return f"{scheme}:{remove_dot_segments(rest)}"


def remove_dot_segments(path: str) -> str:
    """`a/b/../c` -> `a/c` (RFC 3986, 5.2.4); a query after `?` is left alone."""
    path, q, query = path.partition("?")
    segments = path.split("/")
    out: list[str] = []
    for seg in segments:
        if seg == "..":
            if len(out) > 1 or (out and out[0] != ""):
                out.pop()
        elif seg != ".":
            out.append(seg)
    if segments[-1] in (".", ".."):
        out.append("")
    return "/".join(out) + q + query


def strings(value: Any) -> Iterator[str]:
    """Every string in a decoded JSON value, object keys included, without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for k, v in item.items():
                yield k
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)
