"""Progress of `fedlearn run`: a live bar on a terminal (rich), one line per round into a file or pipe, and the
final summary table."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedlearn.metrics import BINARY_KEYS
from fedlearn.run.config import RunConfig


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class RunProgress:
    """Shows round, metric and loss as rounds complete; prints a summary table at the end.

    On a terminal that is a live bar; otherwise (output to a file or pipe, where a bar shows nothing until the
    end) one plain line per round, flushed at once. Disabled (``--quiet``), nothing.
    """

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None
        self._lines = False
        self._total = 0
        self._metric = "accuracy"

    @contextmanager
    def running(self, config: RunConfig, done: int, metric: str = "accuracy") -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if not self.console.is_terminal:
            self._lines, self._total, self._metric = True, config.rounds, metric
            try:
                yield
            finally:
                self._lines = False
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("acc {task.fields[acc]}  loss {task.fields[loss]}"), TimeElapsedColumn(),
            console=self.console,
        )
        title = f"{config.algorithm} {config.dataset} {config.model}"
        self._task = self._progress.add_task(title, total=config.rounds, completed=done, acc="-", loss="-")
        with self._progress:
            yield
        self._progress = None

    def update(self, row: dict[str, Any]) -> None:
        if self._lines:
            self._write_line(row)
        elif self._progress is not None:
            self._progress.update(
                self._task, completed=row["round"], acc=_fmt(row.get("test_accuracy")), loss=_fmt(row.get("test_loss"))
            )

    def _write_line(self, row: dict[str, Any]) -> None:
        """'round 3/20: accuracy 0.9123, loss 0.2345, 10/10 clients, 1.2 s' (the metric is the task's)."""
        line = (f"round {row['round']}/{self._total}: {self._metric} {_fmt(row.get(f'test_{self._metric}'))}, "
                f"loss {_fmt(row.get('test_loss'))}")
        if "clients_succeeded" in row and "clients_sampled" in row:
            line += f", {row['clients_succeeded']}/{row['clients_sampled']} clients"
        if row.get("seconds") is not None:
            line += f", {row['seconds']:.1f} s"
        file = self.console.file
        file.write(line + "\n")
        file.flush()

    def summary(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        table = Table(title="FedLearn run summary", show_header=False)
        table.add_column("key", style="bold")
        table.add_column("value")
        for key in ("dataset", "model", "algorithm", "clients", "partition", "rounds"):
            table.add_row(key, str(summary[key]))
        metric = summary.get("final_metric", "accuracy")
        table.add_row(f"final {metric}", _fmt(summary.get(f"final_{metric}")))
        table.add_row(f"best {metric}", _fmt(summary.get(f"best_{metric}")))
        table.add_row("final loss", _fmt(summary["final_loss"]))
        for key in BINARY_KEYS:  # binary tasks only
            if f"final_{key}" in summary:
                table.add_row(f"final {key.replace('_', ' ')}", _fmt(summary[f"final_{key}"]))
        table.add_row("wall seconds", f"{summary['wall_seconds']:.1f}")
        if "bytes_up" in summary:  # not published under central DP (it counts who took part)
            table.add_row("MB up / down", f"{summary['bytes_up'] / 1e6:.1f} / {summary['bytes_down'] / 1e6:.1f}")
        table.add_row("run directory", summary["run_dir"])
        Console().print(table)
