"""
Bearer-token verification: OIDC discovery, a JWKS cache, and JWT checks.

Pure: no mitmproxy import, no network of its own. The HTTP fetch function and
the clock are injected, so every rule below is unit-testable:

- Keys come only from the issuer's discovery document (`jwks_uri`), never from
  a token's `jku`/`x5u`/`jwk`/`x5c` header: a token carrying one is refused.
- Only asymmetric algorithms are accepted (RS/PS/ES/EdDSA); `none` and HMAC
  can never be configured, and a key is used only with an algorithm matching
  its type (and curve, and its own `alg` when it names one).
- The key set of an issuer is cached for the time its `Cache-Control`/`Expires`
  headers allow (clamped); an unknown `kid` triggers a refetch, at most once
  per `min_refresh_interval`. When the issuer cannot be reached, cached keys
  keep working for `max_stale` seconds past their lifetime, then tokens are
  refused with 503: a token whose key cannot be found is never let through.
- Claims checked: `iss`, `aud`, `exp` (required), `nbf`, `iat`, with leeway,
  then required scopes (403 `insufficient_scope`).
- Verified tokens are cached by the SHA-256 of the token string, bounded in
  number, never past `exp`, and only while their key is still published.

`Verifier.verify()` never performs I/O: when keys are missing or must be
refreshed it raises `KeysNeeded`; the caller runs `Verifier.refresh(issuer)`
(blocking: in a thread from an event loop) and calls `verify()` again.
`verify_blocking()` does both, for scripts and tests.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import re
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jwt
from jwt.api_jws import PyJWS

from .identity import Identity
from .jsonrpc import ParseError, loads_strict

ASYMMETRIC_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
)
# algorithm -> (key type, curve or None for any)
_ALG_KEY = {
    **{a: ("RSA", None) for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}
# Header parameters that point at keys chosen by the token's author.
_KEY_HEADERS = ("jku", "x5u", "jwk", "x5c")
# JWK members that hold private or symmetric key material: never loaded.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")

MAX_DOCUMENT_BYTES = 1024 * 1024  # discovery document or JWKS
MAX_KEYS = 100


class TokenError(Exception):
    """A refused token. `reason` is a stable slug; `error` the RFC 6750 error code.

    `status` is 401 for a missing or invalid token, 403 for insufficient scope,
    503 when the issuer's keys cannot be obtained. `description` never contains
    the token.
    """

    def __init__(self, reason: str, description: str, *, status: int = 401,
                 error: str = "invalid_token", scope: str | None = None):
        super().__init__(f"{reason}: {description}")
        self.reason = reason
        self.description = description
        self.status = status
        self.error = error
        self.scope = scope


class KeysNeeded(Exception):
    """`verify()` needs fresh keys for `issuer`: call `refresh(issuer)`, then verify again."""

    def __init__(self, issuer: str):
        super().__init__(issuer)
        self.issuer = issuer


class TokenFetchError(Exception):
    """Discovery or JWKS could not be fetched or read."""


@dataclass(frozen=True)
class FetchResult:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes


Fetch = Callable[[str], FetchResult]
Clock = Callable[[], float]


def urllib_fetch(url: str, timeout: float = 5.0) -> FetchResult:
    """GET `url` with the standard library (blocking); bodies larger than 1 MiB are cut off."""
    req = urllib.request.Request(url, headers={"accept": "application/json", "user-agent": "mcp-bastion"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read(MAX_DOCUMENT_BYTES + 1)
            return FetchResult(resp.status, {k.lower(): v for k, v in resp.headers.items()}, body)
    except urllib.error.HTTPError as e:
        return FetchResult(e.code, {k.lower(): v for k, v in (e.headers or {}).items()}, b"")


@dataclass(frozen=True)
class VerifierConfig:
    issuers: tuple[str, ...]
    audiences: tuple[str, ...] = ()  # default audiences; verify() may pass others
    algorithms: tuple[str, ...] = ASYMMETRIC_ALGORITHMS
    leeway: float = 30.0
    groups_claim: str = "groups"
    required_scopes: tuple[str, ...] = ()
    default_key_ttl: float = 300.0  # JWKS lifetime when the response sets none
    min_refresh_interval: float = 30.0  # between two fetches for one issuer
    max_key_ttl: float = 86400.0
    max_stale: float = 3600.0  # how long cached keys outlive their TTL while the issuer is down
    max_token_bytes: int = 16 * 1024
    cache_size: int = 10_000

    def __post_init__(self) -> None:
        if not self.issuers:
            raise ValueError("at least one issuer is required")
        for iss in self.issuers:
            if not iss.startswith(("https://", "http://")):
                raise ValueError(f"issuer {iss!r} is not an http(s) URL")
        bad = [a for a in self.algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if bad or not self.algorithms:
            raise ValueError(
                f"algorithms must be a non-empty subset of {', '.join(ASYMMETRIC_ALGORITHMS)}"
                + (f" (refused: {', '.join(bad)})" if bad else "")
            )
        if self.leeway < 0 or self.leeway > 600:
            raise ValueError("leeway must be between 0 and 600 seconds")
        if not self.groups_claim or any(not p for p in self.groups_claim.split(".")):
            raise ValueError(f"groups claim {self.groups_claim!r} is not a dotted claim path")
        if self.min_refresh_interval < 1:
            raise ValueError("the minimum JWKS refresh interval is 1 second")
        if self.max_stale < 0 or self.default_key_ttl < 0:
            raise ValueError("JWKS lifetimes cannot be negative")


@dataclass(frozen=True)
class _Key:
    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    public: Any  # a cryptography public key

    def fits(self, alg: str) -> bool:
        kty, crv = _ALG_KEY[alg]
        if self.kty != kty or (crv is not None and self.crv != crv):
            return False
        return self.alg is None or self.alg == alg


@dataclass
class KeySet:
    """The signing keys of one issuer, as fetched at `fetched_at`, good until `expires_at`."""

    keys: tuple[_Key, ...]
    fetched_at: float
    expires_at: float

    def find(self, kid: str | None, alg: str) -> _Key | None:
        """The key for `kid` usable with `alg`; without a kid, the only key usable with `alg`."""
        if kid is None:
            fitting = [k for k in self.keys if k.fits(alg)]
            return fitting[0] if len(fitting) == 1 else None
        return next((k for k in self.keys if k.kid == kid and k.fits(alg)), None)

    def has(self, kid: str | None) -> bool:
        return any(k.kid == kid for k in self.keys)


@dataclass
class _IssuerState:
    jwks_uri: str | None = None
    keys: KeySet | None = None
    last_attempt: float | None = None
    last_error: str | None = None
    fetching: bool = False  # a refresh is under way: callers wait for it rather than fail
    fetches: int = 0  # refreshes that got keys
    fetch_errors: int = 0  # refreshes that failed
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class _Verified:
    identity: Identity
    exp: float
    kid: str | None
    aud: tuple[str, ...]


class Verifier:
    """Verifies bearer tokens for a set of trusted issuers (see the module docstring)."""

    def __init__(self, config: VerifierConfig, fetch: Fetch = urllib_fetch, clock: Clock = time.time):
        self.config = config
        self.fetch = fetch
        self.clock = clock
        self._issuers = {iss: _IssuerState() for iss in config.issuers}
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._jws = PyJWS(algorithms=list(config.algorithms), options={"enforce_minimum_key_length": True})

    # --- verification (no I/O) ------------------------------------------------

    def verify(self, token: str, audiences: Sequence[str] | None = None, *, may_refresh: bool = True) -> Identity:
        """Check `token` and return its identity, or raise TokenError / KeysNeeded.

        `audiences` overrides the configured audiences for this call. With
        `may_refresh=False`, missing keys are a TokenError rather than KeysNeeded.
        """
        cfg = self.config
        audiences = tuple(audiences if audiences is not None else cfg.audiences)
        if not audiences:
            raise ValueError("no audience to check the token against")
        if len(token) > cfg.max_token_bytes:
            raise TokenError("oversized", f"token longer than {cfg.max_token_bytes} bytes")
        now = self.clock()
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        hit = self._cached(digest, now, audiences)
        if hit is not None:
            return self._check_scopes(hit)
        header, claims = _split(token)
        alg = self._check_header(header)
        iss = claims.get("iss")
        if not isinstance(iss, str) or iss not in self._issuers:
            raise TokenError("untrusted_issuer", "token issuer is not trusted")
        kid = header.get("kid")
        key = self._key(iss, kid, alg, now, may_refresh)
        try:
            self._jws.decode_complete(token, key=key.public, algorithms=[alg])
        except jwt.InvalidKeyError:
            raise TokenError("weak_key", "the issuer's key is too weak to be trusted") from None
        except jwt.InvalidSignatureError:
            raise TokenError("bad_signature", "token signature does not verify") from None
        except jwt.InvalidTokenError:
            raise TokenError("malformed", "token is not a well-formed JWS") from None
        verified = self._check_claims(claims, iss, kid, now, audiences)
        self._remember(digest, verified)
        return self._check_scopes(verified.identity)

    def _check_header(self, header: dict[str, Any]) -> str:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.config.algorithms:
            raise TokenError("alg_not_allowed", f"signature algorithm {str(alg)[:20]!r} is not accepted")
        for name in _KEY_HEADERS:
            if name in header:
                raise TokenError("key_header", f"tokens naming their own key ({name}) are not accepted")
        if "crit" in header:
            raise TokenError("crit_header", "tokens with critical header extensions are not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenError("malformed", "token kid is not a string")
        return alg

    def _key(self, iss: str, kid: str | None, alg: str, now: float, may_refresh: bool) -> _Key:
        state = self._issuers[iss]
        keys = state.keys
        if keys is None or now >= keys.expires_at:
            if may_refresh and (state.fetching or self._may_refresh(state, now)):
                raise KeysNeeded(iss)
            if keys is None or now >= keys.expires_at + self.config.max_stale:
                raise TokenError("keys_unavailable", "the issuer's signing keys could not be obtained",
                                 status=503, error="temporarily_unavailable")
        key = keys.find(kid, alg)
        if key is not None:
            return key
        if keys.has(kid):
            raise TokenError("alg_key_mismatch", f"the issuer's key {str(kid)[:64]!r} is not for {alg}")
        if may_refresh and (state.fetching or self._may_refresh(state, now)):
            raise KeysNeeded(iss)
        raise TokenError("unknown_key", "token is signed with a key the issuer does not publish")

    def _check_claims(self, claims: dict[str, Any], iss: str, kid: str | None, now: float,
                      audiences: tuple[str, ...]) -> _Verified:
        leeway = self.config.leeway
        exp = claims.get("exp")
        if not _is_number(exp):
            raise TokenError("missing_exp", "token has no valid exp claim")
        if now >= exp + leeway:
            raise TokenError("expired", "token has expired")
        nbf = claims.get("nbf")
        if nbf is not None and (not _is_number(nbf) or now < nbf - leeway):
            raise TokenError("not_yet_valid", "token is not valid yet (nbf)")
        iat = claims.get("iat")
        if iat is not None and (not _is_number(iat) or iat > now + leeway):
            raise TokenError("bad_iat", "token was issued in the future (iat)")
        aud_list = _strings(claims.get("aud"))
        if not aud_list:
            raise TokenError("missing_audience", "token has no audience")
        if not {audience_key(a) for a in aud_list} & {audience_key(a) for a in audiences}:
            raise TokenError("wrong_audience", "token is not meant for this server (aud)")
        return _Verified(self._identity(claims, iss), float(exp), kid, aud_list)

    def _identity(self, claims: dict[str, Any], iss: str) -> Identity:
        return Identity(
            iss=iss,
            sub=_str(claims.get("sub")),
            email=_str(claims.get("email")),
            name=_str(claims.get("name")) or _str(claims.get("preferred_username")),
            groups=_strings(claim_path(claims, self.config.groups_claim)),
            client_id=_str(claims.get("client_id")) or _str(claims.get("azp")),
            scopes=_scopes(claims),
        )

    def _check_scopes(self, identity: Identity) -> Identity:
        missing = [s for s in self.config.required_scopes if s not in identity.scopes]
        if missing:
            raise TokenError("insufficient_scope", f"token lacks scope {' '.join(missing)}", status=403,
                             error="insufficient_scope", scope=" ".join(self.config.required_scopes))
        return identity

    # --- verified-token cache -------------------------------------------------

    def _cached(self, digest: bytes, now: float, audiences: tuple[str, ...]) -> Identity | None:
        with self._cache_lock:
            hit = self._cache.get(digest)
            if hit is None:
                return None
            if now >= hit.exp:
                del self._cache[digest]
                return None
        keys = self._issuers[hit.identity.iss].keys
        if keys is None or now >= keys.expires_at or not keys.has(hit.kid):
            return None  # the full path decides (refresh, stale keys, removed key)
        if not set(hit.aud) & set(audiences):
            return None
        return hit.identity

    def _remember(self, digest: bytes, verified: _Verified) -> None:
        with self._cache_lock:
            self._cache[digest] = verified
            self._cache.move_to_end(digest)
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)

    # --- keys (blocking I/O through `fetch`) -----------------------------------

    def _may_refresh(self, state: _IssuerState, now: float) -> bool:
        return state.last_attempt is None or now - state.last_attempt >= self.config.min_refresh_interval

    def refresh(self, issuer: str) -> str | None:
        """Fetch discovery (if needed) and the JWKS of `issuer`, rate-limited.

        Returns an error description when the fetch failed (the previous keys
        stay in use, within `max_stale`), None otherwise. Blocking; thread-safe.
        """
        state = self._issuers[issuer]
        seen = state.last_attempt
        with state.lock:
            now = self.clock()
            if state.last_attempt != seen or not self._may_refresh(state, now):
                return state.last_error  # another caller fetched while this one waited, or too soon
            state.last_attempt = now
            state.fetching = True
            try:
                return self._refresh_locked(issuer, state, now)
            finally:
                state.fetching = False

    def _refresh_locked(self, issuer: str, state: _IssuerState, now: float) -> str | None:
        try:
            if state.jwks_uri is None:
                state.jwks_uri = self._discover(issuer)
            try:
                state.keys = self._fetch_keys(state.jwks_uri, now)
            except TokenFetchError:
                # the jwks_uri may have moved: rediscover once, then give up
                state.jwks_uri = self._discover(issuer)
                state.keys = self._fetch_keys(state.jwks_uri, now)
        except TokenFetchError as e:
            state.last_error = str(e)
            state.fetch_errors += 1
            return state.last_error
        state.last_error = None
        state.fetches += 1
        return None

    def _get_json(self, url: str) -> tuple[dict[str, Any], Mapping[str, str]]:
        try:
            res = self.fetch(url)
        except (OSError, ValueError) as e:
            raise TokenFetchError(f"{url}: {type(e).__name__}: {e}") from None
        if res.status != 200:
            raise TokenFetchError(f"{url}: HTTP {res.status}")
        if len(res.body) > MAX_DOCUMENT_BYTES:
            raise TokenFetchError(f"{url}: document larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            doc = loads_strict(res.body, max_bytes=MAX_DOCUMENT_BYTES, max_depth=16)
        except ParseError as e:
            raise TokenFetchError(f"{url}: {e}") from None
        if not isinstance(doc, dict):
            raise TokenFetchError(f"{url}: not a JSON object")
        return doc, res.headers

    def _discover(self, issuer: str) -> str:
        """The issuer's `jwks_uri`: from its OpenID discovery document, else from its OAuth 2.0
        authorization-server metadata (RFC 8414), whose well-known part goes before the issuer's path."""
        errors: list[str] = []
        for url in discovery_urls(issuer):
            try:
                return self._discover_at(issuer, url)
            except TokenFetchError as e:
                errors.append(str(e))
        raise TokenFetchError("; ".join(errors))

    def _discover_at(self, issuer: str, url: str) -> str:
        doc, _ = self._get_json(url)
        if doc.get("issuer") != issuer:
            raise TokenFetchError(f"{url}: discovery names issuer {str(doc.get('issuer'))[:200]!r}, not {issuer!r}")
        jwks_uri = doc.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
            raise TokenFetchError(f"{url}: no http(s) jwks_uri")
        if issuer.startswith("https://") and not jwks_uri.startswith("https://"):
            raise TokenFetchError(f"{url}: jwks_uri {jwks_uri!r} is not https for an https issuer")
        return jwks_uri

    def _fetch_keys(self, jwks_uri: str, now: float) -> KeySet:
        doc, headers = self._get_json(jwks_uri)
        raw = doc.get("keys")
        if not isinstance(raw, list):
            raise TokenFetchError(f"{jwks_uri}: no keys array")
        keys = tuple(k for k in (_load_key(j) for j in raw[:MAX_KEYS]) if k is not None)
        ttl = cache_lifetime(headers, now, self.config.default_key_ttl)
        ttl = min(max(ttl, self.config.min_refresh_interval), self.config.max_key_ttl)
        return KeySet(keys, now, now + ttl)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per issuer: number of keys, their age, and the last fetch error (for logs)."""
        now = self.clock()
        return {
            iss: {
                "keys": len(s.keys.keys) if s.keys else 0,
                "age": round(now - s.keys.fetched_at, 1) if s.keys else None,
                "error": s.last_error,
                "fetches": s.fetches,
                "fetch_errors": s.fetch_errors,
            }
            for iss, s in self._issuers.items()
        }


def discovery_urls(issuer: str) -> list[str]:
    """Where an issuer's metadata may be: OpenID discovery, then RFC 8414 (well-known part before the path)."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    base = f"{parts.scheme}://{parts.netloc}"
    return list(dict.fromkeys([
        issuer.rstrip("/") + "/.well-known/openid-configuration",
        f"{base}/.well-known/oauth-authorization-server{path}",
    ]))


def audience_key(value: str) -> str:
    """An audience as compared: for an http(s) URL, scheme and host are case-insensitive (RFC 3986)."""
    parts = urlsplit(value)
    if parts.scheme.lower() in ("http", "https") and parts.netloc:
        return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path, parts.query, parts.fragment))
    return value


def verify_blocking(verifier: Verifier, token: str, audiences: Sequence[str] | None = None) -> Identity:
    """Verify `token`, fetching keys on this thread when needed."""
    try:
        return verifier.verify(token, audiences)
    except KeysNeeded as k:
        verifier.refresh(k.issuer)
    return verifier.verify(token, audiences, may_refresh=False)


# --- helpers -------------------------------------------------------------------


def _split(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a compact JWS, decoded strictly (signature not checked yet)."""
    parts = token.split(".")
    # An empty signature is left to the algorithm check (alg "none") and the signature check.
    if len(parts) != 3 or not parts[0] or not parts[1] or not all(_B64URL.fullmatch(p) for p in parts):
        raise TokenError("malformed", "token is not a compact JWS (header.payload.signature)")
    try:
        header = loads_strict(_b64decode(parts[0]), max_bytes=4096, max_depth=4)
        claims = loads_strict(_b64decode(parts[1]), max_bytes=len(token), max_depth=16)
    except (ParseError, binascii.Error, ValueError):
        raise TokenError("malformed", "token header or payload is not base64url JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise TokenError("malformed", "token header or payload is not a JSON object")
    return header, claims


def _b64decode(segment: str) -> bytes:
    if len(segment) % 4 == 1:
        raise ValueError("bad base64url length")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _load_key(jwk_data: Any) -> _Key | None:
    """A usable public signing key from one JWK, or None (skipped: wrong use, symmetric, unreadable)."""
    if not isinstance(jwk_data, dict):
        return None
    kty = jwk_data.get("kty")
    if kty not in ("RSA", "EC", "OKP"):
        return None  # "oct" (HMAC) keys are never used; unknown types are skipped
    if jwk_data.get("use", "sig") != "sig":
        return None
    ops = jwk_data.get("key_ops")  # some issuers publish ["sign"] for the pair's public half
    if ops is not None and (not isinstance(ops, list) or not {"verify", "sign"} & set(ops)):
        return None
    alg = jwk_data.get("alg")
    if alg is not None and alg not in _ALG_KEY:
        return None
    kid = jwk_data.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    public = {k: v for k, v in jwk_data.items() if k not in _PRIVATE_MEMBERS and k != "key_ops"}
    try:
        key = jwt.PyJWK(public).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
        return None
    crv = jwk_data.get("crv")
    return _Key(kid, kty, crv if isinstance(crv, str) else None, alg, key)


def cache_lifetime(headers: Mapping[str, str], now: float, default: float) -> float:
    """Seconds a response may be cached, from Cache-Control (max-age, no-store/no-cache) or Expires."""
    cc = headers.get("cache-control", "").lower()
    directives = [d.strip() for d in cc.split(",") if d.strip()]
    if any(d in ("no-store", "no-cache") for d in directives):
        return 0.0
    for d in directives:
        name, _, value = d.partition("=")
        if name.strip() == "max-age":
            try:
                return max(0.0, float(int(value.strip().strip('"'))))
            except ValueError:
                break
    expires = headers.get("expires")
    if expires:
        try:
            when = email.utils.parsedate_to_datetime(expires).timestamp()
        except (TypeError, ValueError, IndexError):
            return 0.0  # an invalid Expires means "already expired" (RFC 9111 5.3)
        date = headers.get("date")
        try:
            base = email.utils.parsedate_to_datetime(date).timestamp() if date else now
        except (TypeError, ValueError, IndexError):
            base = now
        return max(0.0, when - base)
    return default


def claim_path(claims: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted claim path (`realm_access.roles`), or None.

    A claim whose own name contains dots (`https://example.com/groups`) is
    found too: the longest matching name is tried first at each level.
    """
    value: Any = claims
    rest = path
    while rest:
        if not isinstance(value, Mapping):
            return None
        parts = rest.split(".")
        for n in range(len(parts), 0, -1):
            name = ".".join(parts[:n])
            if name in value:
                value = value[name]
                rest = ".".join(parts[n:])
                break
        else:
            return None
    return value


def _strings(value: Any) -> tuple[str, ...]:
    """A claim that is one string or a list of strings (other list items are ignored)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def _scopes(claims: Mapping[str, Any]) -> tuple[str, ...]:
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            return tuple(value.split())
        if isinstance(value, list):
            return tuple(v for v in value if isinstance(v, str))
    return ()


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

