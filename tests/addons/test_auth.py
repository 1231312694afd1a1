"""
The Auth and UpstreamToken addons inside mitmproxy's test context, with the
gateway and the gate around them as in the bundle. Tokens come from the demo's
dev issuer, a real HTTP issuer started in-process on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from mitmproxy import exceptions, http
from mitmproxy.test import taddons, tflow

from harness import free_port
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.addons.auth import SECRET_HEADERS, Auth, UpstreamToken
from mcp_bastion.core import errors
from bastion_dev.issuer import DevIssuer
from mcp_bastion.addons.gate import Gate
from mcp_bastion.addons.gateway import CLIENT_HOST, Gateway

ORIGIN = "http://127.0.0.1:8080"
PRM = ORIGIN + "/.well-known/oauth-protected-resource"


@pytest.fixture(scope="module")
def issuer():
    with DevIssuer(audience=ORIGIN) as iss:
        yield iss


class Bundle:
    """Gateway, Auth, Gate and UpstreamToken, their request hooks run in bundle order."""

    def __init__(self, tctx: taddons.context):
        self.tctx = tctx
        self.gateway, self.auth, self.gate, self.upstream = Gateway(), Auth(), Gate(), UpstreamToken()
        for addon in (self.gateway, self.auth, self.gate, self.upstream):
            tctx.master.addons.add(addon)

    def configure(self, **options) -> None:
        self.tctx.options.update(**options)

    async def send(self, flow: http.HTTPFlow, client_host: str | None = None) -> http.HTTPFlow:
        self.gateway.requestheaders(flow)
        if client_host:
            flow.metadata[CLIENT_HOST] = client_host
        await self.auth.requestheaders(flow)
        self.gateway.request(flow)
        self.gate.request(flow)
        self.upstream.request(flow)
        return flow


def run(test):
    """Run `test(bundle)` (a coroutine function) inside a fresh mitmproxy test context."""

    async def main():
        with taddons.context() as tctx:
            return await test(Bundle(tctx))

    return asyncio.run(main())


def plain_flow() -> http.HTTPFlow:
    """A flow from a client that spoke plain HTTP to the gateway."""
    f = tflow.tflow()
    f.client_conn.timestamp_tls_setup = None
    return f


def mcp_post(token: str | None = None, path: str = "/mcp", headers: list[tuple[str, str]] = ()) -> http.HTTPFlow:
    hdrs = [("host", "127.0.0.1:8080"), ("content-type", "application/json"),
            ("accept", "application/json, text/event-stream")]
    if token is not None:
        hdrs.append(("authorization", f"Bearer {token}"))
    hdrs += list(headers)
    f = plain_flow()
    f.request = http.Request.make(
        "POST", f"{ORIGIN}{path}", b'{"jsonrpc":"2.0","id":7,"method":"tools/list"}',
        http.Headers([(k.encode(), v.encode()) for k, v in hdrs]),
    )
    return f


def get(path: str, method: str = "GET") -> http.HTTPFlow:
    f = plain_flow()
    f.request = http.Request.make(method, f"{ORIGIN}{path}", b"", http.Headers([(b"host", b"127.0.0.1:8080")]))
    return f


def challenge(flow: http.HTTPFlow) -> str:
    return flow.response.headers.get("www-authenticate", "")


def error_of(flow: http.HTTPFlow) -> dict:
    return json.loads(flow.response.content)["error"]


# --- options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"oidc_issuer": ["https://idp.test"], "oidc_algorithms": ["HS256"]},
        {"oidc_issuer": ["https://idp.test"], "oidc_algorithms": ["none"]},
        {"oidc_algorithms": ["HS256"]},  # refused even while identity checks are off
        {"oidc_issuer": ["idp.test"]},
        {"oidc_issuer": ["https://idp.test"], "oidc_groups_claim": "a..b"},
        {"oidc_issuer": ["https://idp.test"], "oidc_leeway": -5},
        {"oidc_resource": "ftp://mcp.test/"},
        {"oidc_resource": "https://mcp.test/mcp#frag"},
        {"upstream_token_env": "BASTION_TEST_SURELY_UNSET"},
        {"upstream_token_file": "/nonexistent/secret"},
        {"upstream_token_env": "HOME", "upstream_token_file": "/etc/hostname"},
        {"upstream_token_header": "bad header"},
    ],
)
def test_bad_options_are_refused(options):
    async def test(b: Bundle):
        with pytest.raises(exceptions.OptionsError):
            b.configure(**options)

    run(test)


# --- identity off ---------------------------------------------------------------------


def test_identity_off_still_strips_and_injects(monkeypatch, caplog):
    monkeypatch.setenv("BASTION_TEST_UPSTREAM", "upstream-secret")

    async def test(b: Bundle):
        b.configure(upstream_token_env="BASTION_TEST_UPSTREAM")
        with caplog.at_level(logging.WARNING, "mcp_bastion"):
            b.auth.running()
        assert "IDENTITY CHECKS ARE OFF" in caplog.text
        f = await b.send(mcp_post("client-token"))
        assert f.response is None
        assert f.metadata[fs.IDENTITY] is None
        assert fs.passed(f, "auth")
        assert f.request.headers.get_all("authorization") == ["Bearer upstream-secret"]
        assert f.metadata[SECRET_HEADERS] == ["authorization"]
        # once sent, the upstream credential leaves the flow
        b.upstream.responseheaders(f)
        assert "authorization" not in f.request.headers
        # the prm endpoint is not the gateway's to answer without an issuer
        g = await b.send(get("/.well-known/oauth-protected-resource"))
        assert g.response is None and fs.is_mcp(g)

    run(test)


# --- identity on ------------------------------------------------------------------------


def test_valid_token_sets_identity_and_swaps_credentials(issuer, monkeypatch):
    monkeypatch.setenv("BASTION_TEST_UPSTREAM", "upstream-secret")

    async def test(b: Bundle):
        b.configure(oidc_issuer=[issuer.url], upstream_token_env="BASTION_TEST_UPSTREAM",
                    upstream_token_header="x-api-key", upstream_token_scheme="")
        token = issuer.mint("alice")
        f = await b.send(mcp_post(token, headers=[("x-api-key", "client-chosen")]))
        assert f.response is None, f.response and f.response.content
        assert f.metadata[fs.IDENTITY] == {
            "sub": "alice", "email": "alice@acme.example", "name": "Alice Martin", "groups": ["engineering"],
            "iss": issuer.url, "client_id": "alice", "scopes": ["mcp:tools", "mcp:admin"],
        }
        assert fs.passed(f, "auth")
        assert f.metadata[fs.DECISIONS][-1]["action"] == "allow"
        assert f.comment.startswith("alice: tools/list")
        assert "authorization" not in f.request.headers
        assert f.request.headers.get_all("x-api-key") == ["upstream-secret"]
        assert f.metadata[SECRET_HEADERS] == ["x-api-key"]
        assert token not in json.dumps(f.metadata)

    run(test)


def test_missing_token_gets_the_metadata_challenge(issuer):
    async def test(b: Bundle):
        b.configure(oidc_issuer=[issuer.url])
        f = await b.send(mcp_post())
        assert f.response.status_code == 401
        assert challenge(f) == f'Bearer resource_metadata="{PRM}"'
        assert error_of(f)["code"] == errors.UNAUTHENTICATED
        assert json.loads(f.response.content)["id"] is None
        assert f.metadata[fs.DECISIONS][-1]["action"] == "deny"

    run(test)


CASES = {
    "expired": (lambda i: {"authorization": f"Bearer {i.mint('alice', ttl=-3600)}"}, 401, "invalid_token"),
    "wrong audience": (lambda i: {"authorization": f"Bearer {i.mint('alice', audience='http://elsewhere')}"},
                       401, "invalid_token"),
    "garbage": (lambda i: {"authorization": "Bearer garbage"}, 401, "invalid_token"),
    "basic scheme": (lambda i: {"authorization": "Basic YWxpY2U6YWxpY2U="}, 401, None),
    "empty bearer": (lambda i: {"authorization": "Bearer "}, 400, "invalid_request"),
    "scope missing": (lambda i: {"authorization": f"Bearer {i.mint('carol')}"}, 403, "insufficient_scope"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_refusals(issuer, name):
    make_headers, status, error = CASES[name]

    async def test(b: Bundle):
        b.configure(oidc_issuer=[issuer.url], oidc_required_scopes=["mcp:admin"])
        headers = make_headers(issuer)
        f = await b.send(mcp_post(headers=list(headers.items())))
        assert f.response.status_code == status
        www = challenge(f)
        assert www.startswith(f'Bearer resource_metadata="{PRM}"')
        assert 'scope="mcp:admin"' in www
        if error:
            assert f'error="{error}"' in www
        else:
            assert "error=" not in www
        code = errors.FORBIDDEN if status == 403 else errors.UNAUTHENTICATED
        assert error_of(f)["code"] == code
        assert "authorization" not in f.request.headers  # stripped even from a refused request
        assert not fs.passed(f, "auth")

    run(test)


def test_two_authorization_headers_are_refused(issuer):
    async def test(b: Bundle):
        b.configure(oidc_issuer=[issuer.url])
        token = issuer.mint("alice")
        f = await b.send(mcp_post(token, headers=[("authorization", f"Bearer {token}")]))
        assert f.response.status_code == 400
        assert 'error="invalid_request"' in challenge(f)

    run(test)


def test_issuer_unreachable_is_503_not_a_pass():
    unreachable = f"http://127.0.0.1:{free_port()}"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    token = jwt.encode({"iss": unreachable, "sub": "alice", "aud": ORIGIN, "iat": now, "exp": now + 60},
                       key, algorithm="RS256", headers={"kid": "k1"})

    async def test(b: Bundle):
        b.configure(oidc_issuer=[unreachable])
        f = await b.send(mcp_post(token))
        assert f.response.status_code == 503
        assert error_of(f)["code"] == errors.GATEWAY_ERROR
        assert "retry-after" in f.response.headers
        assert "authorization" not in f.request.headers

    run(test)


def test_keys_are_fetched_off_the_event_loop(issuer):
    threads = []

    async def test(b: Bundle):
        b.configure(oidc_issuer=[issuer.url])
        real = b.auth.verifier.refresh

        def refresh(iss):
            threads.append(threading.current_thread())
            return real(iss)

        b.auth.verifier.refresh = refresh
        f = await b.send(mcp_post(issuer.mint("alice")))
        assert f.response is None
        f = await b.send(mcp_post(issuer.mint("carol")))
        assert f.response is None

    run(test)
    assert len(threads) == 1 and threads[0] is not threading.main_thread()


def test_an_exception_in_verification_fails_closed(issuer):
    async def test(b: Bundle):
        b.configure(oidc_issuer=[issuer.url])

        def boom(*a, **kw):
            raise RuntimeError("verifier broke")

        b.auth.verifier.verify = boom
        f = await b.send(mcp_post(issuer.mint("alice")))
        assert f.response.status_code == 500
        assert error_of(f)["code"] == errors.GATEWAY_ERROR
        assert "authorization" not in f.request.headers

    run(test)


# --- audiences and the resource ---------------------------------------------------------


def test_derived_audiences(issuer):
    async def test(b: Bundle):
        b.configure(oidc_issuer=[issuer.url])
        for aud in (ORIGIN, ORIGIN + "/", ORIGIN + "/mcp"):
            f = await b.send(mcp_post(issuer.mint("alice", audience=aud)))
            assert f.response is None, aud
        f = await b.send(mcp_post(issuer.mint("alice", audience="http://127.0.0.1:9999")))
        assert f.response.status_code == 401
        # behind a reverse proxy, the Host the client addressed is what counts
        f = await b.send(mcp_post(issuer.mint("alice", audience="http://localhost:8080")), client_host="localhost:8080")
        assert f.response is None
        f = await b.send(mcp_post(issuer.mint("alice", audience=ORIGIN)), client_host="localhost:8080")
        assert f.response.status_code == 401
        assert 'resource_metadata="http://localhost:8080/.well-known/oauth-protected-resource"' in challenge(f)

    run(test)


def test_configured_resource_and_audience(issuer):
    async def test(b: Bundle):
        b.configure(oidc_issuer=[issuer.url], oidc_resource="https://mcp.example.com/mcp")
        f = await b.send(mcp_post(issuer.mint("alice", audience=ORIGIN)))
        assert f.response.status_code == 401
        assert 'resource_metadata="https://mcp.example.com/.well-known/oauth-protected-resource/mcp"' in challenge(f)
        f = await b.send(mcp_post(issuer.mint("alice", audience="https://mcp.example.com/mcp")))
        assert f.response is None
        b.configure(oidc_audience=["api://mcp"])
        f = await b.send(mcp_post(issuer.mint("alice", audience="api://mcp")))
        assert f.response is None
        f = await b.send(mcp_post(issuer.mint("alice", audience="https://mcp.example.com/mcp")))
        assert f.response.status_code == 401

    run(test)


# --- protected-resource metadata ---------------------------------------------------------


def test_protected_resource_metadata(issuer):
    async def test(b: Bundle):
        b.configure(oidc_issuer=[issuer.url], oidc_required_scopes=["mcp:tools"])
        f = await b.send(get("/.well-known/oauth-protected-resource"))
        assert f.response.status_code == 200
        doc = json.loads(f.response.content)
        assert doc["resource"] == ORIGIN
        assert doc["authorization_servers"] == [issuer.url]
        assert doc["scopes_supported"] == ["mcp:tools"]
        assert doc["bearer_methods_supported"] == ["header"]
        assert not fs.is_mcp(f)  # answered by the gateway: no MCP stage applies
        f = await b.send(get("/.well-known/oauth-protected-resource/mcp"))
        assert json.loads(f.response.content)["resource"] == ORIGIN + "/mcp"
        f = await b.send(get("/.well-known/oauth-protected-resource", method="DELETE"))
        assert f.response.status_code == 405
        b.configure(oidc_resource="https://mcp.example.com/mcp")
        f = await b.send(get("/.well-known/oauth-protected-resource/mcp"))
        assert json.loads(f.response.content)["resource"] == "https://mcp.example.com/mcp"

    run(test)


# --- the upstream credential -----------------------------------------------------------------


def test_upstream_credential_file_is_reread_when_it_changes(tmp_path):
    secret = tmp_path / "upstream.token"
    secret.write_text("first\n")

    async def test(b: Bundle):
        b.configure(upstream_token_file=str(secret))
        f = await b.send(mcp_post())
        assert f.request.headers["authorization"] == "Bearer first"
        secret.write_text("second-longer\n")
        st = secret.stat()
        os.utime(secret, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        f = await b.send(mcp_post())
        assert f.request.headers["authorization"] == "Bearer second-longer"
        secret.unlink()
        f = await b.send(mcp_post())  # the credential cannot be read: the request is not forwarded
        assert f.response.status_code == 500
        assert "authorization" not in f.request.headers

    run(test)


def test_refused_requests_never_carry_the_upstream_credential(issuer, monkeypatch):
    monkeypatch.setenv("BASTION_TEST_UPSTREAM", "upstream-secret")

    async def test(b: Bundle):
        b.configure(oidc_issuer=[issuer.url], upstream_token_env="BASTION_TEST_UPSTREAM")
        f = await b.send(mcp_post("garbage"))
        assert f.response.status_code == 401
        assert "authorization" not in f.request.headers
        assert SECRET_HEADERS not in f.metadata

    run(test)


# --- the demo issuer ----------------------------------------------------------------------------


def test_demo_issuer_token_endpoint(issuer):
    r = httpx.post(f"{issuer.url}/token", auth=("carol", "carol-dev-secret"),
                   data={"grant_type": "client_credentials", "resource": ORIGIN + "/mcp"})
    assert r.status_code == 200 and r.json()["scope"] == "mcp:tools"
    by_basic = r.json()["access_token"]
    r = httpx.post(f"{issuer.url}/token", data={"grant_type": "client_credentials", "client_id": "ci-bot",
                                                 "client_secret": "ci-bot-dev-secret"})
    assert r.status_code == 200
    by_post = r.json()["access_token"]
    assert httpx.post(f"{issuer.url}/token", auth=("carol", "wrong"),
                      data={"grant_type": "client_credentials"}).status_code == 401
    r = httpx.post(f"{issuer.url}/token", auth=("carol", "carol-dev-secret"),
                   data={"grant_type": "client_credentials", "scope": "mcp:admin"})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_scope")
    r = httpx.post(f"{issuer.url}/token", auth=("carol", "carol-dev-secret"), data={"grant_type": "password"})
    assert (r.status_code, r.json()["error"]) == (400, "unsupported_grant_type")
    assert httpx.get(f"{issuer.url}/.well-known/openid-configuration").json()["issuer"] == issuer.url

    async def test(b: Bundle):
        b.configure(oidc_issuer=[issuer.url])
        f = await b.send(mcp_post(by_basic))
        assert f.metadata[fs.IDENTITY]["groups"] == ["contractors"]
        f = await b.send(mcp_post(by_post))
        assert f.metadata[fs.IDENTITY]["groups"] == ["ci"] and "email" not in f.metadata[fs.IDENTITY]

    run(test)
