"""Security for the gRPC deployment: certificates, TLS credentials, client tokens and authentication.

- ``certs``: a development CA and server/client certificates (``fedlearn certs init|issue``)
  and the start-up checks that name a wrong SAN, an expired certificate or a foreign CA.
- ``tls``: gRPC credentials from those files, TLS by default off loopback, a client-side probe.
- ``tokens``: per-client bearer tokens kept as hashes in a file the server re-reads on SIGHUP.
- ``auth``: who a gRPC call comes from, refusing unknown or unauthenticated clients.
"""

from fedlearn.security.auth import Authenticator, bearer_token
from fedlearn.security.certs import (
    CA_CERT,
    CA_KEY,
    DEFAULT_SERVER_HOSTS,
    CertPaths,
    certificate_hosts,
    check_ca,
    check_client_id,
    check_client_identity,
    check_server_identity,
    client_id_from_auth_context,
    init_ca,
    issue,
    san_covers,
)
from fedlearn.security.errors import CertificateError, InsecureTransportError, TokenFileError
from fedlearn.security.tls import (
    bearer_metadata,
    channel_credentials,
    is_loopback,
    probe_server,
    require_tls,
    server_credentials,
    split_host_port,
)
from fedlearn.security.tokens import TokenStore, hash_token, install_sighup_reload, new_token

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "DEFAULT_SERVER_HOSTS",
    "Authenticator",
    "CertPaths",
    "CertificateError",
    "InsecureTransportError",
    "TokenFileError",
    "TokenStore",
    "bearer_metadata",
    "bearer_token",
    "certificate_hosts",
    "channel_credentials",
    "check_ca",
    "check_client_id",
    "check_client_identity",
    "check_server_identity",
    "client_id_from_auth_context",
    "hash_token",
    "init_ca",
    "install_sighup_reload",
    "is_loopback",
    "issue",
    "new_token",
    "probe_server",
    "require_tls",
    "san_covers",
    "server_credentials",
    "split_host_port",
]
