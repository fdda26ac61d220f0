"""Server-side client authentication for gRPC handlers: a verified certificate, a bearer token, or both.

A handler calls ``Authenticator.identify(context)`` first; it returns the client id or aborts
the call with a status and one line the client can act on: UNAUTHENTICATED when the caller
proved no identity (no certificate, no or unknown token), PERMISSION_DENIED when it proved one
the server does not accept (certificate and token disagree, client not registered).
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import NoReturn

import grpc

from fedlearn.security.certs import client_id_from_auth_context
from fedlearn.security.tokens import TokenStore

log = logging.getLogger(__name__)

TOKEN_HEADER = "authorization"  # what grpc.access_token_call_credentials sends: "Bearer <token>"


def bearer_token(context: grpc.ServicerContext) -> str | None:
    """The token of an 'authorization: Bearer <token>' header of this call, or None."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == TOKEN_HEADER and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class Authenticator:
    """Decides who a gRPC call comes from and refuses anyone unknown.

    ``mtls``: the server was started with ``--client-ca`` (require_client_auth), so every
    connection carries a verified certificate whose common name is the client id.
    ``tokens``: every call must carry a bearer token found in the store. With both, the
    token must belong to the same client as the certificate. ``allowed_clients``, when
    given, further limits which ids are accepted (for mutual TLS alone, any certificate the
    CA issued is otherwise enough).
    """

    def __init__(
        self,
        *,
        mtls: bool = False,
        tokens: TokenStore | None = None,
        allowed_clients: Collection[str] | None = None,
    ) -> None:
        if not mtls and tokens is None:
            raise ValueError("Authenticator needs mtls=True, a TokenStore, or both")
        self.mtls = mtls
        self.tokens = tokens
        self.allowed_clients = frozenset(allowed_clients) if allowed_clients is not None else None

    def identify(self, context: grpc.ServicerContext) -> str:
        """The caller's client id; otherwise aborts the call (context.abort raises) with a clear status."""
        cert_id = None
        if self.mtls:
            cert_id = client_id_from_auth_context(context.auth_context())
            if cert_id is None:
                self._refuse(
                    context,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this server requires a client certificate signed by its CA; pass --cert and --key",
                )
        client_id = cert_id
        if self.tokens is not None:
            token = bearer_token(context)
            if token is None:
                self._refuse(
                    context,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this server requires a client token; pass --token-file (the operator makes one with "
                    "`fedlearn tokens add NAME`)",
                )
            token_id = self.tokens.identify(token)
            if token_id is None:
                self._refuse(
                    context,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "unknown or revoked client token; "
                    "ask the server operator for a new one (`fedlearn tokens add NAME`)",
                )
            if cert_id is not None and token_id != cert_id:
                self._refuse(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the client certificate is for {cert_id!r} but the token belongs to {token_id!r}; "
                    f"use the token issued for {cert_id!r}",
                )
            client_id = token_id
        assert client_id is not None
        if self.allowed_clients is not None and client_id not in self.allowed_clients:
            self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"client {client_id!r} is not registered on this server; ask the operator to add it",
            )
        return client_id

    @staticmethod
    def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
        log.warning("refused a call from %s: %s", context.peer(), message)
        context.abort(code, message)
        raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises
