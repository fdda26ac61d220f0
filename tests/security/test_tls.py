"""TLS by default off loopback, address parsing, and the client-side start-up probe against a real server."""

from __future__ import annotations

import datetime as dt
import socket
from concurrent import futures

import grpc
import pytest

from fedlearn.errors import ConfigError, FedLearnError
from fedlearn.security import (
    CertificateError,
    InsecureTransportError,
    init_ca,
    is_loopback,
    issue,
    probe_server,
    require_tls,
    server_credentials,
    split_host_port,
)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("localhost:8443", ("localhost", 8443)),
        ("[::1]:8443", ("::1", 8443)),
        ("::1", ("::1", None)),
        ("[::]:50051", ("::", 50051)),
        ("fl.example.org", ("fl.example.org", None)),
        ("dns:///fl.example.org:443", ("fl.example.org", 443)),
        ("ipv4:10.0.0.5:8443", ("10.0.0.5", 8443)),
    ],
)
def test_split_host_port(address, expected):
    assert split_host_port(address) == expected


def test_split_host_port_rejects_a_bad_port():
    with pytest.raises(ConfigError, match="HOST:PORT"):
        split_host_port("localhost:https")


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:8443", True),
        ("127.3.4.5:8443", True),
        ("localhost:8443", True),
        ("LOCALHOST", True),
        ("[::1]:8443", True),
        ("::1", True),
        ("[::ffff:127.0.0.1]:1", True),
        ("unix:/tmp/fedlearn.sock", True),
        ("0.0.0.0:8443", False),
        ("[::]:8443", False),
        (":8443", False),
        ("10.0.0.5:8443", False),
        ("fl.example.org:8443", False),
        ("localhost.example.org:8443", False),
    ],
)
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_tls_by_default_off_loopback():
    require_tls("127.0.0.1:8443", tls=False)
    require_tls("localhost:8443", tls=False, role="client")
    require_tls("0.0.0.0:8443", tls=True)
    require_tls("0.0.0.0:8443", tls=False, insecure=True)
    with pytest.raises(InsecureTransportError) as caught:
        require_tls("0.0.0.0:8443", tls=False)
    message = str(caught.value)
    assert isinstance(caught.value, FedLearnError) and "\n" not in message
    assert "0.0.0.0:8443 without TLS" in message and "--cert and --key" in message and "--insecure" in message
    with pytest.raises(InsecureTransportError, match="--ca"):
        require_tls("fl.example.org:8443", tls=False, role="client")


def echo(request, context):
    return b"ok"


def test_probe_accepts_a_good_server_and_names_each_problem(pki, tmp_path, serve):
    mtls = server_credentials(pki.ca1 / "server.pem", pki.ca1 / "server.key", client_ca=pki.ca1 / "ca.pem")
    client = (pki.ca1 / "site-a.pem", pki.ca1 / "site-a.key")
    with serve(mtls, echo) as port:
        assert probe_server(f"localhost:{port}", pki.ca1 / "ca.pem", *client) is True
        assert probe_server(f"127.0.0.1:{port}", pki.ca1 / "ca.pem", *client) is True

        with pytest.raises(CertificateError) as caught:
            probe_server(f"localhost:{port}", pki.ca2 / "ca.pem", *client)
        assert "was not signed by CA ca.pem" in str(caught.value) and "--ca" in str(caught.value)

        with pytest.raises(CertificateError) as caught:
            probe_server(f"127.0.0.1:{port}", pki.ca1 / "ca.pem", *client, server_name="fl.example.org")
        assert "is for localhost, 127.0.0.1, ::1, not fl.example.org" in str(caught.value)

        with pytest.raises(CertificateError) as caught:
            probe_server(f"localhost:{port}", pki.ca1 / "ca.pem")
        assert "without a client certificate" in str(caught.value)

        with pytest.raises(CertificateError) as caught:
            probe_server(f"localhost:{port}", pki.ca1 / "ca.pem", pki.ca2 / "site-b.pem", pki.ca2 / "site-b.key")
        assert "with client certificate site-b.pem" in str(caught.value) and "--client-ca" in str(caught.value)

        with pytest.raises(CertificateError, match="not a client certificate"):
            probe_server(f"localhost:{port}", pki.ca1 / "ca.pem", pki.ca1 / "server.pem", pki.ca1 / "server.key")

    # A server started around the start-up checks with an expired certificate.
    init_ca(tmp_path)
    issue(tmp_path, "old", server=True, valid_from=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), days=30)
    expired = grpc.ssl_server_credentials([((tmp_path / "old.key").read_bytes(), (tmp_path / "old.pem").read_bytes())])
    with serve(expired, echo) as port:
        with pytest.raises(CertificateError) as caught:
            probe_server(f"localhost:{port}", tmp_path / "ca.pem")
        assert "expired on 2020-01-31" in str(caught.value) and "\n" not in str(caught.value)


def test_probe_names_a_plaintext_server(pki):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(CertificateError) as caught:
            probe_server(f"localhost:{port}", pki.ca1 / "ca.pem", timeout=3)
        assert "TLS with localhost" in str(caught.value) and "--cert/--key" in str(caught.value)
    finally:
        server.stop(None).wait(5)


def test_probe_says_false_when_nothing_listens():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert probe_server(f"127.0.0.1:{port}", None, timeout=1) is False
