"""gRPC credentials from certificate files, checked before use, and the TLS-by-default rule.

Plaintext is allowed only on loopback (``is_loopback``); anything else needs TLS unless the
operator explicitly opts out (``require_tls``). ``server_credentials`` and
``channel_credentials`` run the start-up checks of ``certs`` first, so a wrong SAN, an expired
certificate or one from another CA fails with one line before the server listens or the
client dials. ``probe_server`` does one real TLS handshake from the client side to turn
failures gRPC would only retry (server certificate for another host, from another CA,
expired; this client's certificate refused) into one clear line.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
from pathlib import Path

import grpc
from cryptography import x509

from fedlearn.errors import ConfigError
from fedlearn.security.certs import (
    _fmt,
    certificate_hosts,
    check_ca,
    check_client_identity,
    check_server_identity,
    issuer_label,
)
from fedlearn.security.errors import CertificateError, InsecureTransportError

log = logging.getLogger(__name__)

_PathLike = str | os.PathLike
# HTTP/2 client preface and an empty SETTINGS frame: a gRPC server answers with its SETTINGS.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def split_host_port(address: str) -> tuple[str, int | None]:
    """Split 'host:port', '[v6]:port', 'host' or a bare IPv6 address; the host comes back without brackets.

    A gRPC 'dns:///' or 'ipv4:'/'ipv6:' scheme prefix is dropped. Raises ConfigError for a port
    that is not a number.
    """
    text = address.strip()
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
            break
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if sep and rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:  # a name, or a bare IPv6 address such as ::1
        host, port_text = text, ""
    if port_text and not port_text.isdigit():
        raise ConfigError(f"address {address!r} has port {port_text!r}; write it as HOST:PORT")
    return host, int(port_text) if port_text else None


def is_loopback(address: str) -> bool:
    """Whether ``address`` ('host:port' or 'host') stays on this machine.

    True for localhost, *.localhost, 127.0.0.0/8, ::1 (also IPv4-mapped) and 'unix:' sockets;
    False for bind-all addresses (0.0.0.0, ::, ''), which accept connections from the network,
    and for every other name, which is not resolved: a name that happens to resolve to
    loopback still gets TLS by default.
    """
    if address.strip().startswith(("unix:", "unix-abstract:")):
        return True
    host, _ = split_host_port(address)
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def require_tls(address: str, *, tls: bool, insecure: bool = False, role: str = "server") -> None:
    """Enforce TLS by default: raise InsecureTransportError for plaintext off loopback unless ``insecure``.

    ``role`` is "server" (``address`` is where it listens) or "client" (where it dials); it only
    changes which flags the message suggests.
    """
    if tls or insecure or is_loopback(address):
        if not tls and insecure and not is_loopback(address):
            log.warning("%s on %s without TLS: updates and tokens travel in plaintext", role, address)
        return
    if role == "server":
        raise InsecureTransportError(
            f"refusing to listen on {address} without TLS; pass --cert and --key (make them with `fedlearn certs`), "
            "or --insecure on a network you trust"
        )
    raise InsecureTransportError(
        f"refusing to connect to {address} without TLS; pass --ca with the CA that signed the server's certificate, "
        "or --insecure on a network you trust"
    )


def _read(path: _PathLike) -> bytes:
    return Path(path).expanduser().read_bytes()


def server_credentials(
    cert: _PathLike,
    key: _PathLike,
    client_ca: _PathLike | None = None,
    *,
    host: str | None = None,
    server_ca: _PathLike | None = None,
) -> grpc.ServerCredentials:
    """TLS credentials for a gRPC server, after ``check_server_identity``.

    ``host`` is the name or IP clients dial (or the listen address; a bind-all address skips
    the SAN check). With ``client_ca`` every client must present a certificate signed by that
    CA (mutual TLS); gRPC then exposes its common name in ``context.auth_context()``.
    ``server_ca``, when known, is checked to have signed the server's own certificate.
    """
    if host is not None:
        host, _ = split_host_port(host)
    check_server_identity(Path(cert), Path(key), Path(server_ca) if server_ca else None, host)
    root = None
    if client_ca is not None:
        check_ca(Path(client_ca))
        root = _read(client_ca)
    return grpc.ssl_server_credentials(
        [(_read(key), _read(cert))], root_certificates=root, require_client_auth=root is not None
    )


def channel_credentials(
    ca: _PathLike | None,
    cert: _PathLike | None = None,
    key: _PathLike | None = None,
    *,
    token: str | None = None,
    cert_ca: _PathLike | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials for a gRPC client, after checking the CA and (for mutual TLS) this client's certificate.

    ``ca`` is the CA that signed the server's certificate (None: the system's trusted roots).
    ``cert`` and ``key`` come together, for a server that requires client certificates;
    ``cert_ca``, when known, is checked to have signed ``cert`` (it need not be ``ca``: servers
    may use a public certificate and clients a private CA; with the development CA it is the
    same file). A ``token`` is sent as 'authorization: Bearer <token>' on every call.
    """
    if (cert is None) != (key is None):
        raise CertificateError("pass both --cert and --key for a client certificate, or neither")
    root = None
    if ca is not None:
        check_ca(Path(ca))
        root = _read(ca)
    private_key = chain = None
    if cert is not None and key is not None:
        client_id = check_client_identity(Path(cert), Path(key), Path(cert_ca) if cert_ca is not None else None)
        log.info("client certificate %s identifies this client as %s", cert, client_id)
        private_key, chain = _read(key), _read(cert)
    credentials = grpc.ssl_channel_credentials(root_certificates=root, private_key=private_key, certificate_chain=chain)
    if token:
        credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
    return credentials


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a token, for plaintext loopback channels (gRPC sends call credentials only over TLS)."""
    return (("authorization", f"Bearer {token}"),)


def probe_server(
    target: str,
    ca: _PathLike | None,
    cert: _PathLike | None = None,
    key: _PathLike | None = None,
    *,
    server_name: str | None = None,
    timeout: float = 5.0,
) -> bool:
    """One TLS handshake with a gRPC server, to fail at start-up on a certificate problem.

    Returns True when the server accepted the handshake (and this client's certificate),
    False when it could not be reached (not a certificate problem: the caller may retry), and
    raises CertificateError with one line when the server's certificate is for another host,
    expired, not yet valid or from another CA, or when the server refused this client.
    ``server_name`` mirrors the ``grpc.ssl_target_name_override`` channel option.
    """
    host, port = split_host_port(target)
    if port is None:
        raise ConfigError(f"address {target!r} has no port; write it as HOST:PORT")
    if (cert is None) != (key is None):
        raise CertificateError("pass both --cert and --key for a client certificate, or neither")
    if ca is not None:
        check_ca(Path(ca))
    if cert is not None and key is not None:
        check_client_identity(Path(cert), Path(key), None)
    name = server_name or host
    context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    context.set_alpn_protocols(["h2"])
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        log.info("cannot reach %s yet (%s); not a certificate problem", target, exc)
        return False
    with raw:
        try:
            tls = context.wrap_socket(raw, server_hostname=name)
        except ssl.SSLCertVerificationError as exc:
            raise CertificateError(_explain_verify_error(exc, host, port, name, ca, timeout)) from None
        except ssl.SSLError as exc:
            if "CERTIFICATE" in str(exc.reason) or "UNKNOWN_CA" in str(exc.reason):  # a TLS 1.2 server's alert
                raise CertificateError(_refused_client(target, cert)) from None
            raise CertificateError(
                f"TLS with {target} failed ({exc.reason or exc}); is the server running without --cert/--key, "
                "or is this not a FedLearn server?"
            ) from None
        except TimeoutError:
            log.info(
                "TLS handshake with %s did not finish in %.0f s; cannot tell whether certificates fit", target, timeout
            )
            return False
        except OSError as exc:
            raise CertificateError(f"TLS with {target} failed ({exc}); check that the server uses TLS") from None
        with tls:
            try:
                tls.sendall(_H2_PREFACE)
                answer = tls.recv(9)
            except TimeoutError:
                log.info("TLS with %s works but the server sent nothing in %.0f s", target, timeout)
                return False
            except (ssl.SSLError, ConnectionError):
                answer = b""  # TLS 1.3 servers check the client certificate after the handshake
    if not answer:
        raise CertificateError(_refused_client(target, cert))
    return True


def _refused_client(target: str, cert: _PathLike | None) -> str:
    who = "without a client certificate" if cert is None else f"with client certificate {Path(cert).name}"
    return (
        f"server {target} closed the connection {who}; it requires a client certificate signed by its --client-ca "
        "(issue one with `fedlearn certs issue CLIENT_ID` from that CA and pass --cert/--key)"
    )


def _peer_certificate(host: str, port: int, name: str, timeout: float) -> x509.Certificate | None:
    """The server's certificate fetched without verification, only to explain why verification failed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=name) as tls:
                der = tls.getpeercert(binary_form=True)
    except (OSError, ValueError):
        return None
    return x509.load_der_x509_certificate(der) if der else None


def _explain_verify_error(
    exc: ssl.SSLCertVerificationError, host: str, port: int, name: str, ca: _PathLike | None, timeout: float
) -> str:
    target = f"{host}:{port}"
    peer = _peer_certificate(host, port, name, timeout)
    code = exc.verify_code
    if code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
        names = ", ".join(certificate_hosts(peer)) if peer is not None else "other hosts"
        return (
            f"server certificate at {target} is for {names}, not {name}; dial one of those names "
            f"or re-issue the server certificate with `fedlearn certs issue server --host {name} --force`"
        )
    if code == 10:
        when = f" on {_fmt(peer.not_valid_after_utc)}" if peer is not None else ""
        return f"server certificate at {target} expired{when}; the server operator must issue a new one"
    if code == 9:
        when = f" until {_fmt(peer.not_valid_before_utc)}" if peer is not None else ""
        return f"server certificate at {target} is not valid yet{when}; check the clocks of both machines"
    if code in (18, 19, 20, 21, 2):
        issuer = f" (its issuer: {issuer_label(peer)!r})" if peer is not None else ""
        trusted = f"CA {Path(ca).name}" if ca is not None else "the system's trusted CAs"
        return (
            f"server certificate at {target} was not signed by {trusted}{issuer}; "
            "pass --ca with the CA that signed the server's certificate"
        )
    if code == 26:
        return f"server certificate at {target} is not a server certificate; issue one with `--server`"
    return (
        f"server certificate at {target} was rejected ({exc.verify_message}); check --ca and the server's certificate"
    )
