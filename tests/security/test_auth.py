"""Authenticator on a real gRPC server: tokens, mutual TLS, both together, and the statuses strangers get."""

from __future__ import annotations

import grpc
import pytest

from fedlearn.security import (
    CLIENT_ID_HEADER,
    AllowList,
    Authenticator,
    TokenStore,
    channel_credentials,
    server_credentials,
)


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
    with pytest.raises(ValueError):
        Authenticator(claimed=True, mtls=True)


def test_a_certificate_must_match_the_claimed_id_and_the_allow_list_is_rechecked_on_every_call(pki, serve, rpc,
                                                                                              tmp_path):
    listed = tmp_path / "clients.txt"
    listed.write_text("site-a\n")
    allowed = AllowList.parse(f"@{listed}")
    credentials = server_credentials(
        pki.ca1 / "server.pem", pki.ca1 / "server.key", client_ca=pki.ca1 / "ca.pem", host="localhost"
    )
    with serve(credentials, handler_for(Authenticator(mtls=True, allowed_clients=allowed))) as port:
        target = f"localhost:{port}"
        creds = channel_credentials(pki.ca1 / "ca.pem", pki.ca1 / "site-a.pem", pki.ca1 / "site-a.key")
        assert rpc(target, creds, metadata=[(CLIENT_ID_HEADER, "site-a")]) == b"site-a"
        error = refused(rpc, target, creds, metadata=[(CLIENT_ID_HEADER, "site-b")])
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "claims client 'site-b' but its certificate belongs to 'site-a'" in error.details()
        listed.write_text("site-b\n")  # the operator removes site-a and sends SIGHUP
        allowed.reload()
        error = refused(rpc, target, creds)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "not in --allowed-clients" in error.details()


def test_claimed_identity_is_taken_as_is_but_still_bounded_by_the_allow_list(pki, serve, rpc):
    credentials = server_credentials(pki.ca1 / "server.pem", pki.ca1 / "server.key", host="localhost")
    auth = Authenticator(claimed=True, allowed_clients={"site-a", "site-b"})
    with serve(credentials, handler_for(auth)) as port:
        target, creds = f"localhost:{port}", channel_credentials(pki.ca1 / "ca.pem")
        assert rpc(target, creds, metadata=[(CLIENT_ID_HEADER, "site-b")]) == b"site-b"
        assert refused(rpc, target, creds).code() == grpc.StatusCode.UNAUTHENTICATED
        error = refused(rpc, target, creds, metadata=[(CLIENT_ID_HEADER, "site-z")])
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "'site-z' is not registered" in error.details()


def test_admits_answers_the_allow_list_and_token_ownership(tokens):
    store, _, _ = tokens
    assert Authenticator(mtls=True).admits("anyone-the-ca-signed")
    assert Authenticator(claimed=True).admits("anything")
    assert Authenticator(tokens=store).admits("site-a") and not Authenticator(tokens=store).admits("site-z")
    narrowed = Authenticator(mtls=True, tokens=store, allowed_clients=["site-b"])
    assert narrowed.admits("site-b") and not narrowed.admits("site-a")
    assert not Authenticator(mtls=True, allowed_clients=AllowList(["x"])).admits("y")


def test_a_flood_of_refused_calls_logs_a_line_per_reason_per_interval(caplog) -> None:
    """One line per refused call let an attacker fill the disk (490 MB an hour at 630 calls/s)."""
    import logging

    from fedlearn.security.auth import RefusalLog

    refusals = RefusalLog(interval=3600.0)
    with caplog.at_level(logging.WARNING, logger="fedlearn.security.auth"):
        for i in range(1000):
            refusals.note("no bearer token", f"ipv4:127.0.0.1:{i}")
        refusals.note("unknown token", "ipv4:127.0.0.1:1")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused a call from ipv4:127.0.0.1:0: no bearer token",
                     "refused a call from ipv4:127.0.0.1:1: unknown token"]
    refusals.interval = 0.0
    refusals.note("no bearer token", "ipv4:127.0.0.1:2")
    assert caplog.records[-1].getMessage().endswith("(and 999 more like it in the last 0 s)")
    refusals.interval = 3600.0
    with caplog.at_level(logging.WARNING, logger="fedlearn.security.auth"):
        for i in range(500):  # a flood of made-up ids: one kind of refusal, not 500
            refusals.note(f"client id 'fake-{i}' is not on the allow-list", "ipv4:127.0.0.1:3")
    assert sum("is not on the allow-list" in r.getMessage() for r in caplog.records) == 1
