"""
Masking: a message stage that replaces sensitive values before a message goes on.

Which profiles apply to a message:
- a client's request that a `mask` rule matched: that rule's profile, on the
  request's own params (outbound: a secret sent to a third-party server is
  masked too; the `Mcp-Param-*` headers follow the body) and on everything
  that comes back for it: the result or error, every event of its stream, and
  the answers of a `tasks/*` fetch of it (`Context.mask_profiles`, from the
  flow's mask decisions);
- a server's message (notification, request, or an answer) that a
  `direction: server_to_client` mask rule matched: that rule's profile.

Only decoded JSON string values inside `params`, `result` and `error`
(`message`, `data`) are rewritten; the envelope (jsonrpc, id, method, error
code) never is. The profiles come from the ruleset in force (`secrets` and
`pii` are built in; a ruleset's `masking:` section may add or redefine
profiles) and the mask key (`BASTION_MASK_KEY`, or `mask_key_file`), which
the `hash` style needs. An exception fails the message closed (the Pipeline
withholds it): nothing is forwarded unmasked.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, exceptions

from mcp_bastion.core import audit
from mcp_bastion.core.masking import MaskingError, Profile, build_profile
from mcp_bastion.core.message import Message
from mcp_bastion.core.pipeline import Context, Outcome, Pass, Replace, Verdict
from mcp_bastion.core.rules import Ruleset
from mcp_bastion.core.vocab import Action, Direction, Kind, StageName
from mcp_bastion.core.wire import private

logger = logging.getLogger("mcp_bastion")

KEY_ENV = "BASTION_MASK_KEY"
MAX_LISTED = 20  # findings (detector, path, count) recorded per message


class Masking:
    """The masking stage: profiles from the ruleset, applied to the messages rules chose."""

    name = StageName.MASK

    def __init__(self, ruleset: Callable[[], Ruleset]):
        self._ruleset = ruleset
        self.key: bytes | None = None
        self._built: tuple[int, dict[str, Profile]] | None = None  # (id of the ruleset's masking spec, profiles)
        self._names: tuple[dict[str, Profile], frozenset[str]] | None = None  # (profiles, their names)

    def load(self, loader) -> None:
        loader.add_option(
            "mask_key_file", str, "",
            f"""
            File holding the key of the `hash` masking style (pseudonyms that are stable across
            restarts and cannot be tested by whoever lacks the key), used when {KEY_ENV} is unset.
            Created with a random key (mode 0600) if missing; refused if group or others can read it.
            """,
        )

    def configure(self, updated: set[str]) -> None:
        if "mask_key_file" in updated or self.key is None:
            try:
                key, _ = audit.load_key(KEY_ENV, ctx.options.mask_key_file or None,
                                        create=bool(ctx.options.mask_key_file))
            except audit.AuditError as e:
                if os.environ.get(KEY_ENV) or ctx.options.mask_key_file:
                    raise exceptions.OptionsError(f"mask key: {e}") from None
                key = None  # no key: only the `hash` style needs one, and asks for it below
            self.key = key
            self._built = None
        if "ruleset" in updated or "mask_key_file" in updated:
            try:
                self.profiles()  # a profile that cannot be built stops the gateway here, not at a call
            except MaskingError as e:
                raise exceptions.OptionsError(f"masking: {e}") from None

    # --- profiles ---------------------------------------------------------------

    @property
    def masking_profiles(self) -> frozenset[str]:
        """The profiles this stage can apply now (a `mask` rule naming another is a denial)."""
        try:
            profiles = self.profiles()
        except MaskingError:
            return frozenset()
        if self._names is None or self._names[0] is not profiles:
            self._names = (profiles, frozenset(profiles))
        return self._names[1]

    def profiles(self) -> dict[str, Profile]:
        spec = self._ruleset().masking
        if self._built is None or self._built[0] != id(spec):
            built = {name: build_profile(name, entries, spec.detectors, key=self.key)
                     for name, entries in spec.profile_entries().items()}
            self._built = (id(spec), built)
        return self._built[1]

    def sensitive(self, names: tuple[str, ...], text: str) -> bool:
        """Whether any of the profiles `names` would mask something in `text` (for fields that are not
        messages: an SSE comment, `id:` or `retry:` on a masked stream, which are dropped, not rewritten)."""
        profiles = self.profiles()
        return any(profiles[n].mask_text(text)[1] for n in names if n in profiles) or any(
            n not in profiles for n in names)

    # --- the stage ----------------------------------------------------------------

    def check(self, m: Message, cx: Context) -> Outcome:
        names = m.masks if m.direction != Direction.S2C else (*cx.mask_profiles, *m.masks)
        if not names or m.kind == Kind.INVALID:
            return Pass()
        profiles = self.profiles()
        missing = [n for n in names if n not in profiles]
        if missing:
            raise MaskingError(f"masking profile(s) {', '.join(missing)} cannot be applied")
        raw = m.raw
        findings: list[dict[str, Any]] = []
        for name in dict.fromkeys(names):
            raw, found = _mask_message(profiles[name], raw)
            findings.extend(f.record() | {"profile": name} for f in found)
        stage = StageName.MASK.response if m.direction == Direction.S2C else StageName.MASK
        if not findings:
            return Pass()
        if m.kind == Kind.RESPONSE and isinstance(raw.get("result"), dict):
            raw = {**raw, "result": private(raw["result"])}  # masked for this caller: never a shared cache
        total = sum(f["count"] for f in findings)
        detectors = sorted({f["detector"] for f in findings})
        v = Verdict(stage, Action.MASK, None, f"{total} value(s) masked ({', '.join(detectors)})",
                    {"profiles": list(dict.fromkeys(names)), "masked": findings[:MAX_LISTED]})
        return Replace(m.replace(raw), (v,))


def _mask_message(profile: Profile, raw: Any) -> tuple[Any, list]:
    """Mask the data parts of one JSON-RPC message; the envelope stays as it is."""
    if not isinstance(raw, dict):
        return raw, []
    out = raw
    findings: list = []
    for part in ("params", "result"):
        if part in raw:
            new, found = profile.mask(raw[part], f"$.{part}")
            if found:
                out = {**out, part: new}
                findings.extend(found)
    error = raw.get("error")
    if isinstance(error, dict):
        new_error = error
        for part in ("message", "data"):
            if part in error:
                new, found = profile.mask(error[part], f"$.error.{part}")
                if found:
                    new_error = {**new_error, part: new}
                    findings.extend(found)
        if new_error is not error:
            out = {**out, "error": new_error}
    return out, findings
