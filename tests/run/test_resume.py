"""Checkpoint and resume through `fedlearn run`: same seed, same metrics; a killed run loses one round at most."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from fedlearn.cli import main
from fedlearn.server.checkpoint import load_checkpoint

FAST = ["--quiet", "--clients", "4", "--local-epochs", "1", "--model", "mcmahan-2nn", "--fraction", "0.5"]


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("seconds")
    return rows


def _same_model(a: Path, b: Path) -> bool:
    sa, sb = torch.load(a / "model.pt", weights_only=True), torch.load(b / "model.pt", weights_only=True)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["run", *FAST, "--rounds", "6", "--output", str(straight)]) == 0
    assert main(["run", *FAST, "--rounds", "3", "--output", str(split)]) == 0
    assert main(["run", "--quiet", "--resume", str(split), "--rounds", "6"]) == 0
    assert _rows(split) == _rows(straight)
    assert _same_model(split, straight)
    assert json.loads((split / "summary.json").read_text())["rounds"] == 6


def test_resume_refuses_other_flags(tmp_path: Path, capsys) -> None:
    run = tmp_path / "r"
    assert main(["run", *FAST, "--rounds", "1", "--output", str(run)]) == 0
    assert main(["run", "--resume", str(run), "--lr", "0.5"]) == 2
    assert "--lr cannot change a resumed run" in capsys.readouterr().err


def test_resume_of_missing_dir_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_new_run_into_a_finished_run_dir_is_refused(tmp_path: Path, capsys) -> None:
    run = tmp_path / "r"
    assert main(["run", *FAST, "--rounds", "1", "--output", str(run)]) == 0
    before = (run / "metrics.jsonl").read_text()
    assert main(["run", *FAST, "--rounds", "1", "--output", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_text() == before  # completed work untouched


def test_killed_run_loses_only_the_round_in_flight(tmp_path: Path) -> None:
    """kill -9 a real `fedlearn run` process mid-training, resume it, compare with an unkilled run."""
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    slow = [*FAST, "--local-epochs", "3", "--fraction", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedlearn.cli", "run", *slow, "--rounds", "400", "--output", str(killed)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        metrics = killed / "metrics.jsonl"
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = len(_rows(killed))
    assert 3 <= done < 400
    total = done + 2
    assert main(["run", "--quiet", "--resume", str(killed), "--rounds", str(total)]) == 0
    assert main(["run", *slow, "--rounds", str(total), "--output", str(straight)]) == 0
    assert _rows(killed) == _rows(straight)
    assert _same_model(killed, straight)


def _without(rows: list[dict], *keys: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in keys} for row in rows]


def test_binary_task_with_federated_evaluation_resumes(tmp_path: Path, shared_dataset) -> None:
    """BreastMNIST with --evaluation both: fed_auc was a numpy float64 and the checkpoint failed safe loading."""
    args = ["run", "--quiet", "--clients", "2", "--local-epochs", "1", "--model", "mcmahan-2nn", "--batch-size", "256",
            "--dataset", "breastmnist", "--data-dir", str(shared_dataset("medmnist")), "--no-download",
            "--evaluation", "both"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*args, "--rounds", "2", "--output", str(straight)]) == 0
    assert main([*args, "--rounds", "1", "--output", str(split)]) == 0
    raw = torch.load(split / "checkpoint.pt", weights_only=True)  # plain safe loading, no allow-list
    assert type(raw["history"][0]["fed_auc"]) is float
    assert main(["run", "--quiet", "--resume", str(split), "--rounds", "2"]) == 0
    assert _rows(split) == _rows(straight)
    assert _same_model(split, straight)


def test_a_damaged_newest_checkpoint_falls_back_and_the_run_finishes_as_a_straight_one(tmp_path: Path) -> None:
    """SCAFFOLD keeps per-client controls in client_state/: the fallback must roll them back with the model."""
    args = [*FAST, "--algorithm", "scaffold", "--seeded-privacy"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["run", *args, "--rounds", "5", "--output", str(straight)]) == 0
    assert main(["run", *args, "--rounds", "3", "--output", str(split)]) == 0
    assert {p.name for p in split.glob("checkpoint*.pt")} == {"checkpoint.pt", "checkpoint.1.pt", "checkpoint.2.pt"}
    newest = split / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # cut short, as by a full disk
    (split / "checkpoint.pt.x1y2.tmp").write_bytes(b"an interrupted save")
    assert main(["run", "--quiet", "--resume", str(split), "--rounds", "5"]) == 0
    assert _rows(split) == _rows(straight)
    assert _same_model(split, straight)
    assert not list(split.glob("*.tmp"))


def test_falling_back_keeps_the_privacy_already_spent(tmp_path: Path) -> None:
    """Local DP with seeded noise: the model after the fallback equals a straight run's, but the rounds run twice
    are accounted twice (the epsilon is ahead, never behind)."""
    args = [*FAST, "--dp", "local", "--noise-multiplier", "1.0", "--clip-norm", "1.0", "--seeded-privacy"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["run", *args, "--rounds", "4", "--output", str(straight)]) == 0
    assert main(["run", *args, "--rounds", "3", "--output", str(split)]) == 0
    (split / "checkpoint.pt").write_bytes(b"")
    assert main(["run", "--quiet", "--resume", str(split), "--rounds", "4"]) == 0
    assert _same_model(split, straight)
    ran, reference = _rows(split), _rows(straight)
    assert _without(ran, "epsilon") == _without(reference, "epsilon")
    assert [r["epsilon"] for r in ran[:2]] == [r["epsilon"] for r in reference[:2]]
    assert all(a["epsilon"] > b["epsilon"] for a, b in zip(ran[2:], reference[2:], strict=True))
    summary = json.loads((split / "summary.json").read_text())
    assert summary["rounds_accounted"] == 5  # rounds 1-3, then 3 and 4 again


def test_a_full_disk_is_one_line_and_the_run_resumes_once_space_is_freed(tmp_path: Path, monkeypatch, capsys) -> None:
    from fedlearn.server import checkpoint

    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["run", *FAST, "--rounds", "4", "--output", str(straight)]) == 0
    real_write = checkpoint._RecordingFile.write
    saves = {"n": 0}

    def write(self, data: bytes) -> int:
        if saves["n"] >= 2:  # the disk is full from the third checkpoint on
            self.error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise self.error
        return real_write(self, data)

    real_save = checkpoint.save_checkpoint

    def counting_save(*args, **kwargs) -> None:
        try:
            real_save(*args, **kwargs)
        finally:
            saves["n"] += 1

    monkeypatch.setattr(checkpoint._RecordingFile, "write", write)
    monkeypatch.setattr("fedlearn.server.loop.save_checkpoint", counting_save)
    capsys.readouterr()
    assert main(["run", *FAST, "--rounds", "4", "--output", str(split)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ENOSPC" in err[0] and "free disk space" in err[0] and f"--resume {split}" in err[0]
    assert "Traceback" not in err[0]
    monkeypatch.undo()  # space is freed
    assert load_checkpoint(split / "checkpoint.pt")["round"] == 2
    assert main(["run", "--quiet", "--resume", str(split), "--rounds", "4"]) == 0
    assert _rows(split) == _rows(straight)
    assert _same_model(split, straight)


def _edit_config(run: Path, **changes) -> None:
    import yaml

    values = yaml.safe_load((run / "config.yaml").read_text())
    values.update(changes)
    (run / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))


def test_resume_refuses_edits_of_config_yaml_naming_each(tmp_path: Path, capsys) -> None:
    """`fedlearn run --resume` and `fedlearn server --resume` took silent edits of lr, clients and seed."""
    run = tmp_path / "r"
    assert main(["run", *FAST, "--rounds", "1", "--output", str(run)]) == 0
    before = (run / "metrics.jsonl").read_text()
    _edit_config(run, lr=0.5, clients=5, seed=7)
    capsys.readouterr()
    for command in (["run", "--quiet"], ["server", "--address", "127.0.0.1:0"]):
        assert main([*command, "--resume", str(run), "--rounds", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "differs from the settings this run started with" in err[-1], err
        assert all(f in err[-1] for f in ("lr 0.1 -> 0.5", "clients 4 -> 5", "seed 0 -> 7")), err[-1]
    assert (run / "metrics.jsonl").read_text() == before  # nothing ran
    _edit_config(run, lr=0.1, clients=4, seed=0, threads=2)  # restored; threads may change
    assert main(["run", "--quiet", "--resume", str(run), "--rounds", "2"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
