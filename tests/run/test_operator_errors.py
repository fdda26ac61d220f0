"""A careless operator's mistakes through the real command: `fedlearn run`, `server` and `client` each answer with
exit 2 and one `fedlearn: error:` line, before training, listening or connecting; never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlearn.cli import main

# `client` needs its server flag; every mistake below is refused before the client would try to reach it
PREFIX = {"run": ["run", "--quiet"], "server": ["server", "--address", "127.0.0.1:0"],
          "client": ["client", "--server", "127.0.0.1:9", "--partition-index", "0"]}


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedlearn: error: "), err
    assert all(n in err[0] for n in needles), err[0]
    return err[0]


@pytest.mark.parametrize("command", ["run", "server", "client"])
@pytest.mark.parametrize(("flags", "needles"), [
    (["--lr", "nan"], ["--lr must be a finite number; got nan"]),
    (["--momentum", "inf"], ["--momentum must be a finite number"]),
    (["--weight-decay=-inf"], ["--weight-decay must be a finite number"]),
    (["--mu", "nan"], ["--mu must be a finite number"]),
    (["--clip-norm", "nan"], ["--clip-norm must be a finite number"]),
    (["--noise-multiplier", "inf"], ["--noise-multiplier must be a finite number"]),
    (["--alpha", "nan"], ["--alpha must be a finite number"]),
    (["--fraction", "nan"], ["--fraction must be a finite number"]),
    (["--server-lr", "nan"], ["--server-lr must be a finite number"]),
    (["--seed", "-1"], ["--seed must be an integer from 0 to 2**63 - 1; got -1"]),
    (["--seed", str(10**23)], ["--seed must be a 64-bit integer"]),
    (["--threads", "100000"], ["--threads must be an integer from 1 to", "got 100000"]),
])
def test_bad_numbers_are_one_line_in_every_command(command: str, flags: list[str], needles: list[str], capsys,
                                                   tmp_path: Path) -> None:
    out = ["--output", str(tmp_path / "run")] if command != "client" else []
    assert main([*PREFIX[command], *out, *flags]) == 2
    _one_error_line(capsys, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["-1", "0", "nan"])
def test_a_client_refuses_a_backoff_that_would_spin(value: str, capsys) -> None:
    assert main([*PREFIX["client"], "--max-backoff", value]) == 2
    _one_error_line(capsys, "--max-backoff must be a number of seconds > 0")


def test_an_infinite_round_timeout_is_refused_by_the_server(capsys, tmp_path: Path) -> None:
    assert main([*PREFIX["server"], "--output", str(tmp_path / "run"), "--round-timeout", "inf"]) == 2
    _one_error_line(capsys, "--round-timeout must be a finite number; got inf")


@pytest.mark.parametrize("command", ["run", "server", "client"])
@pytest.mark.parametrize(("content", "needle"), [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not UTF-8 text"),
    (b"- rounds\n- 2\n", "expected a mapping of keys to values, got list"),
    (b"round_timeout: .inf\n", "--round-timeout must be a finite number; got inf"),
    (b"lr: .nan\n", "--lr must be a finite number; got nan"),
    (b"seed: -3\n", "--seed must be an integer from 0"),
])
def test_bad_config_files_are_one_line_in_every_command(command: str, content: bytes, needle: str, capsys,
                                                        tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_bytes(content)
    assert main([*PREFIX[command], "--config", str(config)]) == 2
    _one_error_line(capsys, needle)


def test_an_output_that_is_a_file_is_refused_before_anything_is_built(capsys, tmp_path: Path) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    assert main(["run", "--quiet", "--rounds", "1", "--output", str(existing)]) == 2
    _one_error_line(capsys, f"--output {existing} is a file")
    assert main(["run", "--quiet", "--rounds", "1", "--output", str(existing / "run")]) == 2
    _one_error_line(capsys, f"{existing} is a file, not a folder")
    assert existing.read_text() == "keep me"


def test_an_output_that_cannot_be_made_is_one_line(capsys) -> None:
    if not Path("/sys").is_dir():
        pytest.skip("needs Linux's /sys, where nobody (root included) can make a folder")
    assert main(["run", "--quiet", "--rounds", "1", "--output", "/sys/fedlearn-run"]) == 2
    _one_error_line(capsys, "--output /sys/fedlearn-run: cannot write there")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_output_folder_is_one_line(capsys, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert main(["run", "--quiet", "--rounds", "1", "--output", str(locked / "run")]) == 2
        _one_error_line(capsys, f"{locked} is not writable")
    finally:
        locked.chmod(0o700)


def test_an_output_name_too_long_is_one_line(capsys, tmp_path: Path) -> None:
    assert main(["run", "--quiet", "--rounds", "1", "--output", str(tmp_path / ("x" * 300))]) == 2
    _one_error_line(capsys, "--output", "give another folder")


def test_a_data_dir_that_is_a_file_says_to_pass_a_folder(capsys, tmp_path: Path) -> None:
    archive = tmp_path / "mnist.npz"
    archive.write_bytes(b"not a folder")
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--dataset", "mnist", "--data-dir", str(archive), "--no-download", "--output",
                 str(out)]) == 2
    line = _one_error_line(capsys, f"--data-dir {archive} is a file; pass the folder that holds the mnist files")
    assert "files not found in" not in line  # the old message called the file a folder
    assert not out.exists()  # the run folder this made is removed again: nothing was written into it


def test_a_failed_default_run_leaves_no_empty_run_folder(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--quiet", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-download"]) == 2
    _one_error_line(capsys, "mnist: files not found")
    assert list((tmp_path / "runs").iterdir()) == []


def test_the_real_process_prints_one_line_for_a_binary_config(tmp_path: Path) -> None:
    config = tmp_path / "model.yaml"
    config.write_bytes(os.urandom(64) + b"\xff")
    proc = subprocess.run([sys.executable, "-m", "fedlearn.cli", "server", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"fedlearn: error: --config {config}: not UTF-8 text")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
