"""Authenticator on a real gRPC server: tokens, mutual TLS, both together, and the statuses strangers get."""

from __future__ import annotations

import grpc
import pytest

from fedlearn.security import Authenticator, TokenStore, channel_credentials, server_credentials


@pytest.fixture
def tokens(tmp_path):
    store = TokenStore(tmp_path / "tokens.txt", missing_ok=True)
    return store, store.add("site-a"), store.add("site-b")


def handler_for(auth: Authenticator):
    def who(request, context):
        return auth.identify(context).encode()

    return who


def refused(rpc, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        rpc(*args, **kwargs)
    return caught.value


def test_tokens_over_tls(pki, tokens, serve, rpc):
    store, token_a, token_b = tokens
    credentials = server_credentials(pki.ca1 / "server.pem", pki.ca1 / "server.key", host="localhost")
    with serve(credentials, handler_for(Authenticator(tokens=store))) as port:
        target = f"localhost:{port}"
        ca = pki.ca1 / "ca.pem"
        assert rpc(target, channel_credentials(ca, token=token_a)) == b"site-a"
        assert rpc(target, channel_credentials(ca, token=token_b)) == b"site-b"

        error = refused(rpc, target, channel_credentials(ca))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "requires a client token" in error.details()

        error = refused(rpc, target, channel_credentials(ca, token="guessed"))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown or revoked" in error.details()

        # A site is added while the server runs: refused until the file is reloaded, then accepted.
        token_c = TokenStore(store.path).add("site-c")
        assert refused(rpc, target, channel_credentials(ca, token=token_c)).code() == grpc.StatusCode.UNAUTHENTICATED
        store.reload()
        assert rpc(target, channel_credentials(ca, token=token_c)) == b"site-c"


def test_mtls_and_token_must_agree(pki, tokens, serve, rpc):
    store, token_a, token_b = tokens
    credentials = server_credentials(
        pki.ca1 / "server.pem", pki.ca1 / "server.key", client_ca=pki.ca1 / "ca.pem", host="localhost"
    )
    with serve(credentials, handler_for(Authenticator(mtls=True, tokens=store))) as port:
        target = f"localhost:{port}"
        cert = (pki.ca1 / "ca.pem", pki.ca1 / "site-a.pem", pki.ca1 / "site-a.key")
        assert rpc(target, channel_credentials(*cert, token=token_a)) == b"site-a"
        error = refused(rpc, target, channel_credentials(*cert, token=token_b))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "certificate is for 'site-a' but the token belongs to 'site-b'" in error.details()
        assert refused(rpc, target, channel_credentials(*cert)).code() == grpc.StatusCode.UNAUTHENTICATED


def test_mtls_with_a_list_of_registered_clients(pki, serve, rpc, tmp_path):
    credentials = server_credentials(
        pki.ca1 / "server.pem", pki.ca1 / "server.key", client_ca=pki.ca1 / "ca.pem", host="localhost"
    )
    auth = Authenticator(mtls=True, allowed_clients={"site-z"})
    with serve(credentials, handler_for(auth)) as port:
        creds = channel_credentials(pki.ca1 / "ca.pem", pki.ca1 / "site-a.pem", pki.ca1 / "site-a.key")
        error = refused(rpc, f"localhost:{port}", creds)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'site-a' is not registered" in error.details()


def test_mtls_authenticator_behind_a_server_without_client_ca(pki, serve, rpc):
    credentials = server_credentials(pki.ca1 / "server.pem", pki.ca1 / "server.key", host="localhost")
    with serve(credentials, handler_for(Authenticator(mtls=True))) as port:
        error = refused(rpc, f"localhost:{port}", channel_credentials(pki.ca1 / "ca.pem"))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "--cert and --key" in error.details()


def test_authenticator_needs_a_mechanism():
    with pytest.raises(ValueError):
        Authenticator()
