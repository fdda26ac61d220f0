"""Per-run tokens of a loopback server: private files, kept for --resume, found by a client of the same user."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from fedlearn.security import ClientIdentityError, RunTokens, wait_for_run_token
from fedlearn.security.runtokens import pointer_path, published_token, token_file_name

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes and pids are POSIX here")


@pytest.fixture(autouse=True)
def fedlearn_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("FEDLEARN_HOME", str(home))
    return home


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@posix_only
def test_issue_writes_one_private_token_per_client_and_reuses_them(tmp_path):
    run = tmp_path / "run"
    tokens = RunTokens()
    folder = tokens.issue(run, ["client-0", "client-1", "client-0"])
    assert folder == run / "client-tokens" and mode(folder) == 0o700
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["client-0.token", "client-1.token"]
    assert all(mode(folder / f) == 0o600 for f in files)
    token0 = (folder / "client-0.token").read_text().strip()
    assert tokens.identify(token0) == "client-0" and tokens.identify(token0[::-1]) is None
    assert tokens.identify(None) is None and tokens.identify("") is None
    assert tokens.clients() == ["client-0", "client-1"] and "client-1" in tokens and "client-2" not in tokens

    # A resumed server reads the same tokens back, so clients that kept waiting are still accepted;
    # a damaged file gets a fresh token.
    (folder / "client-1.token").write_text("short\n")
    again = RunTokens()
    again.issue(run, ["client-0", "client-1"])
    assert again.identify(token0) == "client-0"
    token1 = (folder / "client-1.token").read_text().strip()
    assert len(token1) >= 32 and again.identify(token1) == "client-1"


def test_odd_client_ids_get_safe_distinct_file_names():
    assert token_file_name("client-3") == "client-3.token"
    assert token_file_name("f0123_45") == "f0123_45.token"
    odd = [token_file_name(name) for name in ("../etc/passwd", "a b", "a_b ", ".hidden", "x" * 300)]
    assert all("/" not in n and not n.startswith(".") and len(n) < 80 for n in odd)
    assert len(set(odd)) == len(odd)


@posix_only
def test_publish_lets_a_client_of_this_user_find_its_token_and_unpublish_removes_it(tmp_path, fedlearn_home):
    tokens = RunTokens()
    folder = tokens.issue(tmp_path / "run", ["client-0"])
    path = tokens.publish(4242)
    assert path == pointer_path(4242) == fedlearn_home / "loopback" / "4242.json"
    assert mode(fedlearn_home) == mode(fedlearn_home / "loopback") == 0o700 and mode(path) == 0o600
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert published_token(4242, "client-0") == (True, (folder / "client-0.token").read_text().strip())
    assert published_token(4242, "client-9") == (True, None)  # a live server, but no token for that id
    assert published_token(4243, "client-0") == (False, None)
    tokens.unpublish()
    assert not path.exists() and published_token(4242, "client-0") == (False, None)


@posix_only
def test_pointer_of_a_dead_server_is_ignored_and_a_live_one_is_not_overwritten(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    first = RunTokens()
    first.issue(tmp_path / "a", ["client-0"])
    path = first.publish(4300)
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "pid": dead.pid}))
    assert published_token(4300, "client-0") == (False, None)  # a killed server's leftovers

    second = RunTokens()
    second.issue(tmp_path / "b", ["client-0"])
    second.publish(4300)  # replaces the dead server's pointer
    assert published_token(4300, "client-0")[1] == (tmp_path / "b" / "client-tokens" / "client-0.token"
                                                    ).read_text().strip()

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path.write_text(json.dumps({**record, "pid": alive.pid}))
        with pytest.raises(ClientIdentityError, match=f"pid {alive.pid}.*port 4300"):
            _publish(tmp_path / "c", 4300)
    finally:
        alive.kill()
        alive.wait()


def _publish(run, port):
    tokens = RunTokens()
    tokens.issue(run, ["client-0"])
    return tokens.publish(port)


@posix_only
def test_a_pointer_others_may_write_is_not_trusted(tmp_path):
    tokens = RunTokens()
    tokens.issue(tmp_path / "run", ["client-0"])
    path = tokens.publish(4400)
    os.chmod(path, 0o666)
    assert published_token(4400, "client-0") == (False, None)


@posix_only
def test_loose_home_folder_is_tightened(tmp_path, fedlearn_home):
    (fedlearn_home / "loopback").mkdir(parents=True)
    os.chmod(fedlearn_home / "loopback", 0o755)
    _publish(tmp_path / "run", 4500)
    assert mode(fedlearn_home / "loopback") == 0o700


def test_wait_returns_none_soon_for_a_listening_server_that_publishes_nothing():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        started = time.monotonic()
        assert wait_for_run_token(f"127.0.0.1:{port}", "client-0", 30, interval=0.05, grace=0.3) is None
        assert time.monotonic() - started < 5


def test_wait_gives_up_on_a_server_that_never_comes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        started = time.monotonic()
        assert wait_for_run_token(f"127.0.0.1:{port}", "client-0", 0.5, interval=0.05) is None
        assert time.monotonic() - started < 5


@posix_only
def test_wait_finds_a_token_published_while_waiting(tmp_path):
    import threading

    tokens = RunTokens()
    folder = tokens.issue(tmp_path / "run", ["client-1"])
    timer = threading.Timer(0.3, tokens.publish, args=(4600,))
    timer.start()
    try:
        token = wait_for_run_token("127.0.0.1:4600", "client-1", 10, interval=0.05)
    finally:
        timer.join()
    assert token == (folder / "client-1.token").read_text().strip()
