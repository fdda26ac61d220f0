"""Shared for the security tests: two development CAs with their certificates, and a tiny real gRPC server."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fedlearn.security import init_ca, issue

SERVICE = "fedlearn.test.Echo"
WHO = f"/{SERVICE}/Who"


@dataclass(frozen=True)
class Pki:
    """ca1 signed server (localhost, 127.0.0.1, ::1) and site-a; ca2, a stranger, signed server and site-b."""

    ca1: Path
    ca2: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    ca1 = tmp_path_factory.mktemp("ca1")
    ca2 = tmp_path_factory.mktemp("ca2")
    init_ca(ca1)
    issue(ca1, "server", server=True)
    issue(ca1, "site-a", server=False)
    init_ca(ca2, name="Someone else's CA")
    issue(ca2, "server", server=True)
    issue(ca2, "site-b", server=False)
    return Pki(ca1, ca2)


@contextlib.contextmanager
def serving(credentials: grpc.ServerCredentials, handler: Callable) -> Iterator[int]:
    """A real gRPC server on 127.0.0.1 (free port) whose one unary method runs ``handler(request, context)``."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"Who": grpc.unary_unary_rpc_method_handler(handler)}),)
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    assert port
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None).wait(5)


def call(target: str, credentials: grpc.ChannelCredentials, *, metadata=None, timeout: float = 5.0) -> bytes:
    """One unary call on a fresh secure channel; raises grpc.RpcError like the real client would see."""
    with grpc.secure_channel(target, credentials) as channel:
        return channel.unary_unary(WHO)(b"", timeout=timeout, metadata=metadata)


@pytest.fixture
def serve():
    """``with serve(credentials, handler) as port:`` runs a real gRPC server for the block."""
    return serving


@pytest.fixture
def rpc():
    """``rpc(target, channel_credentials, metadata=...)`` makes one call and returns the reply bytes."""
    return call
