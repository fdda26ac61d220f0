"""TorchScript export: the archive reloads to the same function and carries the metadata."""

from __future__ import annotations

import pytest
import torch

from fedlearn.export import EdgeModelError, ExportError, export_run, load_torchscript


def test_torchscript_round_trip(run_dir, run_model) -> None:
    result = export_run(run_dir, run_dir / "exports" / "model.pt", format="torchscript")
    module, meta = load_torchscript(result.path)
    assert meta == run_model.metadata == result.metadata
    x = run_model.bundle.test.x
    with torch.no_grad():
        assert torch.equal(module(x), run_model.model(x))
        assert torch.equal(module(x[:1]), run_model.model(x[:1]))  # traced with batch 2, runs any batch


def test_torchscript_int8_is_refused(run_dir) -> None:
    with pytest.raises(ExportError, match="--format onnx only"):
        export_run(run_dir, run_dir / "x.pt", format="torchscript", int8=True)


def test_non_archive_is_refused(tmp_path) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a zip archive")
    with pytest.raises(EdgeModelError, match="not a TorchScript archive"):
        load_torchscript(bad)
