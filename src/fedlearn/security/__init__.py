"""Security for the gRPC deployment: certificates, TLS credentials, client tokens and authentication.

- ``certs``: a development CA and server/client certificates (``fedlearn certs init|issue``)
  and the start-up checks that name a wrong SAN, an expired certificate or a foreign CA.
- ``tls``: gRPC credentials from those files, TLS by default off loopback, a client-side probe.
- ``tokens``: per-client bearer tokens kept as hashes in a file the server re-reads on SIGHUP.
- ``auth``: who a gRPC call comes from, refusing unknown or unauthenticated clients.
- ``allowlist``: the client ids an operator names (``--allowed-clients``).
- ``runtokens``: per-run tokens a loopback server issues to its expected clients.
- ``identity``: which of these a `fedlearn server` uses, refusing to start when none would.
"""

from fedlearn.security.allowlist import AllowList
from fedlearn.security.auth import CLIENT_ID_HEADER, Authenticator, bearer_token, claimed_client_id
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
from fedlearn.security.errors import (
    AllowListError,
    CertificateError,
    ClientIdentityError,
    InsecureTransportError,
    TokenFileError,
)
from fedlearn.security.identity import ClientIdentity, server_identity
from fedlearn.security.runtokens import RunTokens, wait_for_run_token
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
    "CLIENT_ID_HEADER",
    "DEFAULT_SERVER_HOSTS",
    "AllowList",
    "AllowListError",
    "Authenticator",
    "CertPaths",
    "CertificateError",
    "ClientIdentity",
    "ClientIdentityError",
    "InsecureTransportError",
    "RunTokens",
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
    "claimed_client_id",
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
    "server_identity",
    "split_host_port",
    "wait_for_run_token",
]
