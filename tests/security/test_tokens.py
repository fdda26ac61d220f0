"""Client tokens: only hashes on disk, constant-time lookup, reload that never locks everyone out, SIGHUP."""

from __future__ import annotations

import logging
import os
import signal
import stat
import threading
import time

import pytest

from fedlearn.errors import FedLearnError
from fedlearn.security import TokenFileError, TokenStore, hash_token, install_sighup_reload, new_token


def test_new_token_and_hash():
    token = new_token()
    assert len(token) >= 43 and token != new_token()
    assert hash_token(token) == hash_token(token)
    assert len(hash_token(token)) == 64 and int(hash_token(token), 16) >= 0


def test_add_then_identify(tmp_path):
    path = tmp_path / "tokens.txt"
    store = TokenStore(path, missing_ok=True)
    token_a = store.add("site-a")
    token_b = store.add("site-b")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert token_a not in text and token_b not in text  # only hashes are kept
    assert f"site-a sha256:{hash_token(token_a)}" in text

    assert store.identify(token_a) == "site-a"
    assert store.identify(token_b) == "site-b"
    assert store.identify("not-a-token") is None
    assert store.identify("") is None and store.identify(None) is None
    assert store.clients() == ["site-a", "site-b"] and "site-a" in store

    fresh = TokenStore(path)  # what a restarted server reads
    assert fresh.identify(token_b) == "site-b"

    with pytest.raises(TokenFileError, match="already has a token"):
        store.add("site-a")
    token_a2 = store.add("site-a", replace=True)
    assert store.identify(token_a2) == "site-a"
    assert store.identify(token_a) is None  # replaced = revoked
    assert store.identify(token_b) == "site-b"
    with pytest.raises(TokenFileError):
        store.add("bad name")


def test_file_format_comments_and_errors(tmp_path):
    token = new_token()
    path = tmp_path / "tokens.txt"
    path.write_text(f"# sites\n\n  site-a   sha256:{hash_token(token).upper()}  # first site\n")
    assert TokenStore(path).identify(token) == "site-a"

    cases = {
        f"site-a {token}\n": "line 1 is not",  # a pasted plaintext token
        f"# ok\nsite-a sha256:{hash_token(token)}\nsite-b\n": "line 3 is not",
        f"site-a sha256:{hash_token(token)} extra\n": "line 1 is not",
        f"site_a sha256:{hash_token(token)}\n": "line 1 has a client id",
        f"site-a sha256:{hash_token(token)}\nsite-b sha256:{hash_token(token)}\n": "line 2 repeats",
    }
    for text, expected in cases.items():
        path.write_text(text)
        with pytest.raises(TokenFileError) as caught:
            TokenStore(path)
        message = str(caught.value)
        assert expected in message and "\n" not in message and isinstance(caught.value, FedLearnError)
        assert token not in message  # never echo what may be a secret
    with pytest.raises(TokenFileError, match="does not exist"):
        TokenStore(tmp_path / "missing.txt")


def test_reload_picks_up_edits_and_keeps_old_table_on_a_bad_file(tmp_path, caplog):
    path = tmp_path / "tokens.txt"
    store = TokenStore(path, missing_ok=True)
    token_a = store.add("site-a")

    # another process (``fedlearn tokens add``) adds a site; this server sees it only after reload
    token_b = TokenStore(path).add("site-b")
    assert store.identify(token_b) is None
    assert store.reload() is True
    assert store.identify(token_b) == "site-b"

    good = path.read_text()
    path.write_text(good + "site-c oops\n")
    with caplog.at_level(logging.ERROR, logger="fedlearn.security.tokens"):
        assert store.reload() is False
    # 2 header comment lines and 2 clients, then the bad line
    assert "line 5 is not" in caplog.text and "previous 2 client(s)" in caplog.text
    assert store.identify(token_a) == "site-a" and store.identify(token_b) == "site-b"

    path.unlink()
    assert store.reload() is False
    assert store.identify(token_a) == "site-a"

    path.write_text(good.replace(f"site-a sha256:{hash_token(token_a)}\n", ""))  # revoke site-a
    assert store.reload() is True
    assert store.identify(token_a) is None and store.identify(token_b) == "site-b"


def test_identify_is_safe_during_concurrent_reloads(tmp_path):
    path = tmp_path / "tokens.txt"
    store = TokenStore(path, missing_ok=True)
    token = store.add("site-a")
    store.add("site-b")
    errors = []

    def lookups():
        for _ in range(2000):
            if store.identify(token) != "site-a":
                errors.append("lost site-a")

    threads = [threading.Thread(target=lookups) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in range(200):
        store.reload()
    for thread in threads:
        thread.join()
    assert errors == []


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_reloads(tmp_path):
    path = tmp_path / "tokens.txt"
    store = TokenStore(path, missing_ok=True)
    store.add("site-a")
    token_b = TokenStore(path).add("site-b")
    assert store.identify(token_b) is None

    previous = install_sighup_reload(store)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        # Python runs the handler on the main thread between bytecodes (CPython: before os.kill returns).
        deadline = time.monotonic() + 2
        while store.identify(token_b) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.identify(token_b) == "site-b"
    finally:
        signal.signal(signal.SIGHUP, previous if previous is not None else signal.SIG_DFL)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
def test_sighup_install_needs_the_main_thread(tmp_path):
    store = TokenStore(tmp_path / "tokens.txt", missing_ok=True)
    raised = []

    def install():
        try:
            install_sighup_reload(store)
        except RuntimeError as exc:
            raised.append(str(exc))

    thread = threading.Thread(target=install)
    thread.start()
    thread.join()
    assert raised and "main thread" in raised[0]
