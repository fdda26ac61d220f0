"""A finished run's final global model, rebuilt from its run directory together with the data it was trained on."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlearn.data import DatasetBundle, load_dataset
from fedlearn.errors import ModelError
from fedlearn.export.errors import ExportError
from fedlearn.export.metadata import EdgeMetadata, metadata_for
from fedlearn.models import build_model
from fedlearn.run.config import RunConfig
from fedlearn.run.rundir import MODEL, SUMMARY, RunDir

_SUMMARY_KEYS = ("rounds", "algorithm", "final_accuracy", "seed")


@dataclass
class RunModel:
    """The run's final model (eval mode, CPU), its config, its dataset and the metadata an export embeds."""

    model: torch.nn.Module
    config: RunConfig
    bundle: DatasetBundle
    metadata: EdgeMetadata
    run_dir: Path


def load_run_model(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> RunModel:
    """Rebuild RUN_DIR's final global model; the dataset is loaded for its normalization constants and samples.

    ``data_dir`` overrides the run's ``data_dir`` (for a run trained on another machine).
    """
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise ExportError(f"run directory {run.path} does not exist; pass the folder given to fedlearn run --output")
    config = run.load_config()
    weights = run.path / MODEL
    if not weights.is_file():
        fix = (f"complete it with fedlearn run --resume {run.path}" if run.checkpoint.is_file()
               else "train it again with fedlearn run")
        raise ExportError(f"{run.path} has no {MODEL} (the run has not finished); {fix}, then export")
    bundle = load_dataset(config.dataset, data_dir if data_dir is not None else config.data_dir,
                          download=config.download)
    model = build_model(config.model, bundle.input_shape, bundle.num_classes)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, OSError, EOFError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{weights} does not hold a {config.model} for {config.dataset} ({first}); "
                         "export the run directory that wrote it") from None
    model.eval()
    metadata = metadata_for(config.model, bundle, training=_training_facts(run.path))
    return RunModel(model=model, config=config, bundle=bundle, metadata=metadata, run_dir=run.path)


def _training_facts(path: Path) -> dict[str, object]:
    """A few facts from summary.json worth carrying along (rounds, algorithm, final accuracy, seed)."""
    try:
        summary = json.loads((path / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}
    return {k: summary[k] for k in _SUMMARY_KEYS if k in summary}
