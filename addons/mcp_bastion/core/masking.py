"""
Masking: sensitive values in decoded JSON replaced, the JSON kept valid.

Pure: no mitmproxy import. A `Profile` is a list of detectors, each with a
style, compiled into one RE2 pattern (one linear-time pass per string).
`Profile.mask(value)` walks a decoded JSON value (no recursion), scans every
string, and returns a new value with each detected value replaced, plus what
was found: detector, JSON path and count, never the value. Object keys are
read (a string under a key such as `password` or `api_key` is a secret
whatever it looks like) but not rewritten. Replacements:

- `redact`:  `[MASKED:card]`
- `partial`: `[MASKED:card …1111]` (the detector's last `keep` characters)
- `hash`:    `[MASKED:card#3f9a1c2b7d4e]`, HMAC-SHA256 of the value under the mask key:
  the same value gets the same pseudonym, so an analyst can correlate
  without seeing it; without the key nobody can test a guess.

A replacement is never detected again, so masking is idempotent.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .detectors import BUILTIN, SECRET_KEYS, STYLES, Detector, PatternError, compile_pattern

MASK_PREFIX = "[MASKED:"
MAX_FINDINGS = 100  # (detector, path) pairs listed per message; the rest are counted
_VALUE_GROUPS = (re.compile(r"\(\?P<v>"), re.compile(r"\(\?P<w>"))  # a detector's value (one of two forms)
_SEPARATORS = b" -"  # where a value that fails its checksum may be cut into a shorter candidate


class MaskingError(ValueError):
    """A profile that cannot be built (unknown detector or style, or a key it needs is missing)."""


@dataclass(frozen=True)
class Finding:
    detector: str
    path: str
    count: int

    def record(self) -> dict[str, Any]:
        return {"detector": self.detector, "path": self.path, "count": self.count}


class Profile:
    """Detectors and their styles, compiled into one pattern."""

    def __init__(self, name: str, entries: Iterable[tuple[Detector, str]], key: bytes | None = None):
        self.name = name
        self.entries = tuple(entries)
        for det, style in self.entries:
            if style not in STYLES:
                raise MaskingError(f"profile {name!r}: detector {det.name!r}: style must be one of {STYLES}")
            if style == "hash" and not key:
                raise MaskingError(f"profile {name!r} hashes {det.name!r} but no mask key is configured "
                                   "(BASTION_MASK_KEY or mask_key_file)")
        self.key = key
        self.keys_are_secrets = any(d.name == "password" for d, _ in self.entries)
        self._password_style = next((s for d, s in self.entries if d.name == "password"), "redact")
        parts = []
        for i, (det, _) in enumerate(self.entries):
            body = _VALUE_GROUPS[1].sub(f"(?P<w{i}>", _VALUE_GROUPS[0].sub(f"(?P<v{i}>", det.pattern))
            if det.ignore_case:
                body = f"(?i:{body})"
            parts.append(f"(?P<d{i}>{body})")
        try:
            self.regex = compile_pattern("|".join(parts)).pattern if parts else None
            # Scanned as UTF-8 bytes: the engine then needs no character offsets (several times faster).
            self._bytes = compile_pattern(self.regex.encode()) if self.regex is not None else None
        except PatternError as e:
            raise MaskingError(f"profile {name!r}: {e}") from None
        index = {(k.decode() if isinstance(k, bytes) else k): v
                 for k, v in (self._bytes.groupindex if self._bytes is not None else {}).items()}
        self._groups = [(index[f"d{i}"], (index.get(f"v{i}"), index.get(f"w{i}")), det, style)
                        for i, (det, style) in enumerate(self.entries)]

    @property
    def detectors(self) -> list[str]:
        return [d.name for d, _ in self.entries]

    # --- replacing ----------------------------------------------------------------

    def _replacement(self, det: Detector, style: str, value: str) -> str:
        if style == "partial" and det.keep and len(value) > det.keep * 2:
            return f"{MASK_PREFIX}{det.name} …{value[-det.keep:]}]"
        if style == "hash":
            assert self.key is not None
            digest = hmac.new(self.key, f"{det.name}:{value}".encode("utf-8", "surrogatepass"),
                              hashlib.sha256).hexdigest()[:12]
            return f"{MASK_PREFIX}{det.name}#{digest}]"  # `#`, not `:`: "password:..." would read as one
        return f"{MASK_PREFIX}{det.name}]"

    def _hit(self, m: Any, base: int, data: bytes) -> tuple[Detector, str, int, int] | None:
        """The detector a match is from and the value's span in `data` (offset by `base`), if it holds."""
        for group, value_groups, det, style in self._groups:
            if m.start(group) < 0:
                continue
            start, end = m.start(group) - base, m.end(group) - base
            for vg in value_groups:
                if vg is not None and m.start(vg) >= 0:
                    start, end = m.start(vg) - base, m.end(vg) - base
                    break
            if _inside_mask(data, start):
                return None
            if det.validate is not None:
                span = _valid_span(det, data, start, end)
                if span is None:
                    return None
                start, end = span
            if det.name in _GENERIC:
                det, style = self._specific(det, style, data[start:end])
            return det, style, start, end
        return None

    def _specific(self, det: Detector, style: str, value: bytes) -> tuple[Detector, str]:
        """A value a generic detector found (`API_KEY=AIza...`) named by the specific one it also is."""
        assert self._bytes is not None
        m = self._bytes.search(value)
        if m is not None and m.start() == 0:
            for group, _, other, other_style in self._groups:
                if m.start(group) >= 0 and other.name not in _GENERIC and m.end(group) == len(value):
                    if other.validate is None or other.validate(value.decode("utf-8", "surrogatepass")):
                        return other, other_style
                    break
        return det, style

    def _apply(self, data: bytes, hits: list[tuple[Detector, str, int, int]],
               counts: dict[str, int]) -> str:
        out: list[str] = []
        pos = 0
        for det, style, start, end in hits:
            out.append(data[pos:start].decode("utf-8", "surrogatepass"))
            out.append(self._replacement(det, style, data[start:end].decode("utf-8", "surrogatepass")))
            pos = end
            counts[det.name] = counts.get(det.name, 0) + 1
        out.append(data[pos:].decode("utf-8", "surrogatepass"))
        return "".join(out)

    def _scan_one(self, data: bytes) -> list[tuple[Detector, str, int, int]]:
        assert self._bytes is not None
        hits = []
        for m in self._bytes.finditer(data):
            hit = self._hit(m, 0, data)
            if hit is not None:
                hits.append(hit)
        return hits

    def mask_text(self, text: str) -> tuple[str, dict[str, int]]:
        """`text` with every detected value replaced, and how many of each detector."""
        if self._bytes is None or not text:
            return text, {}
        data = text.encode("utf-8", "surrogatepass")
        hits = self._scan_one(data)
        if not hits:
            return text, {}
        counts: dict[str, int] = {}
        return self._apply(data, hits, counts), counts

    def _whole(self, value: str) -> str:
        """A string stored under a secret-named key: masked whole, as the `password` detector."""
        return self._replacement(BUILTIN["password"], self._password_style, value)

    # --- a JSON value ---------------------------------------------------------------

    def mask(self, value: Any, path: str = "$") -> tuple[Any, list[Finding]]:
        """A copy of `value` (decoded JSON) with detected values replaced; the findings.

        Every string of the value is scanned in one pass of the engine (joined
        with a separator no match may cross; a match that does is scanned
        again string by string). Containers are copied only where something
        changed; the input is never mutated; with nothing found, `value` itself
        is returned.
        """
        leaves = list(_strings(value, path))
        if not leaves:
            return value, []
        found: dict[tuple[str, str], int] = {}
        new: dict[int, str] = {}
        scan: list[int] = []
        for i, (parent, key, text) in enumerate(leaves):
            if (self.keys_are_secrets and isinstance(key, str) and text and not text.startswith(MASK_PREFIX)
                    and _secret_key(key)):
                new[i] = self._whole(text)
                _count(found, "password", _leaf_path(parent, key), 1)
            elif text:
                scan.append(i)
        if scan and self._bytes is not None:
            self._scan_many(leaves, scan, new, found)
        findings = [Finding(d, p, n) for (d, p), n in found.items()]
        if not new:
            return value, findings
        return _rebuild(value, new), findings

    def _scan_many(self, leaves: list[tuple[str, Any, str]], scan: list[int], new: dict[int, str],
                   found: dict[tuple[str, str], int]) -> None:
        assert self._bytes is not None
        encoded = [leaves[i][2].encode("utf-8", "surrogatepass") for i in scan]
        starts = []
        pos = 0
        for data in encoded:
            starts.append(pos)
            pos += len(data) + len(_SEPARATOR)
        joined = _SEPARATOR.join(encoded)
        hits: dict[int, list[tuple[Detector, str, int, int]]] = {}
        alone: set[int] = set()  # positions in `scan` to scan on their own (a match crossed their end)
        for m in self._bytes.finditer(joined):
            at = bisect.bisect_right(starts, m.start()) - 1
            if m.end() > starts[at] + len(encoded[at]):
                last = bisect.bisect_right(starts, m.end() - 1) - 1
                alone.update(range(at, last + 1))
                continue
            if at in alone:
                continue
            hit = self._hit(m, starts[at], encoded[at])
            if hit is not None:
                hits.setdefault(at, []).append(hit)
        for at in alone:
            hits[at] = self._scan_one(encoded[at])
        for at, leaf_hits in hits.items():
            if not leaf_hits:
                continue
            counts: dict[str, int] = {}
            i = scan[at]
            new[i] = self._apply(encoded[at], leaf_hits, counts)
            leaf_path = _leaf_path(leaves[i][0], leaves[i][1])
            for name, n in counts.items():
                _count(found, name, leaf_path, n)


def _inside_mask(data: bytes, start: int) -> bool:
    """`start` lies inside a replacement already made (`[MASKED:...]`): masking twice changes nothing."""
    opened = data.rfind(_PREFIX_BYTES, max(0, start - 64), start + len(_PREFIX_BYTES))
    return opened >= 0 and data.find(b"]", opened, start) < 0


def _valid_span(det: Detector, data: bytes, start: int, end: int) -> tuple[int, int] | None:
    """The longest part of a candidate that passes its detector's check (a card number followed by an expiry
    date, an IBAN followed by a word), cut at its separators; None if no part does."""
    assert det.validate is not None
    value = data[start:end].decode("utf-8", "surrogatepass")
    if det.validate(value):
        return start, end
    cuts = [0] + [i + 1 for i, c in enumerate(data[start:end]) if c in _SEPARATORS] + [end - start]
    if len(cuts) > 24:
        return None
    spans = sorted(((a, b) for a in cuts for b in cuts if b > a), key=lambda ab: ab[0] - ab[1])
    for a, b in spans[1:]:
        piece = data[start + a:start + b].rstrip(_SEPARATORS)
        try:
            ok = bool(piece) and det.validate(piece.decode("utf-8", "surrogatepass"))
        except ValueError:
            ok = False
        if ok:
            return start + a, start + a + len(piece)
    return None


_GENERIC = frozenset({"password", "url_password", "bearer", "basic_auth"})  # may hold a specific kind of value
_SEPARATOR = b"\n\x00\n"
_ROOT = object()  # the key of a string that is the whole value
_PREFIX_BYTES = MASK_PREFIX.encode()


def _strings(root: Any, path: str) -> Iterable[tuple[str, Any, str]]:
    """(path, key in its container, string) of every string in `root`, depth first, in order."""
    if isinstance(root, str):
        yield path, _ROOT, root
        return
    if not isinstance(root, (dict, list)):
        return
    stack: list[tuple[Any, str]] = [(iter(_items(root)), path)]
    while stack:
        items, node_path = stack[-1]
        try:
            key, child = next(items)
        except StopIteration:
            stack.pop()
            continue
        if isinstance(child, str):
            yield node_path, key, child  # the leaf's own path is made only if something is found in it
        elif isinstance(child, (dict, list)):
            stack.append((iter(_items(child)), _join(node_path, key)))


_secret_keys: dict[str, bool] = {}


def _secret_key(key: str) -> bool:
    """Whether a JSON key names a secret (`password`, `api_key`, ...); remembered, keys repeat."""
    known = _secret_keys.get(key)
    if known is None:
        known = SECRET_KEYS.search(key) is not None
        if len(_secret_keys) < 4096:
            _secret_keys[key] = known
    return known


def _leaf_path(parent: str, key: Any) -> str:
    return parent if key is _ROOT else _join(parent, key)


def _rebuild(root: Any, new: dict[int, str]) -> Any:
    """`root` with its i-th string (in `_strings` order) replaced by `new[i]`, copying only what changes."""
    if isinstance(root, str):
        return new.get(0, root)
    counter = 0
    # frames: [node, items, copy, key in parent]
    stack: list[list[Any]] = [[root, iter(_items(root)), None, None]]
    result: Any = root
    while stack:
        frame = stack[-1]
        try:
            key, child = next(frame[1])
        except StopIteration:
            stack.pop()
            done = frame[2] if frame[2] is not None else frame[0]
            if stack:
                if done is not frame[0]:
                    _set(stack[-1], frame[3], done)
            else:
                result = done
            continue
        if isinstance(child, str):
            if counter in new:
                _set(frame, key, new[counter])
            counter += 1
        elif isinstance(child, (dict, list)):
            stack.append([child, iter(_items(child)), None, key])
    return result


def _items(node: dict | list):
    return node.items() if isinstance(node, dict) else enumerate(node)


def _set(frame: list[Any], key: Any, value: Any) -> None:
    if frame[2] is None:
        frame[2] = dict(frame[0]) if isinstance(frame[0], dict) else list(frame[0])
    frame[2][key] = value


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if _IDENT.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{key!r}]"


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _count(found: dict[tuple[str, str], int], detector: str, path: str, n: int) -> None:
    k = (detector, path)
    if k in found or len(found) < MAX_FINDINGS:
        found[k] = found.get(k, 0) + n
    else:
        found[(detector, "(more)")] = found.get((detector, "(more)"), 0) + n


# --- profiles from definitions --------------------------------------------------------


def build_profile(name: str, detectors: Iterable[str | tuple[str, str]], custom: dict[str, Detector],
                  default_style: str = "redact", key: bytes | None = None) -> Profile:
    """A profile from detector names (built-in or `custom`), each optionally with its own style."""
    entries = []
    for item in detectors:
        det_name, style = (item, default_style) if isinstance(item, str) else item
        det = custom.get(det_name) or BUILTIN.get(det_name)
        if det is None:
            raise MaskingError(f"profile {name!r}: unknown detector {det_name!r}")
        entries.append((det, style))
    return Profile(name, entries, key)
