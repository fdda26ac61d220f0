"""Float ONNX export with a dynamic batch axis and the FedLearn metadata stored in ``metadata_props``."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from fedlearn.export.errors import EdgeModelError, ExportError
from fedlearn.export.metadata import METADATA_KEY, EdgeMetadata

EXAMPLE_BATCH = 2  # torch.export specializes a batch of 1, so trace with 2 and mark the axis dynamic


def export_onnx(model: torch.nn.Module, meta: EdgeMetadata, path: str | os.PathLike) -> Path:
    """Write ``model`` (in eval mode) as ONNX with input ``meta.input_name`` of shape (batch, C, H, W)."""
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it; fail here with the fix)
    except ImportError:
        raise ExportError("ONNX export needs the onnxscript package: pip install onnxscript") from None
    model = model.eval()
    example = torch.zeros(EXAMPLE_BATCH, *meta.input_shape)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # exporter chatter about unused options
        program = torch.onnx.export(
            model, (example,), dynamo=True, verbose=False,
            input_names=[meta.input_name], output_names=[meta.output_name],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
    proto = program.model_proto
    set_metadata(proto, meta)
    return save_onnx(proto, path)


def set_metadata(proto, meta: EdgeMetadata) -> None:
    """Store ``meta`` under the ``fedlearn`` key of an ONNX ModelProto, replacing any earlier copy."""
    kept = [p for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = meta.to_json()
    proto.doc_string = f"FedLearn {meta.model} trained on {meta.dataset}; preprocessing in metadata_props['fedlearn']"


def save_onnx(proto, path: str | os.PathLike) -> Path:
    """Save a ModelProto as one self-contained file, creating the folder."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(path))
    return path


def read_metadata(path: str | os.PathLike) -> EdgeMetadata:
    """The FedLearn metadata of an ONNX file written by ``export_onnx`` or ``quantize_int8``."""
    import onnx

    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a file that is not ONNX
        raise EdgeModelError(f"{path} is not an ONNX model ({type(exc).__name__}); pass a file written by "
                             "fedlearn export --format onnx") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise EdgeModelError(f"{path} has no FedLearn metadata; export it with fedlearn export --format onnx")
    return EdgeMetadata.from_json(props[METADATA_KEY], str(path))
