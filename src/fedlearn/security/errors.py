"""Security errors a user can cause; each is one line that names the problem and the fix."""

from __future__ import annotations

from fedlearn.errors import FedLearnError


class CertificateError(FedLearnError):
    """A certificate or key is missing, malformed, expired, for the wrong host or from the wrong CA."""


class TokenFileError(FedLearnError):
    """A client token file is missing or malformed, or a client id is not allowed."""


class InsecureTransportError(FedLearnError):
    """Plaintext gRPC was asked for on an address other than this machine's loopback."""


class AllowListError(FedLearnError):
    """A ``--allowed-clients`` list or file is empty, unreadable or names something that is not a client id."""


class ClientIdentityError(FedLearnError):
    """The server would not know who its clients are (nothing authenticates them), or its settings contradict."""
