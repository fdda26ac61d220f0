"""Development CA and certificates: what init/issue write, and the start-up checks' one-line errors."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedlearn.errors import FedLearnError
from fedlearn.security import (
    CertificateError,
    certificate_hosts,
    check_ca,
    check_client_identity,
    check_server_identity,
    init_ca,
    issue,
    san_covers,
)


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(cert: x509.Certificate, kind):
    return cert.extensions.get_extension_for_class(kind)


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    assert isinstance(exc_info.value, FedLearnError)
    return message


def openssl_verify(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", "verify", *map(str, args)], capture_output=True, text=True)


def test_init_and_issue_write_a_valid_chain(tmp_path):
    ca = init_ca(tmp_path / "pki")
    server = issue(tmp_path / "pki", "server", server=True, hosts=["localhost", "127.0.0.1", "::1", "fl.example.org"])
    client = issue(tmp_path / "pki", "site-a", server=False)
    assert (ca.cert.name, ca.key.name) == ("ca.pem", "ca.key")
    assert (server.cert.name, client.key.name) == ("server.pem", "site-a.key")
    for key in (ca.key, server.key, client.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600

    ca_cert, server_cert, client_cert = load(ca.cert), load(server.cert), load(client.cert)
    assert ext(ca_cert, x509.BasicConstraints).value.ca is True
    assert ext(ca_cert, x509.BasicConstraints).critical
    assert ext(ca_cert, x509.KeyUsage).value.key_cert_sign
    assert ext(server_cert, x509.BasicConstraints).value.ca is False
    assert ext(server_cert, x509.KeyUsage).value.digital_signature
    assert list(ext(server_cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(ext(client_cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    sans = ext(server_cert, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    client_sans = ext(client_cert, x509.SubjectAlternativeName).value
    assert client_sans.get_values_for_type(x509.DNSName) == ["site-a"]
    assert client_cert.subject.rfc4514_string() == "CN=site-a,O=FedLearn"
    assert ext(server_cert, x509.AuthorityKeyIdentifier).value.key_identifier == (
        ext(ca_cert, x509.SubjectKeyIdentifier).value.digest
    )
    assert server_cert.issuer == ca_cert.subject
    assert server_cert.signature_hash_algorithm.name == "sha256"

    check_ca(ca.cert)
    check_server_identity(server.cert, server.key, ca.cert, "fl.example.org")
    assert check_client_identity(client.cert, client.key, ca.cert) == "site-a"

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed; the chain was checked with cryptography only")
    for leaf, purpose in ((server.cert, "sslserver"), (client.cert, "sslclient")):
        result = openssl_verify("-CAfile", ca.cert, "-purpose", purpose, leaf)
        assert result.returncode == 0, result.stdout + result.stderr
    wrong_purpose = openssl_verify("-CAfile", ca.cert, "-purpose", "sslserver", client.cert)
    assert wrong_purpose.returncode != 0


def test_init_refuses_to_replace_a_ca(tmp_path):
    first = init_ca(tmp_path)
    before = first.cert.read_bytes()
    with pytest.raises(CertificateError) as caught:
        init_ca(tmp_path)
    assert "already exists" in one_line(caught) and "--force" in str(caught.value)
    assert first.cert.read_bytes() == before
    init_ca(tmp_path, force=True)
    assert first.cert.read_bytes() != before


def test_issue_refuses_bad_names_missing_ca_and_overwrites(tmp_path):
    with pytest.raises(CertificateError) as caught:
        issue(tmp_path, "site-a", server=False)
    assert "no CA" in one_line(caught) and "fedlearn certs init" in str(caught.value)
    init_ca(tmp_path)
    for bad in ("ca", "../evil", "site a", "", "site_a"):
        with pytest.raises(CertificateError):
            issue(tmp_path, bad, server=False)
    check_ca(tmp_path / "ca.pem")  # "ca" was refused, so the CA was not overwritten by a leaf
    issue(tmp_path, "site-a", server=False)
    with pytest.raises(CertificateError) as caught:
        issue(tmp_path, "site-a", server=False)
    assert "--force" in one_line(caught)
    with pytest.raises(CertificateError) as caught:
        issue(tmp_path, "server", server=True, hosts=["not a host!"])
    assert "neither an IP address nor a DNS name" in one_line(caught)
    with pytest.raises(CertificateError) as caught:
        issue(tmp_path, "site-b", server=False, days=0)
    assert "at least 1 day" in one_line(caught)


def test_wrong_san_names_the_hosts_and_the_fix(pki):
    with pytest.raises(CertificateError) as caught:
        check_server_identity(pki.ca1 / "server.pem", pki.ca1 / "server.key", pki.ca1 / "ca.pem", "10.0.0.5")
    message = one_line(caught)
    assert "server.pem is for localhost, 127.0.0.1, ::1" in message
    assert "listens on 10.0.0.5" in message
    assert "fedlearn certs issue server --host localhost --host 127.0.0.1 --host ::1 --host 10.0.0.5 --force" in message
    with pytest.raises(CertificateError, match="fl.example.org"):
        check_server_identity(pki.ca1 / "server.pem", pki.ca1 / "server.key", None, "fl.example.org")
    # covered names, IPv6 in brackets, and bind-all addresses (nothing to compare) pass
    for host in ("localhost", "LOCALHOST", "127.0.0.1", "[::1]", "::1", "0.0.0.0", "::", None):
        check_server_identity(pki.ca1 / "server.pem", pki.ca1 / "server.key", pki.ca1 / "ca.pem", host)


def test_expired_and_not_yet_valid_say_which_with_the_date(tmp_path):
    init_ca(tmp_path)
    long_ago = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    issue(tmp_path, "old", server=True, valid_from=long_ago, days=30)
    with pytest.raises(CertificateError) as caught:
        check_server_identity(tmp_path / "old.pem", tmp_path / "old.key", tmp_path / "ca.pem", "localhost")
    assert "old.pem expired on 2020-01-31" in one_line(caught)

    future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)
    issue(tmp_path, "early", server=False, valid_from=future)
    with pytest.raises(CertificateError) as caught:
        check_client_identity(tmp_path / "early.pem", tmp_path / "early.key", tmp_path / "ca.pem")
    message = one_line(caught)
    assert "not valid yet" in message and future.strftime("%Y-%m-%d") in message and "clock" in message


def test_expired_ca_is_detected(tmp_path):
    init_ca(tmp_path, valid_from=dt.datetime(2019, 1, 1, tzinfo=dt.timezone.utc), days=365)
    with pytest.raises(CertificateError) as caught:
        check_ca(tmp_path / "ca.pem")
    assert "CA certificate ca.pem expired on 2020-01-01" in one_line(caught)
    with pytest.raises(CertificateError, match="expired"):
        issue(tmp_path, "site-a", server=False)


def test_wrong_ca_names_both(pki):
    with pytest.raises(CertificateError) as caught:
        check_server_identity(pki.ca2 / "server.pem", pki.ca2 / "server.key", pki.ca1 / "ca.pem", "localhost")
    message = one_line(caught)
    assert "server.pem was not signed by CA ca.pem" in message and "Someone else's CA" in message
    with pytest.raises(CertificateError, match="was not signed by CA"):
        check_client_identity(pki.ca2 / "site-b.pem", pki.ca2 / "site-b.key", pki.ca1 / "ca.pem")


def test_key_not_matching_cert(pki):
    with pytest.raises(CertificateError) as caught:
        check_server_identity(pki.ca1 / "server.pem", pki.ca2 / "server.key", None, "localhost")
    assert "key server.key does not belong to certificate server.pem" in one_line(caught)
    with pytest.raises(CertificateError, match="does not belong"):
        check_client_identity(pki.ca1 / "site-a.pem", pki.ca1 / "server.key", None)


def test_missing_or_unreadable_files(pki, tmp_path):
    with pytest.raises(CertificateError) as caught:
        check_server_identity(tmp_path / "nope.pem", pki.ca1 / "server.key", None, "localhost")
    assert "nope.pem does not exist" in one_line(caught)
    with pytest.raises(CertificateError) as caught:
        check_client_identity(pki.ca1 / "site-a.pem", tmp_path / "nope.key", None)
    assert "nope.key does not exist" in one_line(caught)
    with pytest.raises(CertificateError, match="ca.pem does not exist"):
        check_ca(tmp_path / "ca.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    with pytest.raises(CertificateError) as caught:
        check_ca(garbage)
    assert "is not a PEM certificate" in one_line(caught)
    with pytest.raises(CertificateError) as caught:
        check_client_identity(pki.ca1 / "site-a.pem", garbage, None)
    assert "is not a PEM private key" in one_line(caught)


def test_roles_are_checked(pki):
    with pytest.raises(CertificateError) as caught:
        check_server_identity(pki.ca1 / "site-a.pem", pki.ca1 / "site-a.key", pki.ca1 / "ca.pem", "site-a")
    assert "is not a server certificate" in one_line(caught)
    with pytest.raises(CertificateError, match="is not a client certificate"):
        check_client_identity(pki.ca1 / "server.pem", pki.ca1 / "server.key", pki.ca1 / "ca.pem")
    with pytest.raises(CertificateError) as caught:
        check_ca(pki.ca1 / "site-a.pem")
    assert "is not a CA certificate" in one_line(caught)


def test_wildcard_and_ip_sans(tmp_path):
    init_ca(tmp_path)
    paths = issue(tmp_path, "edge", server=True, hosts=["*.fl.example.org", "10.0.0.5", "[fd00::1]", "10.0.0.5"])
    cert = load(paths.cert)
    assert certificate_hosts(cert) == ["*.fl.example.org", "10.0.0.5", "fd00::1"]
    assert san_covers(cert, "a.fl.example.org") and san_covers(cert, "[fd00::1]")
    assert not san_covers(cert, "fl.example.org") and not san_covers(cert, "a.b.fl.example.org")
    assert not san_covers(cert, "10.0.0.6")
    check_server_identity(paths.cert, paths.key, tmp_path / "ca.pem", "site.fl.example.org")
    with pytest.raises(CertificateError, match="a client certificate is named by its id only"):
        issue(tmp_path, "site-a", server=False, hosts=["localhost"])
