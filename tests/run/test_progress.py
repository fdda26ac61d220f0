"""`fedlearn run`'s progress: one line per round into a file or pipe (a live bar shows nothing there until the
end), the rich bar on a terminal, and nothing with --quiet."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from fedlearn.cli import main
from fedlearn.run.config import RunConfig
from fedlearn.run.progress import RunProgress

ROW = {"round": 3, "test_accuracy": 0.91234, "test_loss": 0.25, "clients_sampled": 10, "clients_succeeded": 9,
       "seconds": 1.234}


def test_each_round_is_one_line_written_at_once_when_not_on_a_terminal() -> None:
    out = io.StringIO()
    progress = RunProgress(console=Console(file=out, force_terminal=False))
    with progress.running(RunConfig(rounds=20), done=2):
        progress.update(ROW)
        assert out.getvalue() == "round 3/20: accuracy 0.9123, loss 0.2500, 9/10 clients, 1.2 s\n"  # not at the end
        progress.update({**ROW, "round": 4})
    assert out.getvalue().splitlines()[1].startswith("round 4/20: accuracy 0.9123")


def test_the_line_reports_the_tasks_metric() -> None:
    out = io.StringIO()
    progress = RunProgress(console=Console(file=out, force_terminal=False))
    with progress.running(RunConfig(rounds=5), done=0, metric="mse"):
        progress.update({"round": 1, "test_mse": 0.5, "test_loss": 0.5, "seconds": 0.1})
    assert out.getvalue() == "round 1/5: mse 0.5000, loss 0.5000, 0.1 s\n"


def test_a_terminal_keeps_the_live_bar_and_no_round_lines() -> None:
    out = io.StringIO()
    progress = RunProgress(console=Console(file=out, force_terminal=True, width=100))
    with progress.running(RunConfig(rounds=20), done=2):
        progress.update(ROW)
    assert "round 3/20:" not in out.getvalue() and "3/20" in out.getvalue()  # the bar's own M/N column


def test_fedlearn_run_into_a_pipe_logs_every_round_and_quiet_logs_none(tmp_path: Path, capsys) -> None:
    args = ["run", "--rounds", "2", "--clients", "2", "--local-epochs", "1", "--model", "mcmahan-2nn"]
    assert main([*args, "--output", str(tmp_path / "loud")]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("round ")]
    assert [line.split(":")[0] for line in lines] == ["round 1/2", "round 2/2"]
    assert all("accuracy 0." in line and "2/2 clients" in line and line.endswith(" s") for line in lines)
    assert main([*args, "--quiet", "--output", str(tmp_path / "quiet")]) == 0
    captured = capsys.readouterr()
    assert "round " not in captured.err and not captured.out.strip()
