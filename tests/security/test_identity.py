"""Which authentication `fedlearn server` uses, and its refusal to start when nothing would authenticate clients."""

from __future__ import annotations

import logging

import pytest

from fedlearn.security import AllowList, ClientIdentityError, RunTokens, TokenStore, server_identity


@pytest.mark.parametrize("address", ["0.0.0.0:8443", "[::]:8443", "10.0.0.5:8443", "fl.example.org:8443"])
def test_nothing_authenticating_clients_off_loopback_is_refused(address):
    with pytest.raises(ClientIdentityError) as caught:
        server_identity(address)
    message = str(caught.value)
    assert "nothing authenticates clients" in message and "--allow-any-client" in message
    assert "--client-ca" in message and "--tokens" in message and "\n" not in message


def test_tls_without_client_authentication_is_refused_too():
    with pytest.raises(ClientIdentityError, match="TLS protects the connection, not who is on the other end"):
        server_identity("0.0.0.0:8443", tls=True)


def test_allow_any_client_starts_with_a_loud_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="fedlearn.server"):
        identity = server_identity("0.0.0.0:8443", allow_any=True)
    assert identity.authenticator.claimed and identity.run_tokens is None
    assert "NO CLIENT AUTHENTICATION (--allow-any-client)" in caplog.text and "0.0.0.0:8443" in caplog.text
    assert identity.admits("anyone")


def test_allow_any_client_with_real_authentication_is_a_contradiction(tmp_path):
    store = TokenStore(tmp_path / "tokens.txt", missing_ok=True)
    with pytest.raises(ClientIdentityError, match="drop it, or drop --client-ca/--tokens"):
        server_identity("0.0.0.0:8443", tokens=store, allow_any=True)


def test_loopback_without_credentials_issues_per_run_tokens():
    identity = server_identity("127.0.0.1:8443", allowed=AllowList(["client-0"]))
    assert isinstance(identity.run_tokens, RunTokens)
    assert identity.authenticator.tokens is identity.run_tokens
    assert not identity.admits("client-0")  # no token issued yet


def test_mutual_tls_alone_warns_that_every_certificate_of_the_ca_is_admitted(caplog):
    with caplog.at_level(logging.WARNING, logger="fedlearn.server"):
        identity = server_identity("0.0.0.0:8443", client_ca="certs/ca.pem")
    assert identity.authenticator.mtls and "every client certificate certs/ca.pem ever signed" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedlearn.server"):
        listed = server_identity("0.0.0.0:8443", client_ca="certs/ca.pem", allowed=AllowList(["site-a"]))
    assert caplog.text == ""
    assert listed.admits("site-a") and not listed.admits("site-b")


def test_tokens_admit_their_owners_narrowed_by_the_allow_list(tmp_path):
    store = TokenStore(tmp_path / "tokens.txt", missing_ok=True)
    store.add("site-a")
    store.add("site-b")
    assert server_identity("0.0.0.0:8443", tokens=store).admits("site-b")
    identity = server_identity("0.0.0.0:8443", tokens=store, allowed=AllowList(["site-a", "site-c"]))
    assert identity.admits("site-a")
    assert not identity.admits("site-b")  # has a token, not on the list
    assert not identity.admits("site-c")  # on the list, no token
