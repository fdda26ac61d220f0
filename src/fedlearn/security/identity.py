"""How `fedlearn server` knows who its clients are, decided before a run starts.

- ``--client-ca`` (mutual TLS) and/or ``--tokens``: the certificate's common name / the
  token's owner is the client id; ``--allowed-clients`` narrows it to named ids (mutual TLS
  alone otherwise admits every certificate the CA ever signed, and says so in a warning).
- Neither, on a loopback address: per-run tokens (``fedlearn.security.runtokens``).
- Neither, elsewhere (TLS without client authentication included): refused with one line,
  unless ``--allow-any-client`` is given, which trusts claimed ids and warns loudly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fedlearn.security.allowlist import AllowList
from fedlearn.security.auth import Authenticator
from fedlearn.security.errors import ClientIdentityError
from fedlearn.security.runtokens import RunTokens
from fedlearn.security.tls import is_loopback
from fedlearn.security.tokens import TokenStore

log = logging.getLogger("fedlearn.server")

RUN_TOKEN_HINT = ("this server gives its expected clients per-run tokens on this machine; start "
                  "`fedlearn client --partition-index I` as the same user, or pass --token-file")


@dataclass
class ClientIdentity:
    """The server's Authenticator, its per-run tokens when it issues them, and a few words for its log line."""

    authenticator: Authenticator
    run_tokens: RunTokens | None
    description: str

    def admits(self, client_id: str) -> bool:
        """The runtime's question: may ``client_id`` take part at all (see ``Authenticator.admits``)."""
        return self.authenticator.admits(client_id)


def server_identity(address: str, *, client_ca: str | None = None, tokens: TokenStore | None = None,
                    allowed: AllowList | None = None, allow_any: bool = False, tls: bool = False) -> ClientIdentity:
    """Choose how a server on ``address`` authenticates clients; raises ClientIdentityError when nothing would."""
    listed = f", allow-list of {len(allowed)} client(s)" if allowed is not None else ""
    if client_ca or tokens is not None:
        if allow_any:
            raise ClientIdentityError("--allow-any-client turns client authentication off; drop it, or drop "
                                      "--client-ca/--tokens")
        if client_ca and tokens is None and allowed is None:
            log.warning("mutual TLS without --allowed-clients admits every client certificate %s ever signed; "
                        "name the clients that may join with --allowed-clients", client_ca)
        proofs = [word for word, used in (("certificate", client_ca), ("token", tokens is not None)) if used]
        return ClientIdentity(Authenticator(mtls=bool(client_ca), tokens=tokens, allowed_clients=allowed), None,
                              f"client ids proved by {' and '.join(proofs)}{listed}")
    if allow_any:
        log.warning("NO CLIENT AUTHENTICATION (--allow-any-client): whoever reaches %s can join as any client id%s, "
                    "read that client's tasks and send results in its name; use --client-ca or --tokens outside a "
                    "test setup", address, " on the allow-list" if allowed is not None else "")
        return ClientIdentity(Authenticator(claimed=True, allowed_clients=allowed), None,
                              "ANY CLAIMED CLIENT ID (--allow-any-client)" + listed)
    if is_loopback(address):
        run_tokens = RunTokens()
        return ClientIdentity(Authenticator(tokens=run_tokens, allowed_clients=allowed,
                                            missing_token_hint=RUN_TOKEN_HINT), run_tokens,
                              "per-run client tokens" + listed)
    transport = "TLS protects the connection, not who is on the other end; " if tls else ""
    raise ClientIdentityError(f"nothing authenticates clients on {address}: {transport}pass --client-ca CA.pem "
                              "(mutual TLS) and/or --tokens FILE, or --allow-any-client to accept any claimed "
                              "client id")
