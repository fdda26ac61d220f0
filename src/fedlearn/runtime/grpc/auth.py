"""Refusals with a gRPC status, and the claimed identity of a runtime served without an Authenticator.

Real authentication (client certificates, bearer tokens) is ``fedlearn.security.Authenticator``,
which ``fedlearn server`` always installs: on loopback without --tokens or --client-ca it issues
per-run tokens, and it trusts claimed ids only with ``--allow-any-client``. A GrpcRuntime served
with no Authenticator at all (tests, benchmarks) trusts the id a client claims.
"""

from __future__ import annotations

import grpc

from fedlearn.security.auth import CLIENT_ID_HEADER, claimed_client_id

__all__ = ["CLIENT_ID_HEADER", "FORMAT_HEADER", "AuthError", "check_format", "claimed_identity"]

FORMAT_HEADER = "x-fedlearn-format"  # the message format version a client speaks (fedlearn.protocol.codec)


class AuthError(Exception):
    """A refusal, carrying the gRPC status and the one-line message the caller should get."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def claimed_identity(context: grpc.ServicerContext) -> str:
    """The client id a caller claims in its metadata (development only: nothing proves it)."""
    client_id = claimed_client_id(context)
    if client_id is not None:
        return client_id
    raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"no client identity: send the {CLIENT_ID_HEADER} header")


def check_format(context: grpc.ServicerContext, expected: int) -> None:
    """Refuse a client that speaks another message format, naming both versions (older clients send none)."""
    sent = next((value for key, value in context.invocation_metadata() or () if key == FORMAT_HEADER), None)
    if sent != str(expected):
        theirs = f"message format {sent}" if sent else "an older message format (1)"
        raise AuthError(grpc.StatusCode.FAILED_PRECONDITION,
                        f"this client speaks {theirs}, this server speaks format {expected}; run the same fedlearn "
                        "release on the server and every client")
