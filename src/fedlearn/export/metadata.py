"""What an exported model carries besides its weights: input spec, preprocessing and class labels.

The same JSON document is stored in an ONNX model's ``metadata_props`` and in a TorchScript archive's
extra files, so `fedlearn predict` (or any other runtime) can turn a raw image into exactly the tensor
the model saw in training: pixels / 255, resized to the input size, then ``(x - mean) / std`` per channel.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from fedlearn import __version__
from fedlearn.data import DatasetBundle
from fedlearn.export.errors import EdgeModelError, ExportError

METADATA_KEY = "fedlearn"  # the ONNX metadata_props key and the TorchScript extra file's stem
TORCHSCRIPT_EXTRA_FILE = "fedlearn.json"
FORMAT_VERSION = 1
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
COLOR_MODES = {1: "L", 3: "RGB"}  # Pillow modes for 1- and 3-channel models


@dataclass(frozen=True)
class EdgeMetadata:
    """Everything needed to feed an exported model a raw image and read its answer."""

    model: str
    dataset: str
    input_shape: tuple[int, int, int]  # (C, H, W); the batch axis is dynamic
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    labels: tuple[str, ...]
    color_mode: str = "L"  # Pillow mode the image is converted to before scaling
    pixel_divisor: float = 255.0  # an 8-bit pixel divided by this lies in [0, 1], as in training
    resize: str = "bilinear"  # Pillow filter used when the image is not input_shape's size
    input_name: str = INPUT_NAME
    input_layout: str = "NCHW"  # float32, batch axis first and of any size
    output_name: str = OUTPUT_NAME
    output: str = "logits"  # softmax gives class probabilities
    quantization: str = "none"
    calibration: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # rounds, accuracy, ... from the run's summary
    fedlearn_version: str = __version__
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        """Compact JSON, stable key order."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> EdgeMetadata:
        """Parse the document written by ``to_json``; ``source`` names the file in error messages."""
        try:
            raw = json.loads(text)
            raw["input_shape"] = tuple(int(v) for v in raw["input_shape"])
            for key in ("mean", "std"):
                raw[key] = tuple(float(v) for v in raw[key])
            raw["labels"] = tuple(str(v) for v in raw["labels"])
            meta = cls(**raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise EdgeModelError(f"{source}: its FedLearn metadata is damaged ({exc}); export the model again "
                                 "with fedlearn export") from None
        if meta.format_version > FORMAT_VERSION:
            raise EdgeModelError(f"{source} was exported by a newer FedLearn (metadata format {meta.format_version}); "
                                 "upgrade fedlearn to read it")
        return meta

    def with_quantization(self, quantization: str, calibration: dict[str, Any]) -> EdgeMetadata:
        """A copy describing a quantized model."""
        values = asdict(self)
        values.update(quantization=quantization, calibration=calibration)
        return EdgeMetadata(**values)


def metadata_for(model: str, bundle: DatasetBundle, training: dict[str, Any] | None = None) -> EdgeMetadata:
    """Metadata for ``model`` trained on ``bundle``: its shape and the bundle's own normalization constants."""
    channels = bundle.input_shape[0]
    if channels not in COLOR_MODES:
        raise ExportError(f"{bundle.name} has {channels}-channel images; export supports 1 (grayscale) or 3 (RGB)")
    return EdgeMetadata(
        model=model,
        dataset=bundle.name,
        input_shape=tuple(int(v) for v in bundle.input_shape),
        mean=tuple(float(v) for v in bundle.mean),
        std=tuple(float(v) for v in bundle.std),
        num_classes=int(bundle.num_classes),
        labels=tuple(str(i) for i in range(bundle.num_classes)),
        color_mode=COLOR_MODES[channels],
        training=dict(training or {}),
    )
