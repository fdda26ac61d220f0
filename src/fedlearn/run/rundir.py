"""The run directory: resolved config, partition, per-round metrics, checkpoint, summary, model, curves."""

from __future__ import annotations

import json
import os
import re
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from fedlearn.errors import CheckpointError
from fedlearn.run.config import RunConfig, load_config_file

CONFIG = "config.yaml"
PARTITION = "partition.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL = "model.pt"
CURVES = "curves.png"
CHECKPOINT = "checkpoint.pt"
RUN_ID = "run_id"


def default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDir:
    """Writes and reads one run's files; metrics are appended as each round completes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def start(self, config: RunConfig, partition: list[dict[str, Any]]) -> None:
        """Create the folder and write the resolved config and partition of a new run."""
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / CHECKPOINT).exists():
            raise CheckpointError(f"{self.path} already holds a run; use --resume {self.path} or another --output")
        _write_atomic(self.path / CONFIG, yaml.safe_dump(config.to_dict(), sort_keys=False))
        if partition:  # a gRPC server does not know its clients' data
            _write_atomic(self.path / PARTITION, json.dumps(partition, indent=1))
        (self.path / METRICS).write_text("")

    def load_config(self) -> RunConfig:
        """The resolved config of an existing run (for --resume)."""
        if not (self.path / CONFIG).is_file():
            raise CheckpointError(
                f"{self.path} is not a run directory (no {CONFIG}); pass the folder given as --output"
            )
        return RunConfig().updated(load_config_file(self.path / CONFIG), source=str(self.path / CONFIG))

    @property
    def run_id(self) -> str:
        """This run's id, made once and kept across --resume: deployed clients file their state under it."""
        path = self.path / RUN_ID
        if path.is_file():
            run_id = path.read_text().strip()
            if not re.fullmatch(r"[0-9a-f]{32}", run_id):
                raise CheckpointError(f"{path} is damaged (not a run id); restore it or start a new run")
            return run_id
        run_id = uuid.uuid4().hex
        _write_atomic(path, run_id + "\n")
        return run_id

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        """Make metrics.jsonl match the checkpoint's history exactly (drops a half-written round)."""
        _write_atomic(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in history))

    def finish(self, summary: dict[str, Any], model: torch.nn.Module, history: list[dict[str, Any]]) -> None:
        """Write summary.json, the final model's state_dict and the learning curves."""
        _write_atomic(self.path / SUMMARY, json.dumps(summary, indent=1))
        tmp = self.path / (MODEL + ".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, self.path / MODEL)
        plot_curves(history, self.path / CURVES, summary.get("final_metric", "accuracy"))


def plot_curves(history: list[dict[str, Any]], path: Path, metric: str = "accuracy") -> None:
    """The task's metric and the loss per round, side by side.

    Drawn with matplotlib's object API on the Agg canvas: pyplot (and its GUI machinery) is never imported,
    which halves what a run pays at the end for its picture.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for r in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_metric, ax_loss = fig.subplots(1, 2)
    ax_metric.plot(rounds, [r.get(f"test_{metric}") for r in history], marker=".", label="test")
    ax_metric.set(xlabel="round", ylabel=metric, title=f"Test {metric}")
    ax_metric.grid(alpha=0.3)
    ax_loss.plot(rounds, [r.get("test_loss") for r in history], marker=".", label="test")
    ax_loss.plot(rounds, [r.get("train_loss") for r in history], marker=".", label="train (clients)")
    ax_loss.set(xlabel="round", ylabel="loss", title="Loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    for ax in (ax_metric, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
