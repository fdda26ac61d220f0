"""Atomic checkpoints: exact round trip, no temporary files left, clear errors for missing or damaged files."""

from __future__ import annotations

import pytest
import torch

from fedlearn.errors import CheckpointError
from fedlearn.server.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint


def state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "round": 3,
        "weights": torch.randn(1000, generator=g),
        "history": [{"round": 1, "train_loss": 0.5, "failed_clients": ["a"], "aggregated": True, "x": None}],
        "spec": {"names": ["w"], "shapes": [[1000]], "dtypes": ["float32"]},
        "seed": 2**62,
    }


def test_round_trip(tmp_path) -> None:
    path = tmp_path / "run" / "checkpoint.pt"  # parent folder is created
    original = state()
    save_checkpoint(path, original)
    back = load_checkpoint(path)
    assert back["format"] == CHECKPOINT_FORMAT
    assert torch.equal(back["weights"], original["weights"]) and back["weights"].dtype == torch.float32
    for key in ("round", "history", "spec", "seed"):
        assert back[key] == original[key], key
    assert "format" not in original  # the caller's dict is not modified
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]


def test_overwrite_leaves_no_temporary_files(tmp_path) -> None:
    path = tmp_path / "checkpoint.pt"
    for rnd in range(1, 5):
        s = state()
        s["round"] = rnd
        save_checkpoint(path, s)
    assert load_checkpoint(path)["round"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert not list(tmp_path.glob("*.tmp"))


def test_failed_save_keeps_the_previous_checkpoint_and_no_tmp(tmp_path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state())
    before = path.read_bytes()
    bad = state()
    bad["unpicklable"] = lambda: None
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises, the old file must survive
        save_checkpoint(path, bad)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]
    assert load_checkpoint(path)["round"] == 3


def test_missing_checkpoint_raises_checkpoint_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path)  # a folder is not a checkpoint


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "flip"])
def test_damaged_checkpoint_raises_checkpoint_error(tmp_path, damage: str) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state())
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"this is not a checkpoint" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(data[:20] + bytes(b ^ 0xFF for b in data[20:200]) + data[200:])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "checkpoint.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": CHECKPOINT_FORMAT, "evil": Evil()}, f, protocol=2)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    torch.save({"format": CHECKPOINT_FORMAT, "evil": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert "owned" not in capsys.readouterr().out


@pytest.mark.parametrize("payload", [{"round": 1}, {"format": 99, "round": 1}, {"format": "1"}])
def test_wrong_format_raises_checkpoint_error(tmp_path, payload: dict) -> None:
    path = tmp_path / "checkpoint.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(path)


@pytest.mark.parametrize("payload", [torch.zeros(3), [1, 2, 3]], ids=["tensor", "list"])
def test_file_holding_something_else_raises_checkpoint_error(tmp_path, payload) -> None:
    # e.g. --resume pointed at a saved weights tensor instead of a run's checkpoint
    path = tmp_path / "checkpoint.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
