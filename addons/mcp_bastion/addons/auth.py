"""
Identity: every MCP request carries an OIDC bearer token the gateway verifies
before anything reaches the upstream; the token never goes further.

- Verification (discovery, JWKS cache, claim checks) lives in `core.tokens`;
  this addon reads the `Authorization` header, fetches keys off the event loop
  when needed, and answers refusals the way the MCP authorization spec asks:
  401 with `WWW-Authenticate: Bearer resource_metadata="..."` (plus `error=`
  per RFC 6750), 403 `insufficient_scope`.
- It serves RFC 9728 protected-resource metadata at
  `/.well-known/oauth-protected-resource` (and the path-suffixed form).
- No token passthrough: `Auth` removes the client's `Authorization` header
  from every MCP request, refused or not. `UpstreamToken` (addons/upstream_token.py), placed after the Gate,
  sets the upstream's own credential (from an environment variable or a file)
  on requests that are actually forwarded, lists its header name in
  `flow.metadata["bastion.secret_headers"]` for the recorders, and takes it
  off the flow again once the request has been sent.
- The verified identity travels on the flow as `flow.metadata[Meta.IDENTITY]`.

With no `oidc_issuer`, identity checks are off (a warning says so at start):
the identity is None, but the client's credentials are still stripped.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from urllib.parse import urlsplit

from mitmproxy import ctx, exceptions, http
from mitmproxy.net.http import url
from mitmproxy.utils import asyncio_utils

from mcp_bastion.core import errors
from mcp_bastion.core.errors import Refusal
from mcp_bastion.core.tokens import (
    ASYMMETRIC_ALGORITHMS,
    KeysNeeded,
    TokenError,
    Verifier,
    VerifierConfig,
)
from mcp_bastion.core.vocab import Action, Direction, Meta, StageName
from mcp_bastion.glue import approvals_page, replies
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.failclosed import fail_closed
from mcp_bastion.glue.replies import refuse

logger = logging.getLogger("mcp_bastion")

PRM_PATH = "/.well-known/oauth-protected-resource"
_CHALLENGE_TEXT = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")  # RFC 6750 error_description charset


class Auth:
    """Verifies bearer tokens, serves protected-resource metadata, strips the client's credentials."""

    def __init__(self) -> None:
        self.verifier: Verifier | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "oidc_issuer", Sequence[str], [],
            """
            Trusted OpenID issuers (exact `iss` values, e.g. https://idp.example.com/realms/acme);
            keys come from each issuer's /.well-known/openid-configuration. Empty: identity
            checks are off and every caller is anonymous.
            """,
        )
        loader.add_option(
            "oidc_audience", Sequence[str], [],
            "Accepted token audiences (`aud`). Empty: the protected resource (oidc_resource, or as derived).",
        )
        loader.add_option(
            "oidc_resource", str, "",
            """
            The MCP server's URL as clients know it (RFC 8707 resource, e.g.
            https://mcp.example.com/mcp), announced in the protected-resource metadata.
            Empty: the gateway's own origins (the port clients connect to, with the loopback
            names, listen_host and literal allowed_hosts), never a name the client sends.
            """,
        )
        loader.add_option(
            "oidc_algorithms", Sequence[str], list(ASYMMETRIC_ALGORITHMS),
            f"Accepted signature algorithms: a subset of {', '.join(ASYMMETRIC_ALGORITHMS)}.",
        )
        loader.add_option("oidc_leeway", int, 30, "Clock skew tolerated on exp/nbf/iat, in seconds.")
        loader.add_option(
            "oidc_groups_claim", str, "groups",
            "Claim carrying the caller's groups, as a dotted path (e.g. realm_access.roles).",
        )
        loader.add_option(
            "oidc_required_scopes", Sequence[str], [],
            "Scopes every token must carry (else 403 insufficient_scope); announced as scopes_supported.",
        )
        loader.add_option(
            "oidc_jwks_cache", int, 300,
            "Seconds an issuer's JWKS is kept when its response has no cache headers.",
        )
        loader.add_option(
            "oidc_jwks_min_refresh", int, 30,
            "Least seconds between two JWKS fetches for one issuer (an unknown kid triggers one).",
        )
        loader.add_option(
            "oidc_jwks_max_stale", int, 3600,
            "Seconds cached keys keep working past their lifetime while the issuer cannot be reached.",
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if any(name.startswith("oidc_") for name in updated):
            if opts.oidc_resource:
                parts = urlsplit(opts.oidc_resource)
                if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
                    raise exceptions.OptionsError(
                        f"oidc_resource must be an http(s) URL without query or fragment: {opts.oidc_resource!r}"
                    )
            bad = [a for a in opts.oidc_algorithms if a not in ASYMMETRIC_ALGORITHMS]
            if bad or not opts.oidc_algorithms:  # refused even while identity is off: it would be on later
                raise exceptions.OptionsError(
                    f"oidc_algorithms must be a non-empty subset of {', '.join(ASYMMETRIC_ALGORITHMS)}; refused: {bad}")
            self.verifier = self._make_verifier() if opts.oidc_issuer else None

    def _make_verifier(self) -> Verifier:
        opts = ctx.options
        try:
            config = VerifierConfig(
                issuers=tuple(opts.oidc_issuer),
                algorithms=tuple(opts.oidc_algorithms),
                leeway=opts.oidc_leeway,
                groups_claim=opts.oidc_groups_claim,
                required_scopes=tuple(opts.oidc_required_scopes),
                default_key_ttl=opts.oidc_jwks_cache,
                min_refresh_interval=opts.oidc_jwks_min_refresh,
                max_stale=opts.oidc_jwks_max_stale,
            )
        except ValueError as e:
            raise exceptions.OptionsError(f"oidc: {e}") from None
        return Verifier(config)

    def running(self) -> None:
        if self.verifier is None:
            logger.warning(
                "mcp-bastion: IDENTITY CHECKS ARE OFF (no oidc_issuer set): every caller is anonymous "
                "and any request is forwarded without a token check"
            )
            return
        if not (ctx.options.oidc_resource or ctx.options.oidc_audience):
            logger.warning("mcp-bastion: no oidc_resource set: tokens must name one of this gateway's own origins "
                           "(http://localhost:PORT, http://127.0.0.1:PORT, listen_host, allowed_hosts names); "
                           "set oidc_resource to the URL clients use")
        asyncio_utils.create_task(self._prefetch(self.verifier), name="mcp-bastion: fetch issuer keys", keep_ref=True)

    async def _prefetch(self, verifier: Verifier) -> None:
        for issuer in verifier.config.issuers:
            error = await asyncio.to_thread(verifier.refresh, issuer)
            if error:
                logger.error("mcp-bastion: cannot fetch the signing keys of %s: %s", issuer, error)
            else:
                logger.info("mcp-bastion: issuer %s: %s", issuer, verifier.status()[issuer])

    # --- requests ------------------------------------------------------------

    @fail_closed(StageName.AUTH)
    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        if not fs.is_mcp(flow):
            return
        authorization = flow.request.headers.get_all("authorization")
        # First, and even on flows already refused: no recording may carry the client's token.
        if authorization:
            del flow.request.headers["authorization"]
        if flow.response or flow.error or not flow.live:
            return
        path = flow.request.path.split("?", 1)[0]
        if self.verifier is not None and (path == PRM_PATH or path.startswith(PRM_PATH + "/")):
            self._serve_metadata(flow, path[len(PRM_PATH):])
            return
        flow.metadata[Meta.IDENTITY] = None  # until a token is verified
        if not authorization and approvals_page.wanted(flow.request.method, path,
                                                        fs.header(flow.request.headers, "accept", "")):
            return  # the reviewer's page holds no data: it signs in to the approval API with a token
        if self.verifier is None:
            reason = "identity checks are off"
        else:
            identity = await self._authenticate(flow, authorization)
            if identity is None:
                return
            flow.metadata[Meta.IDENTITY] = identity
            reason = f"token of {identity.get('sub') or identity.get('client_id') or '?'} from {identity['iss']}"
        fs.mark_stage(flow, StageName.AUTH)
        fs.add_decision(flow, stage=StageName.AUTH, direction=Direction.C2S, action=Action.ALLOW, reason=reason)

    async def _authenticate(self, flow: http.HTTPFlow, authorization: list[str]) -> dict | None:
        """The verified identity as flow metadata, or None after refusing the flow."""
        assert self.verifier is not None
        if not authorization:
            self._refuse(flow, 401, "missing_token", "a bearer token is required")
            return None
        if len(authorization) > 1:
            self._refuse(flow, 400, "several_tokens", "send one Authorization header", error="invalid_request")
            return None
        scheme, _, token = authorization[0].strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer":
            self._refuse(flow, 401, "not_bearer", "the Authorization header must carry a Bearer token")
            return None
        if not token:
            self._refuse(flow, 400, "empty_token", "the bearer token is empty", error="invalid_request")
            return None
        audiences = self._audiences(flow)
        verifier = self.verifier
        try:
            try:
                identity = verifier.verify(token, audiences)
            except KeysNeeded as k:
                error = await asyncio.to_thread(verifier.refresh, k.issuer)
                if error:
                    logger.warning("mcp-bastion: cannot refresh the signing keys of %s: %s", k.issuer, error)
                identity = verifier.verify(token, audiences, may_refresh=False)
        except TokenError as e:
            logger.info("mcp-bastion: refused a token on %s: %s", flow.request.path.split("?", 1)[0], e)
            self._refuse(flow, e.status, e.reason, e.description, error=e.error, scope=e.scope)
            return None
        return identity.as_metadata()

    def _refuse(self, flow: http.HTTPFlow, status: int, reason: str, description: str, *,
                error: str | None = None, scope: str | None = None) -> None:
        if status == 503:  # the issuer's keys cannot be had: the gateway fails closed, it did not deny
            refusal = Refusal(503, errors.GATEWAY_ERROR, f"the bearer token could not be checked: {description}",
                              {"reason": reason}, {"retry-after": "30"})
            refuse(flow, refusal, stage=StageName.AUTH, action=Action.ERROR)
            return
        else:
            if scope is None and ctx.options.oidc_required_scopes:
                scope = " ".join(ctx.options.oidc_required_scopes)
            challenge = self._challenge(flow, error, description, scope)
            code = errors.FORBIDDEN if status == 403 else errors.UNAUTHENTICATED
            refusal = Refusal(status, code, f"{'forbidden' if status == 403 else 'unauthenticated'}: {description}",
                              {"reason": reason}, {"www-authenticate": challenge})
        refuse(flow, refusal, stage=StageName.AUTH)

    def _challenge(self, flow: http.HTTPFlow, error: str | None, description: str, scope: str | None) -> str:
        params = [f'resource_metadata="{self._metadata_url(flow)}"']
        if scope:
            params.append(f'scope="{_CHALLENGE_TEXT.sub("", scope)}"')
        if error:
            params.append(f'error="{error}"')
            params.append(f'error_description="{_CHALLENGE_TEXT.sub("", description)}"')
        return "Bearer " + ", ".join(params)

    # --- protected-resource metadata (RFC 9728) ------------------------------

    def _serve_metadata(self, flow: http.HTTPFlow, suffix: str) -> None:
        assert self.verifier is not None
        # Not MCP traffic: the gateway answers it itself and no other stage applies.
        del flow.metadata[Meta.MCP]
        if flow.request.method != "GET":
            replies.document(flow, 405, {"error": "method not allowed"}, {"allow": "GET"})
            return
        doc: dict = {
            "resource": self._resource(flow, suffix),
            "authorization_servers": list(self.verifier.config.issuers),
            "bearer_methods_supported": ["header"],
            "resource_signing_alg_values_supported": list(self.verifier.config.algorithms),
        }
        if self.verifier.config.required_scopes:
            doc["scopes_supported"] = list(self.verifier.config.required_scopes)
        replies.document(flow, 200, doc, {"cache-control": "public, max-age=300"})
        flow.comment = "OAuth protected-resource metadata (served by mcp-bastion)"

    def _origins(self, flow: http.HTTPFlow) -> list[str]:
        """This gateway's own origins (scheme://host:port), the one the client addressed first.

        Never taken from what the client sends: a Host header only picks one of
        them. In reverse mode the port is the listening socket's and the names
        are the loopback names, the configured `listen_host` and the literal
        names of `allowed_hosts`; in a forward mode the origin is the
        destination the request is actually sent to (see `_audiences`).
        """
        scheme = "https" if flow.client_conn.tls_established else "http"
        if fs.mode_name(flow) != "ReverseMode":
            req = flow.request
            return [f"{req.scheme}://{url.hostport(req.scheme, _bracketed(req.host.lower()), req.port)}"]
        port = _socket_port(flow)
        names = dict.fromkeys(_LOOPBACK)
        host = (ctx.options.listen_host or "").strip().lower()
        if host and host not in _ANY_ADDRESS:
            names[_bracketed(host)] = None
        for pattern in ctx.options.allowed_hosts:
            name = _pattern_name(pattern)
            if name is not None:
                names[name] = None
        addressed = _host_name(flow.metadata.get(Meta.CLIENT_HOST) or flow.request.host_header or "")
        ordered = ([addressed] if addressed in names else []) + [n for n in names if n != addressed]
        return [f"{scheme}://{url.hostport(scheme, n, port)}" for n in ordered]

    def _resource(self, flow: http.HTTPFlow, suffix: str = "") -> str:
        """The resource identifier: configured, or this origin (plus the well-known suffix, RFC 9728 3.3)."""
        return ctx.options.oidc_resource or self._origins(flow)[0] + suffix

    def _metadata_url(self, flow: http.HTTPFlow) -> str:
        """Where the metadata for this request's resource is served (RFC 9728 3.1)."""
        if not ctx.options.oidc_resource:
            return self._origins(flow)[0] + PRM_PATH
        parts = urlsplit(ctx.options.oidc_resource)
        return f"{parts.scheme}://{parts.netloc}{PRM_PATH}{parts.path.rstrip('/')}"

    def _audiences(self, flow: http.HTTPFlow) -> list[str]:
        """Accepted `aud` values: configured ones, or the resource URLs this gateway announces.

        Derived ones are this gateway's own origins (`_origins`), bare or with
        the MCP endpoint's path (a path the Gateway let through: one of `mcp_paths`).
        """
        if ctx.options.oidc_audience:
            values = list(ctx.options.oidc_audience)
        elif ctx.options.oidc_resource:
            values = [ctx.options.oidc_resource]
        else:
            path = flow.request.path.split("?", 1)[0]
            values = [v for origin in self._origins(flow) for v in (origin, origin + path)]
        # A URL with an empty path and the same URL ending in "/" name the same resource.
        return list(dict.fromkeys(v for value in values for v in _with_root_slash(value)))


_LOOPBACK = ("localhost", "127.0.0.1", "[::1]")
_ANY_ADDRESS = ("0.0.0.0", "::", "[::]", "*")


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _host_name(hostport: str) -> str:
    """The host of a `host[:port]` value, lower-cased (IPv6 in brackets)."""
    hostport = hostport.strip().lower()
    if hostport.startswith("["):
        return hostport.partition("]")[0] + "]"
    return hostport.rpartition(":")[0] if hostport.count(":") == 1 else hostport


def _pattern_name(pattern: str) -> str | None:
    """The literal host an `allowed_hosts` pattern names, or None for a wildcard."""
    name = _host_name(pattern)
    return None if not name or "*" in name else name


def _socket_port(flow: http.HTTPFlow) -> int:
    """The port the client connected to: the listening socket's, else the mode's configured one."""
    sockname = flow.client_conn.sockname
    if sockname and len(sockname) > 1 and sockname[1]:
        return int(sockname[1])
    mode = flow.client_conn.proxy_mode
    return mode.listen_port(ctx.options.listen_port) or 8080


def _with_root_slash(value: str) -> tuple[str, ...]:
    parts = urlsplit(value)
    if parts.scheme in ("http", "https") and parts.path in ("", "/") and not parts.query:
        base = f"{parts.scheme}://{parts.netloc}"
        return (base, base + "/")
    return (value,)
