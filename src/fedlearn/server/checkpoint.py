"""Atomic server checkpoints: a crash leaves either the previous round's file or the new one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedlearn.errors import CheckpointError

CHECKPOINT_FORMAT = 2  # 2: named server arrays, model version, client-state index, composed strategy state


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to a temporary file in the same folder, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only`` loading, so a tampered file cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; resume a run directory that finished at least one round")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for damaged files
        raise CheckpointError(f"checkpoint {path} is damaged ({type(exc).__name__}); start a new run") from None
    if not isinstance(state, dict) or not isinstance(state.get("format"), int):
        found = type(state).__name__
        raise CheckpointError(f"{path} is not a FedLearn checkpoint ({found}); resume a run directory")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is checkpoint format {state['format']}, but this fedlearn reads format "
                              f"{CHECKPOINT_FORMAT}; resume it with the fedlearn release that wrote it")
    return state
