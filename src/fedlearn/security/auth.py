"""Server-side client authentication for gRPC handlers: a verified certificate, a bearer token, or both.

A handler calls ``Authenticator.identify(context)`` first, on every RPC; it returns the client
id or aborts the call with a status and one line the client can act on: UNAUTHENTICATED when
the caller proved no identity (no certificate, no or unknown token), PERMISSION_DENIED when it
proved one the server does not accept (certificate and token disagree, the call claims another
id than the one proved, the client is not on the allow-list). ``admits(client_id)`` answers
the same allow-list question for the runtime (it keeps no state for ids it would refuse).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Collection
from typing import NoReturn, Protocol

import grpc

from fedlearn.security.allowlist import AllowList
from fedlearn.security.certs import client_id_from_auth_context

log = logging.getLogger(__name__)

TOKEN_HEADER = "authorization"  # what grpc.access_token_call_credentials sends: "Bearer <token>"
CLIENT_ID_HEADER = "x-fedlearn-client-id"  # the id a client claims; only a certificate or a token proves it
MISSING_TOKEN_HINT = "pass --token-file (the operator makes one with `fedlearn tokens add NAME`)"



_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


class RefusalLog:
    """Logs refused calls without letting a flood fill the disk: the first of each reason at once, then at most
    one summary line per reason every ``interval`` seconds, with how many were refused since."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._pending: dict[str, int] = {}

    def note(self, reason: str, peer: str) -> None:
        now = time.monotonic()
        kind = _QUOTED.sub("'...'", reason)  # one kind per message, whatever id or token it quotes
        with self._lock:
            if len(self._last) > 1000:  # keep the table bounded, whatever the reasons
                self._last.clear()
                self._pending.clear()
            last = self._last.get(kind)
            if last is not None and now - last < self.interval:
                self._pending[kind] = self._pending.get(kind, 0) + 1
                return
            self._last[kind] = now
            count = self._pending.pop(kind, 0)
        log.warning("refused a call from %s: %s%s", peer, reason,
                    f" (and {count} more like it in the last {self.interval:g} s)" if count else "")


REFUSALS = RefusalLog()

class TokenTable(Protocol):
    """What the Authenticator needs of a token table: ``TokenStore`` (a file) or ``RunTokens`` (issued per run)."""

    def identify(self, token: str | None) -> str | None: ...

    def __contains__(self, client_id: object) -> bool: ...


def bearer_token(context: grpc.ServicerContext) -> str | None:
    """The token of an 'authorization: Bearer <token>' header of this call, or None."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == TOKEN_HEADER and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def claimed_client_id(context: grpc.ServicerContext) -> str | None:
    """The client id a call claims in its metadata, or None (nothing proves it by itself)."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == CLIENT_ID_HEADER and isinstance(value, str) and value:
            return value
    return None


class Authenticator:
    """Decides who a gRPC call comes from and refuses anyone unknown.

    ``mtls``: the server was started with ``--client-ca`` (require_client_auth), so every
    connection carries a verified certificate whose common name is the client id.
    ``tokens``: every call must carry a bearer token found in the table. With both, the
    token must belong to the same client as the certificate. ``claimed``: nothing proves an
    identity and the claimed id is taken as is (``--allow-any-client``; for tests and trusted
    networks only). In every mode a claimed id that differs from the proved one is refused.
    ``allowed_clients`` (an AllowList or a collection of ids), when given, limits which ids
    are accepted; for mutual TLS alone any certificate the CA issued is otherwise enough, for
    tokens every owner of a token.
    """

    def __init__(
        self,
        *,
        mtls: bool = False,
        tokens: TokenTable | None = None,
        claimed: bool = False,
        allowed_clients: AllowList | Collection[str] | None = None,
        missing_token_hint: str = MISSING_TOKEN_HINT,
    ) -> None:
        if not mtls and tokens is None and not claimed:
            raise ValueError("Authenticator needs mtls=True, a token table, both, or claimed=True")
        if claimed and (mtls or tokens is not None):
            raise ValueError("claimed=True trusts the claimed id; it cannot be combined with mtls or tokens")
        self.mtls = mtls
        self.tokens = tokens
        self.claimed = claimed
        if allowed_clients is not None and not isinstance(allowed_clients, AllowList):
            allowed_clients = AllowList(allowed_clients)
        self.allowed_clients: AllowList | None = allowed_clients
        self.missing_token_hint = missing_token_hint

    def admits(self, client_id: str) -> bool:
        """Whether ``client_id`` may take part at all: on the allow-list, and the owner of a token when tokens
        are required. It proves nothing about a caller (``identify`` does); the runtime asks it before it keeps
        anything for an id."""
        if self.allowed_clients is not None and not self.allowed_clients.admits(client_id):
            return False
        return self.tokens is None or client_id in self.tokens

    def identify(self, context: grpc.ServicerContext) -> str:
        """The caller's client id; otherwise aborts the call (context.abort raises) with a clear status."""
        claimed = claimed_client_id(context)
        if self.claimed:
            if claimed is None:
                self._refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                             f"no client identity: send the {CLIENT_ID_HEADER} header")
            client_id, proof = claimed, "claimed"
        else:
            client_id, proof = self._proved(context)
            if claimed is not None and claimed != client_id:
                self._refuse(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"this call claims client {claimed[:80]!r} but its {proof} belongs to {client_id!r}; "
                    f"a client may act only as itself (use --client-id {client_id} or that client's credentials)",
                )
        if self.allowed_clients is not None and not self.allowed_clients.admits(client_id):
            self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"client {client_id[:80]!r} is not registered on this server (not in --allowed-clients); "
                "ask the operator to add it",
            )
        return client_id

    def _proved(self, context: grpc.ServicerContext) -> tuple[str, str]:
        """The id a certificate and/or token proves, and what proved it; aborts when nothing does."""
        cert_id = None
        if self.mtls:
            cert_id = client_id_from_auth_context(context.auth_context())
            if cert_id is None:
                self._refuse(
                    context,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "this server requires a client certificate signed by its CA; pass --cert and --key",
                )
        if self.tokens is None:
            assert cert_id is not None
            return cert_id, "certificate"
        token = bearer_token(context)
        if token is None:
            self._refuse(context, grpc.StatusCode.UNAUTHENTICATED,
                         f"this server requires a client token; {self.missing_token_hint}")
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
        return token_id, "token"

    @staticmethod
    def _refuse(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
        REFUSALS.note(message, context.peer())
        context.abort(code, message)
        raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises
