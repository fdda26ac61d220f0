"""Per-run client tokens for a server on loopback, so the one-machine demo authenticates its clients too.

A `fedlearn server` on a loopback address started without ``--tokens``, ``--client-ca`` or
``--allow-any-client`` issues one token per expected client id (``client-0``, ...) into
``RUN_DIR/client-tokens/`` (folder 0700, one ``<client id>.token`` file 0600 each; kept, so
that a ``--resume``d server accepts the clients still waiting), and says where they are in
``$FEDLEARN_HOME/loopback/<port>.json`` (default ``~/.fedlearn``; folders 0700), with its pid.
A `fedlearn client --server 127.0.0.1:<port>` without ``--token-file`` reads its token from
there. Only processes of the same user can read those files: another account's process that
claims client-0 is refused. A process running as the same user can read them too; that
boundary is the operating system's, as for every other file of the run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from fedlearn.security.errors import ClientIdentityError
from fedlearn.security.tls import split_host_port
from fedlearn.security.tokens import _atomic_write, hash_token, new_token

log = logging.getLogger(__name__)

TOKEN_FOLDER = "client-tokens"  # inside the run directory
HOME_ENV = "FEDLEARN_HOME"  # per-user folder for the loopback pointers (default ~/.fedlearn)
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")


def fedlearn_home() -> Path:
    """The per-user folder where servers on loopback say where their clients' tokens are."""
    return Path(os.environ.get(HOME_ENV) or "~/.fedlearn").expanduser().absolute()


def pointer_path(port: int) -> Path:
    """The file a loopback server on ``port`` publishes: its pid and its token folder."""
    return fedlearn_home() / "loopback" / f"{int(port)}.json"


def token_file_name(client_id: str) -> str:
    """The token file of ``client_id``: ``<id>.token`` for plain ids, a hashed name for any other."""
    if _PLAIN_NAME.match(client_id) and not client_id.endswith("."):
        return f"{client_id}.token"
    keep = re.sub(r"[^A-Za-z0-9._-]", "_", client_id)[:40].strip("._") or "client"
    return f"{keep}-{hashlib.sha256(client_id.encode('utf-8')).hexdigest()[:16]}.token"


def _private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as 0700; refuse one another user owns, tighten one we own."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = path.stat()
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise ClientIdentityError(f"{path} belongs to another user; set {HOME_ENV} to a folder of your own "
                                      "or pass --tokens")
        if info.st_mode & 0o077:
            os.chmod(path, 0o700)
    except OSError as exc:
        raise ClientIdentityError(f"cannot create the private folder {path} for client tokens ({exc}); "
                                  f"set {HOME_ENV} to a folder you can write, or pass --tokens") from None
    return path


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there; assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    except OSError:
        return False
    return True


def _read_private(path: Path) -> str | None:
    """A file's text if it is ours and nobody else may write it; else None (never trust a planted file)."""
    try:
        info = path.stat()
        if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & 0o022):
            log.warning("ignoring %s: it is not private to this user", path)
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


class RunTokens:
    """The tokens issued for one run's expected clients; the server's token table (see the module note)."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self._lock = threading.Lock()
        self._entries: tuple[tuple[str, str], ...] = ()  # (client id, hex sha256 of its token)
        self._published: Path | None = None

    def issue(self, run_dir: str | os.PathLike, client_ids: Iterable[str]) -> Path:
        """Give every id a token in ``run_dir/client-tokens`` (keeping the tokens already there); the folder."""
        folder = _private_dir(Path(run_dir).absolute() / TOKEN_FOLDER)
        entries = []
        for client_id in dict.fromkeys(client_ids):
            path = folder / token_file_name(client_id)
            token = (_read_private(path) or "").strip() if path.exists() else ""
            if len(token) < 32:  # missing, damaged or planted: issue a fresh one
                token = new_token()
                try:
                    _atomic_write(path, token + "\n", 0o600)
                except OSError as exc:
                    raise ClientIdentityError(f"cannot write client token {path} ({exc}); check the run "
                                              "directory's permissions, or pass --tokens") from None
            entries.append((client_id, hash_token(token)))
        with self._lock:
            self.folder, self._entries = folder, tuple(entries)
        return folder

    def identify(self, token: str | None) -> str | None:
        """The client id whose token this is, or None; compares against every entry in constant time."""
        if not token:
            return None
        digest = hash_token(token)
        found = None
        for client_id, expected in self._entries:
            if hmac.compare_digest(digest, expected) and found is None:
                found = client_id
        return found

    def clients(self) -> list[str]:
        """The client ids tokens were issued for, sorted."""
        return sorted(client_id for client_id, _ in self._entries)

    def __contains__(self, client_id: object) -> bool:
        return any(client_id == known for known, _ in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def publish(self, port: int) -> Path:
        """Write ``$FEDLEARN_HOME/loopback/<port>.json`` so clients on this machine find their tokens."""
        if self.folder is None:
            raise RuntimeError("issue() the tokens before publishing them")
        path = pointer_path(port)
        try:
            path.parent.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # a new ~/.fedlearn is private too
        except OSError:
            pass  # _private_dir says what went wrong
        _private_dir(path.parent)
        other = _live_pointer(path)
        if other is not None and other["pid"] != os.getpid():
            raise ClientIdentityError(f"another fedlearn server (pid {other['pid']}) serves port {port} on this "
                                      f"machine; stop it or choose another --address port (or delete {path} if "
                                      "that process is not a fedlearn server)")
        record = {"pid": os.getpid(), "tokens": str(self.folder), "clients": len(self), "since": time.time()}
        try:
            _atomic_write(path, json.dumps(record) + "\n", 0o600)
        except OSError as exc:
            raise ClientIdentityError(f"cannot write {path} ({exc}); set {HOME_ENV} to a folder you can write, "
                                      "or pass --tokens") from None
        self._published = path
        return path

    def unpublish(self) -> None:
        """Remove the pointer this process published (the token files stay, for --resume)."""
        path, self._published = self._published, None
        if path is None:
            return
        record = _live_pointer(path)
        if record is not None and record["pid"] == os.getpid():
            path.unlink(missing_ok=True)


def _live_pointer(path: Path) -> dict | None:
    """The pointer at ``path`` if it is private to this user and its server process still runs."""
    text = _read_private(path) if path.exists() else None
    if text is None:
        return None
    try:
        record = json.loads(text)
        pid, folder = int(record["pid"]), Path(record["tokens"])
    except (ValueError, TypeError, KeyError):
        return None
    if not _pid_alive(pid):
        return None
    return {"pid": pid, "tokens": folder}


def published_token(port: int, client_id: str) -> tuple[bool, str | None]:
    """(a live loopback server on ``port`` published tokens, this client's token or None)."""
    record = _live_pointer(pointer_path(port))
    if record is None:
        return False, None
    path = record["tokens"] / token_file_name(client_id)
    text = _read_private(path) if path.exists() else None
    return True, (text.strip() or None) if text else None


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host or "127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def wait_for_run_token(server: str, client_id: str, give_up_after: float | None, *,
                       interval: float = 0.25, grace: float = 1.0) -> str | None:
    """This client's per-run token from a loopback server on this machine, or None when that server issues none.

    Waits (bounded by ``give_up_after``) while the server is not yet listening: it publishes
    before it listens, so once the port answers with nothing published (after ``grace``
    seconds more), the server does not issue run tokens (``--tokens``, ``--allow-any-client``).
    """
    host, port = split_host_port(server)
    if port is None:
        return None
    started = time.monotonic()
    answered_at = None
    waiting_said = False
    while True:
        published, token = published_token(port, client_id)
        if published:
            if token is None:
                log.warning("the server on port %d issued tokens only to its expected clients, not to %r; "
                            "it will refuse this client (use --partition-index, or --token-file)", port, client_id)
            else:
                log.info("using this machine's per-run token for %s (from %s)", client_id, pointer_path(port))
            return token
        now = time.monotonic()
        if answered_at is None and _reachable(host, port):
            answered_at = now
        if answered_at is not None and now - answered_at >= grace:
            return None
        if give_up_after is not None and now - started > give_up_after:
            return None
        if not waiting_said and answered_at is None:
            log.info("waiting for the server on %s to start (a server on this machine publishes this run's "
                     "client tokens in %s)", server, pointer_path(port))
            waiting_said = True
        time.sleep(interval)
