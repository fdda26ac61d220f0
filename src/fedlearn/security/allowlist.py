"""The client ids a server admits, named by the operator: ``--allowed-clients site-a,site-b`` or ``@FILE``.

``@FILE`` holds one id per line (commas also separate; ``#`` starts a comment) and is re-read
on SIGHUP like the token file, so a site is added without a restart. The ``@`` is required:
a misspelt file name must not silently become the one client id allowed. The list applies to
every mechanism: the certificate's common name (mutual TLS), the owner of a token, or the
claimed id under ``--allow-any-client``; an id not on it is refused with PERMISSION_DENIED.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from fedlearn.security.errors import AllowListError

log = logging.getLogger(__name__)

# Certificate names (letters, digits, '-', '.') and the ids partitions make (client-3, f0123_45).
_CLIENT_ID = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")


def _parse(text: str, where: str) -> frozenset[str]:
    ids: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        for item in raw.split("#", 1)[0].split(","):
            item = item.strip()
            if not item:
                continue
            if not _CLIENT_ID.match(item):
                line = f" line {number}" if where.startswith("file") else ""
                raise AllowListError(f"--allowed-clients {where}{line}: {item[:60]!r} is not a client id; use "
                                     "letters, digits, '-', '_' and '.' (like site-a or client-3)")
            ids.append(item)
    if not ids:
        raise AllowListError(f"--allowed-clients {where} names no client; list the ids that may join, "
                             "e.g. --allowed-clients site-a,site-b or @clients.txt")
    return frozenset(ids)


class AllowList:
    """An explicit set of client ids; ``admits(client_id)`` is the one question it answers (thread-safe)."""

    def __init__(self, ids: Iterable[str], *, path: str | Path | None = None) -> None:
        self.path = Path(path).expanduser().absolute() if path is not None else None
        self._lock = threading.RLock()  # reentrant: a SIGHUP handler may run inside a locked section
        self._ids = frozenset(ids)

    @classmethod
    def parse(cls, spec: str) -> AllowList:
        """``a,b,c`` or ``@FILE``; raises AllowListError with one line for a bad id, an empty list or no file."""
        spec = spec.strip()
        if spec.startswith("@"):
            path = Path(spec[1:]).expanduser()
            return cls(_parse(cls._read(path), f"file {path}"), path=path)
        if "," not in spec and spec and Path(spec).expanduser().is_file():
            raise AllowListError(f"--allowed-clients {spec} is a file; write @{spec} to read client ids from it "
                                 "(a bare word is taken as a client id)")
        return cls(_parse(spec, "list"))

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise AllowListError(f"--allowed-clients @{path}: no such file; write one client id per line") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise AllowListError(f"--allowed-clients @{path}: cannot read it ({exc}); check the path and "
                                 "permissions") from None

    def admits(self, client_id: str) -> bool:
        """Whether ``client_id`` is on the list."""
        with self._lock:
            return client_id in self._ids

    def reload(self) -> bool:
        """Re-read ``@FILE`` (a fixed list has nothing to re-read); a bad file keeps the old list and returns False."""
        if self.path is None:
            return True
        try:
            ids = _parse(self._read(self.path), f"file {self.path}")
        except AllowListError as exc:
            log.error("client allow-list not reloaded, still admitting %d client(s): %s", len(self), exc)
            return False
        with self._lock:
            self._ids = ids
        log.info("reloaded %s: %d allowed client(s)", self.path, len(ids))
        return True

    def __contains__(self, client_id: object) -> bool:
        return isinstance(client_id, str) and self.admits(client_id)

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(sorted(self._ids))

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)
