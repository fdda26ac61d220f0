"""Edge inference on image files: same class and probability as the PyTorch model on the same input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fedlearn.export import EdgeModel, EdgeModelError, image_to_array, predict_images, softmax


def _write_test_pngs(run_model, folder, count: int = 12) -> list:
    """The first ``count`` digits test images as 8-bit PNGs (undoing the normalization), some upscaled to 32x32."""
    mean, std = run_model.metadata.mean[0], run_model.metadata.std[0]
    paths = []
    for i in range(count):
        pixels = (run_model.bundle.test.x[i, 0].numpy() * std + mean) * 255
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L")
        if i % 3 == 2:
            image = image.resize((32, 32), Image.Resampling.NEAREST).convert("RGB")
        paths.append(folder / f"digit{i}.png")
        image.save(paths[-1])
    return paths


def test_predict_matches_pytorch_on_the_same_preprocessed_images(run_model, float_onnx, tmp_path) -> None:
    paths = _write_test_pngs(run_model, tmp_path)
    predictions = predict_images(float_onnx, paths)
    batch = torch.from_numpy(np.stack([image_to_array(p, run_model.metadata) for p in paths]))
    with torch.no_grad():
        probs = torch.softmax(run_model.model(batch).double(), dim=1).numpy()
    assert [p.image for p in predictions] == [str(p) for p in paths]
    assert [p.class_index for p in predictions] == probs.argmax(1).tolist()
    assert [p.label for p in predictions] == [str(k) for k in probs.argmax(1)]
    np.testing.assert_allclose([p.probability for p in predictions], probs.max(1), atol=1e-5)


def test_int8_predict_agrees_with_pytorch(run_model, int8_onnx, tmp_path) -> None:
    paths = _write_test_pngs(run_model, tmp_path)
    batch = torch.from_numpy(np.stack([image_to_array(p, run_model.metadata) for p in paths]))
    with torch.no_grad():
        want = run_model.model(batch).argmax(1).tolist()
    got = [p.class_index for p in predict_images(int8_onnx, paths)]
    assert sum(g == w for g, w in zip(got, want)) >= len(want) - 1  # int8 may flip a near tie, not more


def test_softmax_is_stable_and_normalized() -> None:
    probs = softmax(np.array([[1000.0, 1000.0, -1000.0], [0.0, np.log(3.0), 0.0]]))
    np.testing.assert_allclose(probs, [[0.5, 0.5, 0.0], [0.2, 0.6, 0.2]], atol=1e-12)


def test_bad_model_paths_are_refused(tmp_path, float_onnx) -> None:
    with pytest.raises(EdgeModelError, match="does not exist"):
        EdgeModel(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 not a protobuf")
    with pytest.raises(EdgeModelError, match="not an ONNX model"):
        EdgeModel(junk)
    with pytest.raises(EdgeModelError, match="--threads"):
        EdgeModel(float_onnx, threads=0)
