"""Tests for fedlearn.data dataset loading: bundled digits, real offline files, synthetic files and failures."""

from __future__ import annotations

import gzip
import json
import pickle
import struct
import sys
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlearn.data import DATASETS, ArrayDataset, DatasetBundle, load_dataset
from fedlearn.data.mnist import FILES as IDX_FILES
from fedlearn.errors import ConfigError, DataError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist(shared_dataset) -> DatasetBundle:
    return load_dataset("mnist", shared_dataset("mnist"), download=False)


def _counts(dataset: ArrayDataset, classes: int) -> list[int]:
    return torch.bincount(dataset.y, minlength=classes).tolist()


def _pixels(bundle: DatasetBundle, split: str = "train") -> torch.Tensor:
    """Undo the normalization: back to [0, 1] pixels."""
    x = getattr(bundle, split).x
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    return x * std + mean


def _write_idx(path: Path, array: np.ndarray, magic: bytes | None = None) -> None:
    header = magic or bytes([0, 0, 0x08, array.ndim])
    raw = header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(raw)
    else:
        path.write_bytes(raw)


def _write_mnist_format(folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        IDX_FILES[0]: rng.integers(0, 256, (n_train, 28, 28)),
        IDX_FILES[1]: np.arange(n_train) % 10,
        IDX_FILES[2]: rng.integers(0, 256, (n_test, 28, 28)),
        IDX_FILES[3]: np.arange(n_test) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        _write_idx(folder / (name + (".gz" if gz else "")), array)
    return arrays


def _assert_one_line_missing(error: pytest.ExceptionInfo, folder: Path, names: list[str]) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert str(folder) in message
    for name in names:
        assert name in message


# --- registry ------------------------------------------------------------------------------------------------

def test_names() -> None:
    assert DATASETS[:5] == ("digits", "mnist", "fashion-mnist", "cifar10", "femnist")
    assert {"pneumoniamnist", "breastmnist", "bloodmnist", "tissuemnist", "retinamnist"} <= set(DATASETS)


def test_unknown_name_is_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'; choose one of: digits, mnist"):
        load_dataset("imagenet")


# --- digits --------------------------------------------------------------------------------------------------

def test_digits() -> None:
    bundle = load_dataset("digits")
    assert (len(bundle.train), len(bundle.test)) == (1437, 360)
    assert bundle.train.x.shape == (1437, 1, 8, 8) and bundle.train.x.dtype == torch.float32
    assert bundle.train.y.dtype == torch.int64
    assert bundle.input_shape == (1, 8, 8) and bundle.num_classes == 10
    assert abs(bundle.train.x.mean().item()) < 1e-4 and abs(bundle.train.x.std().item() - 1) < 1e-3
    pixels = _pixels(bundle)
    assert pixels.min().item() == pytest.approx(0, abs=1e-5) and pixels.max().item() == pytest.approx(1, abs=1e-5)
    np.testing.assert_allclose((pixels * 16).numpy(), np.round((pixels * 16).numpy()), atol=1e-4)
    counts = np.array(_counts(bundle.test, 10))
    assert counts.sum() == 360 and counts.min() >= 35  # stratified: about 36 per class
    assert bundle.train_groups is None and bundle.group_names is None
    again = load_dataset("digits")
    assert torch.equal(again.train.x, bundle.train.x) and torch.equal(again.test.y, bundle.test.y)


# --- MNIST / Fashion-MNIST -----------------------------------------------------------------------------------

def test_mnist_real_files(mnist: DatasetBundle) -> None:
    assert (len(mnist.train), len(mnist.test)) == (60000, 10000)
    assert mnist.train.x.shape == (60000, 1, 28, 28) and mnist.input_shape == (1, 28, 28)
    assert _counts(mnist.train, 10) == MNIST_TRAIN_COUNTS and _counts(mnist.test, 10) == MNIST_TEST_COUNTS
    assert mnist.train.y[:5].tolist() == [5, 0, 4, 1, 9] and mnist.test.y[:5].tolist() == [7, 2, 1, 0, 4]
    assert (mnist.mean, mnist.std) == ((0.1307,), (0.3081,))
    assert abs(mnist.train.x.mean().item()) < 1e-3 and abs(mnist.train.x.std().item() - 1) < 1e-3


def test_mnist_torchvision_raw_layout(mnist: DatasetBundle, tmp_path: Path, shared_dataset) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        (raw / f"{name}.gz").symlink_to(shared_dataset("mnist") / f"{name}.gz")
    bundle = load_dataset("mnist", tmp_path, download=False)
    assert torch.equal(bundle.test.x, mnist.test.x) and torch.equal(bundle.train.y, mnist.train.y)


def test_fashion_mnist_uncompressed_idx(tmp_path: Path) -> None:
    arrays = _write_mnist_format(tmp_path)
    bundle = load_dataset("fashion-mnist", tmp_path, download=False)
    assert (bundle.mean, bundle.std) == ((0.2860,), (0.3530,))
    assert (len(bundle.train), len(bundle.test)) == (12, 5)
    expected = (arrays[IDX_FILES[2]] / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(bundle.test.x[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert bundle.train.y.tolist() == arrays[IDX_FILES[1]].tolist()


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        ("magic", "not an IDX file"),
        ("truncated", "truncated or damaged"),
        ("not-gzip", "cannot be read"),
    ],
)
def test_corrupt_idx_is_data_error(tmp_path: Path, damage: str, pattern: str) -> None:
    _write_mnist_format(tmp_path, gz=True)
    target = tmp_path / f"{IDX_FILES[0]}.gz"
    if damage == "magic":
        _write_idx(target, np.zeros((12, 28, 28)), magic=b"\x08\x03\x00\x00")
    elif damage == "truncated":
        raw = gzip.decompress(target.read_bytes())
        target.write_bytes(gzip.compress(raw[:-100]))
    else:
        target.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match=pattern) as error:
        load_dataset("mnist", tmp_path, download=False)
    assert str(target) in str(error.value) and "\n" not in str(error.value)


def test_idx_count_mismatch_is_data_error(tmp_path: Path) -> None:
    _write_mnist_format(tmp_path)
    _write_idx(tmp_path / IDX_FILES[1], np.arange(11) % 10)
    with pytest.raises(DataError, match="train split has 12 images but 11 labels"):
        load_dataset("mnist", tmp_path, download=False)


@pytest.mark.parametrize(("name", "raw"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_missing_without_download(tmp_path: Path, name: str, raw: str) -> None:
    with pytest.raises(DataError, match="files not found.*allow downloading") as error:
        load_dataset(name, tmp_path, download=False)
    _assert_one_line_missing(error, tmp_path, [f"{f}.gz" for f in IDX_FILES] + [str(tmp_path / raw / "raw")])


def test_mnist_download_failure_is_one_line_and_quiet(tmp_path: Path, monkeypatch, capsys) -> None:
    import torchvision.datasets

    class Offline:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            print("Downloading http://example.invalid/train-images-idx3-ubyte.gz")
            raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(DataError, match=r"downloading them failed \(URLError: .*Name or service") as error:
        load_dataset("mnist", tmp_path, download=True)
    _assert_one_line_missing(error, tmp_path, [f"{f}.gz" for f in IDX_FILES])
    assert capsys.readouterr() == ("", "")


def test_mnist_download_success_reads_what_torchvision_left(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets

    class Fetcher:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            _write_mnist_format(Path(root) / "MNIST" / "raw", n_train=7, gz=True)

    monkeypatch.setattr(torchvision.datasets, "MNIST", Fetcher)
    bundle = load_dataset("mnist", tmp_path / "new", download=True)
    assert (len(bundle.train), len(bundle.test)) == (7, 5)


def test_default_data_dir_is_data_slash_name(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as error:
        load_dataset("mnist", download=False)
    assert f"files not found in {tmp_path / 'data' / 'mnist'}:" in str(error.value)


# --- CIFAR-10 ------------------------------------------------------------------------------------------------

CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _cifar_records(batch: int, per_batch: int) -> bytes:
    """per_batch records of batch ``batch``: labels (batch + i) % 10, planes R=255, G=51, B=batch."""
    records = np.zeros((per_batch, 3073), dtype=np.uint8)
    records[:, 0] = [(batch + i) % 10 for i in range(per_batch)]
    records[:, 1:1025], records[:, 1025:2049], records[:, 2049:] = 255, 51, batch
    return records.tobytes()


def _write_cifar(folder: Path, per_batch: int = 4) -> None:
    """The binary version's six files, as in cifar-10-batches-bin/."""
    folder.mkdir(parents=True, exist_ok=True)
    for b, name in enumerate(CIFAR_NAMES):
        (folder / f"{name}.bin").write_bytes(_cifar_records(b, per_batch))


def _check_cifar_bundle(bundle: DatasetBundle) -> None:
    assert bundle.train.x.shape == (20, 3, 32, 32) and bundle.test.x.shape == (4, 3, 32, 32)
    assert bundle.input_shape == (3, 32, 32) and bundle.num_classes == 10
    assert bundle.train.y.tolist()[:8] == [0, 1, 2, 3, 1, 2, 3, 4]
    assert bundle.test.y.tolist() == [5, 6, 7, 8]
    pixels = _pixels(bundle, "test")
    assert pixels[:, 0].allclose(torch.tensor(1.0), atol=1e-5)
    assert pixels[:, 1].allclose(torch.tensor(0.2), atol=1e-5)
    assert pixels[:, 2].allclose(torch.tensor(5 / 255), atol=1e-5)
    assert bundle.mean == (0.4914, 0.4822, 0.4465) and bundle.std == (0.2470, 0.2435, 0.2616)


@pytest.mark.parametrize("subdir", ["cifar-10-batches-bin", ""])
def test_cifar10_binary_batches(tmp_path: Path, subdir: str) -> None:
    _write_cifar(tmp_path / subdir)
    _check_cifar_bundle(load_dataset("cifar10", tmp_path, download=False))


@pytest.mark.parametrize(("data", "match"), [
    (b"garbage", "7 bytes, not a whole number of 3073-byte"),
    (b"", "0 bytes"),
    (bytes([10]) + bytes(3072), "record 0 has label 10"),
])
def test_cifar10_damaged_batch(tmp_path: Path, data: bytes, match: str) -> None:
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3.bin").write_bytes(data)
    with pytest.raises(DataError, match=match) as error:
        load_dataset("cifar10", tmp_path, download=False)
    assert "data_batch_3.bin" in str(error.value) and "\n" not in str(error.value)


class _RunsCode:
    """A pickle payload that would run a shell command when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("subdir", ["cifar-10-batches-py", ""])
def test_cifar10_python_version_is_never_unpickled(tmp_path: Path, subdir: str, monkeypatch) -> None:
    """A tampered data_batch_1 in --data-dir used to run code, on the server too."""
    folder = tmp_path / subdir
    folder.mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "code-ran"
    for name in CIFAR_NAMES:
        (folder / name).write_bytes(pickle.dumps({b"data": _RunsCode(marker), b"labels": [0]}))
    with pytest.raises(DataError, match="python .pickle. version of CIFAR-10.*binary version") as error:
        load_dataset("cifar10", tmp_path, download=False)
    assert "\n" not in str(error.value) and str(folder) in str(error.value)
    offline = urllib.error.URLError("no network")

    def refuse(*args, **kwargs):
        raise offline

    monkeypatch.setattr("urllib.request.urlopen", refuse)
    with pytest.raises(DataError, match="python .pickle. version.*downloading it failed: .*no network"):
        load_dataset("cifar10", tmp_path, download=True)
    assert not marker.exists()


def _cifar_archive(path: Path, extra: dict[str, bytes] | None = None) -> None:
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for b, name in enumerate(CIFAR_NAMES):
            data = _cifar_records(b, 4)
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}.bin")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("cifar-10-batches-bin/batches.meta.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)


def test_cifar10_download_checks_the_archive_and_extracts_only_the_data_files(tmp_path: Path, monkeypatch) -> None:
    import hashlib

    from fedlearn.data import cifar

    served = tmp_path / "served.tar.gz"
    _cifar_archive(served, extra={"../outside.bin": b"x", "cifar-10-batches-bin/readme.html": b"<html>"})
    data = served.read_bytes()
    requested = []

    def urlopen(url: str, timeout: float):
        requested.append(url)
        import io

        return io.BytesIO(data)

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    with pytest.raises(DataError, match="downloading them failed .*not the official CIFAR-10 binary archive"):
        load_dataset("cifar10", tmp_path / "a", download=True)  # the real checksums: this archive is refused
    assert requested == ["https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"]
    assert not (tmp_path / "a" / "cifar-10-batches-bin").exists()

    monkeypatch.setattr(cifar, "ARCHIVE_BYTES", len(data))
    monkeypatch.setattr(cifar, "ARCHIVE_MD5", hashlib.md5(data).hexdigest())
    monkeypatch.setattr(cifar, "ARCHIVE_SHA256", hashlib.sha256(data).hexdigest())
    _check_cifar_bundle(load_dataset("cifar10", tmp_path / "b", download=True))
    unpacked = sorted(p.name for p in (tmp_path / "b" / "cifar-10-batches-bin").iterdir())
    assert unpacked == sorted(f"{n}.bin" for n in CIFAR_NAMES)  # no link, no readme, nothing outside
    assert not (tmp_path / "outside.bin").exists() and not (tmp_path / "b" / "outside.bin").exists()


def test_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="files not found") as error:
        load_dataset("cifar10", tmp_path, download=False)
    _assert_one_line_missing(error, tmp_path, ["data_batch_1.bin", "data_batch_5.bin", "test_batch.bin",
                                               "cifar-10-batches-bin", "binary version"])


# --- MedMNIST ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "sizes", "train_counts", "test_counts"),
    [
        ("breastmnist", (546, 156), [147, 399], [42, 114]),
        ("pneumoniamnist", (4708, 624), [1214, 3494], [234, 390]),
    ],
)
def test_medmnist_real_files(
    name: str, sizes: tuple[int, int], train_counts: list[int], test_counts: list[int], shared_dataset
) -> None:
    bundle = load_dataset(name, shared_dataset("medmnist"), download=False)
    assert (len(bundle.train), len(bundle.test)) == sizes
    assert bundle.train.x.shape[1:] == (1, 28, 28) and bundle.input_shape == (1, 28, 28)
    assert bundle.num_classes == 2 and bundle.train.y.dtype == torch.int64 and bundle.train.y.dim() == 1
    assert _counts(bundle.train, 2) == train_counts and _counts(bundle.test, 2) == test_counts
    assert abs(bundle.train.x.mean().item()) < 1e-4 and abs(bundle.train.x.std().item() - 1) < 1e-3


def _medmnist_npz(path: Path, rgb: bool = True, label_columns: int = 1) -> None:
    rng = np.random.default_rng(0)
    shape = (28, 28, 3) if rgb else (28, 28)
    arrays = {}
    for split, n in (("train", 16), ("val", 3), ("test", 8)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 8, (n, label_columns), dtype=np.uint8)
    np.savez(path, **arrays)


def test_medmnist_rgb_synthetic(tmp_path: Path) -> None:
    _medmnist_npz(tmp_path / "bloodmnist.npz")
    bundle = load_dataset("bloodmnist", tmp_path, download=False)
    assert bundle.train.x.shape == (16, 3, 28, 28) and bundle.input_shape == (3, 28, 28)
    assert bundle.num_classes == 8 and len(bundle.mean) == 3 and len(bundle.test) == 8
    raw = np.load(tmp_path / "bloodmnist.npz")
    np.testing.assert_allclose(_pixels(bundle, "test").numpy(), raw["test_images"].transpose(0, 3, 1, 2) / 255,
                               atol=1e-5)
    assert bundle.test.y.tolist() == raw["test_labels"].reshape(-1).tolist()


def test_medmnist_multi_label_file_refused(tmp_path: Path) -> None:
    _medmnist_npz(tmp_path / "bloodmnist.npz", label_columns=14)
    with pytest.raises(DataError, match="multi-label"):
        load_dataset("bloodmnist", tmp_path, download=False)


def test_medmnist_missing_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "dermamnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="lacks the arrays train_labels, test_images, test_labels"):
        load_dataset("dermamnist", tmp_path, download=False)


def test_medmnist_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pip install medmnist") as error:
        load_dataset("octmnist", tmp_path, download=False)
    _assert_one_line_missing(error, tmp_path, ["octmnist.npz"])


def test_medmnist_download_with_package(tmp_path: Path, monkeypatch) -> None:
    class PathMNIST:
        def __init__(self, split: str, root: str, download: bool) -> None:
            _medmnist_npz(Path(root) / "pathmnist.npz", label_columns=1)

    fake = types.SimpleNamespace(INFO={"pathmnist": {"python_class": "PathMNIST"}}, PathMNIST=PathMNIST)
    monkeypatch.setitem(sys.modules, "medmnist", fake)
    bundle = load_dataset("pathmnist", tmp_path / "fresh", download=True)
    assert bundle.num_classes == 9 and len(bundle.train) == 16


def test_medmnist_download_without_package(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "medmnist", None)  # makes `import medmnist` fail
    with pytest.raises(DataError, match="downloading them failed .*pip install medmnist") as error:
        load_dataset("tissuemnist", tmp_path, download=True)
    _assert_one_line_missing(error, tmp_path, ["tissuemnist.npz"])


# --- FEMNIST -------------------------------------------------------------------------------------------------

def test_femnist_real_npz(shared_dataset) -> None:
    bundle = load_dataset("femnist", shared_dataset("femnist_leaf"), download=False)
    assert (len(bundle.train), len(bundle.test)) == (14708, 1685)
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 62
    assert len(bundle.group_names) == 105 and bundle.group_names[0] == "f3313_11"
    for groups, split in ((bundle.train_groups, bundle.train), (bundle.test_groups, bundle.test)):
        assert groups.dtype == np.int64 and groups.shape == (len(split),)
        assert set(np.unique(groups).tolist()) == set(range(105))  # every writer is in both splits
    sizes = np.bincount(bundle.train_groups)
    assert (sizes.min(), int(np.median(sizes))) == (4, 152)
    assert _pixels(bundle).mean().item() > 0.9  # LEAF polarity: white background is 1
    assert abs(bundle.train.x.mean().item()) < 1e-4


def _leaf_user(rng: np.random.Generator, n: int) -> dict:
    return {"x": (rng.integers(0, 256, (n, 784)) / 255).tolist(), "y": rng.integers(0, 62, n).tolist()}


def test_femnist_leaf_json_matches_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shards = {  # LEAF writes each shard's train/test JSON with the same users
        "all_data_2_niid_05_keep_0_{}_9.json": ["f0002_01", "f0001_07"],
        "all_data_10_niid_05_keep_0_{}_9.json": ["f0100_33"],
    }
    for split, n in (("train", 5), ("test", 2)):
        (tmp_path / "leaf" / split).mkdir(parents=True)
        for pattern, users in shards.items():
            data = {u: _leaf_user(rng, n) for u in users}
            blob = {"users": users, "num_samples": [n] * len(users), "user_data": data}
            (tmp_path / "leaf" / split / pattern.format(split)).write_text(json.dumps(blob))
    bundle = load_dataset("femnist", tmp_path / "leaf", download=False)
    assert bundle.group_names == ["f0002_01", "f0001_07", "f0100_33"]  # shard 2 before shard 10
    assert bundle.train_groups.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert bundle.test_groups.tolist() == [0] * 2 + [1] * 2 + [2] * 2
    assert bundle.train.x.shape == (15, 1, 28, 28) and bundle.num_classes == 62

    # The same data as a converted .npz (uint8 pixels) gives the same tensors.
    pixels = np.round(_pixels(bundle).numpy() * 255).astype(np.uint8)[:, 0]
    test_pixels = np.round(_pixels(bundle, "test").numpy() * 255).astype(np.uint8)[:, 0]
    np.savez(tmp_path / "femnist.npz", x_train=pixels, y_train=bundle.train.y.numpy(), writer_train=bundle.train_groups,
             x_test=test_pixels, y_test=bundle.test.y.numpy(), writer_test=bundle.test_groups,
             writer_ids=np.array(bundle.group_names))
    from_npz = load_dataset("femnist", tmp_path, download=False)
    assert torch.allclose(from_npz.train.x, bundle.train.x, atol=1e-5)
    assert from_npz.group_names == bundle.group_names and torch.equal(from_npz.test.y, bundle.test.y)


def test_femnist_bad_json(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "a.json").write_text('{"users": ["u"], "user_data": {"u": {"x": [[0.5]], "y": [1]}}}')
    with pytest.raises(DataError, match=r"a\.json is not a LEAF FEMNIST JSON file"):
        load_dataset("femnist", tmp_path, download=False)


@pytest.mark.parametrize("download", [False, True])
def test_femnist_missing(tmp_path: Path, download: bool) -> None:
    with pytest.raises(DataError, match="no LEAF data found.*preprocess.sh") as error:
        load_dataset("femnist", tmp_path, download=download)
    _assert_one_line_missing(error, tmp_path, ["x_train", "writer_ids", str(tmp_path / "train")])


# --- tasks: multilabel chestmnist, regression, bundle.task -----------------------------------------------------

def _chestmnist_npz(path: Path, labels: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A tiny chestmnist.npz in the MedMNIST layout: grayscale 28x28 images and (N, 14) uint8 0/1 labels."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 3), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((n, 14)) < 0.15).astype(np.uint8)
    arrays["train_labels"][:3] = 0  # some "no finding" rows
    arrays.update(labels or {})
    np.savez(path, **arrays)
    return arrays


def test_chestmnist_loads_as_multilabel(tmp_path: Path) -> None:
    from fedlearn.data.datasets import partition_labels
    from fedlearn.data.partition import label_counts, partition_indices

    assert "chestmnist" in DATASETS
    arrays = _chestmnist_npz(tmp_path / "chestmnist.npz")
    bundle = load_dataset("chestmnist", tmp_path, download=False)
    assert bundle.task == "multilabel" and bundle.num_classes == 14
    assert bundle.train.x.shape == (20, 1, 28, 28) and bundle.input_shape == (1, 28, 28)
    assert bundle.train.y.shape == (20, 14) and bundle.train.y.dtype == torch.float32
    np.testing.assert_array_equal(bundle.test.y.numpy(), arrays["test_labels"])
    np.testing.assert_allclose(_pixels(bundle, "test")[:, 0].numpy(), arrays["test_images"] / 255, atol=1e-5)

    groups, classes = partition_labels(bundle)
    raw = arrays["train_labels"]
    expected = [int(np.flatnonzero(row)[0]) if row.any() else 14 for row in raw]
    assert classes == 15 and groups.tolist() == expected and groups[:3].tolist() == [14, 14, 14]
    parts = partition_indices(groups, 3, "dirichlet", seed=0, alpha=1.0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(20))
    assert sum(label_counts(groups, np.arange(20), classes)) == 20


@pytest.mark.parametrize(
    ("labels", "pattern"),
    [
        (np.full((20, 14), 2, dtype=np.uint8), "must all be 0 or 1"),
        (np.zeros((20, 1), dtype=np.uint8), r"shape \(20, 1\), expected \(N, 14\)"),
    ],
)
def test_chestmnist_bad_labels_are_data_errors(tmp_path: Path, labels: np.ndarray, pattern: str) -> None:
    _chestmnist_npz(tmp_path / "chestmnist.npz", {"train_labels": labels})
    with pytest.raises(DataError, match=pattern) as error:
        load_dataset("chestmnist", tmp_path, download=False)
    assert "\n" not in str(error.value)


def test_chestmnist_missing_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pip install medmnist") as error:
        load_dataset("chestmnist", tmp_path, download=False)
    _assert_one_line_missing(error, tmp_path, ["chestmnist.npz"])


def test_bundle_task_defaults_to_classification(tmp_path: Path) -> None:
    assert load_dataset("digits").task == "classification"
    _medmnist_npz(tmp_path / "bloodmnist.npz")
    bundle = load_dataset("bloodmnist", tmp_path, download=False)
    assert bundle.task == "classification" and bundle.train.y.dtype == torch.int64
    plain = DatasetBundle(bundle.name, bundle.train, bundle.test, 8, (3, 28, 28), (0.0,), (1.0,))
    assert plain.task == "classification"


def test_make_bundle_task_checks() -> None:
    from fedlearn.data.bundle import make_bundle

    x = np.zeros((4, 1, 2, 2))
    with pytest.raises(ConfigError, match="unknown task 'ranking'"):
        make_bundle("toy", (x, np.zeros(4)), (x, np.zeros(4)), num_classes=1, scale=1.0, task="ranking")
    with pytest.raises(DataError, match="NaN or infinity"):
        make_bundle("toy", (x, np.array([0.0, np.nan, 1.0, 2.0])), (x, np.zeros(4)), num_classes=1, scale=1.0,
                    task="regression")
    with pytest.raises(DataError, match=r"expected \(N, 3\)"):
        make_bundle("toy", (x, np.zeros(4)), (x, np.zeros(4)), num_classes=3, scale=1.0, task="regression")
    with pytest.raises(DataError, match="train split has 4 images but 3 labels"):
        make_bundle("toy", (x, np.zeros((3, 2))), (x, np.zeros((4, 2))), num_classes=2, scale=1.0, task="multilabel")
    bundle = make_bundle("toy", (x, np.ones((4, 2))), (x, np.zeros((4, 2))), num_classes=2, scale=1.0,
                         task="regression")
    assert bundle.task == "regression" and bundle.train.y.shape == (4, 2) and bundle.train.y.dtype == torch.float32


def test_synthetic_regression() -> None:
    from fedlearn.data.datasets import REGRESSION_BINS, partition_labels
    from fedlearn.data.synthetic import true_weights

    bundle = load_dataset("synthetic-regression")
    assert bundle.task == "regression" and bundle.num_classes == 1 and bundle.input_shape == (1, 1, 8)
    assert (len(bundle.train), len(bundle.test)) == (800, 200) and bundle.train.y.dtype == torch.float32
    x = bundle.train.x.reshape(800, 8).double().numpy()
    fitted = np.linalg.lstsq(x, bundle.train.y.double().numpy(), rcond=None)[0]
    assert np.abs(fitted - true_weights()).max() < 0.02  # noise std 0.1 over 800 examples
    assert torch.equal(load_dataset("synthetic-regression").test.y, bundle.test.y)
    bins, classes = partition_labels(bundle)
    assert classes == REGRESSION_BINS and np.bincount(bins).tolist() == [80] * REGRESSION_BINS
    test_bins, _ = partition_labels(bundle, "test")
    assert test_bins.min() >= 0 and test_bins.max() < REGRESSION_BINS
