"""FEMNIST (LEAF) with its writers as natural groups, from a converted .npz or LEAF's raw train/test JSON.

Pixels follow LEAF's float input x / 255 in [0, 1], where 1 is the white background and ink is dark (not
MNIST's polarity). Mean/std are computed per channel on the training split. There is no downloader: LEAF's
preprocess.sh builds the JSON files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from fedlearn.data.bundle import DatasetBundle, make_bundle
from fedlearn.data.files import load_npz, npz_keys
from fedlearn.errors import DataError

NUM_CLASSES = 62
NPZ_KEYS = ("x_train", "y_train", "writer_train", "x_test", "y_test", "writer_test", "writer_ids")
_SIDE = 28


def _natural_key(path: Path) -> list[object]:
    """Sort key that puts all_data_2 before all_data_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _find_npz(folder: Path) -> Path | None:
    """The first .npz in folder (by name) holding every FEMNIST array."""
    candidates = sorted(folder.glob("*.npz")) if folder.is_dir() else []
    return next((p for p in candidates if set(NPZ_KEYS) <= npz_keys(p)), None)


def _json_files(folder: Path, split: str) -> list[Path]:
    """LEAF's <folder>/<split>/*.json, in natural name order."""
    split_dir = folder / split
    return sorted(split_dir.glob("*.json"), key=_natural_key) if split_dir.is_dir() else []


def _not_found(folder: Path) -> DataError:
    """The one-line error for a folder with neither a FEMNIST .npz nor LEAF JSON."""
    return DataError(
        f"femnist: no LEAF data found in {folder}: put a .npz with arrays {', '.join(NPZ_KEYS)} there, or LEAF's "
        f"JSON files in {folder / 'train'} and {folder / 'test'} (make them with LEAF's data/femnist/preprocess.sh, "
        "e.g. ./preprocess.sh -s niid --sf 0.05 -k 0 -t sample; there is no automatic download)"
    )


def _from_npz(path: Path) -> tuple[tuple, tuple, list[str], float]:
    """Train/test (images, labels, writer index) and writer ids from the converted .npz (uint8 pixels)."""
    a = load_npz(path, NPZ_KEYS)
    train = (a["x_train"].reshape(-1, 1, _SIDE, _SIDE), a["y_train"], a["writer_train"])
    test = (a["x_test"].reshape(-1, 1, _SIDE, _SIDE), a["y_test"], a["writer_test"])
    names = [str(w) for w in a["writer_ids"]]
    for split, groups in (("train", train[2]), ("test", test[2])):
        if groups.size and (groups.min() < 0 or groups.max() >= len(names)):
            raise DataError(f"{path}: writer_{split} indexes past the {len(names)} writer_ids; replace the file")
    return train, test, names, 255.0


def _read_json_split(files: list[Path], writers: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate LEAF users' samples; new writers get the next index in order of first appearance."""
    xs, ys, groups = [], [], []
    for path in files:
        try:
            with open(path, encoding="utf-8") as handle:
                blob = json.load(handle)
            for user in blob["users"]:
                data = blob["user_data"][user]
                x = np.asarray(data["x"], dtype=np.float32).reshape(-1, 1, _SIDE, _SIDE)
                y = np.asarray(data["y"], dtype=np.int64).reshape(-1)
                if x.shape[0] != y.shape[0]:
                    raise ValueError(f"user {user} has {x.shape[0]} images but {y.shape[0]} labels")
                xs.append(x)
                ys.append(y)
                groups.append(np.full(y.shape[0], writers.setdefault(str(user), len(writers)), dtype=np.int64))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path} is not a LEAF FEMNIST JSON file ({type(exc).__name__}: {exc}); "
                            "regenerate it with LEAF's preprocess.sh") from None
    if not xs:
        return np.zeros((0, 1, _SIDE, _SIDE), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(groups)


def _from_json(folder: Path) -> tuple[tuple, tuple, list[str], float]:
    """Train/test and writer ids from LEAF's JSON (float pixels already in [0, 1])."""
    writers: dict[str, int] = {}
    train = _read_json_split(_json_files(folder, "train"), writers)
    test = _read_json_split(_json_files(folder, "test"), writers)
    return train, test, list(writers), 1.0


def load_femnist(name: str, folder: Path, download: bool) -> DatasetBundle:
    """Load FEMNIST; a matching .npz in folder wins over LEAF JSON. ``download`` is ignored (no downloader)."""
    npz = _find_npz(folder)
    if npz is not None:
        train, test, names, scale = _from_npz(npz)
    elif _json_files(folder, "train") and _json_files(folder, "test"):
        train, test, names, scale = _from_json(folder)
    else:
        raise _not_found(folder)
    return make_bundle(
        name, train[:2], test[:2], num_classes=NUM_CLASSES, scale=scale,
        train_groups=train[2], test_groups=test[2], group_names=names,
    )
