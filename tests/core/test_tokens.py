"""
Unit tests of core.tokens: discovery, the JWKS cache and token verification,
with an in-memory issuer (injected fetch) and an injected clock. No network.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from mcp_bastion.core.tokens import (
    FetchResult,
    KeysNeeded,
    TokenError,
    Verifier,
    VerifierConfig,
    cache_lifetime,
    claim_path,
    verify_blocking,
)

ISS = "https://idp.test"
AUD = "https://mcp.test/mcp"
T0 = 1_800_000_000.0

_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_RSA2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
_EC256 = ec.generate_private_key(ec.SECP256R1())
_EC384 = ec.generate_private_key(ec.SECP384R1())
_ED = ed25519.Ed25519PrivateKey.generate()


def _public_jwk(key, kid: str, alg: str | None = None) -> dict:
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(pub, as_dict=True)
    else:
        jwk = jwt.algorithms.OKPAlgorithm.to_jwk(pub, as_dict=True)
    jwk.update(kid=kid, use="sig")
    if alg:
        jwk["alg"] = alg
    return jwk


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeIssuer:
    """An issuer in memory: discovery + JWKS served through the injected fetch."""

    def __init__(self, clock: Clock, issuer: str = ISS):
        self.issuer = issuer
        self.clock = clock
        self.jwks: list[dict] = [_public_jwk(_RSA, "k1", "RS256")]
        self.jwks_headers = {"cache-control": "max-age=300"}
        self.discovery = {"issuer": issuer, "jwks_uri": f"{issuer}/keys"}
        self.down = False
        self.calls: list[str] = []
        self.oauth_only = False  # serve RFC 8414 authorization-server metadata instead of OpenID discovery
        parts = issuer.split("/", 3)
        self.rfc8414_url = f"{parts[0]}//{parts[2]}/.well-known/oauth-authorization-server" + (
            "/" + parts[3] if len(parts) > 3 and parts[3] else "")

    def fetch(self, url: str) -> FetchResult:
        self.calls.append(url)
        if self.down:
            raise OSError("connection refused")
        if url == f"{self.issuer}/.well-known/openid-configuration" and not self.oauth_only:
            return FetchResult(200, {}, json.dumps(self.discovery).encode())
        if url == self.rfc8414_url and self.oauth_only:
            return FetchResult(200, {}, json.dumps(self.discovery).encode())
        if url == self.discovery.get("jwks_uri"):
            return FetchResult(200, self.jwks_headers, json.dumps({"keys": self.jwks}).encode())
        return FetchResult(404, {}, b"")

    def claims(self, **over) -> dict:
        now = int(self.clock.now)
        claims = {"iss": self.issuer, "sub": "alice", "aud": AUD, "iat": now, "nbf": now, "exp": now + 600,
                  "scope": "mcp:tools", "groups": ["engineering"], "client_id": "agent-1",
                  "email": "alice@acme.example", "name": "Alice"}
        claims.update(over)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, key=_RSA, alg: str = "RS256", kid: str | None = "k1", headers: dict | None = None, **over) -> str:
        hdr = {"kid": kid} if kid is not None else {}
        hdr.update(headers or {})
        return jwt.encode(self.claims(**over), key, algorithm=alg, headers=hdr)


def raw_jws(header: dict, claims: dict, sign=lambda signing_input: b"") -> str:
    def seg(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{seg(json.dumps(header).encode())}.{seg(json.dumps(claims).encode())}"
    return f"{signing_input}.{seg(sign(signing_input.encode()))}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def idp(clock) -> FakeIssuer:
    return FakeIssuer(clock)


def make(idp: FakeIssuer, clock: Clock, **cfg) -> Verifier:
    cfg.setdefault("issuers", (ISS,))
    cfg.setdefault("audiences", (AUD,))
    return Verifier(VerifierConfig(**cfg), fetch=idp.fetch, clock=clock)


def refused(verifier: Verifier, token: str, **kw) -> TokenError:
    with pytest.raises(TokenError) as e:
        verify_blocking(verifier, token, **kw)
    return e.value


# --- the good path --------------------------------------------------------------


def test_valid_token_gives_identity_and_fetches_keys_once(idp, clock):
    v = make(idp, clock)
    with pytest.raises(KeysNeeded):
        v.verify(idp.token())  # no keys yet: verify() itself never fetches
    assert idp.calls == []
    ident = verify_blocking(v, idp.token())
    assert ident.as_metadata() == {
        "sub": "alice", "email": "alice@acme.example", "name": "Alice", "groups": ["engineering"],
        "iss": ISS, "client_id": "agent-1", "scopes": ["mcp:tools"],
    }
    verify_blocking(v, idp.token(sub="bob"))
    assert idp.calls == [f"{ISS}/.well-known/openid-configuration", f"{ISS}/keys"]


@pytest.mark.parametrize(
    "key, alg, jwk",
    [
        (_RSA, "PS256", _public_jwk(_RSA, "k1")),
        (_RSA, "RS512", _public_jwk(_RSA, "k1")),
        (_EC256, "ES256", _public_jwk(_EC256, "k1")),
        (_EC384, "ES384", _public_jwk(_EC384, "k1")),
        (_ED, "EdDSA", _public_jwk(_ED, "k1")),
    ],
)
def test_asymmetric_algorithms(idp, clock, key, alg, jwk):
    idp.jwks = [jwk]
    assert verify_blocking(make(idp, clock), idp.token(key=key, alg=alg)).sub == "alice"


def test_key_is_used_only_with_a_matching_algorithm(idp, clock):
    # an RS256-only key does not verify PS256; a P-384 key does not verify ES256
    idp.jwks = [_public_jwk(_RSA, "k1", "RS256"), _public_jwk(_EC384, "e1")]
    v = make(idp, clock)
    assert refused(v, idp.token(alg="PS256")).reason == "alg_key_mismatch"
    assert refused(v, idp.token(key=_EC256, alg="ES256", kid="e1")).reason == "alg_key_mismatch"


def test_identity_details(idp, clock):
    v = make(idp, clock, groups_claim="realm_access.roles")
    ident = verify_blocking(v, idp.token(realm_access={"roles": ["ops", 7, "dev"]}, scope=None,
                                          scp=["a", "b"], email=None, name=None, preferred_username="al",
                                          client_id=None, azp="agent-2"))
    assert ident.groups == ("ops", "dev")
    assert ident.scopes == ("a", "b")
    assert ident.name == "al" and ident.email is None and ident.client_id == "agent-2"
    assert "email" not in ident.as_metadata()


def test_claim_path():
    claims = {"a": {"b": {"c": ["x"]}}, "https://example.com/groups": ["g"], "s": "one"}
    assert claim_path(claims, "a.b.c") == ["x"]
    assert claim_path(claims, "https://example.com/groups") == ["g"]
    assert claim_path(claims, "a.x") is None
    assert claim_path(claims, "s.t") is None


def test_audience_list_and_per_call_audiences(idp, clock):
    v = make(idp, clock)
    assert verify_blocking(v, idp.token(aud=["other", AUD])).sub == "alice"
    assert verify_blocking(v, idp.token(aud="https://x.test"), audiences=["https://x.test"]).sub == "alice"
    assert refused(v, idp.token(aud="https://x.test")).reason == "wrong_audience"


def test_leeway_on_time_claims(idp, clock):
    v = make(idp, clock, leeway=30)
    now = int(clock.now)
    assert verify_blocking(v, idp.token(exp=now - 10)).sub == "alice"
    assert verify_blocking(v, idp.token(nbf=now + 10, iat=now + 10)).sub == "alice"
    assert refused(v, idp.token(exp=now - 31)).reason == "expired"


# --- the corpus of bad tokens ------------------------------------------------------


def _hs256_with_public_key(idp: FakeIssuer) -> str:
    pem = _RSA.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return raw_jws({"alg": "HS256", "typ": "JWT", "kid": "k1"}, idp.claims(),
                   lambda si: hmac.new(pem, si, hashlib.sha256).digest())


def _tampered(idp: FakeIssuer) -> str:
    h, _, s = idp.token().split(".")
    payload = base64.urlsafe_b64encode(json.dumps(idp.claims(sub="root", groups=["admins"])).encode())
    return f"{h}.{payload.rstrip(b'=').decode()}.{s}"


BAD = {
    "expired": (lambda i: i.token(exp=int(i.clock.now) - 3600), "expired"),
    "not yet valid": (lambda i: i.token(nbf=int(i.clock.now) + 3600), "not_yet_valid"),
    "issued in the future": (lambda i: i.token(iat=int(i.clock.now) + 3600), "bad_iat"),
    "no exp": (lambda i: i.token(exp=None), "missing_exp"),
    "wrong issuer": (lambda i: i.token(iss="https://evil.test"), "untrusted_issuer"),
    "issuer with trailing slash": (lambda i: i.token(iss=ISS + "/"), "untrusted_issuer"),
    "wrong audience": (lambda i: i.token(aud="https://other.test"), "wrong_audience"),
    "no audience": (lambda i: i.token(aud=None), "missing_audience"),
    "alg none": (lambda i: raw_jws({"alg": "none"}, i.claims()), "alg_not_allowed"),
    "alg none with signature": (lambda i: raw_jws({"alg": "none", "kid": "k1"}, i.claims(), lambda si: b"x"),
                                "alg_not_allowed"),
    "HS256 with the public key": (_hs256_with_public_key, "alg_not_allowed"),
    "unknown kid": (lambda i: i.token(key=_RSA2, kid="k9"), "unknown_key"),
    "known kid, other key": (lambda i: i.token(key=_RSA2), "bad_signature"),
    "tampered payload": (_tampered, "bad_signature"),
    "garbage": (lambda i: "not-a-token", "malformed"),
    "garbage segments": (lambda i: "a.b.c", "malformed"),
    "non-JSON header": (lambda i: "bm90anNvbg.e30.c2ln", "malformed"),
    "oversized": (lambda i: i.token(pad="x" * 20_000), "oversized"),
    "jku pointing elsewhere": (lambda i: i.token(headers={"jku": "https://evil.test/jwks"}), "key_header"),
    "embedded jwk": (lambda i: i.token(key=_RSA2, headers={"jwk": _public_jwk(_RSA2, "k1")}), "key_header"),
    "x5u": (lambda i: i.token(headers={"x5u": "https://evil.test/cert"}), "key_header"),
    "crit header": (lambda i: i.token(headers={"crit": ["exp"], "exp": 1}), "crit_header"),
    "duplicate claim": (lambda i: i.token().split(".")[0] + "."
                        + base64.urlsafe_b64encode(b'{"sub":"a","sub":"b"}').rstrip(b"=").decode() + ".c2ln",
                        "malformed"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_tokens_are_refused(idp, clock, name):
    make_token, reason = BAD[name]
    err = refused(make(idp, clock), make_token(idp))
    assert (err.status, err.error, err.reason) == (401, "invalid_token", reason)


def test_error_descriptions_never_contain_the_token(idp, clock):
    v = make(idp, clock)
    for make_token, _ in BAD.values():
        token = make_token(idp)
        err = refused(v, token)
        assert token not in str(err) and token[-20:] not in str(err)


def test_required_scopes(idp, clock):
    v = make(idp, clock, required_scopes=("mcp:tools", "mcp:admin"))
    err = refused(v, idp.token())
    assert (err.status, err.error, err.scope) == (403, "insufficient_scope", "mcp:tools mcp:admin")
    assert verify_blocking(v, idp.token(scope="mcp:admin mcp:tools openid")).sub == "alice"
    # a cached token is checked again
    err = refused(v, idp.token())
    assert err.status == 403


# --- the JWKS cache ------------------------------------------------------------------


def test_unknown_kid_refreshes_once_within_the_rate_limit(idp, clock):
    v = make(idp, clock, min_refresh_interval=30)
    verify_blocking(v, idp.token())
    idp.jwks.append(_public_jwk(_RSA2, "k2", "RS256"))
    clock.now += 31
    assert verify_blocking(v, idp.token(key=_RSA2, kid="k2")).sub == "alice"  # refetched on the new kid
    fetches = len(idp.calls)
    clock.now += 1
    assert refused(v, idp.token(key=_RSA2, kid="k3")).reason == "unknown_key"
    assert len(idp.calls) == fetches  # 1 s after the last fetch: rate-limited
    clock.now += 30
    assert refused(v, idp.token(key=_RSA2, kid="k3")).reason == "unknown_key"
    assert refused(v, idp.token(key=_RSA2, kid="k4")).reason == "unknown_key"
    assert len(idp.calls) == fetches + 1  # one refetch for k3; none for k4


def test_cache_control_is_honoured_and_removed_keys_refuse_cached_tokens(idp, clock):
    idp.jwks_headers = {"cache-control": "public, max-age=60"}
    idp.jwks = [_public_jwk(_RSA, "k1"), _public_jwk(_RSA2, "k2")]
    v = make(idp, clock, min_refresh_interval=5)
    old = idp.token()
    assert verify_blocking(v, old).sub == "alice"
    idp.jwks = [_public_jwk(_RSA2, "k2")]  # k1 rotated out at the issuer
    clock.now += 30
    assert verify_blocking(v, old).sub == "alice"  # within max-age: the cached key set stands
    calls = len(idp.calls)
    clock.now += 31
    assert refused(v, old).reason == "unknown_key"
    assert len(idp.calls) == calls + 1
    assert verify_blocking(v, idp.token(key=_RSA2, kid="k2")).sub == "alice"


def test_keys_survive_an_outage_for_max_stale_then_refuse(idp, clock):
    idp.jwks_headers = {"cache-control": "max-age=100"}
    v = make(idp, clock, max_stale=1000, min_refresh_interval=10)
    verify_blocking(v, idp.token())
    idp.down = True
    clock.now += 500
    assert verify_blocking(v, idp.token()).sub == "alice"  # stale but within bounds
    assert v.status()[ISS]["error"].endswith("connection refused")
    clock.now += 700  # 1200 s after the fetch: 100 s TTL + 1000 s stale exceeded
    err = refused(v, idp.token())
    assert (err.status, err.reason) == (503, "keys_unavailable")
    idp.down = False
    clock.now += 10
    assert verify_blocking(v, idp.token()).sub == "alice"


def test_no_keys_and_issuer_down(idp, clock):
    idp.down = True
    v = make(idp, clock)
    err = refused(v, idp.token())
    assert (err.status, err.reason) == (503, "keys_unavailable")
    calls = len(idp.calls)
    refused(v, idp.token())
    assert len(idp.calls) == calls  # failures are rate-limited too


@pytest.mark.parametrize(
    "discovery, error",
    [
        ({"issuer": "https://evil.test", "jwks_uri": f"{ISS}/keys"}, "discovery names issuer"),
        ({"issuer": ISS, "jwks_uri": "http://idp.test/keys"}, "not https"),
        ({"issuer": ISS}, "no http(s) jwks_uri"),
    ],
)
def test_discovery_is_checked(idp, clock, discovery, error):
    idp.discovery = discovery
    v = make(idp, clock)
    assert error in v.refresh(ISS)
    assert refused(v, idp.token()).status == 503


def test_jwks_entries_that_are_not_public_signing_keys_are_ignored(idp, clock):
    private = jwt.algorithms.RSAAlgorithm.to_jwk(_RSA, as_dict=True)
    private.update(kid="k1")
    idp.jwks = [
        {"kty": "oct", "kid": "h1", "k": base64.urlsafe_b64encode(b"secret").decode()},
        {**_public_jwk(_RSA2, "enc"), "use": "enc"},
        {"kty": "RSA", "kid": "broken", "n": "AQAB"},
        "not a key",
        private,  # private members are dropped, the public half is used
    ]
    v = make(idp, clock)
    assert verify_blocking(v, idp.token()).sub == "alice"
    assert v.status()[ISS]["keys"] == 1
    hs = raw_jws({"alg": "HS256", "kid": "h1"}, idp.claims(),
                 lambda si: hmac.new(b"secret", si, hashlib.sha256).digest())
    assert refused(v, hs).reason == "alg_not_allowed"


def test_token_without_kid_uses_the_only_fitting_key(idp, clock):
    v = make(idp, clock)
    assert verify_blocking(v, idp.token(kid=None)).sub == "alice"
    idp.jwks.append(_public_jwk(_RSA2, "k2"))
    clock.now += 301  # past the key set's max-age: refetched, now ambiguous
    assert refused(v, idp.token(kid=None)).reason == "unknown_key"


def test_verified_cache_never_outlives_exp(idp, clock):
    v = make(idp, clock, leeway=0)
    token = idp.token(exp=int(clock.now) + 60)
    verify_blocking(v, token)
    clock.now += 59
    assert v.verify(token).sub == "alice"
    clock.now += 1
    assert refused(v, token).reason == "expired"


def test_verified_cache_is_bounded(idp, clock):
    v = make(idp, clock, cache_size=3)
    for i in range(10):
        verify_blocking(v, idp.token(sub=f"u{i}"))
    assert len(v._cache) == 3


def test_several_issuers(clock):
    a, b = FakeIssuer(clock, "https://a.test"), FakeIssuer(clock, "https://b.test")
    b.jwks = [_public_jwk(_EC256, "k1")]

    def fetch(url: str) -> FetchResult:
        return (a if url.startswith("https://a.test") else b).fetch(url)

    v = Verifier(VerifierConfig(issuers=("https://a.test", "https://b.test"), audiences=(AUD,)), fetch, clock)
    assert verify_blocking(v, a.token()).iss == "https://a.test"
    assert verify_blocking(v, b.token(key=_EC256, alg="ES256")).iss == "https://b.test"
    # b's key id with a's algorithm family: not accepted
    assert refused(v, b.token(alg="RS256")).reason == "alg_key_mismatch"


@pytest.mark.parametrize(
    "cfg",
    [
        {"algorithms": ("HS256",)},
        {"algorithms": ("none",)},
        {"algorithms": ()},
        {"issuers": ()},
        {"issuers": ("idp.test",)},
        {"leeway": -1},
        {"groups_claim": "a..b"},
        {"min_refresh_interval": 0},
    ],
)
def test_config_refuses_unsafe_settings(cfg):
    cfg = {"issuers": (ISS,), **cfg}
    with pytest.raises(ValueError):
        VerifierConfig(**cfg)


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({}, 77.0),
        ({"cache-control": "public, max-age=120"}, 120.0),
        ({"cache-control": "no-store"}, 0.0),
        ({"cache-control": "max-age=60, no-cache"}, 0.0),
        ({"expires": "Thu, 01 Jan 2026 00:10:00 GMT", "date": "Thu, 01 Jan 2026 00:00:00 GMT"}, 600.0),
        ({"expires": "0"}, 0.0),
    ],
)
def test_cache_lifetime(headers, expected):
    assert cache_lifetime(headers, time.time(), 77.0) == expected


# --- properties ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_is_refused_cleanly(text):
    clock = Clock()
    idp = FakeIssuer(clock)
    v = make(idp, clock)
    with pytest.raises(TokenError):
        verify_blocking(v, text)


_GOOD = FakeIssuer(Clock()).token()


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=len(_GOOD) - 2), st.sampled_from("AQgw-_.9z"))
def test_changed_tokens_are_refused(pos, char):
    # the last character of a segment may carry unused bits: leave it alone
    if _GOOD[pos] == char or _GOOD[pos + 1] == "." or _GOOD[pos] == ".":
        return
    clock = Clock()
    idp = FakeIssuer(clock)
    v = make(idp, clock)
    mutated = _GOOD[:pos] + char + _GOOD[pos + 1:]
    with pytest.raises(TokenError):
        verify_blocking(v, mutated)



def test_a_token_arriving_during_the_first_key_fetch_waits_for_it(idp, clock):
    """The start-up fetch is under way when a request comes: it must wait for it, not get 503."""
    import threading

    v = make(idp, clock)
    release, fetching = threading.Event(), threading.Event()
    serve = idp.fetch

    def slow_fetch(url):
        if url == idp.discovery["jwks_uri"]:
            fetching.set()
            release.wait(10)
        return serve(url)

    v.fetch = slow_fetch
    first = threading.Thread(target=v.refresh, args=(ISS,))
    first.start()
    assert fetching.wait(10)
    token = idp.token()
    with pytest.raises(KeysNeeded):  # not TokenError("keys_unavailable"): the caller refreshes, i.e. waits
        v.verify(token)
    waiter = threading.Thread(target=v.refresh, args=(ISS,))
    waiter.start()
    release.set()
    first.join(10)
    waiter.join(10)
    assert v.verify(token, may_refresh=False).sub == "alice"
    assert idp.calls.count(idp.discovery["jwks_uri"]) == 1  # the waiter did not fetch again


@pytest.mark.parametrize("issuer", [ISS, "https://idp.test/realms/acme"])
def test_keys_are_found_through_rfc8414_metadata_without_openid_discovery(clock, issuer):
    idp = FakeIssuer(clock, issuer)
    idp.oauth_only = True
    v = make(idp, clock, issuers=(issuer,))
    assert v.refresh(issuer) is None, idp.calls
    assert idp.calls[-2:] == [idp.rfc8414_url, idp.discovery["jwks_uri"]]
    assert v.verify(idp.token(), [AUD]).sub == "alice"


@pytest.mark.parametrize("aud", ["https://MCP.TEST/mcp", "HTTPS://mcp.test/mcp", "https://Mcp.Test/mcp"])
def test_the_host_part_of_an_audience_is_compared_case_insensitively(idp, clock, aud):
    v = make(idp, clock)
    v.refresh(ISS)
    assert v.verify(idp.token(aud=aud), [AUD]).sub == "alice"


def test_the_path_of_an_audience_stays_case_sensitive(idp, clock):
    v = make(idp, clock)
    v.refresh(ISS)
    assert refused(v, idp.token(aud="https://mcp.test/MCP")).reason == "wrong_audience"
