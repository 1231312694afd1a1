"""
Identity end to end: a real OpenID provider (npm `oidc-provider`), a real
gateway (mitmdump with the bundle), a real MCP server (Python SDK, uvicorn)
that only accepts its own credential, and the Python SDK client.

- tokens come from the provider's client_credentials grant with RFC 8707
  resource indicators; the provider's keys are rotated (new key first, then the
  old one removed) and the gateway follows;
- a corpus of bad tokens, signed with the provider's own key where that
  matters, is refused with 401 and the right `WWW-Authenticate`;
- the SDK client starts with no token and no metadata, and finds its way
  through the protected-resource metadata to the provider and back;
- neither the client's token nor the upstream credential reaches the gateway's
  log, and the upstream never sees the client's token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from pathlib import Path

import httpx
import httpx2
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp import Client
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer

from harness import NODE22, ROOT, free_port, mitmdump_args, running, wait_port

pytestmark = pytest.mark.e2e

UPSTREAM_SECRET = "upstream-secret-4a7c1e"
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "identity-e2e", "version": "1"}}}
MCP_HEADERS = {"content-type": "application/json", "accept": "application/json, text/event-stream"}


def _key(kid: str) -> tuple[rsa.RSAPrivateKey, dict]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
    jwk.update(kid=kid, use="sig", alg="RS256")
    return key, jwk


K1, K2, K9 = _key("k1"), _key("k2"), _key("k9")


class Provider:
    """tests/peers/oidc_provider.mjs on a free port; its keys are rewritten and reloaded for rotation."""

    def __init__(self, workdir: Path):
        self.jwks_file = workdir / "provider-jwks.json"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def set_keys(self, *jwks: dict) -> None:
        self.jwks_file.write_text(json.dumps({"keys": list(jwks)}))

    def reload(self) -> None:
        assert httpx.post(f"{self.url}/admin/reload").status_code == 204

    def token(self, resource: str, client: str = "alice-agent", scope: str | None = "mcp:tools") -> str:
        data = {"grant_type": "client_credentials", "resource": resource}
        if scope:
            data["scope"] = scope
        r = httpx.post(f"{self.url}/token", data=data, auth=(client, client.split("-")[0] + "-secret"))
        assert r.status_code == 200, r.text
        return r.json()["access_token"]


class Upstream:
    """An MCP server (Python SDK) that accepts only its own credential and remembers every Authorization."""

    def __init__(self):
        self.seen: list[str] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        server = MCPServer("identity-upstream")

        @server.tool()
        def echo(text: str) -> str:
            """Echo `text`."""
            return f"echo: {text}"

        app = server.streamable_http_app()
        self.server = uvicorn.Server(uvicorn.Config(self._check(app), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))

    def _check(self, app):
        async def asgi(scope, receive, send):
            if scope["type"] == "http":
                auth = [v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"]
                self.seen.extend(auth)
                if auth != [f"Bearer {UPSTREAM_SECRET}"]:
                    await send({"type": "http.response.start", "status": 401, "headers": []})
                    await send({"type": "http.response.body", "body": b""})
                    return
            await app(scope, receive, send)

        return asgi

    def __enter__(self) -> Upstream:
        self.thread = threading.Thread(target=self.server.run, name="e2e-upstream", daemon=True)
        self.thread.start()
        wait_port(self.port)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("identity")
    provider = Provider(workdir)
    provider.set_keys(K1[1])
    gw_port = free_port()
    options = {
        "oidc_issuer": provider.url,
        "oidc_required_scopes": "mcp:tools",
        "oidc_jwks_min_refresh": 1,
        "upstream_token_env": "BASTION_E2E_UPSTREAM",
        "ruleset": str(ROOT / "rulesets" / "allow-all.yaml"),
        "flow_detail": 2,
    }
    with running([NODE22, str(ROOT / "tests" / "peers" / "oidc_provider.mjs")], provider.port,
                 env={"PORT": str(provider.port), "JWKS_FILE": str(provider.jwks_file), "JWKS_MAX_AGE": "1"}), \
            Upstream() as upstream:
        args = mitmdump_args(upstream.url, gw_port, options)
        with running(args, gw_port, env={"BASTION_E2E_UPSTREAM": UPSTREAM_SECRET}) as gw:
            yield provider, upstream, gw


def _origin(gw) -> str:
    return f"http://127.0.0.1:{gw.port}"


def _prm(gw) -> str:
    return f"{_origin(gw)}/.well-known/oauth-protected-resource"


def _post(gw, token: str | None, path: str = "/mcp") -> httpx.Response:
    headers = dict(MCP_HEADERS)
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return httpx.post(f"{_origin(gw)}{path}", json=INIT, headers=headers, timeout=30)


def _segments(token: str) -> tuple[dict, dict]:
    h, p, _ = token.split(".")
    return (json.loads(base64.urlsafe_b64decode(h + "=" * (-len(h) % 4))),
            json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _resign(token: str, key=K1[0], header: dict | None = None, **claims) -> str:
    """The provider's token with some claims changed, signed again with the provider's own key."""
    hdr, payload = _segments(token)
    payload = {**payload, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm="RS256",
                      headers={**{"kid": hdr["kid"], "typ": hdr["typ"]}, **(header or {})})


def _hs256_with_public_key(token: str) -> str:
    _, payload = _segments(token)
    pem = K1[0].public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = (f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': 'k1'}).encode())}."
                     f"{_b64(json.dumps(payload).encode())}")
    return f"{signing_input}.{_b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())}"


def _alg_none(token: str) -> str:
    _, payload = _segments(token)
    return f"{_b64(json.dumps({'alg': 'none'}).encode())}.{_b64(json.dumps(payload).encode())}."


def _tampered(token: str) -> str:
    h, p, s = token.split(".")
    _, payload = _segments(token)
    payload["groups"] = ["admins"]
    return f"{h}.{_b64(json.dumps(payload).encode())}.{s}"


def _bad_tokens(good: str, attacker_port: int) -> dict[str, str]:
    now = int(time.time())
    return {
        "expired": _resign(good, exp=now - 3600, iat=now - 7200),
        "not yet valid": _resign(good, nbf=now + 3600),
        "wrong issuer": _resign(good, iss="http://127.0.0.1:1"),
        "wrong audience": _resign(good, aud="http://127.0.0.1:1/mcp"),
        "alg none": _alg_none(good),
        "HS256 signed with the issuer's public key": _hs256_with_public_key(good),
        "unknown kid": _resign(good, key=K9[0], header={"kid": "k9"}),
        "tampered payload": _tampered(good),
        "garbage": "garbage",
        "oversized": _resign(good, pad="x" * 20_000),
        "jku pointing elsewhere": _resign(good, key=K9[0], header={"jku": f"http://127.0.0.1:{attacker_port}/jwks"}),
    }


# --- tests ---------------------------------------------------------------------------------


def test_protected_resource_metadata_is_served(stack):
    provider, _, gw = stack
    for url, resource in ((_prm(gw), _origin(gw)), (_prm(gw) + "/mcp", _origin(gw) + "/mcp")):
        r = httpx.get(url)
        assert r.status_code == 200
        assert r.json() == {
            "resource": resource,
            "authorization_servers": [provider.url],
            "bearer_methods_supported": ["header"],
            "resource_signing_alg_values_supported": r.json()["resource_signing_alg_values_supported"],
            "scopes_supported": ["mcp:tools"],
        }


def test_no_token_is_401_with_the_metadata_challenge(stack):
    _, upstream, gw = stack
    seen = len(upstream.seen)
    r = _post(gw, None)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == f'Bearer resource_metadata="{_prm(gw)}", scope="mcp:tools"'
    assert r.json()["error"]["code"] == -31004
    assert len(upstream.seen) == seen


def test_bad_token_corpus(stack):
    provider, upstream, gw = stack
    good = provider.token(_origin(gw))
    assert _post(gw, good).status_code == 200
    seen = len(upstream.seen)
    for name, token in _bad_tokens(good, free_port()).items():
        r = _post(gw, token)
        assert r.status_code == 401, name
        www = r.headers["www-authenticate"]
        assert www.startswith(f'Bearer resource_metadata="{_prm(gw)}"'), name
        assert 'error="invalid_token"' in www, (name, www)
        assert r.json()["error"]["code"] == -31004, name
    assert len(upstream.seen) == seen  # none of them reached the upstream


def test_missing_scope_is_403_insufficient_scope(stack):
    provider, _, gw = stack
    r = _post(gw, provider.token(_origin(gw), scope=None))
    assert r.status_code == 403
    assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
    assert 'scope="mcp:tools"' in r.headers["www-authenticate"]
    assert r.json()["error"]["code"] == -31005


def test_token_in_query_string_is_refused(stack):
    provider, upstream, gw = stack
    seen = len(upstream.seen)
    r = _post(gw, None, path=f"/mcp?access_token={provider.token(_origin(gw))}")
    assert r.status_code == 400
    assert 'error="invalid_request"' in r.headers["www-authenticate"]
    assert len(upstream.seen) == seen


def test_upstream_sees_only_its_own_credential(stack):
    provider, upstream, gw = stack
    for client in ("alice-agent", "carol-agent"):
        assert _post(gw, provider.token(_origin(gw), client=client)).status_code == 200
    assert upstream.seen and set(upstream.seen) == {f"Bearer {UPSTREAM_SECRET}"}


class MemoryStorage:
    def __init__(self):
        self.tokens = None
        self.client_info = None

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens) -> None:
        self.tokens = tokens

    async def get_client_info(self):
        return self.client_info

    async def set_client_info(self, client_info) -> None:
        self.client_info = client_info


def test_sdk_client_discovers_metadata_and_reaches_the_upstream(stack):
    provider, upstream, gw = stack
    storage = MemoryStorage()
    auth = ClientCredentialsOAuthProvider(
        server_url=f"{_origin(gw)}/mcp", storage=storage, client_id="carol-agent", client_secret="carol-secret",
        issuer=provider.url,
    )

    async def session() -> tuple[list[str], str]:
        async with httpx2.AsyncClient(auth=auth, timeout=30) as http:
            async with Client(streamable_http_client(f"{_origin(gw)}/mcp", http_client=http), mode="legacy") as client:
                tools = await client.list_tools()
                result = await client.call_tool("echo", {"text": "hi"})
                return [t.name for t in tools.tools], result.content[0].text

    assert storage.tokens is None
    names, text = asyncio.run(session())
    assert names == ["echo"] and text == "echo: hi"
    assert auth.context.protected_resource_metadata is not None  # found through the 401's resource_metadata
    claims = _segments(storage.tokens.access_token)[1]
    assert claims["groups"] == ["contractors"] and claims["iss"] == provider.url
    assert set(upstream.seen) == {f"Bearer {UPSTREAM_SECRET}"}


def test_key_rotation(stack):
    provider, _, gw = stack
    old = provider.token(_origin(gw))
    assert _segments(old)[0]["kid"] == "k1"
    assert _post(gw, old).status_code == 200

    provider.set_keys(K2[1], K1[1])  # the new key signs; the old one is still published
    provider.reload()
    new = provider.token(_origin(gw))
    assert _segments(new)[0]["kid"] == "k2"
    time.sleep(1.2)  # past the gateway's refresh rate limit (oidc_jwks_min_refresh=1)
    assert _post(gw, new).status_code == 200  # unknown kid: the gateway refetched the JWKS
    assert _post(gw, old).status_code == 200

    provider.set_keys(K2[1])  # the old key is removed
    provider.reload()
    time.sleep(1.2)  # past the JWKS max-age (1 s) the provider announces
    r = _post(gw, old)
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert r.json()["error"]["data"]["reason"] == "unknown_key"
    assert _post(gw, new).status_code == 200
    assert _post(gw, provider.token(_origin(gw))).status_code == 200


def test_no_token_in_the_gateway_log(stack):
    provider, _, gw = stack
    token = provider.token(_origin(gw))
    assert _post(gw, token).status_code == 200
    assert _post(gw, _resign(token, exp=1)).status_code == 401
    log = gw.output()
    assert "POST" in log  # flows are logged (flow_detail=2: with request headers)
    assert token not in log and token.split(".")[2] not in log
    assert UPSTREAM_SECRET not in log
