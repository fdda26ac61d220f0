"""Per-client bearer tokens: the server keeps only their hashes, in a file it re-reads on SIGHUP.

File format, one client per line (``#`` comments and blank lines allowed)::

    # client id   token hash
    site-a        sha256:3f0c...64 hex digits
    site-b        sha256:9a41...

A client may have several lines, so a token can be rotated without downtime (add the new
line, reload, switch the client over, delete the old line, reload).

Why a plain SHA-256 and not bcrypt/scrypt: tokens come from ``secrets.token_urlsafe(32)``,
256 random bits, so nobody can guess one or brute-force its hash; a slow password hash only
protects low-entropy secrets, and would cost milliseconds on every RPC. Hashes are compared
with ``hmac.compare_digest`` against every entry, so timing reveals neither which entry
matched nor how much of a hash did.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from fedlearn.security.certs import check_client_id
from fedlearn.security.errors import CertificateError, TokenFileError

log = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"
_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")
_HEADER = (
    "# FedLearn client tokens: one '<client_id> sha256:<hex>' per line; only hashes are kept here.\n"
    "# Add a client with `fedlearn tokens add NAME`, then send the server SIGHUP to reload.\n"
)


class Reloadable(Protocol):
    """Anything SIGHUP re-reads: a TokenStore, an AllowList from a file."""

    def reload(self) -> bool: ...


def new_token() -> str:
    """A fresh bearer token: 256 random bits, URL-safe text."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token (without the ``sha256:`` prefix); see the module note for why SHA-256 suffices."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _parse(text: str, path: Path) -> list[tuple[str, str]]:
    """Parse a token file into (client_id, hex hash) pairs; raise TokenFileError naming the bad line."""
    entries: list[tuple[str, str]] = []
    owner_of: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        match = _HASH.match(fields[1].lower()) if len(fields) == 2 else None
        # Never echo the line: a mistake here may be a pasted plaintext token.
        if match is None:
            raise TokenFileError(
                f"{path}: line {number} is not '<client_id> sha256:<64 hex digits>'; "
                "fix or delete it (add clients with `fedlearn tokens add NAME`)"
            )
        try:
            client_id = check_client_id(fields[0])
        except CertificateError:
            raise TokenFileError(
                f"{path}: line {number} has a client id that is not allowed; use letters, digits, '-' and '.'"
            ) from None
        digest = match.group(1)
        if digest in owner_of:
            raise TokenFileError(
                f"{path}: line {number} repeats the token hash of {owner_of[digest]!r}; give each client its own token"
            )
        owner_of[digest] = client_id
        entries.append((client_id, digest))
    return entries


class TokenStore:
    """The table of client token hashes, loaded from ``path``; safe to use from gRPC handler threads.

    The constructor reads the file and raises TokenFileError if it is missing or malformed
    (with ``missing_ok`` a missing file is an empty table, for ``fedlearn tokens add``).
    ``reload()`` never raises: a bad file keeps the previous table and logs an error, so a
    typo made while adding a site never locks every site out nor stops the server.
    """

    def __init__(self, path: str | os.PathLike, *, missing_ok: bool = False) -> None:
        self.path = Path(path).expanduser().absolute()
        # Reentrant: a SIGHUP handler runs on the main thread and may interrupt it inside a locked section.
        self._lock = threading.RLock()
        if missing_ok and not self.path.exists():
            self._entries: tuple[tuple[str, str], ...] = ()
        else:
            self._entries = tuple(self._read())

    def _read(self) -> list[tuple[str, str]]:
        return _parse(self._read_text(), self.path)

    def _read_text(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TokenFileError(
                f"token file {self.path} does not exist; create it with `fedlearn tokens add NAME --file {self.path}`"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenFileError(
                f"cannot read token file {self.path} ({exc}); check its path and permissions"
            ) from None

    def reload(self) -> bool:
        """Re-read the file and swap in the new table; on any error keep the old one, log it and return False."""
        with self._lock:
            try:
                entries = self._read()
            except TokenFileError as exc:
                log.error("token file not reloaded, still using the previous %d client(s): %s", len(self), exc)
                return False
            self._entries = tuple(entries)
        log.info("reloaded %s: %d client token(s)", self.path, len(entries))
        return True

    def identify(self, token: str | None) -> str | None:
        """The client id whose token this is, or None; compares against every entry in constant time."""
        if not token:
            return None
        digest = hash_token(token)
        with self._lock:
            entries = self._entries
        found = None
        for client_id, expected in entries:
            if hmac.compare_digest(digest, expected) and found is None:
                found = client_id
        return found

    def clients(self) -> list[str]:
        """The client ids in the table, sorted, each once."""
        with self._lock:
            return sorted({client_id for client_id, _ in self._entries})

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, client_id: object) -> bool:
        with self._lock:
            return any(client_id == known for known, _ in self._entries)

    def add(self, client_id: str, *, replace: bool = False) -> str:
        """Append ``client_id`` with a fresh token and return the plaintext token (shown once, never stored).

        Reads the file strictly first (a malformed file raises rather than being rewritten),
        keeps its comments, and writes atomically (mode 0600 for a new file). With ``replace``
        the client's existing lines are dropped, which revokes its old token(s).
        """
        try:
            check_client_id(client_id)
        except CertificateError as exc:
            raise TokenFileError(str(exc)) from None
        with self._lock:
            exists = self.path.exists()
            text = self._read_text() if exists else _HEADER
            entries = _parse(text, self.path)
            if any(known == client_id for known, _ in entries):
                if not replace:
                    raise TokenFileError(
                        f"client {client_id!r} already has a token in {self.path}; "
                        "pass --replace to issue a new one (the old one stops working)"
                    )
                text = "".join(
                    line
                    for line in text.splitlines(keepends=True)
                    if (line.split("#", 1)[0].split() or [None])[0] != client_id
                )
            token = new_token()
            if text and not text.endswith("\n"):
                text += "\n"
            text += f"{client_id} {HASH_PREFIX}{hash_token(token)}\n"
            mode = (self.path.stat().st_mode & 0o777) if exists else 0o600
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.path, text, mode)
            self._entries = tuple(_parse(text, self.path))
        log.info("added client %s to %s", client_id, self.path)
        return token


def _atomic_write(path: Path, text: str, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install_sighup_reload(*targets: Reloadable) -> Callable | int | None:
    """Make SIGHUP call ``reload()`` on each target (a TokenStore, an ``@FILE`` allow-list); return the previous
    handler so a caller can restore it.

    Python runs signal handlers only on the main thread and only lets the main thread install
    them, so call this from the main thread (the CLI's ``fedlearn server``) before serving;
    elsewhere it raises RuntimeError. The handler runs between bytecodes of the main thread,
    which is why TokenStore and AllowList use reentrant locks. On platforms without SIGHUP (Windows) it
    logs a warning and returns None: restart the server to pick up a new token file there.
    """
    if not hasattr(signal, "SIGHUP"):
        log.warning("this platform has no SIGHUP; restart the server to reload %s",
                    ", ".join(str(getattr(t, "path", t)) for t in targets))
        return None
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("install_sighup_reload must be called from the main thread")

    def _on_sighup(signum, frame) -> None:
        for target in targets:
            target.reload()

    return signal.signal(signal.SIGHUP, _on_sighup)
