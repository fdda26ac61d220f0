"""Server checkpoints: the last ``KEEP`` rounds, each written atomically; a resume takes the newest intact one.

``checkpoint.pt`` is the newest, ``checkpoint.1.pt`` and ``checkpoint.2.pt`` the two before it. A new round is
written to a temporary file and fsynced first; only then are the older files shifted down and the new one renamed
into place, and the folder is fsynced. So a crash, a full disk or a damaged file costs at most the rounds after
the newest intact checkpoint, never the run. Everything written is a plain value (None, bool, int, float, str,
bytes, tensors, and lists, tuples and dicts of them): ``torch.load(weights_only=True)`` reads it without running
code, and a value that safe loading would refuse is caught when it is written, not when the run is resumed.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import tempfile
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlearn.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: named server arrays, model version, client-state index, composed strategy state
KEEP = 3  # checkpoints kept: the newest and the two before it

_PLAIN = (type(None), bool, int, float, str, bytes, torch.dtype)
_FIXES = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free disk space (the disk quota is used up)",
    errno.EACCES: "make the folder writable",
    errno.EPERM: "make the folder writable",
    errno.EROFS: "the file system is read-only: copy the run folder to a writable disk",
}


def checkpoint_files(path: str | os.PathLike, keep: int = KEEP) -> list[Path]:
    """The checkpoint files of ``path``, newest first: ``checkpoint.pt``, ``checkpoint.1.pt``, ``checkpoint.2.pt``."""
    path = Path(path)
    return [path, *(path.with_name(f"{path.stem}.{i}{path.suffix}") for i in range(1, keep))]


def disk_error(action: str, path: str | os.PathLike, exc: OSError) -> CheckpointError:
    """The one-line error for a failed run-folder write: what failed, why, and how to carry on."""
    path = Path(path)
    code = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    reason = exc.strerror or str(exc) or type(exc).__name__
    fix = _FIXES.get(exc.errno or 0, "fix the folder")
    return CheckpointError(f"could not {action} {path} ({code}: {reason}); {fix}, then continue the run with "
                           f"--resume {path.parent} (its completed rounds are kept)")


def fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable (a no-op where folders cannot be opened, i.e. Windows)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _RecordingFile:
    """A file that keeps the OSError of a failed write: torch.save reports one as a RuntimeError without its errno."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def write_fsynced(obj: Any, directory: Path, prefix: str) -> Path:
    """``torch.save`` ``obj`` to a new temporary file in ``directory`` and fsync it; the caller renames it into place.

    A failed write raises its OSError (ENOSPC, EACCES, ...), not torch's RuntimeError, and leaves no file behind.
    """
    fd, tmp = tempfile.mkstemp(prefix=prefix + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            sink = _RecordingFile(f)
            try:
                torch.save(obj, sink)
            except RuntimeError:
                if sink.error is not None:
                    raise sink.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def to_plain(value: Any, where: str = "checkpoint") -> Any:
    """``value`` with numpy scalars turned into Python numbers; CheckpointError naming anything else not plain.

    Plain: None, bool, int, float, str, bytes, torch dtypes and tensors, and lists, tuples and dicts of them
    (what ``torch.load(weights_only=True)`` reads back). A numpy float64 is a ``float`` subclass that safe
    loading refuses, so exact types are checked, not ``isinstance``.
    """
    kind = type(value)
    if kind in _PLAIN or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.bool_ | np.integer | np.floating):
        return value.item()
    if isinstance(value, dict):
        out = OrderedDict() if kind is OrderedDict else {}
        for key, item in value.items():
            plain_key = to_plain(key, f"{where} key")
            if type(plain_key) not in _PLAIN:
                raise CheckpointError(f"cannot checkpoint {where}: key {key!r} is a {type(key).__name__}; "
                                      "this is a fedlearn bug, please report it")
            out[plain_key] = to_plain(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, list | tuple):
        items = [to_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise CheckpointError(f"cannot checkpoint {where}: a {kind.__module__}.{kind.__qualname__} is not a plain value "
                          "(None, bool, int, float, str, tensor, list, tuple or dict); this is a fedlearn bug, "
                          "please report it")


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], *, keep: int = KEEP) -> None:
    """Write ``state`` as the newest checkpoint at ``path``, keeping the ``keep - 1`` before it.

    The new file is written to a temporary file in the same folder and fsynced before any existing file moves;
    a failure (a value that is not plain, a full disk) leaves every earlier checkpoint as it was. An OSError
    becomes a one-line CheckpointError saying what to do.
    """
    path = Path(path)
    plain = to_plain({"format": CHECKPOINT_FORMAT, **state})
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = write_fsynced(plain, path.parent, path.name)
        files = checkpoint_files(path, keep)
        for older, newer in zip(reversed(files[1:]), reversed(files[:-1]), strict=True):
            if newer.exists():
                os.replace(newer, older)  # the oldest kept is overwritten: it drops out
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as exc:
        raise disk_error("write the checkpoint", path, exc) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


@contextmanager
def _numpy_scalars_allowed():
    """Let safe loading rebuild numeric numpy scalars (plain data, no code), which releases before 0.x wrote into
    binary tasks' histories; they are turned into Python numbers right after loading."""
    scalar = np.float64(0).__reduce__()[0]  # numpy's own scalar constructor, wherever this numpy keeps it
    dtypes = {type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?")}
    with torch.serialization.safe_globals([scalar, np.dtype, *dtypes]):
        yield


class _Unreadable(Exception):
    """A checkpoint file that cannot be used; the message says why, in a few words."""


def _refused_globals(path: Path) -> list[str]:
    """The classes and functions a checkpoint names that safe loading refuses; [] when it cannot even be parsed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - a damaged file: no globals to name
        return []


def _read(path: Path) -> dict[str, Any]:
    """One checkpoint file, safely loaded and checked; _Unreadable saying why it cannot be used."""
    try:
        with _numpy_scalars_allowed(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol of some damaged files
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        refused = _refused_globals(path)
        if refused:
            raise _Unreadable(f"holds objects that safe loading refuses ({', '.join(refused[:3])}): it was not "
                              "written by fedlearn, or was altered") from None
        raise _Unreadable("is damaged (UnpicklingError)") from None
    except Exception as exc:  # torch raises several unrelated types for damaged files
        raise _Unreadable(f"is damaged ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("format"), int):
        raise _Unreadable(f"is not a FedLearn checkpoint ({type(state).__name__})")
    if state["format"] != CHECKPOINT_FORMAT:
        raise _Unreadable(f"is checkpoint format {state['format']}, but this fedlearn reads format "
                          f"{CHECKPOINT_FORMAT} (resume it with the fedlearn release that wrote it)")
    try:
        return to_plain(state)
    except CheckpointError:
        raise _Unreadable("holds values that are not plain data: not written by fedlearn, or altered") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read one checkpoint file with ``weights_only`` loading, so a tampered file cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; resume a run directory that finished at least one round")
    try:
        return _read(path)
    except _Unreadable as exc:
        raise CheckpointError(f"checkpoint {path} {exc}; resume the run folder to use its earlier checkpoints, "
                              "or restore the file from a backup") from None


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Delete temporary files an interrupted save left beside the checkpoint ``path``; return what was deleted."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(p for p in path.parent.glob(f"{path.name}.*.tmp") if p.is_file())
    for leftover in stale:
        leftover.unlink(missing_ok=True)
    if stale:
        log.info("removed %d unfinished checkpoint file(s): %s", len(stale), ", ".join(p.name for p in stale))
        fsync_dir(path.parent)
    return stale


def load_latest_checkpoint(path: str | os.PathLike, *, keep: int = KEEP) -> tuple[dict[str, Any], Path]:
    """The newest intact checkpoint of ``path`` and its file; unusable ones are skipped with a warning naming them.

    Leftover temporary files are deleted first. CheckpointError when none of the kept files is intact (saying why).
    """
    path = Path(path)
    remove_leftovers(path)
    problems: list[str] = []
    for candidate in checkpoint_files(path, keep):
        if not candidate.is_file():
            continue
        try:
            state = _read(candidate)
        except _Unreadable as exc:
            log.warning("checkpoint %s %s; skipping it", candidate, exc)
            problems.append(f"{candidate.name} {exc}")
            continue
        if problems:
            log.warning("resuming from the older checkpoint %s (round %s): %s", candidate, state.get("round"),
                        "; ".join(problems))
        return state, candidate
    if not problems:
        raise CheckpointError(f"no checkpoint at {path}; resume a run directory that finished at least one round")
    raise CheckpointError(f"no intact checkpoint in {path.parent} ({'; '.join(problems)}); restore one from a "
                          "backup, or start a new run in another folder")
