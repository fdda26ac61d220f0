"""Refusals with a gRPC status, and the claimed identity used on loopback without TLS or tokens.

Real authentication (client certificates, bearer tokens) is ``fedlearn.security.Authenticator``;
a server started without either trusts the id a client claims, which ``fedlearn server`` allows
only on a loopback address or with ``--insecure``.
"""

from __future__ import annotations

import grpc

CLIENT_ID_HEADER = "x-fedlearn-client-id"
FORMAT_HEADER = "x-fedlearn-format"  # the message format version a client speaks (fedlearn.protocol.codec)


class AuthError(Exception):
    """A refusal, carrying the gRPC status and the one-line message the caller should get."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def claimed_identity(context: grpc.ServicerContext) -> str:
    """The client id a caller claims in its metadata (development only: nothing proves it)."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_ID_HEADER and value:
            return value
    raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"no client identity: send the {CLIENT_ID_HEADER} header")


def check_format(context: grpc.ServicerContext, expected: int) -> None:
    """Refuse a client that speaks another message format, naming both versions (older clients send none)."""
    sent = next((value for key, value in context.invocation_metadata() or () if key == FORMAT_HEADER), None)
    if sent != str(expected):
        theirs = f"message format {sent}" if sent else "an older message format (1)"
        raise AuthError(grpc.StatusCode.FAILED_PRECONDITION,
                        f"this client speaks {theirs}, this server speaks format {expected}; run the same fedlearn "
                        "release on the server and every client")
