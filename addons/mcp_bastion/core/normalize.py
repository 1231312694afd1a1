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

_SPACE_RUN = re.compile(r"\s+")

MAX_GROWTH = 4  # normalised text may be this many times longer than the text (plus GROWTH_SLACK characters)
GROWTH_SLACK = 4096


class TooCostly(ValueError):
    """Text that would grow too much under normalisation to be checked at the cost of its own size."""


class _Tables:
    """Built once, on the first text that is not already in normal form (about a second of CPU)."""

    def __init__(self) -> None:
        format_chars: list[str] = []
        self.expansion: dict[str, int] = {}  # characters whose NFKC form is longer than 2: that length
        for cp in range(sys.maxunicode + 1):
            c = chr(cp)
            if unicodedata.category(c) == "Cf":
                format_chars.append(c)
            if not unicodedata.is_normalized("NFKC", c):
                n = len(unicodedata.normalize("NFKC", c))
                if n > 2:
                    self.expansion[c] = n
        self.format = re.compile("[" + "".join(map(re.escape, format_chars)) + "]")
        self.expanding = re.compile("[" + "".join(map(re.escape, self.expansion)) + "]")


_tables: _Tables | None = None


def prepare() -> None:
    """Build the tables now (at start) rather than on the first text that needs them."""
    _get_tables()


def _get_tables() -> _Tables:
    global _tables
    if _tables is None:
        _tables = _Tables()
    return _tables


def _check_growth(value: str, t: _Tables) -> None:
    """Refuse text whose normal form could be much longer than itself (U+FDFA is 18 characters in NFKC)."""
    found = t.expanding.findall(value)
    if not found:
        return  # at most twice as long
    bound = 2 * len(value) + sum(t.expansion[c] - 2 for c in found)
    if bound > MAX_GROWTH * len(value) + GROWTH_SLACK:
        raise TooCostly(f"text of {len(value)} characters would grow to about {bound} under Unicode "
                        f"normalisation (more than {MAX_GROWTH}x): refused rather than checked at that cost")


def text(value: str, fold: bool = False) -> str:
    """NFKC, without format characters, case-folded if `fold`.

    Text already in NFKC without format characters is not rewritten (a cheap
    check); text that would grow more than MAX_GROWTH times raises `TooCostly`.
    """
    if value.isascii():
        return value.lower() if fold else value
    t = _get_tables()
    if not unicodedata.is_normalized("NFKC", value):
        _check_growth(value, t)
        value = unicodedata.normalize("NFKC", value)
    if t.format.search(value):
        value = t.format.sub("", value)
    if fold:
        value = value.casefold()
        if not unicodedata.is_normalized("NFKC", value):
            value = unicodedata.normalize("NFKC", value)
    return value


def name(value: str) -> str:
    """A method, tool or prompt name as rules compare it: normalised and always case-folded."""
    return text(value, fold=True).strip()


def spaced(value: str, fold: bool = False) -> str:
    """`text()` with every run of white space made one space (for keyword scans)."""
    return _SPACE_RUN.sub(" ", text(value, fold))


# Schemes a WHATWG URL parser (Node, browsers, undici) treats as "special": `\\` is a
# path separator there, as it is for a Windows file system.
_SPECIAL = frozenset({"file", "http", "https", "ws", "wss", "ftp"})
_URL_NOISE = re.compile(r"[\t\n\r]")  # removed anywhere by WHATWG parsers
_SLASHES = re.compile(r"/{2,}")


def uri(value: str, fold: bool = False) -> str:
    """A resource URI as rules compare it: the form a URL parser or file system resolves it to.

    - tabs and newlines are removed and surrounding control characters and
      spaces stripped, as WHATWG parsers do; the fragment is dropped;
    - the query is split off *before* percent-escapes are decoded (an escaped
      `%3f` is part of the path, as the server reads it), then path and query
      are decoded (`%2e%2e` is `..`, `%2f` is `/`);
    - the scheme and the host are lower-cased; in special schemes `\\` is `/`;
    - `file:` URIs take one form, `file:///path`: `file:/path`,
      `file://localhost/path` and `file:////path` all name the same file;
    - runs of `/` in a path are one `/`, and dot segments are removed
      (RFC 3986, 5.2.4),

    so `file://localhost//srv/app/../../etc//passwd` is compared as
    `file:///etc/passwd` and cannot slip past a glob on `file:///etc/*`.
    """
    raw = _URL_NOISE.sub("", text(value)).strip("\x00- ")
    raw = raw.split("#", 1)[0]
    raw, q, query = raw.partition("?")
    query = q + text(unquote(query), fold)
    scheme, sep, rest = raw.partition(":")
    if not sep or not _SCHEME.fullmatch(scheme):
        return path(_decoded(raw, fold)) + query
    scheme = scheme.lower()
    special = scheme in _SPECIAL
    if special:
        rest = rest.replace("\\", "/")
    if not rest.startswith("//"):
        tail = _decoded(rest, fold, special)
        if scheme == "file":
            return f"file://{path('/' + tail)}{query}"
        return f"{scheme}:{path(tail)}{query}"
    authority, slash, tail = rest[2:].partition("/")
    authority = _decoded(authority, True)
    tail = _decoded(slash + tail, fold, special)
    if scheme == "file" and authority in ("", "localhost"):
        return f"file://{path('/' + tail)}{query}"
    return f"{scheme}://{authority}{tail and path('/' + tail)}{query}"


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def _decoded(part: str, fold: bool, special: bool = False) -> str:
    out = text(unquote(part), fold)
    return out.replace("\\", "/") if special else out


def path(value: str) -> str:
    """A path as a file system resolves it: runs of `/` collapsed, then dot segments removed.

    Give it a path without query (`uri` splits the query off first).
    """
    return remove_dot_segments(_SLASHES.sub("/", value))


def pathlike(value: str, fold: bool = False) -> str:
    """A string that names a file or a URL (it has a `/`), as it resolves; others unchanged.

    A value with a scheme (`https://…`, `file:…`) is read as a URI (`uri`);
    any other as a POSIX path (`path`: `?` and `\\` are ordinary characters there).
    """
    if "/" not in value:
        return text(value, fold)
    scheme, sep, _ = value.strip("\x00- ").partition(":")
    if sep and len(scheme) > 1 and _SCHEME.fullmatch(scheme):
        return uri(value, fold)
    return path(text(value, fold))


def remove_dot_segments(path: str) -> str:
    """`a/b/../c` -> `a/c` (RFC 3986, 5.2.4). Every `?` is part of the path here."""
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
    return "/".join(out)


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
