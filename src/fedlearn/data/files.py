"""Shared file handling for the loaders: default folders, file lookup, quiet downloads, npz reading, one-line errors."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from fedlearn.errors import DataError

log = logging.getLogger(__name__)
T = TypeVar("T")

ALLOW_DOWNLOAD_HINT = "or allow downloading on a machine with internet access"


class DownloadUnavailable(Exception):
    """No downloader can run here (e.g. an optional package is missing); the message says what to install."""


def data_folder(name: str, data_dir: str | os.PathLike | None) -> Path:
    """The folder to look in: data_dir, or ./data/<name> when it is None (absolute, for clear messages).

    A data_dir that is a file is refused here, in one line: every later message would call it a folder.
    """
    folder = Path(data_dir).expanduser() if data_dir is not None else Path("data") / name
    if data_dir is not None and folder.is_file():
        raise DataError(f"--data-dir {folder.absolute()} is a file; pass the folder that holds the {name} files")
    return folder.absolute()


def find_files(folders: Sequence[Path], wanted: Sequence[Sequence[str]]) -> list[Path] | None:
    """Paths from the first folder that holds every wanted file; each file may go by any of its names."""
    for folder in folders:
        found = []
        for names in wanted:
            path = next((folder / n for n in names if (folder / n).is_file()), None)
            if path is None:
                break
            found.append(path)
        else:
            return found
    return None


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as a short single line: 'Type: message' (message only for DownloadUnavailable)."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, DownloadUnavailable):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def try_download(name: str, fetch: Callable[[], object]) -> str | None:
    """Run a downloader with its console output captured; None on success, else a one-line reason."""
    log.info("%s: files not found locally, trying to download them (this may take a while)", name)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            fetch()
    except Exception as exc:  # noqa: BLE001 - any downloader failure (URLError, RuntimeError, OSError...) is reported
        log.debug("%s: download failed: %s; downloader output: %s", name, one_line(exc), captured.getvalue())
        return one_line(exc)
    return None


def locate(name: str, find: Callable[[], T | None], fetch: Callable[[], object] | None,
           download: bool) -> tuple[T | None, str | None]:
    """Find files, downloading first if allowed and needed; returns (what find found, download failure)."""
    found = find()
    if found is not None or not download or fetch is None:
        return found, None
    failure = try_download(name, fetch)
    found = find()
    if found is None and failure is None:
        failure = "the download left no usable files there"
    return found, failure


def missing_error(name: str, folder: Path, files: Sequence[str], *, also: Path | None = None,
                  failure: str | None = None, hint: str = ALLOW_DOWNLOAD_HINT) -> DataError:
    """The one-line 'files not found' error: which files, which folder, and how to get them."""
    message = f"{name}: files not found in {folder}"
    if failure:
        message += f" and downloading them failed ({failure})"
    message += f": put {', '.join(files)} there"
    if also is not None:
        message += f" (or in {also})"
    if not failure and hint:
        message += f", {hint}"
    return DataError(message)


def npz_keys(path: Path) -> set[str]:
    """The array names in an .npz file (reads only the zip directory); empty if it is not a readable npz."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return set(archive.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return set()


def load_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """Read the named arrays from an .npz file, with a one-line DataError if it is damaged or lacks a key."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in keys if k not in archive.files]
            if missing:
                raise DataError(
                    f"{path} lacks the arrays {', '.join(missing)} (it has {', '.join(sorted(archive.files))}); "
                    "replace it with an original copy"
                )
            return {k: archive[k] for k in keys}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        reason = one_line(exc)
        raise DataError(f"{path} is not a readable .npz file ({reason}); replace it with an original copy") from None
