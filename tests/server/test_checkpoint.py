"""Atomic checkpoints: exact round trip, the last three kept, the newest intact one resumed, plain values only,
no temporary files left, clear errors for missing or damaged files and for a full disk."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlearn.errors import CheckpointError
from fedlearn.server import checkpoint
from fedlearn.server.checkpoint import (
    CHECKPOINT_FORMAT,
    KEEP,
    checkpoint_files,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
    to_plain,
)


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


def _save_rounds(path: Path, rounds: range) -> None:
    for rnd in rounds:
        s = state()
        s["round"] = rnd
        save_checkpoint(path, s)


def test_the_last_three_are_kept_and_no_temporary_files(tmp_path) -> None:
    path = tmp_path / "checkpoint.pt"
    assert KEEP == 3  # the number
    assert [p.name for p in checkpoint_files(path)] == ["checkpoint.pt", "checkpoint.1.pt", "checkpoint.2.pt"]
    _save_rounds(path, range(1, 6))
    assert [load_checkpoint(p)["round"] for p in checkpoint_files(path)] == [5, 4, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.1.pt", "checkpoint.2.pt", "checkpoint.pt"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_value_safe_loading_would_refuse_is_refused_when_written(tmp_path) -> None:
    path = tmp_path / "checkpoint.pt"
    _save_rounds(path, range(1, 3))
    before = _snapshot(tmp_path)
    bad = state()
    bad["history"][0]["note"] = object()
    with pytest.raises(CheckpointError, match=r"cannot checkpoint checkpoint\['history'\]\[0\]\['note'\].*not a plain"):
        save_checkpoint(path, bad)
    bad["history"][0]["note"] = lambda: None
    with pytest.raises(CheckpointError, match="function is not a plain value"):
        save_checkpoint(path, bad)
    assert _snapshot(tmp_path) == before  # every earlier checkpoint untouched, no temporary file


def test_numpy_scalars_are_written_as_python_numbers(tmp_path) -> None:
    """Binary tasks' fed_auc was a numpy float64: the file then failed weights_only loading on --resume."""
    path = tmp_path / "checkpoint.pt"
    s = state()
    s["history"][0].update(fed_auc=np.float64(0.75), n=np.int64(3), ok=np.bool_(True), f32=np.float32(0.5))
    save_checkpoint(path, s)
    raw = torch.load(path, weights_only=True)  # plain torch safe loading, no allow-list needed
    row = raw["history"][0]
    assert (type(row["fed_auc"]), type(row["n"]), type(row["ok"]), type(row["f32"])) == (float, int, bool, float)
    assert (row["fed_auc"], row["n"], row["ok"], row["f32"]) == (0.75, 3, True, 0.5)


def test_to_plain_keeps_plain_values_and_tensors_as_they_are() -> None:
    weights = torch.arange(3.0)
    value = {"a": [1, 2.5, None, "x", True, (b"y", torch.float16)], 4: {"w": weights}}
    plain = to_plain(value)
    assert plain == {"a": [1, 2.5, None, "x", True, (b"y", torch.float16)], 4: {"w": weights}}
    assert plain[4]["w"] is weights
    with pytest.raises(CheckpointError, match="key"):
        to_plain({(1, 2): 3})


def test_a_checkpoint_an_earlier_release_wrote_with_numpy_scalars_still_resumes(tmp_path) -> None:
    """Good runs written before the fix are not thrown away: their numpy floats load (as data) and become floats."""
    path = tmp_path / "checkpoint.pt"
    s = {"format": CHECKPOINT_FORMAT, **state()}
    s["history"][0]["fed_auc"] = np.float64(0.625)
    torch.save(s, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    back = load_checkpoint(path)
    assert type(back["history"][0]["fed_auc"]) is float and back["history"][0]["fed_auc"] == 0.625


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, damage: str, caplog) -> None:
    path = tmp_path / "checkpoint.pt"
    _save_rounds(path, range(1, 4))
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 3], "empty": b"", "garbage": b"\x80not a checkpoint"}[damage])
    (tmp_path / "checkpoint.pt.abc123.tmp").write_bytes(b"half a write")  # an interrupted save
    with caplog.at_level(logging.WARNING, logger="fedlearn.server.checkpoint"):
        back, used = load_latest_checkpoint(path)
    assert back["round"] == 2 and used.name == "checkpoint.1.pt"
    assert "checkpoint.pt is damaged" in caplog.text and str(path) in caplog.text
    assert not list(tmp_path.glob("*.tmp"))


def test_when_no_kept_checkpoint_is_intact_the_error_names_each(tmp_path) -> None:
    path = tmp_path / "checkpoint.pt"
    _save_rounds(path, range(1, 4))
    for p in checkpoint_files(path):
        p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="no intact checkpoint") as error:
        load_latest_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and all(p.name in message for p in checkpoint_files(path))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_latest_checkpoint(tmp_path / "other" / "checkpoint.pt")


def test_a_full_disk_is_one_line_and_keeps_the_earlier_checkpoints(tmp_path, monkeypatch) -> None:
    """The disk fills up half way through the file: torch.save's RuntimeError is not what the user sees."""
    path = tmp_path / "checkpoint.pt"
    _save_rounds(path, range(1, 4))
    before = _snapshot(tmp_path)
    written = {"bytes": 0}
    real_write = checkpoint._RecordingFile.write

    def fill_up(self, data: bytes) -> int:
        written["bytes"] += len(data)
        if written["bytes"] > 2000:
            self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise self.error
        return real_write(self, data)

    monkeypatch.setattr(checkpoint._RecordingFile, "write", fill_up)
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(path, state())
    message = str(error.value)
    assert "\n" not in message and "ENOSPC" in message and "free disk space" in message
    assert f"--resume {tmp_path}" in message
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_an_oserror_at_fsync_is_one_line_saying_what_to_do(tmp_path, monkeypatch, code: int) -> None:
    path = tmp_path / "checkpoint.pt"
    _save_rounds(path, range(1, 3))
    before = _snapshot(tmp_path)

    def fail(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint.os, "fsync", fail)
    with pytest.raises(CheckpointError, match=errno.errorcode[code]) as error:
        save_checkpoint(path, state())
    assert "--resume" in str(error.value)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before


def _mount_tiny_tmpfs(where: Path) -> bool:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True,
                          timeout=20)
    return done.returncode == 0


def test_a_real_full_disk(tmp_path) -> None:
    """A 256 KiB tmpfs that really fills up (needs root and mount; skipped elsewhere)."""
    disk = tmp_path / "tiny"
    if not _mount_tiny_tmpfs(disk):
        pytest.skip("mounting a small tmpfs needs root on Linux; the monkeypatched tests cover the same path")
    try:
        path = disk / "checkpoint.pt"
        _save_rounds(path, range(1, 4))
        before = _snapshot(disk)
        big = {**state(), "weights": torch.zeros(200_000)}
        with pytest.raises(CheckpointError, match="ENOSPC.*free disk space"):
            save_checkpoint(path, big)
        assert _snapshot(disk) == before
        assert load_latest_checkpoint(path)[0]["round"] == 3
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=20)


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
