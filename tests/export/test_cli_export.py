"""`fedlearn export` and `fedlearn predict` from the command line, and their one-line errors."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from fedlearn.cli import main
from fedlearn.export import read_metadata


def test_export_then_predict_json(run_dir, run_model, tmp_path, capsys) -> None:
    model = tmp_path / "m.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--output", str(model)]) == 0
    out = capsys.readouterr().out
    assert f"to {model}" in out and "seed-cnn (digits, input 1x8x8 L" in out
    assert read_metadata(model) == run_model.metadata

    pixels = (run_model.bundle.test.x[0, 0].numpy() * run_model.metadata.std[0] + run_model.metadata.mean[0]) * 255
    png = tmp_path / "digit.png"
    Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), "L").save(png)
    assert main(["predict", str(model), str(png), str(png), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and rows[0] == rows[1]
    assert set(rows[0]) == {"image", "class_index", "label", "probability"} and 0 < rows[0]["probability"] <= 1

    assert main(["predict", str(model), str(png)]) == 0
    assert capsys.readouterr().out.strip() == f"{png}: {rows[0]['label']} (p={rows[0]['probability']:.3f})"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedlearn: error: ") and "\n" not in err
    return err


def test_export_missing_run_dir_exits_2(tmp_path, capsys) -> None:
    assert main(["export", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in _one_line_error(capsys)


def test_export_run_without_model_exits_2(run_dir, tmp_path, capsys) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert main(["export", str(unfinished)]) == 2
    assert "has no model.pt" in _one_line_error(capsys)


def test_export_folder_that_is_not_a_run_exits_2(tmp_path, capsys) -> None:
    assert main(["export", str(tmp_path)]) == 2
    assert "not a run directory" in _one_line_error(capsys)


def test_torchscript_int8_exits_2(run_dir, capsys) -> None:
    assert main(["export", str(run_dir), "--format", "torchscript", "--int8"]) == 2
    assert "--format onnx only" in _one_line_error(capsys)


def test_predict_on_a_non_image_exits_2(float_onnx, run_dir, capsys) -> None:
    assert main(["predict", str(float_onnx), str(run_dir / "config.yaml")]) == 2
    assert "cannot read image" in _one_line_error(capsys)
