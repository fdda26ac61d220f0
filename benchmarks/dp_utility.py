"""Accuracy against privacy: DP-FedAvg on MNIST at epsilon in {1, 3, 8, inf} (issue 4's benchmark).

Workload: MNIST split into 1,000 clients (IID and Dirichlet 0.5), Poisson sampling of 100
clients per round (q = 0.1), McMahan et al.'s CNN, 1 local epoch, batch 10, delta = 1e-5. For a
finite epsilon the noise multiplier is calibrated to reach it after ``--rounds`` rounds; inf is
the same run without DP (FedAvg, 100 clients sampled per round). Goal: at epsilon = 8 within 3
points of the non-private run. Writes benchmarks/results/dp_utility.json and dp_utility.png.

    python benchmarks/dp_utility.py --rounds 200          # the full run (hours on 2 CPU cores)
    python benchmarks/dp_utility.py --quick               # smoke run: 2 rounds, IID, epsilon 8 and inf
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from machine import machine_info, write_results

from fedlearn.run.config import RunConfig
from fedlearn.run.experiment import build_experiment, resolve_privacy

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


def config_for(epsilon: float, partition: str, rounds: int, data_dir: str, device: str) -> RunConfig:
    base = RunConfig(dataset="mnist", data_dir=data_dir, model="mcmahan-cnn", clients=1000, fraction=0.1,
                     partition=partition, alpha=0.5, local_epochs=1, batch_size=10, lr=0.1, rounds=rounds,
                     client_test_fraction=0.0, download=False, device=device, threads=1, seed=0)
    if math.isinf(epsilon):
        return base.validate()
    return resolve_privacy(base.updated({"dp": "central", "clip_norm": 1.0, "delta": 1e-5,
                                         "target_epsilon": epsilon}).validate())


def run_one(config: RunConfig) -> dict:
    torch.set_num_threads(config.threads)
    experiment = build_experiment(config)
    start = time.perf_counter()
    history = experiment.loop.run(config.rounds)
    return {"partition": config.partition, "dp": config.dp,
            "noise_multiplier": config.noise_multiplier if config.dp != "none" else 0.0,
            "target_epsilon": config.target_epsilon, "epsilon": history[-1].get("epsilon", math.inf),
            "final_accuracy": history[-1]["test_accuracy"], "accuracy_per_round": [r["test_accuracy"] for r in history],
            "rounds": len(history), "seconds": time.perf_counter() - start}


def merged_with_earlier(results: list[dict], path: Path) -> list[dict]:
    """Keep earlier runs of other (partition, epsilon, rounds) cells, so the grid can be filled in several sittings."""
    if not path.exists():
        return results
    fresh = {(r["partition"], r["target_epsilon"], r["rounds"]) for r in results}
    earlier = json.loads(path.read_text()).get("results", [])
    return [r for r in earlier if (r["partition"], r["target_epsilon"], r["rounds"]) not in fresh] + results


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for partition, rounds in sorted({(r["partition"], r["rounds"]) for r in results}):
        rows = sorted((r for r in results if (r["partition"], r["rounds"]) == (partition, rounds)),
                      key=lambda r: r["target_epsilon"] or 1e9)
        labels = [("inf" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}") for r in rows]
        ax.plot(labels, [r["final_accuracy"] for r in rows], marker="o", label=f"{partition}, {rounds} rounds")
    ax.set(xlabel="epsilon (delta = 1e-5)", ylabel="test accuracy", title="DP-FedAvg on MNIST, 1,000 clients")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's per-order convergence notes
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1, 3, 8, math.inf])
    parser.add_argument("--partitions", nargs="+", default=["iid", "dirichlet"])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="2 rounds, IID, epsilon 8 and inf; writes nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.epsilons, args.partitions = 2, [8, math.inf], ["iid"]
    results = []
    for partition in args.partitions:
        for epsilon in args.epsilons:
            config = config_for(epsilon, partition, args.rounds, args.data_dir, args.device)
            result = run_one(config)
            results.append(result)
            print(f"{partition:9s} target epsilon {epsilon:>5g}: z {result['noise_multiplier']:.3f}, "
                  f"epsilon {result['epsilon']:.3f}, accuracy {result['final_accuracy']:.4f}, "
                  f"{result['seconds']:.0f} s", flush=True)
    for partition in args.partitions:
        rows = {r["target_epsilon"]: r for r in results if r["partition"] == partition}
        if None in rows and 8.0 in rows:
            gap = rows[None]["final_accuracy"] - rows[8.0]["final_accuracy"]
            print(f"{partition}: non-private minus epsilon=8 accuracy = {100 * gap:.1f} points (goal <= 3)")
    if not args.quick:
        results = merged_with_earlier(results, RESULTS / "dp_utility.json")
        doc = {"benchmark": "dp_utility", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": machine_info(), "argv": sys.argv[1:], "results": results}
        write_results(RESULTS / "dp_utility.json", doc)
        plot(results, RESULTS / "dp_utility.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
