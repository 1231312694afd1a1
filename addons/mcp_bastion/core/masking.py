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
- `hash`:    `[MASKED:card:3f9a1c2b7d4e]`, HMAC-SHA256 of the value under the mask key:
  the same value gets the same pseudonym, so an analyst can correlate
  without seeing it; without the key nobody can test a guess.

A replacement is never detected again, so masking is idempotent.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .detectors import BUILTIN, SECRET_KEYS, STYLES, Detector, PatternError, compile_pattern

MASK_PREFIX = "[MASKED:"
MAX_FINDINGS = 100  # (detector, path) pairs listed per message; the rest are counted
_VALUE_GROUP = re.compile(r"\(\?P<v>")


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
            body = _VALUE_GROUP.sub(f"(?P<v{i}>", det.pattern)
            if det.ignore_case:
                body = f"(?i:{body})"
            parts.append(f"(?P<d{i}>{body})")
        try:
            self.regex = compile_pattern("|".join(parts)) if parts else None
        except PatternError as e:
            raise MaskingError(f"profile {name!r}: {e}") from None
        index = self.regex.groupindex if self.regex is not None else {}
        self._groups = [(index[f"d{i}"], index.get(f"v{i}"), det, style) for i, (det, style) in enumerate(self.entries)]

    @property
    def detectors(self) -> list[str]:
        return [d.name for d, _ in self.entries]

    # --- one string ---------------------------------------------------------------

    def _replacement(self, det: Detector, style: str, value: str) -> str:
        if style == "partial" and det.keep and len(value) > det.keep * 2:
            return f"{MASK_PREFIX}{det.name} …{value[-det.keep:]}]"
        if style == "hash":
            assert self.key is not None
            digest = hmac.new(self.key, f"{det.name}:{value}".encode(), hashlib.sha256).hexdigest()[:12]
            return f"{MASK_PREFIX}{det.name}:{digest}]"
        return f"{MASK_PREFIX}{det.name}]"

    def mask_text(self, text: str) -> tuple[str, dict[str, int]]:
        """`text` with every detected value replaced, and how many of each detector."""
        if self.regex is None or not text:
            return text, {}
        counts: dict[str, int] = {}
        out: list[str] = []
        pos = 0
        for m in self.regex.finditer(text):
            hit = self._which(m)
            if hit is None:
                continue
            det, style, start, end = hit
            value = text[start:end]
            if value.startswith(MASK_PREFIX) or (det.validate is not None and not det.validate(value)):
                continue
            out.append(text[pos:start])
            out.append(self._replacement(det, style, value))
            pos = end
            counts[det.name] = counts.get(det.name, 0) + 1
        if not counts:
            return text, {}
        out.append(text[pos:])
        return "".join(out), counts

    def _which(self, m: Any) -> tuple[Detector, str, int, int] | None:
        for group, value_group, det, style in self._groups:
            if m.start(group) >= 0:
                if value_group is not None and m.start(value_group) >= 0:
                    return det, style, m.start(value_group), m.end(value_group)
                return det, style, m.start(group), m.end(group)
        return None

    def _whole(self, value: str) -> str:
        """A string stored under a secret-named key: masked whole, as the `password` detector."""
        return self._replacement(BUILTIN["password"], self._password_style, value)

    # --- a JSON value ---------------------------------------------------------------

    def mask(self, value: Any, path: str = "$") -> tuple[Any, list[Finding]]:
        """A copy of `value` (decoded JSON) with detected values replaced; the findings.

        Containers are copied only where something changed; the input is never mutated.
        """
        found: dict[tuple[str, str], int] = {}
        result = self._walk(value, path, found)
        findings = [Finding(d, p, n) for (d, p), n in found.items()]
        return result, findings

    def _walk(self, root: Any, path: str, found: dict[tuple[str, str], int]) -> Any:
        # Iterative: (container, key or index, value, path) frames; rebuilt bottom-up.
        if isinstance(root, str):
            return self._string(root, path, found, None)
        if not isinstance(root, (dict, list)):
            return root
        return self._container(root, path, found)

    def _container(self, root: dict | list, path: str, found: dict[tuple[str, str], int]) -> dict | list:
        # Depth-first with an explicit stack; each frame holds the new copy (made lazily).
        stack: list[list[Any]] = [[root, iter(_items(root)), None, path, None, None]]
        result: Any = root
        while stack:
            frame = stack[-1]
            node, items, copy, node_path, parent_frame_key, _ = frame
            try:
                key, child = next(items)
            except StopIteration:
                stack.pop()
                new = copy if copy is not None else node
                if stack:
                    parent = stack[-1]
                    if new is not node:
                        _set(parent, parent_frame_key, new)
                else:
                    result = new
                continue
            child_path = _join(node_path, key)
            if isinstance(child, str):
                secret_key = isinstance(key, str) and self.keys_are_secrets and SECRET_KEYS.search(key) is not None
                new_child = self._string(child, child_path, found, secret_key)
                if new_child is not child:
                    _set(frame, key, new_child)
            elif isinstance(child, (dict, list)):
                stack.append([child, iter(_items(child)), None, child_path, key, None])
        return result

    def _string(self, value: str, path: str, found: dict[tuple[str, str], int], secret_key: bool | None) -> str:
        if secret_key and value and not value.startswith(MASK_PREFIX):
            _count(found, "password", path, 1)
            return self._whole(value)
        new, counts = self.mask_text(value)
        for name, n in counts.items():
            _count(found, name, path, n)
        return new if counts else value


def _items(node: dict | list):
    return node.items() if isinstance(node, dict) else enumerate(node)


def _set(frame: list[Any], key: Any, value: Any) -> None:
    if frame[2] is None:
        frame[2] = dict(frame[0]) if isinstance(frame[0], dict) else list(frame[0])
    frame[2][key] = value


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{path}.{key}"
    return f"{path}[{key!r}]"


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
