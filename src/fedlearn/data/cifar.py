"""CIFAR-10 from the official *binary* version (data_batch_1..5.bin, test_batch.bin), loose or in cifar-10-batches-bin/.

Each file is a run of 3,073-byte records: one label byte (0-9), then 1,024 red, 1,024 green and 1,024 blue pixel
bytes of a 32x32 image. Reading that is arithmetic on bytes, so a tampered file can give wrong images but cannot
run code. The python version (cifar-10-batches-py/, pickled) is never loaded: unpickling a file from --data-dir
would run whatever it names. The download fetches cifar-10-binary.tar.gz from the dataset's page, checks its size,
MD5 (the one the page publishes) and SHA-256, and extracts only the six data files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.request
from pathlib import Path

import numpy as np

from fedlearn.data.bundle import DatasetBundle, make_bundle
from fedlearn.data.files import ALLOW_DOWNLOAD_HINT, find_files, locate, missing_error
from fedlearn.errors import DataError

NAME = "cifar10"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
SUBDIR = "cifar-10-batches-bin"
PICKLE_SUBDIR = "cifar-10-batches-py"
PICKLE_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
PAGE = "https://www.cs.toronto.edu/~kriz/cifar.html"
ARCHIVE_BYTES = 170_052_171
ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"  # as published on the dataset's page
ARCHIVE_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
RECORD = 1 + 3 * 32 * 32
NUM_CLASSES = 10
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def read_binary_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch as (uint8 images (n, 3, 32, 32), int64 labels); DataError for a file that is not one."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({type(exc).__name__}: {exc.strerror or exc}); check the file") from None
    if not raw or len(raw) % RECORD:
        raise DataError(f"{path} is {len(raw)} bytes, not a whole number of {RECORD}-byte CIFAR-10 records; "
                        f"download the binary version again ({PAGE})")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= NUM_CLASSES:
        first = int(np.argmax(labels >= NUM_CLASSES))
        raise DataError(f"{path} record {first} has label {int(labels[first])}, outside 0..9; it is not a CIFAR-10 "
                        f"binary batch: download it again ({PAGE})")
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def _hashes(path: Path) -> tuple[str, str]:
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            md5.update(block)
            sha256.update(block)
    return md5.hexdigest(), sha256.hexdigest()


def check_archive(path: Path) -> None:
    """DataError unless ``path`` is the official cifar-10-binary.tar.gz (size, MD5 and SHA-256)."""
    size = path.stat().st_size
    md5, sha256 = _hashes(path)
    if size != ARCHIVE_BYTES or md5 != ARCHIVE_MD5 or sha256 != ARCHIVE_SHA256:
        raise DataError(f"{path} is not the official CIFAR-10 binary archive ({size} bytes, MD5 {md5}; expected "
                        f"{ARCHIVE_BYTES} bytes, MD5 {ARCHIVE_MD5}); delete it and download again")


def extract_batches(archive: Path, folder: Path) -> None:
    """Copy the six data files out of the archive into folder/cifar-10-batches-bin (nothing else, no links)."""
    wanted = {f"{SUBDIR}/{name}" for name in (*TRAIN_FILES, TEST_FILE)}
    target = folder / SUBDIR
    target.mkdir(parents=True, exist_ok=True)
    found = set()
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.name not in wanted or not member.isfile():
                continue
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has content
            part = target / (Path(member.name).name + ".part")
            with source, open(part, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            os.replace(part, target / Path(member.name).name)
            found.add(member.name)
    if found != wanted:
        raise DataError(f"{archive} lacks {', '.join(sorted(wanted - found))}; delete it and download again")


def download_binary(folder: Path) -> None:
    """Fetch, check and unpack the binary version into folder/cifar-10-batches-bin (the archive is kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / Path(URL).name
    if not archive.is_file():
        part = archive.with_name(archive.name + ".part")
        with urllib.request.urlopen(URL, timeout=60) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        os.replace(part, archive)
    check_archive(archive)
    extract_batches(archive, folder)


def _pickle_folder(folder: Path) -> Path | None:
    """Where the python (pickled) version lies, if it is here."""
    for candidate in (folder, folder / PICKLE_SUBDIR):
        if any((candidate / name).is_file() for name in PICKLE_FILES):
            return candidate
    return None


def load_cifar10(name: str, folder: Path, download: bool) -> DatasetBundle:
    """Load CIFAR-10 (binary version) with the usual per-channel normalization."""
    files = (*TRAIN_FILES, TEST_FILE)
    paths, failure = locate(
        name,
        lambda: find_files((folder, folder / SUBDIR), [(f,) for f in files]),
        lambda: download_binary(folder),
        download,
    )
    if paths is None:
        pickled = _pickle_folder(folder)
        if pickled is not None:
            why = f" (downloading it failed: {failure})" if failure else f", {ALLOW_DOWNLOAD_HINT}"
            raise DataError(f"{name}: {pickled} holds the python (pickle) version of CIFAR-10, which fedlearn does "
                            f"not load because unpickling a file can run code; put the binary version "
                            f"(cifar-10-binary.tar.gz from {PAGE}, unpacked) in {folder}{why}")
        raise missing_error(name, folder, files, also=folder / SUBDIR, failure=failure,
                            hint=f"{ALLOW_DOWNLOAD_HINT} (the binary version from {PAGE})")
    batches = [read_binary_batch(p) for p in paths]
    x_train = np.concatenate([b[0] for b in batches[:-1]])
    y_train = np.concatenate([b[1] for b in batches[:-1]])
    return make_bundle(name, (x_train, y_train), batches[-1], num_classes=NUM_CLASSES, scale=255.0, mean=MEAN, std=STD)
