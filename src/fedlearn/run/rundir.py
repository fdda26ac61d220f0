"""The run directory: resolved config, partition, per-round metrics, checkpoint, summary, model, curves."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from fedlearn.errors import CheckpointError, ConfigError
from fedlearn.registry import shown
from fedlearn.run.config import RunConfig, load_config_file
from fedlearn.run.publication import public_partition, public_row
from fedlearn.server.checkpoint import disk_error, write_fsynced

CONFIG = "config.yaml"
PARTITION = "partition.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL = "model.pt"
CURVES = "curves.png"
CHECKPOINT = "checkpoint.pt"
RUN_ID = "run_id"
STARTED = "config.started.yaml"  # the settings the run started with: --resume compares config.yaml against it
# What config.yaml may change on --resume: how many rounds, where the folder and the data are, how to run.
RESUMABLE = ("rounds", "output", "data_dir", "download", "device", "threads", "round_timeout")
_STARTED_HEADER = ("# The settings this run started with; do not edit. --resume refuses a config.yaml that differs\n"
                   f"# from them in anything but {', '.join(RESUMABLE)}.\n")
log = logging.getLogger(__name__)


def default_run_dir(root: str | os.PathLike = "runs", now: datetime | None = None) -> Path:
    """A new empty folder ``root/<timestamp>``, made here: two runs started in the same second get
    ``<timestamp>`` and ``<timestamp>-2`` (mkdir is atomic, so they can never share one)."""
    root = Path(root)
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    path = root / stamp
    try:
        root.mkdir(parents=True, exist_ok=True)
        for n in range(1, 10_000):
            path = root / (stamp if n == 1 else f"{stamp}-{n}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as exc:
        raise ConfigError(f"cannot create the run folder {path} ({exc.strerror or exc}); give --output a folder "
                          "you can write to") from None
    raise ConfigError(f"{root} already holds 10000 runs started at {stamp}; give --output")


def _short(path: str | os.PathLike, limit: int = 200) -> str:
    """A path for a message: whole when it is of a usual length, else its start and end."""
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 3:]}"


def check_output(path: str | os.PathLike) -> None:
    """Refuse an output folder that cannot be made or written (a file, a file on the way, no write permission),
    changing nothing on disk (for --dry-run; a real run also tries a write, in ``RunDir.create``)."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--output {_short(path)} is a file; give a folder for the run's files")
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"--output {_short(path)}: {existing} is a file, not a folder; give another --output")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"--output {_short(path)}: {existing} is not writable; give a folder you can write to")
    except OSError as exc:  # a name too long, a loop of links, ...
        raise ConfigError(f"--output {_short(path)}: {exc.strerror or exc}; give another folder") from None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:  # a full disk or a read-only folder: one line saying what to do, the old file intact
        tmp.unlink(missing_ok=True)
        raise disk_error("write", path, exc) from None


class RunDir:
    """Writes and reads one run's files; metrics are appended as each round completes."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.withheld: tuple[str, ...] = ()  # row keys the run does not publish (publication.withheld)

    def create(self) -> bool:
        """Make (or check) the folder of a new run before anything is built; True when this call made it.

        A file, an unwritable folder or one holding a run is refused in one line, not by a traceback later.
        """
        check_output(self.path)
        existed = self.path.is_dir()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=self.path)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(f"--output {_short(self.path)}: cannot write there ({exc.strerror or exc}); give a "
                              "folder you can write to") from None
        if (self.path / CHECKPOINT).exists():
            raise CheckpointError(f"{self.path} already holds a run; use --resume {self.path} or another --output")
        return not existed

    def discard_if_unused(self) -> None:
        """Remove the folder again if it holds no file but its run id (a new run that failed while being built)."""
        try:
            if any(p.is_file() and p != self.path / RUN_ID for p in self.path.rglob("*")):
                return
            (self.path / RUN_ID).unlink(missing_ok=True)
            for sub in sorted(self.path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                sub.rmdir()
            self.path.rmdir()
        except OSError:
            pass  # best effort: an empty folder left behind is harmless

    def start(self, config: RunConfig, partition: list[dict[str, Any]]) -> None:
        """Create the folder and write the resolved config and partition of a new run."""
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / CHECKPOINT).exists():
            raise CheckpointError(f"{self.path} already holds a run; use --resume {self.path} or another --output")
        text = yaml.safe_dump(config.to_dict(), sort_keys=False)
        _write_atomic(self.path / CONFIG, text)
        _write_atomic(self.path / STARTED, _STARTED_HEADER + text)
        if partition:  # a gRPC server does not know its clients' data
            _write_atomic(self.path / PARTITION, json.dumps(public_partition(partition, config), indent=1))
        (self.path / METRICS).write_text("")

    def load_config(self) -> RunConfig:
        """The resolved config of an existing run (for --resume)."""
        if not (self.path / CONFIG).is_file():
            raise CheckpointError(
                f"{self.path} is not a run directory (no {CONFIG}); pass the folder given as --output"
            )
        return RunConfig().updated(load_config_file(self.path / CONFIG), source=str(self.path / CONFIG))

    def config_for_resume(self, rounds: int | None = None, *, record: bool = True) -> RunConfig:
        """config.yaml for --resume, refused (naming each key and both values) where it differs from the settings
        the run started with in anything but ``RESUMABLE``; ``rounds`` (``--rounds``) sets the total to reach.
        ``record=False`` (a dry run) writes no record into a folder that lacks one."""
        config = self.load_config()
        started_path = self.path / STARTED
        if started_path.is_file():
            started = RunConfig().updated(load_config_file(started_path), source=str(started_path))
            changed = changed_settings(started, config)
            if changed:
                listed = ", ".join(f"{key} {shown(before)} -> {shown(now)}" for key, before, now in changed)
                raise ConfigError(f"{self.path / CONFIG} differs from the settings this run started with: {listed}; "
                                  f"restore them (on --resume only {', '.join(RESUMABLE)} may change) or start a new "
                                  "run with another --output")
        elif record:  # a run folder from a release before the record: keep what is there now as the record
            log.warning("%s has no %s (an older fedlearn made it): recording %s as it is now", self.path, STARTED,
                        CONFIG)
            _write_atomic(started_path, _STARTED_HEADER + (self.path / CONFIG).read_text())
        changes: dict[str, Any] = {"output": str(self.path)}  # the folder may have moved since it was made
        if rounds is not None:
            changes["rounds"] = rounds
        return config.updated(changes)

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
        try:
            with open(self.path / METRICS, "a") as f:
                f.write(json.dumps(public_row(row, self.withheld)) + "\n")
                f.flush()
        except OSError as exc:  # the checkpoint holds the row; --resume rewrites metrics.jsonl from it
            raise disk_error("append to", self.path / METRICS, exc) from None

    def rewrite_metrics(self, history: list[dict[str, Any]]) -> None:
        """Make metrics.jsonl match the checkpoint's history exactly (drops a half-written round)."""
        _write_atomic(self.path / METRICS, "".join(json.dumps(public_row(r, self.withheld)) + "\n" for r in history))

    def finish(self, summary: dict[str, Any], model: torch.nn.Module, history: list[dict[str, Any]]) -> None:
        """Write summary.json, the final model's state_dict and the learning curves."""
        _write_atomic(self.path / SUMMARY, json.dumps(summary, indent=1))
        try:
            os.replace(write_fsynced(model.state_dict(), self.path, MODEL), self.path / MODEL)
        except OSError as exc:
            raise disk_error("write", self.path / MODEL, exc) from None
        plot_curves([public_row(r, self.withheld) for r in history], self.path / CURVES,
                    summary.get("final_metric", "accuracy"))


def changed_settings(started: RunConfig, now: RunConfig) -> list[tuple[str, Any, Any]]:
    """(key, started value, current value) for every setting outside ``RESUMABLE`` that differs."""
    keys = dict.fromkeys([*started.to_dict(), *now.to_dict()])
    return [(key, getattr(started, key), getattr(now, key)) for key in keys
            if key not in RESUMABLE and getattr(started, key) != getattr(now, key)]


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
