"""`fedlearn export`: a run directory's final model to ONNX (float or int8) or TorchScript, metadata embedded."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedlearn.export.errors import ExportError
from fedlearn.export.metadata import EdgeMetadata
from fedlearn.export.onnx_export import export_onnx
from fedlearn.export.quantize import DEFAULT_CALIBRATION_IMAGES, calibration_sample, quantize_int8
from fedlearn.export.runmodel import load_run_model
from fedlearn.export.torchscript_export import export_torchscript

FORMATS = ("onnx", "torchscript")
DEFAULT_NAMES = {("onnx", False): "model.onnx", ("onnx", True): "model.int8.onnx",
                 ("torchscript", False): "model.torchscript.pt"}


@dataclass(frozen=True)
class ExportResult:
    """Where the exported model went and what it carries."""

    path: Path
    format: str
    metadata: EdgeMetadata

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


def export_run(
    run_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    format: str = "onnx",
    int8: bool = False,
    data_dir: str | os.PathLike | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
) -> ExportResult:
    """Export RUN_DIR's final global model; ``int8`` calibrates on a seeded sample of the run's training split.

    The default output is RUN_DIR/model.onnx, model.int8.onnx or model.torchscript.pt.
    """
    if format not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}; got {format!r}")
    if int8 and format != "onnx":
        raise ExportError("--int8 is available for --format onnx only (onnxruntime static quantization); "
                          "drop --int8 or use --format onnx")
    if int8 and calibration_images < 1:
        raise ExportError(f"--calibration-images must be a positive integer; got {calibration_images}")
    run = load_run_model(run_dir, data_dir=data_dir)
    path = Path(output) if output is not None else run.run_dir / DEFAULT_NAMES[(format, int8)]
    if format == "torchscript":
        return ExportResult(export_torchscript(run.model, run.metadata, path), format, run.metadata)
    if not int8:
        return ExportResult(export_onnx(run.model, run.metadata, path), format, run.metadata)
    sample = calibration_sample(run.bundle.train.x, calibration_images, seed=run.config.seed)
    with tempfile.TemporaryDirectory(prefix="fedlearn-export-") as tmp:
        float_path = export_onnx(run.model, run.metadata, Path(tmp) / "float.onnx")
        info = {"source": f"{run.config.dataset} training split (all clients' training data in this simulation)",
                "seed": run.config.seed}
        path, meta = quantize_int8(float_path, path, sample, run.metadata, calibration_info=info)
    return ExportResult(path, format, meta)
