"""Shared test helpers: where the real offline datasets live, and one torch thread."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def shared_datasets_root() -> Path:
    """../shared/datasets beside the repository, or $FEDLEARN_SHARED_DATASETS."""
    override = os.environ.get("FEDLEARN_SHARED_DATASETS")
    return Path(override) if override else REPO.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_dataset():
    """Return the folder of one real dataset, skipping the test when ../shared is absent."""

    def find(sub: str) -> Path:
        folder = shared_datasets_root() / sub
        if not folder.is_dir():
            pytest.skip(f"real dataset folder {folder} is absent (set FEDLEARN_SHARED_DATASETS to shared/datasets)")
        return folder

    return find


@pytest.fixture(scope="session", autouse=True)
def private_fedlearn_home(tmp_path_factory):
    """Loopback servers started by tests publish their per-run client tokens here, not in the user's ~/.fedlearn
    (subprocesses inherit the variable)."""
    previous = os.environ.get("FEDLEARN_HOME")
    os.environ["FEDLEARN_HOME"] = str(tmp_path_factory.mktemp("fedlearn-home"))
    yield
    if previous is None:
        os.environ.pop("FEDLEARN_HOME", None)
    else:
        os.environ["FEDLEARN_HOME"] = previous


@pytest.fixture
def procs(tmp_path):
    """fedlearn processes started by one test, killed by pid when it ends."""
    from processes import Procs

    started = Procs(tmp_path)
    yield started
    started.stop_all()
