"""MNIST and Fashion-MNIST from their four IDX files, as distributed or in torchvision's <Class>/raw layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedlearn.data.bundle import DatasetBundle, make_bundle
from fedlearn.data.files import find_files, locate, missing_error
from fedlearn.data.idx import read_idx

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_NDIMS = (3, 1, 3, 1)


@dataclass(frozen=True)
class _Spec:
    """What differs between the MNIST-format datasets."""

    torchvision_class: str  # also the folder torchvision downloads into: <root>/<class>/raw
    mean: float
    std: float


_SPECS = {
    "mnist": _Spec("MNIST", 0.1307, 0.3081),
    "fashion-mnist": _Spec("FashionMNIST", 0.2860, 0.3530),
}
NAMES = tuple(_SPECS)


def _torchvision_download(class_name: str, root: Path) -> None:
    """Let torchvision fetch (and unpack) the four files into root/<class_name>/raw."""
    from torchvision import datasets

    getattr(datasets, class_name)(root=str(root), train=True, download=True)


def load_mnist_format(name: str, folder: Path, download: bool) -> DatasetBundle:
    """Load ``mnist`` or ``fashion-mnist`` (uncompressed IDX files are preferred over .gz when both exist)."""
    spec = _SPECS[name]
    raw = folder / spec.torchvision_class / "raw"
    wanted = [(f, f + ".gz") for f in FILES]
    paths, failure = locate(
        name,
        lambda: find_files((folder, raw), wanted),
        lambda: _torchvision_download(spec.torchvision_class, folder),
        download,
    )
    if paths is None:
        raise missing_error(name, folder, [f + ".gz" for f in FILES], also=raw, failure=failure)
    x_train, y_train, x_test, y_test = (read_idx(p, n) for p, n in zip(paths, _NDIMS, strict=True))
    return make_bundle(
        name, (x_train[:, None], y_train), (x_test[:, None], y_test),
        num_classes=10, scale=255.0, mean=(spec.mean,), std=(spec.std,),
    )
