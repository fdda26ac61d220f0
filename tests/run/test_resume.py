"""Checkpoint and resume through `fedlearn run`: same seed, same metrics; a killed run loses one round at most."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from fedlearn.cli import main

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
