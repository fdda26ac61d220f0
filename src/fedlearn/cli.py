"""The `fedlearn` command: `fedlearn run` trains a federated model from flags and/or a YAML config."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from fedlearn import __version__
from fedlearn.errors import FedLearnError
from fedlearn.run.config import RunConfig, load_config_file

# flag -> (type, help); every flag is also a YAML key (dashes become underscores)
RUN_FLAGS: dict[str, tuple[type, str]] = {
    "--dataset": (str, "digits (built in), mnist, fashion-mnist, cifar10, femnist, pneumoniamnist, breastmnist, ..."),
    "--data-dir": (str, "folder holding the dataset's files"),
    "--model": (str, "seed-cnn, mcmahan-2nn, mcmahan-cnn, lenet5, resnet18-gn"),
    "--algorithm": (str, "fedavg, fedsgd or fedprox"),
    "--mu": (float, "FedProx proximal coefficient"),
    "--clients": (int, "number of clients"),
    "--fraction": (float, "fraction of clients sampled per round, in (0, 1]"),
    "--min-clients": (int, "fewest successful clients for a round to update the model"),
    "--rounds": (int, "federated rounds (with --resume: total rounds to reach)"),
    "--local-epochs": (int, "local epochs per round"),
    "--batch-size": (int, "local batch size"),
    "--lr": (float, "learning rate (client SGD; the server step for fedsgd)"),
    "--momentum": (float, "client SGD momentum"),
    "--weight-decay": (float, "client SGD weight decay"),
    "--partition": (str, "iid, dirichlet, shards, quantity or natural"),
    "--alpha": (float, "Dirichlet concentration (smaller = more label skew)"),
    "--shards-per-client": (int, "shards per client for --partition shards"),
    "--client-test-fraction": (float, "share of each client's data held out as its local test set"),
    "--evaluation": (str, "centralized, federated or both"),
    "--seed": (int, "seed for every random choice"),
    "--threads": (int, "torch intra-op threads (1 is fastest for small models on 2 cores)"),
    "--device": (str, "cpu, cuda, cuda:N or auto"),
    "--output": (str, "run directory (default runs/<timestamp>)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlearn", description="Federated learning of vision models.")
    parser.add_argument("--version", action="version", version=f"fedlearn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a federated model in simulation")
    run.add_argument("--config", help="YAML file of config keys; flags override it")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last completed round")
    run.add_argument("--no-download", action="store_true", help="never try to download missing datasets")
    run.add_argument("--quiet", action="store_true", help="no progress bar or table")
    for flag, (kind, text) in RUN_FLAGS.items():
        run.add_argument(flag, type=kind, default=None, help=text)
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[RunConfig | None, dict[str, Any]]:
    """The run config (None when resuming) and the flags given on the command line."""
    given = {f[2:].replace("-", "_"): getattr(args, f[2:].replace("-", "_")) for f in RUN_FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    if args.no_download:
        given["download"] = False
    if args.resume:
        extra = sorted(set(given) - {"rounds"})
        if extra or args.config:
            bad = "--config" if args.config else "--" + extra[0].replace("_", "-")
            raise FedLearnError(f"{bad} cannot change a resumed run; only --rounds may be given with --resume")
        return None, given
    config = RunConfig()
    if args.config:
        config = config.updated(load_config_file(args.config), source=args.config)
    return config.updated(given).validate(), given


def cmd_run(args: argparse.Namespace) -> int:
    from fedlearn.run.progress import RunProgress
    from fedlearn.run.runner import finish_run, prepare_run

    config, given = config_from_args(args)
    start = time.perf_counter()
    progress = RunProgress(enabled=not args.quiet)
    experiment, run_dir = prepare_run(
        config, resume=args.resume, rounds=given.get("rounds"), callbacks=[progress.update]
    )
    with progress.running(experiment.config, experiment.loop.round):
        experiment.loop.run(experiment.config.rounds)
    summary = finish_run(experiment, run_dir, time.perf_counter() - start)
    progress.summary(summary)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_run(args)
    except FedLearnError as exc:
        print(f"fedlearn: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedlearn: interrupted; completed rounds are saved, continue with --resume DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
