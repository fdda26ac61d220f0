"""The two face datasets shipped beside FedLearn, loaded as one set of 40 identities.

Olivetti (Roweis's 64x64 version) is a tight per-photo face crop of the AT&T/ORL database: the
same 40 people, in the same order (Olivetti subject i is ORL folder s<i+1>), and the same 400
photographs (examples/faces/README.md records the check). Mixing the two would count every person
and every photo twice, and a probe's twin crop would sit in the gallery, so exactly one source is
loaded at a time and both use the same identity numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedlearn.data.files import load_npz
from fedlearn.errors import DataError

SOURCES: dict[str, tuple[str, float]] = {  # source -> (file name, raw pixel maximum that maps to 1)
    "olivetti": ("olivetti_faces.npz", 242.0),  # sklearn divides Olivetti's raw values by their maximum, 242
    "orl": ("att_orl_faces.npz", 255.0),
}
SOURCE_FOLDERS = {"olivetti": "olivetti_faces", "orl": "att_orl_faces"}
NUM_IDENTITIES = 40
IMAGES_PER_IDENTITY = 10
IMAGE_SIZE = 64
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25  # fixed, so no statistic of any identity's photos enters preprocessing


@dataclass
class FaceImages:
    """Face photos as normalized (N, 1, 64, 64) float32 with the person (0-39) and photo number (1-10) of each."""

    x: torch.Tensor
    identity: torch.Tensor
    photo: torch.Tensor
    source: str

    def __len__(self) -> int:
        return int(self.identity.shape[0])

    def select(self, identities: list[int] | np.ndarray) -> FaceImages:
        """The photos of the given people only, in their stored order."""
        mask = torch.isin(self.identity, torch.as_tensor(np.asarray(identities, dtype=np.int64)))
        return FaceImages(self.x[mask], self.identity[mask], self.photo[mask], self.source)


def _resolve(source: str, folder: str | os.PathLike) -> Path:
    """The .npz path: ``folder`` may be the dataset's own folder or the shared datasets root above it."""
    name = SOURCES[source][0]
    folder = Path(folder).expanduser().absolute()
    for candidate in (folder / name, folder / SOURCE_FOLDERS[source] / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"{source} faces: {name} not found in {folder}; point to the folder holding it "
                    f"(e.g. shared/datasets/{SOURCE_FOLDERS[source]})")


def _orl_to_64(images: np.ndarray) -> np.ndarray:
    """ORL's 112x92 frames cut to the central 92x92 square and area-resampled to 64x64."""
    square = torch.from_numpy(images[:, None, 10:102, :].astype(np.float32))
    return F.interpolate(square, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")[:, 0].numpy()


def load_faces(folder: str | os.PathLike, source: str = "olivetti") -> FaceImages:
    """Load all 400 photos of one source (``olivetti`` or ``orl``), sorted by (identity, photo number)."""
    if source not in SOURCES:
        raise DataError(f"unknown face source {source!r}; choose one of: {', '.join(SOURCES)} (they are the same "
                        "people, so use one, never both)")
    path = _resolve(source, folder)
    if source == "olivetti":
        arrays = load_npz(path, ("x_train", "x_test", "idx_train", "idx_test"))
        raw = np.concatenate([arrays["x_train"], arrays["x_test"]])
        position = np.concatenate([arrays["idx_train"], arrays["idx_test"]]).astype(np.int64)
        identity, photo = position // IMAGES_PER_IDENTITY, position % IMAGES_PER_IDENTITY + 1  # sklearn's order
    else:
        arrays = load_npz(path, ("x_train", "x_test", "y_train", "y_test", "img_train", "img_test"))
        raw = _orl_to_64(np.concatenate([arrays["x_train"], arrays["x_test"]]))
        identity = np.concatenate([arrays["y_train"], arrays["y_test"]]).astype(np.int64)
        photo = np.concatenate([arrays["img_train"], arrays["img_test"]]).astype(np.int64)
    expected = NUM_IDENTITIES * IMAGES_PER_IDENTITY
    if raw.shape != (expected, IMAGE_SIZE, IMAGE_SIZE) or identity.min() < 0 or identity.max() >= NUM_IDENTITIES:
        raise DataError(f"{path} does not hold 400 face images of 40 people (images {raw.shape}); "
                        "replace it with the copy described in shared/datasets/README.md")
    if len(set(zip(identity.tolist(), photo.tolist()))) != expected:
        raise DataError(f"{path} repeats a (person, photo) pair; replace it with an original copy")
    order = np.lexsort((photo, identity))
    scale = SOURCES[source][1]
    x = (raw[order].astype(np.float32) / np.float32(scale) - PIXEL_MEAN) / PIXEL_STD
    return FaceImages(
        x=torch.from_numpy(np.ascontiguousarray(x[:, None])),
        identity=torch.from_numpy(identity[order]),
        photo=torch.from_numpy(photo[order]),
        source=source,
    )


def _unit(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True)


def crop_match(face: np.ndarray, frame: np.ndarray, side: int = 20, step: int = 3) -> float:
    """Highest correlation between ``face`` and any axis-aligned crop of the larger ``frame`` (both resampled).

    Used to check that an Olivetti photo is a crop of an ORL photo: it scans crops of every
    position, height and aspect ratio 0.8-1.0 on a ``step``-pixel grid and compares at side x side.
    """
    from torchvision.ops import roi_align

    height, width = frame.shape
    boxes = [[left, top, left + h * ratio, top + h]
             for top in range(0, height // 2, step) for left in range(0, width // 2, step)
             for h in range(height // 3, height + 1, 4) for ratio in (0.8, 0.9, 1.0)
             if top + h <= height and left + h * ratio <= width]
    crops = roi_align(torch.as_tensor(frame, dtype=torch.float32)[None, None],
                      [torch.tensor(boxes, dtype=torch.float32)], output_size=side, sampling_ratio=2, aligned=True)
    target = F.adaptive_avg_pool2d(torch.as_tensor(face, dtype=torch.float32)[None, None], side)
    return float((_unit(crops) @ _unit(target)[0]).max())


def load_raw_pair(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Olivetti (400, 64, 64) and ORL (400, 112, 92) raw photos, both ordered by (person, photo number)."""
    oliv = load_npz(_resolve("olivetti", folder), ("x_train", "x_test", "idx_train", "idx_test"))
    orl = load_npz(_resolve("orl", folder), ("x_train", "x_test", "y_train", "y_test", "img_train", "img_test"))
    olivetti = np.zeros((400, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    olivetti[np.concatenate([oliv["idx_train"], oliv["idx_test"]])] = np.concatenate([oliv["x_train"], oliv["x_test"]])
    position = (np.concatenate([orl["y_train"], orl["y_test"]]) * IMAGES_PER_IDENTITY
                + np.concatenate([orl["img_train"], orl["img_test"]]) - 1)
    frames = np.zeros((400, 112, 92), np.float32)
    frames[position] = np.concatenate([orl["x_train"], orl["x_test"]])
    return olivetti, frames
