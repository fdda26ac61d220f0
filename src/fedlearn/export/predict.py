"""`fedlearn predict`: run an exported ONNX model with onnxruntime on image files, preprocessing from its metadata."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedlearn.export.errors import EdgeModelError
from fedlearn.export.metadata import METADATA_KEY, EdgeMetadata
from fedlearn.export.preprocess import images_to_batch


@dataclass(frozen=True)
class Prediction:
    """The top class of one image and its softmax probability."""

    image: str
    class_index: int
    label: str
    probability: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row maximum so large logits do not overflow."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class EdgeModel:
    """An exported ONNX model in an onnxruntime CPU session, with the metadata that says how to feed it."""

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise EdgeModelError(f"model file {self.path} does not exist; pass a file written by fedlearn export")
        if threads < 1:
            raise EdgeModelError(f"--threads must be a positive integer; got {threads}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types for a file that is not ONNX
            raise EdgeModelError(f"{self.path} is not an ONNX model onnxruntime can load ({type(exc).__name__}); "
                                 "pass a file written by fedlearn export --format onnx") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise EdgeModelError(f"{self.path} has no FedLearn metadata; export it with fedlearn export --format onnx")
        self.metadata = EdgeMetadata.from_json(props[METADATA_KEY], str(self.path))

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, num_classes) logits for a preprocessed (N, C, H, W) float32 batch."""
        return self.session.run([self.metadata.output_name], {self.metadata.input_name: batch})[0]

    def predict_files(self, images: Sequence[str | os.PathLike]) -> list[Prediction]:
        """Top-1 class and probability for each image file, in the order given."""
        probs = softmax(self.logits(images_to_batch(images, self.metadata)).astype(np.float64))
        top = probs.argmax(axis=1)
        return [Prediction(str(path), int(k), self.metadata.labels[int(k)], float(probs[i, k]))
                for i, (path, k) in enumerate(zip(images, top))]


def predict_images(model: str | os.PathLike, images: Sequence[str | os.PathLike], threads: int = 1) -> list[Prediction]:
    """Load ``model`` and classify ``images`` (PNG/JPEG files)."""
    return EdgeModel(model, threads=threads).predict_files(images)
