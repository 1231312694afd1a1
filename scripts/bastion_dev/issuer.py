"""
A small OpenID issuer for the demo, in pure Python: discovery, JWKS, and a
token endpoint that issues RS256 JWT access tokens for three demo identities.

    python -m bastion_dev.issuer --port 9100 [--audience http://127.0.0.1:8080]

or, from Python, `with DevIssuer(audience=...) as issuer: token = issuer.mint("alice")`.

| user     | client secret (dev only)  | groups        | scopes               |
|----------|---------------------------|---------------|----------------------|
| alice    | alice-dev-secret          | engineering   | mcp:tools mcp:admin  |
| carol    | carol-dev-secret          | contractors   | mcp:tools            |
| ci-bot   | ci-bot-dev-secret         | ci            | mcp:tools            |

Each identity is a client of the `client_credentials` grant (client_secret_basic
or client_secret_post); `resource` (RFC 8707) sets the token's audience. The
signing key is made fresh at every start and lives only in memory.
Not an identity provider: no login, no consent, no refresh tokens. For the
demo and local experiments only.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from mcp_bastion.cli.common import ArgumentParser, positive, run

logger = logging.getLogger("bastion_dev.issuer")

SCOPES = ("mcp:tools", "mcp:admin")


@dataclass(frozen=True)
class DemoUser:
    sub: str
    secret: str
    name: str
    groups: tuple[str, ...]
    scopes: tuple[str, ...]
    email: str | None = None


USERS = {
    u.sub: u
    for u in (
        DemoUser("alice", "alice-dev-secret", "Alice Martin", ("engineering",), SCOPES, "alice@acme.example"),
        DemoUser("bob", "bob-dev-secret", "Bob Okafor", ("engineering", "sre"), SCOPES, "bob@acme.example"),
        DemoUser("carol", "carol-dev-secret", "Carol Diaz", ("contractors",), ("mcp:tools",),
                 "carol@contractor.example"),
        DemoUser("ci-bot", "ci-bot-dev-secret", "CI bot", ("ci",), ("mcp:tools",)),
    )
}


class TokenRequestError(Exception):
    def __init__(self, status: int, error: str, description: str):
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


class DevIssuer:
    """The dev issuer: key, token minting, and an HTTP server (started by `start()`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, audience: str | None = None, ttl: int = 3600):
        self.audience = audience
        self.ttl = ttl
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        self.kid = _thumbprint(public)
        self._public_jwk = {**public, "kid": self.kid, "use": "sig", "alg": "RS256"}
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    # --- documents -----------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.url,
            "jwks_uri": f"{self.url}/jwks",
            "token_endpoint": f"{self.url}/token",
            # Only client_credentials is implemented; this endpoint answers unsupported_response_type.
            "authorization_endpoint": f"{self.url}/authorize",
            "grant_types_supported": ["client_credentials"],
            "response_types_supported": ["code"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            "scopes_supported": list(SCOPES),
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "claims_supported": ["sub", "name", "email", "groups", "scope", "client_id"],
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self._public_jwk]}

    # --- tokens --------------------------------------------------------------

    def mint(self, user: str, audience: str | None = None, scopes: tuple[str, ...] | None = None,
             ttl: int | None = None) -> str:
        """An access token for demo `user` (KeyError if there is no such user)."""
        u = USERS[user]
        aud = audience or self.audience
        if not aud:
            raise ValueError("no audience: pass one or start the issuer with audience=")
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.url,
            "sub": u.sub,
            "aud": aud,
            "iat": now,
            "nbf": now,
            "exp": now + (ttl or self.ttl),
            "jti": secrets.token_urlsafe(12),
            "client_id": u.sub,
            "name": u.name,
            "groups": list(u.groups),
            "scope": " ".join(scopes if scopes is not None else u.scopes),
        }
        if u.email:
            claims["email"] = u.email
        return jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid, "typ": "at+jwt"})

    def token_response(self, form: dict[str, list[str]], authorization: str | None) -> dict[str, Any]:
        """Answer a token request (form fields, Authorization header) or raise TokenRequestError."""
        user = self._client(form, authorization)
        grant = _one(form, "grant_type")
        if grant != "client_credentials":
            raise TokenRequestError(400, "unsupported_grant_type", "only client_credentials is supported")
        requested = tuple((_one(form, "scope") or "").split())
        if any(s not in user.scopes for s in requested):
            raise TokenRequestError(400, "invalid_scope", f"{user.sub} may have {' '.join(user.scopes)}")
        resource = _one(form, "resource") or self.audience
        if not resource or urlsplit(resource).scheme not in ("http", "https") or "#" in resource:
            raise TokenRequestError(400, "invalid_target", "an absolute http(s) resource is required")
        scopes = requested or user.scopes
        return {
            "access_token": self.mint(user.sub, resource, scopes),
            "token_type": "Bearer",
            "expires_in": self.ttl,
            "scope": " ".join(scopes),
        }

    def _client(self, form: dict[str, list[str]], authorization: str | None) -> DemoUser:
        client_id, secret = _one(form, "client_id"), _one(form, "client_secret")
        if authorization and authorization.lower().startswith("basic "):
            try:
                raw = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
            except ValueError:
                raise TokenRequestError(401, "invalid_client", "unreadable Basic credentials") from None
            cid, _, sec = raw.partition(":")
            client_id, secret = unquote(cid), unquote(sec)
        user = USERS.get(client_id or "")
        if user is None or secret is None or not hmac.compare_digest(user.secret.encode(), secret.encode()):
            raise TokenRequestError(401, "invalid_client", "unknown client or wrong secret")
        return user

    # --- server --------------------------------------------------------------

    def start(self) -> DevIssuer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="demo-issuer", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve on this thread until interrupted."""
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> DevIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler(issuer: DevIssuer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "mcp-bastion-demo-issuer"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
                self._json(200, issuer.discovery(), cache="public, max-age=300")
            elif path == "/jwks":
                self._json(200, issuer.jwks(), cache="public, max-age=300")
            elif path == "/authorize":
                self._json(400, {"error": "unsupported_response_type",
                                 "error_description": "the demo issuer only implements client_credentials"})
            else:
                self._json(404, {"error": "not_found"})

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != "/token":
                self._json(404, {"error": "not_found"})
                return
            length = int(self.headers.get("content-length") or 0)
            if length > 64 * 1024:
                self._json(413, {"error": "invalid_request", "error_description": "request too large"})
                return
            form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
            try:
                body = issuer.token_response(form, self.headers.get("authorization"))
            except TokenRequestError as e:
                extra = {"www-authenticate": 'Basic realm="demo-issuer"'} if e.status == 401 else {}
                self._json(e.status, {"error": e.error, "error_description": e.description}, extra=extra)
                return
            self._json(200, body)

        def _json(self, status: int, doc: dict, cache: str = "no-store", extra: dict | None = None) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("cache-control", cache)
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("%s %s", self.address_string(), format % args)

    return Handler


def _one(form: dict[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def _thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint of an RSA key."""
    canonical = json.dumps({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def _port(text: str) -> int:
    port = positive(int)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"not a port (1-65535): {text}")
    return port


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m bastion_dev.issuer",
                                 description="A small OpenID issuer for the demo: discovery, JWKS and a "
                                             "client_credentials token endpoint.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=_port, default=9100)
    ap.add_argument("--audience", help="audience of tokens requested without a resource parameter")
    ap.add_argument("--ttl", type=positive(int), default=3600, help="token lifetime in seconds")
    args = ap.parse_args(argv)
    try:
        issuer = DevIssuer(args.host, args.port, args.audience, args.ttl)
    except OSError as e:
        print(f"{ap.prog}: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"demo issuer {issuer.url} (dev only: fixed client secrets, key in memory)")
    for u in USERS.values():
        print(f"  {u.sub:7} secret {u.secret:18} groups {','.join(u.groups):12} scopes {' '.join(u.scopes)}")
    print(f"  token: curl -u alice:alice-dev-secret -d grant_type=client_credentials "
          f"-d resource=<gateway URL> {issuer.url}/token", flush=True)
    try:
        issuer.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    run(main, "python -m bastion_dev.issuer")
