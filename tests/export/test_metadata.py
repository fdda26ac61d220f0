"""Export metadata: built from the run's own dataset, JSON round trip, and refusal of damaged documents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedlearn.data.bundle import make_bundle
from fedlearn.export import EdgeMetadata, EdgeModelError, ExportError, metadata_for


def test_metadata_carries_the_bundles_normalization(run_model) -> None:
    meta = run_model.metadata
    bundle = run_model.bundle
    assert meta.model == "seed-cnn" and meta.dataset == "digits"
    assert meta.input_shape == (1, 8, 8) == bundle.input_shape
    assert meta.mean == bundle.mean and meta.std == bundle.std
    assert meta.color_mode == "L" and meta.num_classes == 10 and meta.labels == tuple("0123456789")
    assert meta.training["rounds"] == 3 and meta.training["final_accuracy"] > 0.5
    assert meta.quantization == "none"


def test_json_round_trip_is_exact(run_model) -> None:
    meta = run_model.metadata.with_quantization("int8 test", {"images": 7})
    again = EdgeMetadata.from_json(meta.to_json(), "memory")
    assert again == meta
    assert json.loads(meta.to_json())["calibration"] == {"images": 7}


def test_rgb_bundle_gets_rgb_mode_and_two_channels_are_refused() -> None:
    rng = np.random.default_rng(0)
    rgb = make_bundle("toy", (rng.integers(0, 256, (6, 3, 4, 4)), np.arange(6) % 2),
                      (rng.integers(0, 256, (2, 3, 4, 4)), np.arange(2)), num_classes=2, scale=255.0)
    meta = metadata_for("seed-cnn", rgb)
    assert meta.color_mode == "RGB" and len(meta.mean) == len(meta.std) == 3
    two = make_bundle("toy", (rng.integers(0, 256, (6, 2, 4, 4)), np.arange(6) % 2),
                      (rng.integers(0, 256, (2, 2, 4, 4)), np.arange(2)), num_classes=2, scale=255.0)
    with pytest.raises(ExportError, match="2-channel"):
        metadata_for("seed-cnn", two)


def test_damaged_or_newer_metadata_is_refused(run_model) -> None:
    with pytest.raises(EdgeModelError, match="damaged"):
        EdgeMetadata.from_json('{"model": "seed-cnn"}', "x.onnx")
    newer = json.loads(run_model.metadata.to_json())
    newer["format_version"] = 99
    with pytest.raises(EdgeModelError, match="newer FedLearn"):
        EdgeMetadata.from_json(json.dumps(newer), "x.onnx")
