"""Raw image files to model input, exactly as training saw them: color mode, size, /255, (x - mean) / std."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from fedlearn.export.errors import EdgeModelError
from fedlearn.export.metadata import EdgeMetadata

_FILTERS = {"bilinear": "BILINEAR", "bicubic": "BICUBIC", "nearest": "NEAREST", "lanczos": "LANCZOS"}


def image_to_array(path: str | os.PathLike, meta: EdgeMetadata) -> np.ndarray:
    """One image file as a (C, H, W) float32 array ready for the model."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # phone JPEGs store rotation in EXIF
            image = image.convert(meta.color_mode)
            channels, height, width = meta.input_shape
            if image.size != (width, height):
                image = image.resize((width, height), getattr(Image.Resampling, _FILTERS[meta.resize]))
            pixels = np.asarray(image, dtype=np.float32)
    except (OSError, UnidentifiedImageError) as exc:
        raise EdgeModelError(f"cannot read image {path} ({exc}); pass PNG or JPEG files") from None
    if pixels.ndim == 2:
        pixels = pixels[None]
    else:
        pixels = pixels.transpose(2, 0, 1)
    return normalize(pixels / np.float32(meta.pixel_divisor), meta)


def normalize(scaled: np.ndarray, meta: EdgeMetadata) -> np.ndarray:
    """(x - mean) / std per channel for (C, H, W) or (N, C, H, W) pixels already scaled to [0, 1]."""
    shape = (-1, 1, 1)
    mean = np.asarray(meta.mean, dtype=np.float32).reshape(shape)
    std = np.asarray(meta.std, dtype=np.float32).reshape(shape)
    return np.ascontiguousarray((scaled - mean) / std, dtype=np.float32)


def images_to_batch(paths: Sequence[str | os.PathLike], meta: EdgeMetadata) -> np.ndarray:
    """Several image files as one (N, C, H, W) float32 batch."""
    if not paths:
        raise EdgeModelError("no images given; pass one or more PNG or JPEG files")
    return np.stack([image_to_array(p, meta) for p in paths])
