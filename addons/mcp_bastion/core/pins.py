"""
Pinned definitions: the first definition the gateway sees of each tool, prompt and
resource template of an upstream, and every later change to it.

A tool's description is read by the model as instructions. A server that changes a
tool after it was trusted ("rug pull") steers agents without any rule firing, so
each item is pinned by a digest over its canonical definition (every field a
client or model reads: name, title, description, schemas, annotations; for a
prompt its arguments; for a template its URI template and media type). A
definition that differs from its pin is a change: the item stays blocked until a
reviewer accepts the new definition (`PinStore.accept`).

`PinStore` keeps pins in memory, and in a JSON file when given one (written
whole, to a temporary file then renamed, so a crash leaves the old or the new
file, never half of one). Pure: no mitmproxy import.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import fcntl
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from mcp_bastion.core import normalize
from mcp_bastion.core.audit import canonical
from mcp_bastion.core.toolscan import visible

TOOL, PROMPT, TEMPLATE = "tool", "prompt", "template"
KINDS = (TOOL, PROMPT, TEMPLATE)
# List method -> (result key, kind of item).
LISTED = {"tools/list": ("tools", TOOL), "prompts/list": ("prompts", PROMPT),
          "resources/templates/list": ("resourceTemplates", TEMPLATE)}
# What a client shows a model of each kind: the digest covers exactly these fields.
FIELDS = {
    TOOL: ("name", "title", "description", "inputSchema", "outputSchema", "annotations"),
    PROMPT: ("name", "title", "description", "arguments"),
    TEMPLATE: ("name", "title", "description", "uriTemplate", "mimeType", "annotations"),
}
NEW, SAME, CHANGED, CHANGED_NOW = "new", "same", "changed", "changed-now"  # changed-now: first seen this change
MAX_PINS = 50_000  # items pinned per store (beyond: nothing new is pinned, and what is not pinned is blocked)


def fold(name: str) -> str:
    """A name as rules read it (case and Unicode form folded, invisible characters dropped)."""
    try:
        return normalize.name(name) or name
    except normalize.TooCostly:
        return name


def name_of(kind: str, item: Any) -> str | None:
    """The name an item is pinned under (a template without a name: its URI template)."""
    if not isinstance(item, dict):
        return None
    name = item.get("name")
    if kind == TEMPLATE and not isinstance(name, str):
        name = item.get("uriTemplate")
    return name if isinstance(name, str) and name else None


def definition(kind: str, item: dict[str, Any]) -> dict[str, Any]:
    return {k: item[k] for k in FIELDS[kind] if k in item}


def digest(kind: str, item: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical(definition(kind, item))).hexdigest()


@dataclass
class Pin:
    upstream: str
    kind: str
    name: str
    digest: str
    definition: dict[str, Any]
    pinned: float
    accepted_by: str | None = None  # None: pinned when first seen
    changed: dict[str, Any] | None = None  # {"digest", "definition", "seen"}: a different definition, not accepted
    findings: list[dict[str, Any]] = field(default_factory=list)  # of the pinned definition
    changed_findings: list[dict[str, Any]] = field(default_factory=list)  # of the changed one

    @property
    def key(self) -> tuple[str, str, str]:
        return self.upstream, self.kind, self.name

    def view(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = "changed" if self.changed else "pinned"
        out["pinned"] = _iso(self.pinned)
        if self.changed:
            out["changed"] = {**self.changed, "seen": _iso(self.changed["seen"])}
        return out


class PinError(ValueError):
    """A pin that cannot be accepted or forgotten (unknown, ambiguous, nothing changed)."""


class PinStore:
    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._pins: dict[tuple[str, str, str], Pin] = {}
        self._lock = threading.Lock()
        self._held: Any = None  # the open lock file while this process owns the store
        self._dirty = False  # observed pins not yet in the file (`flush` writes them, once per list)
        self._folded: dict[tuple[str, str, str], set[tuple[str, str, str]]] = {}  # (upstream, kind, folded) -> keys
        self._by_upstream: dict[tuple[str, str], set[tuple[str, str, str]]] = {}  # (upstream, kind) -> keys
        if path and os.path.exists(path):
            self._load(path)
        for pin in self._pins.values():
            self._index(pin)

    def _index(self, pin: Pin) -> None:
        self._folded.setdefault((pin.upstream, pin.kind, fold(pin.name)), set()).add(pin.key)
        self._by_upstream.setdefault((pin.upstream, pin.kind), set()).add(pin.key)

    def _unindex(self, pin: Pin) -> None:
        self._folded.get((pin.upstream, pin.kind, fold(pin.name)), set()).discard(pin.key)
        self._by_upstream.get((pin.upstream, pin.kind), set()).discard(pin.key)

    def lock(self) -> None:
        """Own the store file: one process writes it (`<path>.lock`, an exclusive flock). PinError if taken."""
        if not self.path or self._held is not None:
            return
        f = open(self.path + ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise PinError(f"{self.path} is in use by a running gateway (use --gateway to change its pins)") from None
        self._held = f

    def unlock(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def refresh(self) -> None:
        """Catch up with pins other replicas made (a shared store; this one is the only writer of its own)."""

    def _replace_all(self, pins: Iterable[Pin]) -> None:
        """Hold exactly `pins` (a shared store read afresh)."""
        self._pins = {p.key: p for p in pins}
        self._folded, self._by_upstream = {}, {}
        for pin in self._pins.values():
            self._index(pin)

    # --- reading -------------------------------------------------------------------

    def get(self, upstream: str, kind: str, name: str) -> Pin | None:
        return self._pins.get((upstream, kind, name))

    @property
    def full(self) -> bool:
        return len(self._pins) >= MAX_PINS

    def of(self, upstream: str, kind: str) -> list[Pin]:
        """The pins of one kind of one upstream."""
        return [self._pins[k] for k in self._by_upstream.get((upstream, kind), ())]

    def find_folded(self, upstream: str, kind: str, folded: str) -> list[Pin]:
        """The pins of `upstream` whose names read as `folded` does to rules (case, Unicode form)."""
        return [self._pins[k] for k in self._folded.get((upstream, kind, folded), ())]

    def all(self) -> list[Pin]:
        return sorted(self._pins.values(), key=lambda p: p.key)

    def names(self, kind: str, exclude_upstream: str | None = None) -> dict[str, str]:
        """Pinned names of one kind (name -> upstream), other than `exclude_upstream`'s."""
        return {p.name: p.upstream for p in self._pins.values() if p.kind == kind and p.upstream != exclude_upstream}

    def find(self, name: str, kind: str | None = None, upstream: str | None = None) -> list[Pin]:
        return [p for p in self.all() if p.name == name and (kind is None or p.kind == kind)
                and (upstream is None or p.upstream == upstream)]

    # --- observing -----------------------------------------------------------------

    def observe(self, upstream: str, kind: str, item: dict[str, Any],
                findings: Iterable[dict[str, Any]] | Callable[[], Iterable[dict[str, Any]]] = (),
                now: float | None = None) -> tuple[str, Pin | None]:
        """Compare one listed item with its pin: (NEW, pin) pins it; (SAME, pin); (CHANGED, pin) records the
        change on the pin. (NEW, None): the store is full and the item was not pinned."""
        name = name_of(kind, item)
        assert name is not None
        now = time.time() if now is None else now
        d = digest(kind, item)
        scanned = findings if not callable(findings) else None  # scanned only when new or newly changed
        with self._lock:
            pin = self._pins.get((upstream, kind, name))
            if pin is None:
                if len(self._pins) >= MAX_PINS:
                    return NEW, None
                found = list(findings() if scanned is None else scanned)
                pin = self._pins[(upstream, kind, name)] = Pin(upstream, kind, name, d, definition(kind, item), now,
                                                               findings=found)
                self._index(pin)
                self._dirty = True
                return NEW, pin
            if pin.digest == d:
                return SAME, pin
            if pin.changed is None or pin.changed["digest"] != d:
                found = list(findings() if scanned is None else scanned)  # first: a scan that fails changes nothing
                pin.changed = {"digest": d, "definition": definition(kind, item), "seen": now}
                pin.changed_findings = found
                self._dirty = True
                return CHANGED_NOW, pin
            return CHANGED, pin

    def flush(self) -> None:
        """Write what `observe` pinned or saw change since the last write (one write per list answer)."""
        if self._dirty:
            with self._lock:
                self._save()
                self._dirty = False

    def accept(self, pins: list[Pin], by: str, now: float | None = None, expect: str | None = None) -> Pin:
        """Accept the changed definition of the one pin in `pins`: it becomes the pin. With `expect`, only if
        that is the digest of the change (the one the reviewer saw). Nothing changes unless it is written."""
        pin = _one(pins)
        with self._lock:
            if pin.changed is None:
                raise PinError(f"{pin.kind} {pin.name} of {pin.upstream} has not changed: nothing to accept")
            if expect is not None and pin.changed["digest"] != expect:
                raise PinError(f"{pin.kind} {pin.name} changed again since you looked ({pin.changed['digest'][:19]}"
                               f", not {expect[:19]}): look again before accepting")
            before = copy.deepcopy(pin)
            pin.digest, pin.definition = pin.changed["digest"], pin.changed["definition"]
            pin.findings, pin.changed_findings = pin.changed_findings, []
            pin.changed, pin.accepted_by = None, by
            pin.pinned = time.time() if now is None else now
            try:
                self._save()
            except BaseException:
                self._pins[pin.key] = before  # as it was: refused, and still refused
                raise
        return self._pins[pin.key]

    def forget(self, pins: list[Pin]) -> Pin:
        """Forget the one pin in `pins`: the next definition seen is pinned afresh."""
        pin = _one(pins)
        with self._lock:
            self._pins.pop(pin.key, None)
            try:
                self._save()
            except BaseException:
                self._pins[pin.key] = pin
                raise
            self._unindex(pin)
        return pin

    # --- the file ------------------------------------------------------------------

    def _load(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            for raw in doc["pins"]:
                pin = pin_from_record(raw)
                self._pins[pin.key] = pin
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PinError(f"pin store {path} is unreadable: {e}") from None

    def _save(self) -> None:
        if not self.path:
            return
        doc = {"version": 1, "pins": [asdict(p) for p in self.all()]}
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".pins-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(doc, f, ensure_ascii=False, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def pin_from_record(raw: dict[str, Any]) -> Pin:
    """A pin as `asdict` wrote it (the file, a shared store); ValueError/KeyError/TypeError if it is not one."""
    pin = Pin(**{k: raw[k] for k in Pin.__dataclass_fields__ if k in raw})
    if pin.kind not in KINDS or not isinstance(pin.definition, dict):
        raise ValueError(f"bad pin {raw.get('name')!r}")
    return pin


def _one(pins: list[Pin]) -> Pin:
    if not pins:
        raise PinError("no such pinned item")
    if len(pins) > 1:
        where = ", ".join(f"{p.kind} of {p.upstream}" for p in pins)
        raise PinError(f"{pins[0].name} is pinned several times ({where}): say which with --upstream or --kind")
    return pins[0]


def diff(pin: Pin) -> str | None:
    """A changed pin's definitions as a unified diff of their pretty JSON (invisible characters as
    escapes); None when unchanged."""
    if pin.changed is None:
        return None
    before = visible(json.dumps(pin.definition, indent=2, sort_keys=True, ensure_ascii=False)).splitlines()
    after = visible(json.dumps(pin.changed["definition"], indent=2, sort_keys=True, ensure_ascii=False)).splitlines()
    return "\n".join(difflib.unified_diff(before, after, f"{pin.kind} {pin.name} (pinned)",
                                          f"{pin.kind} {pin.name} (now)", lineterm=""))


def template_matches(template: str, uri: str) -> bool:
    """Whether `uri` is one of the URIs an RFC 6570 template expands to (levels 1-4, loosely)."""
    pattern, pos = "", 0
    for m in re.finditer(r"\{([+#./;?&]?)[^{}]*\}", template):
        pattern += re.escape(template[pos:m.start()])
        pattern += ".*" if m.group(1) in ("+", "#") else "[^/?#]*" if m.group(1) in ("", ".", ";") else ".*"
        pos = m.end()
    pattern += re.escape(template[pos:])
    return re.fullmatch(pattern, uri, re.DOTALL) is not None


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
