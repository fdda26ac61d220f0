"""Raw PNG/JPEG files become exactly the tensors training used: mode, size, /255 and (x - mean) / std."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from fedlearn.export import EdgeModelError, image_to_array, images_to_batch


def _digits_raw_test_images() -> np.ndarray:
    """The raw 0..16 pixels of the digits test split, in the bundle's order."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    _, x_test, _, _ = train_test_split(digits.images, digits.target, test_size=0.2, stratify=digits.target,
                                       random_state=0)
    return x_test


def test_png_reproduces_training_preprocessing(run_model, tmp_path) -> None:
    meta, bundle = run_model.metadata, run_model.bundle
    raw = _digits_raw_test_images()[:5]
    pixels = np.round(raw * 255 / 16).astype(np.uint8)  # what a digits image saved as an 8-bit PNG holds
    for i, image in enumerate(pixels):
        path = tmp_path / f"d{i}.png"
        Image.fromarray(image, "L").save(path)
        got = image_to_array(path, meta)
        want = (image.astype(np.float32) / 255 - meta.mean[0]) / meta.std[0]
        np.testing.assert_allclose(got[0], want, atol=1e-6)
        # and the training tensor itself, up to the PNG's 8-bit rounding of the 0..16 scale
        np.testing.assert_allclose(got, bundle.test.x[i].numpy(), atol=0.5 / 255 / meta.std[0] + 1e-6)


def test_rgb_image_of_another_size_is_converted_and_resized(run_model, tmp_path) -> None:
    meta = run_model.metadata
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), "RGB")
    path = tmp_path / "photo.png"
    rgb.save(path)
    got = image_to_array(path, meta)
    assert got.shape == (1, 8, 8) and got.dtype == np.float32
    manual = np.asarray(rgb.convert("L").resize((8, 8), Image.Resampling.BILINEAR), dtype=np.float32)
    np.testing.assert_allclose(got[0], (manual / 255 - meta.mean[0]) / meta.std[0], atol=1e-6)


def test_grayscale_jpeg_into_rgb_model_uses_each_channels_constants(run_model, tmp_path) -> None:
    meta = dataclasses.replace(run_model.metadata, input_shape=(3, 8, 8), color_mode="RGB",
                               mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    gray = np.full((8, 8), 51, dtype=np.uint8)  # 51 / 255 = 0.2 exactly
    path = tmp_path / "gray.jpg"
    Image.fromarray(gray, "L").save(path, quality=100)
    got = image_to_array(path, meta)
    assert got.shape == (3, 8, 8)
    want = [(0.2 - 0.1) / 0.5, 0.0, (0.2 - 0.3) / 0.125]
    np.testing.assert_allclose(got[:, 0, 0], want, atol=0.035)  # up to one JPEG level


def test_unreadable_image_and_empty_list_are_refused(run_model, tmp_path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(EdgeModelError, match="cannot read image"):
        image_to_array(bad, run_model.metadata)
    with pytest.raises(EdgeModelError, match="no images"):
        images_to_batch([], run_model.metadata)
