"""Edge deployment: export a run's global model (ONNX float/int8, TorchScript) and run it with onnxruntime."""

from fedlearn.export.errors import EdgeModelError, ExportError
from fedlearn.export.exporting import FORMATS, ExportResult, export_run
from fedlearn.export.metadata import EdgeMetadata, metadata_for
from fedlearn.export.onnx_export import export_onnx, read_metadata
from fedlearn.export.predict import EdgeModel, Prediction, predict_images, softmax
from fedlearn.export.preprocess import image_to_array, images_to_batch
from fedlearn.export.quantize import calibration_sample, quantize_int8
from fedlearn.export.runmodel import RunModel, load_run_model
from fedlearn.export.torchscript_export import export_torchscript, load_torchscript

__all__ = [
    "FORMATS",
    "EdgeMetadata",
    "EdgeModel",
    "EdgeModelError",
    "ExportError",
    "ExportResult",
    "Prediction",
    "RunModel",
    "calibration_sample",
    "export_onnx",
    "export_run",
    "export_torchscript",
    "image_to_array",
    "images_to_batch",
    "load_run_model",
    "load_torchscript",
    "metadata_for",
    "predict_images",
    "quantize_int8",
    "read_metadata",
    "softmax",
]
