"""Runs an experiment into a run directory, new or resumed, reporting each round to callbacks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from fedlearn.data import load_dataset
from fedlearn.errors import ConfigError
from fedlearn.metrics import BINARY_KEYS
from fedlearn.run.config import RunConfig
from fedlearn.run.experiment import Experiment, RuntimeFactory, build_experiment, resolve_clients, resolve_privacy
from fedlearn.run.publication import public_summary, withheld
from fedlearn.run.rundir import RunDir, check_output, default_run_dir
from fedlearn.server.loop import RoundCallback


def prepare_run(
    config: RunConfig | None = None,
    *,
    resume: str | os.PathLike | None = None,
    rounds: int | None = None,
    callbacks: Iterable[RoundCallback] = (),
    runtime: RuntimeFactory | None = None,
    before_round: Callable[[int], None] | None = None,
) -> tuple[Experiment, RunDir]:
    """Build a new run in ``config.output`` (or a new runs/<timestamp>), or reload ``resume`` at its last round.

    A resumed run takes config.yaml only if it still holds the settings the run started with (``rounds`` aside);
    a new run's folder is made (and checked writable) after the config is resolved and before anything is built,
    and is removed again if building fails before a file was written.
    """
    if resume is not None:
        run_dir = RunDir(resume)
        config = run_dir.config_for_resume(rounds).validate()
        created = False
    else:
        if config is None:
            raise ConfigError("give a config or --resume DIR")
        config = resolve_new_run(config)
        if config.output:
            run_dir = RunDir(config.output)
            created = run_dir.create()
        else:
            run_dir, created = RunDir(default_run_dir()), True
        config = config.updated({"output": str(run_dir.path)}).validate()
    run_dir.withheld = withheld(config)
    callbacks = [run_dir.append_metrics, *callbacks]
    try:
        experiment = build_experiment(config, runtime=runtime, checkpoint_path=run_dir.checkpoint,
                                      callbacks=callbacks, before_round=before_round)
        if resume is not None:
            experiment.loop.resume(run_dir.checkpoint)
            run_dir.rewrite_metrics(experiment.loop.history)
        else:
            run_dir.start(config, experiment.partition)
    except BaseException:
        if created:
            run_dir.discard_if_unused()
        raise
    return experiment, run_dir


def check_run(config: RunConfig | None = None, *, resume: str | os.PathLike | None = None,
              rounds: int | None = None) -> RunConfig:
    """The config ``prepare_run`` would run, with every check that needs no data or model (``--dry-run``):
    validation, DP's calibration, the output folder, a resumed run's unchanged settings. Writes nothing."""
    if resume is not None:
        return RunDir(resume).config_for_resume(rounds, record=False).validate()
    if config is None:
        raise ConfigError("give a config or --resume DIR")
    config = resolve_new_run(config)
    if config.output:
        check_output(config.output)
    return config


def resolve_new_run(config: RunConfig) -> RunConfig:
    """A new run's config as its config.yaml records it: validated, with the values DP derives and the client test
    share filled in (so a resumed run, or a later release with other defaults, reads back exactly what ran).
    A natural partition without ``--clients`` loads the dataset here to count its groups, and DP-SGD without
    ``--delta`` to count the training examples it protects."""
    config = config.validate()
    needs_data = (config.clients is None and config.partition == "natural") or (
        config.dp == "dpsgd" and config.delta is None)
    bundle = load_dataset(config.dataset, config.data_dir, download=config.download) if needs_data else None
    config = resolve_clients(config, bundle).validate()
    config = resolve_privacy(config, len(bundle.train) if bundle is not None else None)
    return config.updated({"client_test_fraction": config.effective_client_test_fraction}).validate()


def finish_run(experiment: Experiment, run_dir: RunDir, wall_seconds: float) -> dict[str, Any]:
    """Write the summary, final model and curves; return the summary."""
    history = experiment.loop.history
    last = history[-1] if history else {}
    config = experiment.config
    metric = experiment.final_metric
    from fedlearn.tasks import get_task

    values = [r[f"test_{metric}"] for r in history if r.get(f"test_{metric}") is not None]
    best = (max if get_task(experiment.task).higher_is_better else min)(values) if values else None
    summary = {
        "final_metric": metric,
        f"final_{metric}": last.get(f"test_{metric}"),
        f"best_{metric}": best,
        "final_loss": last.get("test_loss"),
        "rounds": experiment.loop.round,
        "algorithm": config.algorithm,
        "dataset": config.dataset,
        "model": config.model,
        "clients": config.clients,
        "partition": config.partition,
        "seed": config.seed,
        "wall_seconds": wall_seconds,
        "round_seconds": sum(r["seconds"] for r in history),
        "bytes_up": sum(r["bytes_up"] for r in history),
        "bytes_down": sum(r["bytes_down"] for r in history),
        "run_dir": str(run_dir.path),
    }
    # Binary tasks (two classes): the last round's ROC AUC, sensitivity, specificity, balanced accuracy.
    summary.update({f"final_{k}": last[f"test_{k}"] for k in BINARY_KEYS if f"test_{k}" in last})
    privacy = getattr(experiment.loop.strategy, "privacy_summary", None)
    if privacy is not None:
        summary.update(privacy())
    summary = public_summary(summary, config)
    if config.seeded_privacy:
        summary["private"] = False
        summary["private_why"] = ("seeded_privacy: noise, masks and rounding came from the run seed (a simulation "
                                  "switch for reproducible tests); nothing here is private")
    run_dir.finish(summary, experiment.load_global(), history)
    return summary


def run(config: RunConfig | None = None, *, resume: str | os.PathLike | None = None, rounds: int | None = None,
        callbacks: Iterable[RoundCallback] = ()) -> dict[str, Any]:
    """Train to ``config.rounds`` rounds in total and return the summary (the Python face of `fedlearn run`)."""
    start = time.perf_counter()
    experiment, run_dir = prepare_run(config, resume=resume, rounds=rounds, callbacks=callbacks)
    experiment.loop.run(experiment.config.rounds)
    return finish_run(experiment, run_dir, time.perf_counter() - start)
