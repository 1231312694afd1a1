"""
Regular (forward) proxy mode with TLS interception: the client keeps the
remote server's https URL and only configures the proxy. The upstream serves
HTTPS with a certificate from a CA made here; mitmproxy verifies it with that
CA, and the client trusts nothing but mitmproxy's own CA (from a fresh
confdir) - so a working session proves the gateway read the traffic.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from pathlib import Path

import httpx
import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mcp.client.streamable_http import streamable_http_client

from harness import gateway, sdk_server, wait_file
from test_e2e_sdk import SESSION_TIMEOUT, TIMEOUT, Session, assert_full_session, scripted_session

pytestmark = pytest.mark.e2e


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for localhost/127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("mcp-bastion test CA"))
        .issuer_name(_name("mcp-bastion test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def tls_setup(tmp_path_factory):
    """(HTTPS SDK server on localhost, gateway in regular mode, mitmproxy's CA certificate)."""
    tmp = tmp_path_factory.mktemp("forward")
    ca, cert, key = make_pki(tmp)
    confdir = tmp / "mitmproxy"
    with sdk_server("streamable-http", ["--certfile", str(cert), "--keyfile", str(key)]) as srv:
        options = {
            "confdir": str(confdir),
            "ssl_verify_upstream_trusted_ca": str(ca),
            "mcp_hosts": [f"localhost:{srv.port}"],
        }
        with gateway("", options, mode="regular") as gw:
            mitm_ca = confdir / "mitmproxy-ca-cert.pem"
            wait_file(mitm_ca)
            yield srv, gw, mitm_ca, ca


def trusting(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def test_the_client_trusts_only_mitmproxys_ca(tls_setup):
    """Without the gateway the client's trust store rejects the upstream: the session below went through it."""
    srv, _, mitm_ca, _ = tls_setup
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://localhost:{srv.port}/mcp", verify=trusting(mitm_ca))


def test_sdk_session_through_the_forward_proxy(tls_setup):
    srv, gw, mitm_ca, _ = tls_setup
    seen = Session()

    async def session() -> None:
        async def on_response(response: httpx2.Response) -> None:
            seen.http.append((response.request.method, str(response.request.url), response.status_code))

        async with httpx2.AsyncClient(proxy=gw.url, verify=trusting(mitm_ca), timeout=TIMEOUT,
                                      event_hooks={"response": [on_response]}) as client:
            transport = streamable_http_client(f"https://localhost:{srv.port}/mcp", http_client=client)
            await asyncio.wait_for(scripted_session(transport, seen), SESSION_TIMEOUT)

    asyncio.run(session())
    assert_full_session(seen)
    assert ("DELETE", f"https://localhost:{srv.port}/mcp", 200) in seen.http


def test_hosts_outside_mcp_hosts_are_refused(tls_setup):
    _, gw, mitm_ca, _ = tls_setup
    with httpx.Client(proxy=gw.url, verify=trusting(mitm_ca), timeout=30) as client:
        r = client.post("http://127.0.0.1:9/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert r.status_code == 403
    assert r.json()["error"]["code"] == -31005
