"""Mutual TLS on a real gRPC server: the client id comes from the verified certificate, strangers are refused."""

from __future__ import annotations

import grpc
import pytest

from fedlearn.security import (
    CertificateError,
    channel_credentials,
    client_id_from_auth_context,
    server_credentials,
)


def echo_client_id(request: bytes, context: grpc.ServicerContext) -> bytes:
    client_id = client_id_from_auth_context(context.auth_context())
    return (client_id or "<anonymous>").encode()


def test_client_id_from_auth_context_without_tls_or_certificate():
    assert client_id_from_auth_context({}) is None
    assert client_id_from_auth_context({"transport_security_type": [b"insecure"]}) is None
    assert client_id_from_auth_context({"transport_security_type": [b"ssl"]}) is None
    context = {"transport_security_type": [b"ssl"], "x509_common_name": [b"site-a"]}
    assert client_id_from_auth_context(context) == "site-a"


def test_mtls_server_sees_the_certificate_name_and_refuses_strangers(pki, serve, rpc):
    credentials = server_credentials(
        pki.ca1 / "server.pem", pki.ca1 / "server.key", client_ca=pki.ca1 / "ca.pem", host="localhost"
    )
    good = channel_credentials(pki.ca1 / "ca.pem", pki.ca1 / "site-a.pem", pki.ca1 / "site-a.key")
    with serve(credentials, echo_client_id) as port:
        target = f"localhost:{port}"
        assert rpc(target, good) == b"site-a"
        assert rpc(f"127.0.0.1:{port}", good) == b"site-a"  # the IP SAN covers this too

        with pytest.raises(grpc.RpcError) as no_cert:
            rpc(target, channel_credentials(pki.ca1 / "ca.pem"), timeout=3)
        assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE

        stranger = channel_credentials(pki.ca1 / "ca.pem", pki.ca2 / "site-b.pem", pki.ca2 / "site-b.key")
        with pytest.raises(grpc.RpcError) as foreign:
            rpc(target, stranger, timeout=3)
        assert foreign.value.code() == grpc.StatusCode.UNAVAILABLE

        # A server certificate from the right CA is not a client certificate (EKU serverAuth only);
        # built by hand because channel_credentials refuses it at start-up.
        wrong_role = grpc.ssl_channel_credentials(
            (pki.ca1 / "ca.pem").read_bytes(),
            (pki.ca1 / "server.key").read_bytes(),
            (pki.ca1 / "server.pem").read_bytes(),
        )
        with pytest.raises(grpc.RpcError):
            rpc(target, wrong_role, timeout=3)

        assert rpc(target, good) == b"site-a"  # still serving the good client


def test_client_refuses_a_server_from_another_ca(pki, serve, rpc):
    credentials = server_credentials(pki.ca2 / "server.pem", pki.ca2 / "server.key", host="localhost")
    with serve(credentials, echo_client_id) as port:
        with pytest.raises(grpc.RpcError) as caught:
            rpc(f"localhost:{port}", channel_credentials(pki.ca1 / "ca.pem"), timeout=3)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # TLS without client certificates: the server sees no client id.
        assert rpc(f"localhost:{port}", channel_credentials(pki.ca2 / "ca.pem")) == b"<anonymous>"


def test_a_certificate_sent_to_a_server_without_client_ca_is_not_an_identity(pki, serve, rpc):
    credentials = server_credentials(pki.ca1 / "server.pem", pki.ca1 / "server.key", host="localhost")
    with serve(credentials, echo_client_id) as port:
        creds = channel_credentials(pki.ca1 / "ca.pem", pki.ca1 / "site-a.pem", pki.ca1 / "site-a.key")
        assert rpc(f"localhost:{port}", creds) == b"<anonymous>"


def test_misconfigured_credentials_fail_before_serving(pki):
    with pytest.raises(CertificateError, match="listens on 10.0.0.5"):
        server_credentials(pki.ca1 / "server.pem", pki.ca1 / "server.key", host="10.0.0.5:8443")
    with pytest.raises(CertificateError, match="not a CA certificate"):
        server_credentials(pki.ca1 / "server.pem", pki.ca1 / "server.key", client_ca=pki.ca1 / "site-a.pem")
    with pytest.raises(CertificateError, match="was not signed by CA"):
        server_credentials(pki.ca2 / "server.pem", pki.ca2 / "server.key", server_ca=pki.ca1 / "ca.pem")
    with pytest.raises(CertificateError, match="was not signed by CA"):
        channel_credentials(
            pki.ca1 / "ca.pem", pki.ca2 / "site-b.pem", pki.ca2 / "site-b.key", cert_ca=pki.ca1 / "ca.pem"
        )
    with pytest.raises(CertificateError, match="does not belong"):
        channel_credentials(pki.ca1 / "ca.pem", pki.ca1 / "site-a.pem", pki.ca2 / "site-b.key")
    with pytest.raises(CertificateError, match="both --cert and --key"):
        channel_credentials(pki.ca1 / "ca.pem", pki.ca1 / "site-a.pem")
