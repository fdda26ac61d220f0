"""Live progress bar and final summary table for `fedlearn run` (rich)."""

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
    """Shows round, accuracy and loss as rounds complete; prints a summary table at the end."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task = None

    @contextmanager
    def running(self, config: RunConfig, done: int) -> Iterator[None]:
        if not self.enabled:
            yield
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
        if self._progress is not None:
            self._progress.update(
                self._task, completed=row["round"], acc=_fmt(row.get("test_accuracy")), loss=_fmt(row.get("test_loss"))
            )

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
        table.add_row("MB up / down", f"{summary['bytes_up'] / 1e6:.1f} / {summary['bytes_down'] / 1e6:.1f}")
        table.add_row("run directory", summary["run_dir"])
        Console().print(table)
