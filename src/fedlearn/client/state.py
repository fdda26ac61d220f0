"""Per-client state that persists across rounds: SCAFFOLD control variates, error-feedback residuals, personal layers.

Each entry is a dict of named tensors tagged with the version (round number) it belongs to. Without a directory the
store is a plain in-memory dict (small simulations, tests) and its ``state_dict`` carries the tensors. With a directory
every committed entry is its own atomically written file ``<sha256(client id)[:32]>-<version>.pt`` and only an LRU of
``max_cached`` entries stays in RAM, so 10,000 clients with model-sized state do not need 10,000 copies in memory; the
server checkpoint then stores only the small index ``{client_id: version}``. Loading a checkpoint's index deletes files
written by rounds after it (a round that crashed before its checkpoint), so a resumed run sees exactly the client state
of the checkpointed round and is bit-for-bit equal to a straight run. A server keeps its last few checkpoints, so
``prune`` keeps every version one of them names (``keep``), and a resume that falls back to an older checkpoint rolls
the client state back with it. A deployed client reopens its own folder after a restart with
:meth:`ClientStateStore.open_latest`, keeps its last few versions, and trains a round from the newest state older than
that round (``get(..., before=round)``), so a server that went back to an older checkpoint gets matching state.

Privacy is never rolled back: entries named in ``PRIVACY_COUNTERS`` (DP-SGD's step count, from which a client's own
accountant reports its epsilon) keep the highest value any newer, dropped version held.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from fedlearn.errors import CheckpointError, InvalidUpdateError
from fedlearn.server.checkpoint import KEEP, fsync_dir, write_fsynced

Arrays = dict[str, torch.Tensor]
log = logging.getLogger(__name__)

STATE_FORMAT = 1
LOCAL_DP_RELEASES = "ldp_releases"  # rounds a client released a local-DP update in (its own budget's count)
DISTRIBUTED_DP_RELEASES = "ddp_releases"  # rounds a client added a distributed-DP noise share in
# privacy spent: a rollback keeps the highest
PRIVACY_COUNTERS = frozenset({"dpsgd_steps", LOCAL_DP_RELEASES, DISTRIBUTED_DP_RELEASES})
VERSIONS_KEPT = KEEP + 1  # a deployed client's versions: the server's kept checkpoints plus the round in flight
_FILE_RE = re.compile(r"^([0-9a-f]{32})-(0|[1-9][0-9]*)\.pt$")
_TMP_RE = re.compile(r"^[0-9a-f]{32}-[0-9]+\.pt\..*\.tmp$")


def _digest(client_id: str) -> str:
    return hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _file_name(client_id: str, version: int) -> str:
    return f"{_digest(client_id)}-{version}.pt"


def _check_client_id(client_id: Any) -> str:
    if not isinstance(client_id, str) or not client_id:
        raise InvalidUpdateError(f"client state needs a non-empty string client id, not {client_id!r}")
    return client_id


def _check_version(version: Any, client_id: str) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InvalidUpdateError(f"client state of {client_id!r} needs a non-negative int version, not {version!r}")
    return version


def _check_arrays(arrays: Any, client_id: str) -> Arrays:
    if not isinstance(arrays, dict):
        kind = type(arrays).__name__
        raise InvalidUpdateError(f"client state of {client_id!r} must be a dict of name -> tensor, not a {kind}")
    for name, tensor in arrays.items():
        if not isinstance(name, str):
            raise InvalidUpdateError(f"client state of {client_id!r} has a non-string name {name!r}; use str names")
        if not isinstance(tensor, torch.Tensor):
            kind = type(tensor).__name__
            raise InvalidUpdateError(f"client state of {client_id!r} entry {name!r} is a {kind}, not a torch.Tensor")
    return arrays


def _prepare(arrays: Any, client_id: str) -> Arrays:
    """Validate ``arrays`` and return detached, contiguous CPU copies the caller cannot alter through its buffers."""
    out: Arrays = {}
    for name, tensor in _check_arrays(arrays, client_id).items():
        tensor = tensor.detach()
        if tensor.device.type == "cpu":
            out[name] = tensor.clone(memory_format=torch.contiguous_format)
        else:
            out[name] = tensor.to("cpu").contiguous()  # the device-to-host copy is already a fresh tensor
    return out


def _write_error(path: Path, exc: OSError) -> CheckpointError:
    """One line for a failed client-state write (a full disk, a read-only folder): what to free, then restart."""
    code = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    fix = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free disk space", errno.EROFS: "use a writable folder",
           errno.EACCES: "make the folder writable", errno.EPERM: "make the folder writable"}.get(exc.errno or 0,
                                                                                               "fix the folder")
    return CheckpointError(f"could not write client state {path} ({code}: {exc.strerror or exc}); {fix}, then start "
                           "again (a server continues with --resume RUN_DIR; its completed rounds are kept)")


def _counters(arrays: Arrays) -> Arrays:
    """The privacy counters among ``arrays``."""
    return {k: v for k, v in arrays.items() if k in PRIVACY_COUNTERS}


def _raise_counters(arrays: Arrays, newer: list[Arrays]) -> Arrays:
    """``arrays`` with each privacy counter raised to the highest value in ``newer`` (dropped later versions)."""
    out = dict(arrays)
    for entry in newer:
        for name, value in _counters(entry).items():
            if name not in out or bool((value > out[name]).all()):
                out[name] = value.clone()
    return out


def _read_file(path: Path, client_id: str | None, version: int | None, *, mmap: bool = False) -> dict[str, Any]:
    """Load one entry file (weights_only) and check it holds what its name promises."""
    who = f"client {client_id!r}" if client_id is not None else "a client"
    advice = "delete it to drop that client's state, or resume from a run directory whose client state is intact"
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"client state file {path} of {who} (version {version}) is missing; {advice}") from None
    except Exception as exc:  # torch raises several unrelated types for damaged files
        kind = type(exc).__name__
        raise CheckpointError(f"client state file {path} of {who} is damaged ({kind}); {advice}") from None
    ok = (
        isinstance(data, dict)
        and isinstance(data.get("client_id"), str)
        and isinstance(data.get("version"), int)
        and isinstance(data.get("arrays"), dict)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data["arrays"].items())
    )
    if not ok:
        raise CheckpointError(f"client state file {path} of {who} is damaged (not a client state entry); {advice}")
    match = _FILE_RE.match(path.name)
    expected = (
        (client_id is None or data["client_id"] == client_id)
        and (version is None or data["version"] == version)
        and match is not None
        and match.group(1) == _digest(data["client_id"])
        and int(match.group(2)) == data["version"]
    )
    if not expected:
        raise CheckpointError(
            f"client state file {path} of {who} holds client {data['client_id']!r} version {data['version']}, "
            f"which its name does not match; {advice}"
        )
    return data


class ClientStateStore:
    """Named tensors per client, versioned by round, in memory or spilled to a folder with an LRU cache.

    ``put`` keeps a new entry in memory (dirty) until ``commit`` writes it; ``state_dict`` is what a server
    checkpoint stores (only the index when there is a directory); ``prune`` deletes superseded files once that
    checkpoint is durable; ``load_state_dict`` rewinds the folder to a checkpoint's index. ``get`` returns the
    store's own tensors: do not modify them in place (``put`` a new dict instead).
    """

    def __init__(self, directory: str | os.PathLike | None = None, *, max_cached: int = 64) -> None:
        if isinstance(max_cached, bool) or not isinstance(max_cached, int) or max_cached < 0:
            raise ValueError(f"max_cached must be a non-negative int, not {max_cached!r}")
        self.directory: Path | None = None if directory is None else Path(directory)
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.max_cached = max_cached
        self._lock = threading.RLock()
        self._versions: dict[str, int] = {}  # current version per client (dirty ones included)
        self._committed: dict[str, int] = {}  # version on disk per client (directory only)
        self._memory: dict[str, Arrays] = {}  # no directory: every entry
        self._dirty: dict[str, Arrays] = {}  # directory: put but not yet committed
        self._cache: OrderedDict[str, Arrays] = OrderedDict()  # directory: clean entries, least recent first

    # -- reading -----------------------------------------------------------------------------------

    def get(self, client_id: str, *, before: int | None = None) -> Arrays:
        """The client's latest state (``{}`` if it has none). The tensors are shared: do not modify them in place.

        With ``before`` (the round about to be trained): the newest state older than that round. It differs from the
        latest only when the server went back to an older checkpoint and runs rounds again; the privacy counters
        then keep the latest's values. Without a directory only the latest exists, and it is returned.
        """
        client_id = _check_client_id(client_id)
        with self._lock:
            version = self._versions.get(client_id)
            if before is not None and version is not None and version >= before and self.directory is not None:
                return self._rolled_back(client_id, before)
            return self._latest(client_id)

    def _latest(self, client_id: str) -> Arrays:
        with self._lock:
            if self.directory is None:
                return dict(self._memory.get(client_id, {}))
            if client_id in self._dirty:
                return dict(self._dirty[client_id])
            if client_id in self._cache:
                self._cache.move_to_end(client_id)
                return dict(self._cache[client_id])
            version = self._committed.get(client_id)
            if version is None:
                return {}
            data = _read_file(self.directory / _file_name(client_id, version), client_id, version)
            arrays: Arrays = data["arrays"]
            if self.max_cached > 0:
                self._cache[client_id] = arrays
                self._evict()
            return dict(arrays)

    def _rolled_back(self, client_id: str, before: int) -> Arrays:
        """The newest entry on disk older than ``before``, its privacy counters raised to the newer ones'."""
        assert self.directory is not None
        digest = _digest(client_id)
        versions = sorted(v for d, v, _ in self._state_files() if d == digest)
        older = [v for v in versions if v < before]
        newer = [_read_file(self.directory / _file_name(client_id, v), client_id, v, mmap=True)["arrays"]
                 for v in versions if v >= before]
        if client_id in self._dirty:
            newer.append(self._dirty[client_id])
        if not older:
            log.warning("client %r has no state older than round %d (the server went back further than this "
                        "client keeps); it trains that round from fresh state", client_id, before)
            return _raise_counters({}, newer)
        arrays = _read_file(self.directory / _file_name(client_id, older[-1]), client_id, older[-1])["arrays"]
        return _raise_counters(arrays, newer)

    def version(self, client_id: str) -> int | None:
        """The version (round) of the client's latest state, or None if it has none."""
        with self._lock:
            return self._versions.get(client_id)

    def client_ids(self) -> list[str]:
        """Every client with state, sorted."""
        with self._lock:
            return sorted(self._versions)

    def __len__(self) -> int:
        return len(self._versions)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._versions

    @property
    def cached_count(self) -> int:
        """How many entries have their tensors in RAM now (clean cached ones plus uncommitted ones)."""
        with self._lock:
            if self.directory is None:
                return len(self._memory)
            return len(self._cache) + len(self._dirty)

    # -- writing -----------------------------------------------------------------------------------

    def put(self, client_id: str, arrays: Arrays, version: int) -> None:
        """Set the client's state as of ``version``; the tensors are copied, and held in memory until ``commit``."""
        client_id = _check_client_id(client_id)
        version = _check_version(version, client_id)
        prepared = _prepare(arrays, client_id)
        with self._lock:
            self._versions[client_id] = version
            if self.directory is None:
                self._memory[client_id] = prepared
            else:
                self._cache.pop(client_id, None)
                self._dirty[client_id] = prepared

    def commit(self) -> None:
        """Write every uncommitted entry as its own file (temp file, fsync, rename), then fsync the folder once."""
        with self._lock:
            if self.directory is None or not self._dirty:
                return
            written = False
            try:
                for client_id in list(self._dirty):
                    arrays = self._dirty[client_id]
                    version = self._versions[client_id]
                    self._write(client_id, version, arrays)
                    written = True
                    del self._dirty[client_id]
                    self._committed[client_id] = version
                    self._cache[client_id] = arrays
                    self._cache.move_to_end(client_id)
            finally:
                self._evict()
                if written:
                    fsync_dir(self.directory)

    def index(self) -> dict[str, int]:
        """``{client_id: version}`` of the committed entries (what a directory checkpoint stores)."""
        with self._lock:
            return dict(self._committed)

    def prune(self, keep: Iterable[Mapping[str, int]] = (), *, latest: int = 1) -> None:
        """Once the caller's checkpoint is durable: delete the files no longer needed.

        A client keeps its ``latest`` newest versions up to its committed one, and every version an index in
        ``keep`` names (the older checkpoints a server still holds). Versions newer than the committed one (a
        caller went back to a lower version) are deleted. Files of clients this store does not know are left alone.
        """
        if isinstance(latest, bool) or not isinstance(latest, int) or latest < 1:
            raise ValueError(f"latest must be a positive int, not {latest!r}")
        with self._lock:
            if self.directory is None:
                return
            committed = {_digest(cid): v for cid, v in self._committed.items()}
            named: dict[str, set[int]] = {}
            for index in keep:
                for cid, version in index.items():
                    named.setdefault(_digest(cid), set()).add(version)
            found: dict[str, list[tuple[int, Path]]] = {}
            for path in self.directory.iterdir():
                match = _FILE_RE.match(path.name)
                if match is not None and match.group(1) in committed:
                    found.setdefault(match.group(1), []).append((int(match.group(2)), path))
            removed = False
            for digest, files in found.items():
                current = committed[digest]
                recent = sorted((v for v, _ in files if v <= current), reverse=True)[:latest]
                wanted = {*recent, *named.get(digest, ())}
                for version, path in files:
                    if version > current or version not in wanted:
                        path.unlink(missing_ok=True)
                        removed = True
            if removed:
                fsync_dir(self.directory)

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a server checkpoint stores; plain types and tensors only (``torch.load(weights_only=True)``).

        With a directory: ``{"format", "directory", "clients": {client_id: version}}``, no tensors, and every entry
        must be committed first. Without one: ``{"format", "directory": None, "clients": {client_id: {"version": v,
        "arrays": {name: tensor}}}}``.
        """
        with self._lock:
            if self.directory is None:
                clients: dict[str, Any] = {
                    cid: {"version": self._versions[cid], "arrays": dict(self._memory[cid])} for cid in self._versions
                }
                return {"format": STATE_FORMAT, "directory": None, "clients": clients}
            if self._dirty:
                raise RuntimeError(
                    f"client state store has {len(self._dirty)} uncommitted entries; call commit() before state_dict()"
                )
            return {"format": STATE_FORMAT, "directory": str(self.directory), "clients": dict(self._committed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly the checkpointed index, discarding every uncommitted and cached entry.

        With a directory, files of versions newer than the index (rounds after the checkpoint: a crash before the
        next checkpoint, or a fall back to an older one) and files of clients not in the index are deleted, after
        checking that every indexed file is present; older versions stay (older checkpoints name them). The privacy
        counters of a dropped newer version are carried into the restored entry (as an uncommitted change). An
        in-memory checkpoint loaded into a store with a directory becomes uncommitted entries (call ``commit``);
        a directory checkpoint loaded into an in-memory store is read from that checkpoint's directory.
        """
        index, entries = self._parse_state(state)
        with self._lock:
            memory: dict[str, Arrays] = {}
            dirty: dict[str, Arrays] = {}
            if self.directory is None:
                if entries is None:
                    folder = Path(state["directory"])
                    entries = {
                        cid: (v, _read_file(folder / _file_name(cid, v), cid, v)["arrays"]) for cid, v in index.items()
                    }
                memory = {cid: _prepare(arrays, cid) for cid, (_, arrays) in entries.items()}
            elif entries is not None:
                dirty = {cid: _prepare(arrays, cid) for cid, (_, arrays) in entries.items()}
            else:
                for cid, version in index.items():
                    path = self.directory / _file_name(cid, version)
                    if not path.is_file():
                        raise CheckpointError(
                            f"client state file {path} of client {cid!r} (version {version}) is missing; "
                            "resume with the run directory's own client-state folder"
                        )
            self._cache.clear()
            self._memory = memory
            self._dirty = dirty
            self._versions = dict(index)
            self._committed = {} if self.directory is None or entries is not None else dict(index)
            if self.directory is not None:
                self._keep_privacy_counters(index)
                self._remove_files(index)

    @classmethod
    def open_latest(cls, directory: str | os.PathLike, *, max_cached: int = 64) -> ClientStateStore:
        """Reopen a deployed client's folder after a restart: the newest file of each client is its state.

        Leftover ``*.tmp`` files of an interrupted commit are deleted.
        """
        store = cls(directory, max_cached=max_cached)
        newest: dict[str, tuple[int, Path]] = {}
        for digest, version, path in store._state_files():
            if digest not in newest or version > newest[digest][0]:
                newest[digest] = (version, path)
        for version, path in newest.values():
            data = _read_file(path, None, version, mmap=True)  # mmap: only the client id is needed now
            store._versions[data["client_id"]] = version
            store._committed[data["client_id"]] = version
        return store

    # -- internals ---------------------------------------------------------------------------------

    def _write(self, client_id: str, version: int, arrays: Arrays) -> None:
        assert self.directory is not None
        name = _file_name(client_id, version)
        tmp: Path | None = None
        try:
            tmp = write_fsynced({"client_id": client_id, "version": version, "arrays": arrays}, self.directory, name)
            os.replace(tmp, self.directory / name)
            tmp = None
        except OSError as exc:
            raise _write_error(self.directory / name, exc) from None
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def _evict(self) -> None:
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)

    def _state_files(self) -> list[tuple[str, int, Path]]:
        """(client digest, version, path) of every state file here, after deleting leftover ``*.tmp`` files."""
        assert self.directory is not None
        found, removed = [], False
        for path in self.directory.iterdir():
            if _TMP_RE.match(path.name):
                path.unlink(missing_ok=True)
                removed = True
                continue
            match = _FILE_RE.match(path.name)
            if match is not None:
                found.append((match.group(1), int(match.group(2)), path))
        if removed:
            fsync_dir(self.directory)
        return found

    def _keep_privacy_counters(self, index: dict[str, int]) -> None:
        """Before newer files go: an indexed entry whose newer versions counted more privacy takes their counts."""
        assert self.directory is not None
        by_digest = {_digest(cid): (cid, v) for cid, v in index.items()}
        newer: dict[str, list[Arrays]] = {}
        for digest, version, path in self._state_files():
            if digest in by_digest and version > by_digest[digest][1]:
                cid = by_digest[digest][0]
                arrays = _read_file(path, cid, version, mmap=True)["arrays"]
                if _counters(arrays):
                    newer.setdefault(cid, []).append(_counters(arrays))
        for cid, entries in newer.items():
            base = self._dirty.get(cid)
            if base is None:
                base = _read_file(self.directory / _file_name(cid, index[cid]), cid, index[cid])["arrays"]
            raised = _raise_counters(base, entries)
            if any(k not in base or not torch.equal(raised[k], base[k]) for k in _counters(raised)):
                self._dirty[cid] = _prepare(raised, cid)

    def _remove_files(self, index: dict[str, int]) -> None:
        """Delete tmp leftovers, files of clients not in ``index`` and files of versions newer than the index."""
        by_digest = {_digest(cid): v for cid, v in index.items()}
        removed = False
        for digest, version, path in self._state_files():
            if digest not in by_digest or version > by_digest[digest]:
                path.unlink(missing_ok=True)
                removed = True
        if removed:
            fsync_dir(self.directory)

    @staticmethod
    def _parse_state(state: Any) -> tuple[dict[str, int], dict[str, tuple[int, Any]] | None]:
        """Check a ``state_dict`` and return its index plus, for an in-memory one, its entries."""
        bad = "client state in the checkpoint is damaged ({}); start a new run"
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(bad.format("not a client state dict"))
        if not isinstance(state.get("clients"), dict):
            raise CheckpointError(bad.format("not a client state dict"))
        index: dict[str, int] = {}
        entries: dict[str, tuple[int, Any]] | None = None if state.get("directory") is not None else {}
        if entries is None and not isinstance(state["directory"], str):
            raise CheckpointError(bad.format("directory is not a path"))
        for cid, value in state["clients"].items():
            if entries is not None:
                if not isinstance(value, dict) or "arrays" not in value:
                    raise CheckpointError(bad.format(f"entry of {cid!r} has no arrays"))
                version, arrays = value.get("version"), value["arrays"]
            else:
                version, arrays = value, None
            try:
                _check_client_id(cid)
                _check_version(version, cid)
                if entries is not None:
                    _check_arrays(arrays, cid)
            except InvalidUpdateError as exc:
                raise CheckpointError(bad.format(str(exc))) from None
            index[cid] = version
            if entries is not None:
                entries[cid] = (version, arrays)
        return index, entries
