"""TorchScript export (traced) with the FedLearn metadata stored as an extra file of the archive."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from fedlearn.export.errors import EdgeModelError
from fedlearn.export.metadata import TORCHSCRIPT_EXTRA_FILE, EdgeMetadata


def export_torchscript(model: torch.nn.Module, meta: EdgeMetadata, path: str | os.PathLike) -> Path:
    """Trace ``model`` (eval mode) on a zero batch and save it with ``meta`` inside the archive."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, *meta.input_shape)
    # torch 2.14 marks TorchScript deprecated; it is still what C++/mobile runtimes without ONNX load
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        traced = torch.jit.trace(model.eval(), example)
        torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_EXTRA_FILE: meta.to_json()})
    return path


def load_torchscript(path: str | os.PathLike) -> tuple[torch.jit.ScriptModule, EdgeMetadata]:
    """Load an archive written by ``export_torchscript`` and its metadata."""
    extra = {TORCHSCRIPT_EXTRA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgeModelError(f"{path} is not a TorchScript archive ({first}); pass a file written by "
                             "fedlearn export --format torchscript") from None
    if not extra[TORCHSCRIPT_EXTRA_FILE]:
        raise EdgeModelError(f"{path} has no FedLearn metadata; export it with fedlearn export --format torchscript")
    return module, EdgeMetadata.from_json(extra[TORCHSCRIPT_EXTRA_FILE], str(path))
