"""
UpstreamToken and UpstreamCredential: the upstream's own credential, set only
on requests that are forwarded. Options and the credential on their own; the
request path through the shipped `bundle()` (tests/bundled.py).
"""

from __future__ import annotations

import os

import pytest
from mitmproxy import exceptions, flow
from mitmproxy.test import taddons

from bastion_dev.issuer import DevIssuer
from mcp_bastion.addons.upstream_token import UpstreamCredential, UpstreamToken
from mcp_bastion.core.vocab import Meta, StageName

from bundled import bundled, call, forwarded

pytestmark = pytest.mark.anyio

ORIGIN = "http://127.0.0.1:8080"


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def issuer():
    with DevIssuer(audience=ORIGIN) as iss:
        yield iss


def mcp_post(b, token: str | None = None):
    f = b.flow("POST", call("tools/list", 7), host="127.0.0.1:8080")
    f.client_conn.timestamp_tls_setup = None  # plain HTTP to the gateway
    if token is not None:
        f.request.headers["authorization"] = f"Bearer {token}"
    return f


# --- options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"upstream_token_env": "BASTION_TEST_SURELY_UNSET"},
        {"upstream_token_file": "/nonexistent/secret"},
        {"upstream_token_env": "HOME", "upstream_token_file": "/etc/hostname"},
        {"upstream_token_header": "bad header"},
    ],
)
def test_bad_options_are_refused(options):
    token = UpstreamToken()
    with taddons.context(token) as tctx:
        with pytest.raises(exceptions.OptionsError):
            tctx.configure(token, **options)


def test_an_empty_credential_file_is_refused(tmp_path):
    secret = tmp_path / "upstream.token"
    secret.write_text("\n")
    token = UpstreamToken()
    with taddons.context(token) as tctx:
        with pytest.raises(exceptions.OptionsError, match="empty"):
            tctx.configure(token, upstream_token_file=str(secret))


# --- the credential ------------------------------------------------------------------


def test_credential_from_the_environment(monkeypatch):
    monkeypatch.setenv("BASTION_TEST_UPSTREAM", " s3cret \n")
    assert UpstreamCredential("Authorization", "Bearer", env="BASTION_TEST_UPSTREAM").value() == "Bearer s3cret"
    bare = UpstreamCredential("X-Api-Key", "", env="BASTION_TEST_UPSTREAM")
    assert (bare.header, bare.value()) == ("x-api-key", "s3cret")
    assert UpstreamCredential("authorization", "Bearer").value() is None  # none configured


def test_a_credential_with_a_line_break_is_refused(tmp_path):
    secret = tmp_path / "upstream.token"
    secret.write_text("first\nx-evil: 1\n")
    with pytest.raises(ValueError, match="line break"):
        UpstreamCredential("authorization", "Bearer", path=str(secret)).value()


# --- on the request path ---------------------------------------------------------------


async def test_upstream_credential_file_is_reread_when_it_changes(tmp_path):
    secret = tmp_path / "upstream.token"
    secret.write_text("first\n")
    with bundled(upstream_token_file=str(secret)) as b:
        f = mcp_post(b)
        await b.request(f)
        assert f.request.headers["authorization"] == "Bearer first"
        secret.write_text("second-longer\n")
        st = secret.stat()
        os.utime(secret, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        f = mcp_post(b)
        await b.request(f)
        assert f.request.headers["authorization"] == "Bearer second-longer"
        secret.unlink()
        f = mcp_post(b)  # the credential cannot be read: the request is not forwarded
        await b.request(f)
        assert f.response.status_code == 500
        assert "authorization" not in f.request.headers
        assert f.metadata[Meta.ERROR].startswith(f"{StageName.UPSTREAM_TOKEN}: ")


async def test_refused_requests_never_carry_the_upstream_credential(issuer, monkeypatch):
    monkeypatch.setenv("BASTION_TEST_UPSTREAM", "upstream-secret")
    with bundled(oidc_issuer=[issuer.url], upstream_token_env="BASTION_TEST_UPSTREAM") as b:
        f = mcp_post(b, "garbage")
        await b.request(f)
        assert f.response.status_code == 401
        assert "authorization" not in f.request.headers
        assert Meta.SECRET_HEADERS not in f.metadata


async def test_the_credential_leaves_the_flow_when_the_request_fails(monkeypatch):
    monkeypatch.setenv("BASTION_TEST_UPSTREAM", "upstream-secret")
    with bundled(upstream_token_env="BASTION_TEST_UPSTREAM") as b:
        f = mcp_post(b, "client-token")
        await b.request(f)
        assert forwarded(f) and f.request.headers["authorization"] == "Bearer upstream-secret"
        f.error = flow.Error("connection reset")
        await b.error(f)
        assert "authorization" not in f.request.headers
