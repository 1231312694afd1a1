"""
The Auth addon: its options on its own, its behaviour inside the shipped
`bundle()` (tests/bundled.py), where it strips the client's credentials and the
UpstreamToken addon sets the upstream's own. Tokens come from the demo's dev
issuer, a real HTTP issuer started in-process on 127.0.0.1.

The upstream credential itself is tested in tests/addons/test_upstream_token.py.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from mitmproxy import exceptions, http
from mitmproxy.test import taddons

from bastion_dev.issuer import DevIssuer
from mcp_bastion.addons.auth import Auth
from mcp_bastion.core import errors
from mcp_bastion.core.vocab import Meta, StageName
from mcp_bastion.glue import flowstate as fs

from bundled import Bundled, bundled
from harness import free_port

pytestmark = pytest.mark.anyio

ORIGIN = "http://127.0.0.1:8080"  # the gateway, as the client addresses it (reverse mode)
PRM = ORIGIN + "/.well-known/oauth-protected-resource"
TOOLS_LIST = b'{"jsonrpc":"2.0","id":7,"method":"tools/list"}'


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def issuer():
    with DevIssuer(audience=ORIGIN) as iss:
        yield iss


def plain(f: http.HTTPFlow) -> http.HTTPFlow:
    """The client spoke plain HTTP to the gateway."""
    f.client_conn.timestamp_tls_setup = None
    return f


def mcp_post(b: Bundled, token: str | None = None, path: str = "/mcp", headers: list[tuple[str, str]] = (),
             host: str = "127.0.0.1:8080") -> http.HTTPFlow:
    """tools/list #7 to the gateway at `host` (in front of the bundle's upstream)."""
    f = plain(b.flow("POST", TOOLS_LIST, path=path, host=host))
    if token is not None:
        f.request.headers.add("authorization", f"Bearer {token}")
    for k, v in headers:
        f.request.headers.add(k, v)
    return f


def get(b: Bundled, path: str, method: str = "GET") -> http.HTTPFlow:
    return plain(b.flow(method, path=path, host="127.0.0.1:8080"))


async def send(b: Bundled, f: http.HTTPFlow) -> http.HTTPFlow:
    """The request hooks of every addon of the bundle, in order."""
    await b.request(f)
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
    ],
)
def test_bad_options_are_refused(options):
    auth = Auth()
    with taddons.context(auth) as tctx:
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(auth, **options)


# --- identity off ---------------------------------------------------------------------


async def test_identity_off_still_strips_and_injects(monkeypatch, caplog):
    monkeypatch.setenv("BASTION_TEST_UPSTREAM", "upstream-secret")
    with bundled(upstream_token_env="BASTION_TEST_UPSTREAM") as b:
        with caplog.at_level(logging.WARNING, "mcp_bastion"):
            b.addon(Auth).running()
        assert "IDENTITY CHECKS ARE OFF" in caplog.text
        f = await send(b, mcp_post(b, "client-token"))
        assert f.response is None
        assert f.metadata[Meta.IDENTITY] is None
        assert fs.passed(f, StageName.AUTH)
        assert f.request.headers.get_all("authorization") == ["Bearer upstream-secret"]
        assert f.metadata[Meta.SECRET_HEADERS] == ["authorization"]
        # once sent, the upstream credential leaves the flow
        await b.response(f, {"jsonrpc": "2.0", "id": 7, "result": {"tools": []}})
        assert f.response.status_code == 200
        assert "authorization" not in f.request.headers
        # without an issuer the prm path is not the gateway's to answer, and not an MCP endpoint to forward
        g = await send(b, get(b, "/.well-known/oauth-protected-resource"))
        assert g.response.status_code == 404 and json.loads(g.response.content)["error"]["data"] == {"reason": "path"}


# --- identity on ------------------------------------------------------------------------


async def test_valid_token_sets_identity_and_swaps_credentials(issuer, monkeypatch):
    monkeypatch.setenv("BASTION_TEST_UPSTREAM", "upstream-secret")
    with bundled(oidc_issuer=[issuer.url], upstream_token_env="BASTION_TEST_UPSTREAM",
                 upstream_token_header="x-api-key", upstream_token_scheme="") as b:
        token = issuer.mint("alice")
        f = await send(b, mcp_post(b, token, headers=[("x-api-key", "client-chosen")]))
        assert f.response is None, f.response and f.response.content
        assert f.metadata[Meta.IDENTITY] == {
            "sub": "alice", "email": "alice@acme.example", "name": "Alice Martin", "groups": ["engineering"],
            "iss": issuer.url, "client_id": "alice", "scopes": ["mcp:tools", "mcp:admin"],
        }
        assert fs.passed(f, StageName.AUTH)
        auth = [d for d in f.metadata[Meta.DECISIONS] if d["stage"] == StageName.AUTH]
        assert [d["action"] for d in auth] == ["allow"]
        assert f.metadata[Meta.DECISIONS][-1]["action"] == "allow"  # and the ruleset's, after it
        assert f.comment.startswith("alice: tools/list")
        assert "authorization" not in f.request.headers
        assert f.request.headers.get_all("x-api-key") == ["upstream-secret"]
        assert f.metadata[Meta.SECRET_HEADERS] == ["x-api-key"]
        assert token not in json.dumps(f.metadata)


async def test_missing_token_gets_the_metadata_challenge(issuer):
    with bundled(oidc_issuer=[issuer.url]) as b:
        f = await send(b, mcp_post(b))
        assert f.response.status_code == 401
        assert challenge(f) == f'Bearer resource_metadata="{PRM}"'
        assert error_of(f)["code"] == errors.UNAUTHENTICATED
        assert json.loads(f.response.content)["id"] is None
        assert f.metadata[Meta.DECISIONS][-1]["action"] == "deny"


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
async def test_refusals(issuer, name):
    make_headers, status, error = CASES[name]
    with bundled(oidc_issuer=[issuer.url], oidc_required_scopes=["mcp:admin"]) as b:
        headers = make_headers(issuer)
        f = await send(b, mcp_post(b, headers=list(headers.items())))
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
        assert not fs.passed(f, StageName.AUTH)


async def test_two_authorization_headers_are_refused(issuer):
    with bundled(oidc_issuer=[issuer.url]) as b:
        token = issuer.mint("alice")
        f = await send(b, mcp_post(b, token, headers=[("authorization", f"Bearer {token}")]))
        assert f.response.status_code == 400
        assert 'error="invalid_request"' in challenge(f)
        assert "authorization" not in f.request.headers


async def test_a_refused_request_still_loses_the_clients_token():
    """Refused by the gateway before Auth verifies anything: the token never reaches a recording."""
    with bundled() as b:
        f = mcp_post(b, "client-token", headers=[("origin", "http://evil.example")])
        await send(b, f)
        assert f.response.status_code == 403
        assert "authorization" not in f.request.headers


async def test_issuer_unreachable_is_503_not_a_pass():
    unreachable = f"http://127.0.0.1:{free_port()}"
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    token = jwt.encode({"iss": unreachable, "sub": "alice", "aud": ORIGIN, "iat": now, "exp": now + 60},
                       key, algorithm="RS256", headers={"kid": "k1"})
    with bundled(oidc_issuer=[unreachable]) as b:
        f = await send(b, mcp_post(b, token))
        assert f.response.status_code == 503
        assert error_of(f)["code"] == errors.GATEWAY_ERROR
        assert "retry-after" in f.response.headers
        assert "authorization" not in f.request.headers


async def test_keys_are_fetched_off_the_event_loop(issuer):
    threads = []
    with bundled(oidc_issuer=[issuer.url]) as b:
        verifier = b.addon(Auth).verifier
        real = verifier.refresh

        def refresh(iss):
            threads.append(threading.current_thread())
            return real(iss)

        verifier.refresh = refresh
        f = await send(b, mcp_post(b, issuer.mint("alice")))
        assert f.response is None
        f = await send(b, mcp_post(b, issuer.mint("carol")))
        assert f.response is None
    assert len(threads) == 1 and threads[0] is not threading.main_thread()


async def test_an_exception_in_verification_fails_closed(issuer):
    with bundled(oidc_issuer=[issuer.url]) as b:

        def boom(*a, **kw):
            raise RuntimeError("verifier broke")

        b.addon(Auth).verifier.verify = boom
        f = await send(b, mcp_post(b, issuer.mint("alice")))
        assert f.response.status_code == 500
        assert error_of(f)["code"] == errors.GATEWAY_ERROR
        assert "authorization" not in f.request.headers


# --- audiences and the resource ---------------------------------------------------------


async def test_derived_audiences(issuer):
    with bundled(oidc_issuer=[issuer.url]) as b:
        for aud in (ORIGIN, ORIGIN + "/", ORIGIN + "/mcp", "http://localhost:8080", "http://[::1]:8080/mcp"):
            f = await send(b, mcp_post(b, issuer.mint("alice", audience=aud)))
            assert f.response is None, aud
        f = await send(b, mcp_post(b, issuer.mint("alice", audience="http://127.0.0.1:9999")))
        assert f.response.status_code == 401
        # behind a reverse proxy, the Host the client addressed picks which of the gateway's names is announced
        f = await send(b, mcp_post(b, issuer.mint("alice", audience="http://localhost:8080"), host="localhost:8080"))
        assert f.response is None
        f = await send(b, mcp_post(b, "not-a-token", host="localhost:8080"))
        assert 'resource_metadata="http://localhost:8080/.well-known/oauth-protected-resource"' in challenge(f)


@pytest.mark.parametrize("host", [
    "mcp.other.example", "mcp.other.example:8080", "127.0.0.1:9999", "localhost:443", "LOCALHOST:9999",
    "evil.example:8080", "[::1]:9999", "127.0.0.1:8080.evil.example",
])
async def test_the_accepted_audience_never_comes_from_the_client(issuer, host):
    """A token minted for another server is refused, whatever Host names that server."""
    with bundled(oidc_issuer=[issuer.url], allowed_hosts=["*", "*:*"]) as b:
        for aud in (f"http://{host}", f"http://{host}/mcp", f"https://{host}", f"http://{host.lower()}"):
            f = await send(b, mcp_post(b, issuer.mint("alice", audience=aud), host=host))
            assert f.response is not None and f.response.status_code == 401, aud
            # ... and the challenge names the gateway's own metadata, not the Host it was sent
            assert re.search(r'resource_metadata="http://(localhost|127\.0\.0\.1|\[::1\]):8080/', challenge(f))
            assert not re.search(r"evil|other|9999|:443", challenge(f)), challenge(f)


async def test_configured_names_are_derived_audiences(issuer):
    with bundled(oidc_issuer=[issuer.url], allowed_hosts=["mcp.internal:*", "*:*"],
                 listen_host="10.1.2.3") as b:
        for aud in ("http://mcp.internal:8080", "http://10.1.2.3:8080/mcp"):
            f = await send(b, mcp_post(b, issuer.mint("alice", audience=aud), host="mcp.internal:8080"))
            assert f.response is None, aud
        f = await send(b, mcp_post(b, issuer.mint("alice", audience="http://a.example:8080"), host="a.example:8080"))
        assert f.response.status_code == 401  # a wildcard names no host of this gateway
        assert 'resource_metadata="http://localhost:8080/' in challenge(f)


async def test_configured_resource_and_audience(issuer):
    with bundled(oidc_issuer=[issuer.url], oidc_resource="https://mcp.example.com/mcp") as b:
        f = await send(b, mcp_post(b, issuer.mint("alice", audience=ORIGIN)))
        assert f.response.status_code == 401
        assert 'resource_metadata="https://mcp.example.com/.well-known/oauth-protected-resource/mcp"' in challenge(f)
        f = await send(b, mcp_post(b, issuer.mint("alice", audience="https://mcp.example.com/mcp")))
        assert f.response is None
        b.tctx.options.update(oidc_audience=["api://mcp"])
        f = await send(b, mcp_post(b, issuer.mint("alice", audience="api://mcp")))
        assert f.response is None
        f = await send(b, mcp_post(b, issuer.mint("alice", audience="https://mcp.example.com/mcp")))
        assert f.response.status_code == 401


# --- protected-resource metadata ---------------------------------------------------------


async def test_protected_resource_metadata(issuer):
    with bundled(oidc_issuer=[issuer.url], oidc_required_scopes=["mcp:tools"]) as b:
        f = await send(b, get(b, "/.well-known/oauth-protected-resource"))
        assert f.response.status_code == 200
        doc = json.loads(f.response.content)
        assert doc["resource"] == ORIGIN
        assert doc["authorization_servers"] == [issuer.url]
        assert doc["scopes_supported"] == ["mcp:tools"]
        assert doc["bearer_methods_supported"] == ["header"]
        assert not fs.is_mcp(f)  # answered by the gateway: no MCP stage applies
        f = await send(b, get(b, "/.well-known/oauth-protected-resource/mcp"))
        assert json.loads(f.response.content)["resource"] == ORIGIN + "/mcp"
        f = await send(b, get(b, "/.well-known/oauth-protected-resource", method="DELETE"))
        assert f.response.status_code == 405
        b.tctx.options.update(oidc_resource="https://mcp.example.com/mcp")
        f = await send(b, get(b, "/.well-known/oauth-protected-resource/mcp"))
        assert json.loads(f.response.content)["resource"] == "https://mcp.example.com/mcp"


# --- the demo issuer ----------------------------------------------------------------------------


async def test_demo_issuer_token_endpoint(issuer):
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

    with bundled(oidc_issuer=[issuer.url]) as b:
        f = await send(b, mcp_post(b, by_basic))
        assert f.metadata[Meta.IDENTITY]["groups"] == ["contractors"]
        f = await send(b, mcp_post(b, by_post))
        assert f.metadata[Meta.IDENTITY]["groups"] == ["ci"] and "email" not in f.metadata[Meta.IDENTITY]
