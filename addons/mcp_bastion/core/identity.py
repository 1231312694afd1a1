"""
Who is calling: the one `Identity` the token verifier produces, rules match on,
and flows carry (as `as_metadata()` under `Meta.IDENTITY`).

Pure: no mitmproxy import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Identity:
    """A verified caller (or ANONYMOUS when identity checks are off)."""

    sub: str | None = None
    groups: tuple[str, ...] = ()
    iss: str | None = None
    email: str | None = None
    name: str | None = None
    client_id: str | None = None
    scopes: tuple[str, ...] = ()

    @property
    def authenticated(self) -> bool:
        return self.sub is not None

    @property
    def who(self) -> str | None:
        """The name people see: the subject, else the OAuth client."""
        return self.sub or self.client_id

    def as_metadata(self) -> dict[str, Any]:
        """What travels on a flow (plain JSON values)."""
        out: dict[str, Any] = {}
        for key in ("sub", "email", "name"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out["groups"] = list(self.groups)
        out["iss"] = self.iss
        if self.client_id is not None:
            out["client_id"] = self.client_id
        out["scopes"] = list(self.scopes)
        return out

    @classmethod
    def from_claims(cls, claims: dict[str, Any] | None) -> Identity:
        """From a flow's identity metadata (None or anything unreadable: anonymous, no groups)."""
        if not isinstance(claims, dict):
            return ANONYMOUS
        groups = claims.get("groups") or ()
        if isinstance(groups, str):
            groups = (groups,)
        elif not isinstance(groups, (list, tuple)):
            groups = ()  # a number, an object: no groups
        scopes = claims.get("scopes") or ()

        def text(key: str) -> str | None:
            value = claims.get(key)
            return value if isinstance(value, str) and value else None

        return cls(
            sub=text("sub"),
            groups=tuple(g for g in groups if isinstance(g, str)),
            iss=text("iss"),
            email=text("email"),
            name=text("name"),
            client_id=text("client_id"),
            scopes=tuple(s for s in scopes if isinstance(s, str)) if isinstance(scopes, (list, tuple)) else (),
        )


ANONYMOUS = Identity()
