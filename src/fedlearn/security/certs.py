"""A development CA, server and client certificates, and the start-up checks that read them.

``init_ca`` and ``issue`` back ``fedlearn certs init|issue``: an ECDSA P-256 CA signs server
certificates (SANs for the hosts clients dial, EKU serverAuth) and client certificates (CN and
SAN DNS name = the client id, EKU clientAuth). Keys are written unencrypted with mode 0600.

The ``check_*`` helpers run before a server listens or a client dials, so a wrong SAN, an
expired certificate or one from another CA fails at once with one line that says which,
instead of as an opaque handshake failure that the gRPC client retries forever.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import re
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlearn.security.errors import CertificateError

log = logging.getLogger(__name__)

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
DEFAULT_SERVER_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
# Tolerates a few minutes of clock skew between the machine that issues and the one that checks.
_BACKDATE = dt.timedelta(minutes=5)

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")
_RESERVED_NAMES = {"ca"}  # "ca" would overwrite ca.pem / ca.key


@dataclass(frozen=True)
class CertPaths:
    """Where a certificate and its private key were written."""

    cert: Path
    key: Path


# ---------------------------------------------------------------------------------------------
# names


def check_client_id(client_id: str) -> str:
    """Return ``client_id`` if it can be a certificate name, a SAN DNS name and a file name; else raise."""
    if (
        not isinstance(client_id, str)
        or not _DNS_NAME.match(client_id)
        or client_id.endswith(".")
        or (len(client_id) > 253)
    ):
        raise CertificateError(
            f"client id {client_id!r} is not allowed; use letters, digits, '-' and '.' (like site-a or hospital-3)"
        )
    if client_id.lower() in _RESERVED_NAMES:
        raise CertificateError(f"the name {client_id!r} is reserved for the CA; pick another name")
    return client_id


def _san_for_host(host: str) -> x509.GeneralName:
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if host.startswith("*.") and _DNS_NAME.match(host[2:]):
        return x509.DNSName(host.lower())
    if not _DNS_NAME.match(host):
        raise CertificateError(f"host {host!r} is neither an IP address nor a DNS name; pass --host with one of those")
    return x509.DNSName(host.rstrip(".").lower())


# ---------------------------------------------------------------------------------------------
# writing


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` atomically; the temporary file is created 0600, so a key is never readable by others."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, cert_path: Path, key_path: Path) -> None:
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(key_path, key_pem, 0o600)
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _validity(days: int, valid_from: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    if not isinstance(days, int) or days < 1:
        raise CertificateError(f"a certificate must be valid for at least 1 day, not {days}; pass --days 1 or more")
    start = valid_from if valid_from is not None else _now() - _BACKDATE
    if start.tzinfo is None:
        start = start.replace(tzinfo=dt.timezone.utc)
    return start, start + dt.timedelta(days=days)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def init_ca(
    directory: Path,
    *,
    name: str = "FedLearn development CA",
    days: int = 3650,
    force: bool = False,
    valid_from: dt.datetime | None = None,
) -> CertPaths:
    """Create a development CA: ``directory/ca.pem`` and ``directory/ca.key`` (0600).

    Refuses to replace an existing CA unless ``force``: every certificate the old CA issued
    would stop being trusted. ``valid_from`` (default: now minus 5 minutes) exists for tests.
    """
    directory = Path(directory).expanduser().absolute()
    paths = CertPaths(directory / CA_CERT, directory / CA_KEY)
    if not force and (paths.cert.exists() or paths.key.exists()):
        raise CertificateError(
            f"a CA already exists in {directory}; pass --force to replace it "
            "(certificates it issued will no longer be trusted)"
        )
    if not name.strip():
        raise CertificateError("the CA name is empty; pass --name with a short description")
    start, end = _validity(days, valid_from)
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedLearn"), x509.NameAttribute(NameOID.COMMON_NAME, name)]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_pair(cert, key, paths.cert, paths.key)
    log.info("created CA %s in %s, valid until %s", name, directory, _fmt(end))
    return paths


def issue(
    directory: Path,
    name: str,
    *,
    server: bool,
    hosts: Sequence[str] | None = None,
    days: int = 825,
    force: bool = False,
    valid_from: dt.datetime | None = None,
) -> CertPaths:
    """Sign ``directory/<name>.pem`` and ``<name>.key`` (0600) with the CA in ``directory``.

    A server certificate gets a SAN for each of ``hosts`` (DNS names or IP addresses; default
    localhost, 127.0.0.1 and ::1) and EKU serverAuth. A client certificate gets CN = SAN DNS name
    = ``name`` (the client id the server identifies it by) and EKU clientAuth. Refuses to
    replace an existing ``<name>.pem`` unless ``force``. ``valid_from`` exists for tests.
    """
    directory = Path(directory).expanduser().absolute()
    check_client_id(name)
    paths = CertPaths(directory / f"{name}.pem", directory / f"{name}.key")
    if not force and (paths.cert.exists() or paths.key.exists()):
        raise CertificateError(f"{paths.cert} already exists; pass --force to replace it")
    ca_paths = CertPaths(directory / CA_CERT, directory / CA_KEY)
    if not ca_paths.cert.exists() or not ca_paths.key.exists():
        raise CertificateError(f"no CA in {directory}; create one first with `fedlearn certs init --dir {directory}`")
    ca_cert = _load_cert(ca_paths.cert, "CA certificate")
    ca_key = _load_key(ca_paths.key, "CA key")
    _check_key_matches(ca_cert, ca_key, ca_paths.cert, ca_paths.key)
    _check_is_ca(ca_cert, ca_paths.cert)
    _check_dates(ca_cert, ca_paths.cert, "CA certificate")
    start, end = _validity(days, valid_from)

    if server:
        host_list = list(DEFAULT_SERVER_HOSTS if hosts is None else hosts)
        if not host_list:
            raise CertificateError("a server certificate needs at least one host; pass --host NAME_OR_IP")
        sans = list(dict.fromkeys(_san_for_host(h) for h in host_list))  # dedupe, keep order
        eku = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        if hosts:
            raise CertificateError("--host is for server certificates; a client certificate is named by its id only")
        sans = [x509.DNSName(name)]
        eku = ExtendedKeyUsageOID.CLIENT_AUTH

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "FedLearn"), x509.NameAttribute(NameOID.COMMON_NAME, name)]
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_pair(cert, key, paths.cert, paths.key)
    log.info("issued %s certificate %s, valid until %s", "server" if server else "client", paths.cert, _fmt(end))
    return paths


# ---------------------------------------------------------------------------------------------
# reading and checking


def _fmt(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _load_cert(path: Path, what: str) -> x509.Certificate:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CertificateError(f"{what} {path} does not exist; check the path or create it with `fedlearn certs`")
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise CertificateError(f"{what} {path} is not a PEM certificate ({exc}); pass the .pem file") from None
    return certs[0]  # a chain file starts with the leaf


def _load_key(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CertificateError(f"{what} {path} does not exist; check the path or create it with `fedlearn certs`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except TypeError:
        raise CertificateError(
            f"{what} {path} is password-protected; FedLearn needs an unencrypted key file with mode 0600"
        ) from None
    except (ValueError, OSError, UnsupportedAlgorithm):
        raise CertificateError(f"{what} {path} is not a PEM private key; pass the .key file") from None
    mode = path.stat().st_mode
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s %s is readable by other users; run `chmod 600 %s`", what, path, path)
    return key  # type: ignore[return-value]


def _public_der(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check_key_matches(cert: x509.Certificate, key, cert_path: Path, key_path: Path) -> None:
    if _public_der(cert.public_key()) != _public_der(key.public_key()):
        raise CertificateError(
            f"key {Path(key_path).name} does not belong to certificate {Path(cert_path).name}; "
            "pass the .key file written together with that .pem"
        )


def _check_dates(cert: x509.Certificate, path: Path, what: str) -> None:
    now = _now()
    if now < cert.not_valid_before_utc:
        raise CertificateError(
            f"{what} {Path(path).name} is not valid yet (not before {_fmt(cert.not_valid_before_utc)}); "
            "check this machine's clock or issue a new one"
        )
    if now > cert.not_valid_after_utc:
        raise CertificateError(
            f"{what} {Path(path).name} expired on {_fmt(cert.not_valid_after_utc)}; "
            "issue a new one with `fedlearn certs`"
        )


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _check_is_ca(cert: x509.Certificate, path: Path) -> None:
    constraints = _basic_constraints(cert)
    if constraints is None or not constraints.ca:
        raise CertificateError(
            f"{Path(path).name} is not a CA certificate (it is {_describe(cert)}); "
            "pass the ca.pem from `fedlearn certs init`"
        )


def _key_id(cert: x509.Certificate, *, authority: bool) -> str | None:
    """The first 8 hex digits of the certificate's own (or its issuer's) key identifier."""
    try:
        if authority:
            digest = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        else:
            digest = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None
    return digest.hex()[:8] if digest else None


def issuer_label(cert: x509.Certificate) -> str:
    """Who signed ``cert``, with the key id, since every development CA has the same default name."""
    key_id = _key_id(cert, authority=True)
    return cert.issuer.rfc4514_string() + (f", key id {key_id}" if key_id else "")


def _check_signed_by(cert: x509.Certificate, ca: x509.Certificate, cert_path: Path, ca_path: Path) -> None:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        ca_key_id = _key_id(ca, authority=False)
        ca_label = ca.subject.rfc4514_string() + (f", key id {ca_key_id}" if ca_key_id else "")
        raise CertificateError(
            f"certificate {Path(cert_path).name} was not signed by CA {Path(ca_path).name} "
            f"(issuer {issuer_label(cert)!r}; CA {ca_label!r}); issue it from this CA or pass the CA that signed it"
        ) from None


def _check_eku(cert: x509.Certificate, path: Path, usage: x509.ObjectIdentifier, role: str) -> None:
    try:
        ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return  # no EKU means any use
    if usage not in ekus and ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE not in ekus:
        other = "client" if role == "server" else "server"
        raise CertificateError(
            f"certificate {Path(path).name} is not a {role} certificate (it looks like a {other} one); "
            f"issue one with `fedlearn certs issue {'server' if role == 'server' else 'CLIENT_ID'}`"
        )


def _common_name(cert: x509.Certificate) -> str | None:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def certificate_hosts(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses a certificate's SAN names, as text."""
    out = []
    for san in _sans(cert):
        if isinstance(san, x509.DNSName):
            out.append(san.value)
        elif isinstance(san, x509.IPAddress):
            out.append(str(san.value))
    return out


def _describe(cert: x509.Certificate) -> str:
    cn = _common_name(cert)
    return f"for {cn!r}" if cn else f"subject {cert.subject.rfc4514_string()!r}"


def _strip_brackets(host: str) -> str:
    host = host.strip()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_unspecified_host(host: str | None) -> bool:
    """True for '', '0.0.0.0', '::' and '*': a bind-all address, not a name a client dials."""
    if host is None:
        return True
    host = _strip_brackets(host)
    if host in ("", "*"):
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def san_covers(cert: x509.Certificate, host: str) -> bool:
    """Whether the certificate's SANs cover ``host`` (an IP must match an IP SAN; a DNS name a DNS SAN)."""
    host = _strip_brackets(host)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for san in _sans(cert):
        if ip is not None and isinstance(san, x509.IPAddress) and san.value == ip:
            return True
        if ip is None and isinstance(san, x509.DNSName) and _dns_match(san.value, host):
            return True
    return False


def _dns_match(pattern: str, host: str) -> bool:
    pattern, host = pattern.rstrip(".").lower(), host.rstrip(".").lower()
    if pattern.startswith("*."):  # one whole left-most label, as browsers do
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host


def check_ca(ca_path: Path) -> None:
    """Raise CertificateError unless ``ca_path`` is a readable, current CA certificate."""
    ca = _load_cert(ca_path, "CA certificate")
    _check_is_ca(ca, ca_path)
    _check_dates(ca, ca_path, "CA certificate")


def _check_pair(cert_path: Path, key_path: Path, ca_path: Path | None, role: str, usage) -> x509.Certificate:
    """The checks servers and clients share: files parse, key matches, dates, usage, and the CA signed it."""
    cert = _load_cert(cert_path, f"{role} certificate")
    key = _load_key(key_path, f"{role} key")
    _check_key_matches(cert, key, cert_path, key_path)
    _check_dates(cert, cert_path, f"{role} certificate")
    _check_eku(cert, cert_path, usage, role)
    if ca_path is not None:
        check_ca(ca_path)
        _check_signed_by(cert, _load_cert(ca_path, "CA certificate"), cert_path, ca_path)
    return cert


def check_server_identity(cert_path: Path, key_path: Path, ca_path: Path | None, host: str | None) -> None:
    """Start-up check of a server's certificate and key; raises CertificateError naming what is wrong.

    Checks: both files exist and parse; the key belongs to the certificate; the certificate is
    valid now; it is meant for servers; when ``ca_path`` is given, that CA signed it; and its
    SANs cover ``host``, the name or IP clients dial. A bind-all ``host`` (None, '', 0.0.0.0,
    ::) cannot be checked against the SANs and is skipped.
    """
    cert = _check_pair(cert_path, key_path, ca_path, "server", ExtendedKeyUsageOID.SERVER_AUTH)
    if not is_unspecified_host(host) and not san_covers(cert, host):  # type: ignore[arg-type]
        names = ", ".join(certificate_hosts(cert)) or "no host at all"
        bare = _strip_brackets(host)  # type: ignore[arg-type]
        raise CertificateError(
            f"server certificate {Path(cert_path).name} is for {names} but the server listens on {bare}; "
            f"issue one with `fedlearn certs issue server {_host_flags([*certificate_hosts(cert), bare])} --force`"
        )


def _host_flags(hosts: Sequence[str]) -> str:
    return " ".join(f"--host {host}" for host in dict.fromkeys(hosts))


def check_client_identity(cert_path: Path, key_path: Path, ca_path: Path | None) -> str:
    """Start-up check of a client's certificate and key; returns the client id the server will see.

    Same checks as ``check_server_identity`` without the host, and the certificate must be
    meant for clients and carry a common name (the client id).
    """
    cert = _check_pair(cert_path, key_path, ca_path, "client", ExtendedKeyUsageOID.CLIENT_AUTH)
    client_id = _common_name(cert)
    if client_id is None:
        dns = [san.value for san in _sans(cert) if isinstance(san, x509.DNSName)]
        client_id = dns[0] if dns else None
    if not client_id:
        raise CertificateError(
            f"client certificate {Path(cert_path).name} names no client (no common name); "
            "issue one with `fedlearn certs issue CLIENT_ID`"
        )
    return client_id


def client_id_from_auth_context(auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
    """The authenticated client id from ``grpc.ServicerContext.auth_context()``, or None.

    gRPC fills the x509 keys only after it verified the peer's certificate against the
    server's ``root_certificates`` (mutual TLS), so the common name can be trusted; without a
    verified client certificate there is no id and None is returned. Falls back to the first
    SAN when a certificate has no common name.
    """
    security = auth_context.get("transport_security_type") or []
    if b"ssl" not in security:
        return None
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        values = auth_context.get(key) or []
        if values:
            value = values[0]
            return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    return None
