"""The default influence bound (``--update-bound``): what it costs honest runs and what it stops.

For each workload on the built-in digits, one run with the default bound and one without: how many honest
updates the bound scaled down or refused, and the final accuracy. Then one client in ten answers every round
with a finite vector of 1e38 (the issue's attack) or 1e15 everywhere (still finite as a float32 norm): the final
accuracy with the default bound, without it, and with a scale-only variant (every over-limit update scaled to
the limit, none refused) at factors 2 and 3, which is why the default refuses far outliers.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from machine import machine_info, write_results

import fedlearn.server.influence as influence
from fedlearn.protocol.messages import TrainResult
from fedlearn.run.config import RunConfig
from fedlearn.run.experiment import build_experiment

RESULTS = Path(__file__).resolve().parent / "results"
HONEST = {
    "default (Dirichlet 0.5, 10 clients)": {},
    "W1 (100 clients, 10 a round)": dict(clients=100, fraction=0.1, local_epochs=1, lr=0.05, rounds=30),
    "Dirichlet 0.1": dict(alpha=0.1),
    "quantity skew": dict(partition="quantity"),
    "lr 0.5": dict(lr=0.5),
    "scaffold": dict(algorithm="scaffold"),
    "fedprox": dict(algorithm="fedprox"),
    "fedadam": dict(algorithm="fedadam"),
}


class Attacker:
    """The simulation's runtime, with client-0 answering every train task with ``value`` everywhere."""

    def __init__(self, inner, value: float) -> None:
        self.inner = inner
        self.value = value

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def deliver(self, tasks):
        for answer in self.inner.deliver(tasks):
            if isinstance(answer, TrainResult) and answer.client_id == "client-0":
                answer = replace(answer, arrays={"update": torch.full_like(answer.arrays["update"], self.value)})
            yield answer


def run(config: RunConfig, attack: float | None = None) -> dict:
    experiment = build_experiment(config)
    if attack is not None:
        experiment.loop.runtime = Attacker(experiment.loop.runtime, attack)
    history = experiment.loop.run(config.rounds)
    return {"accuracy": history[-1]["test_accuracy"],
            "scaled": sum(r.get("updates_scaled", 0) for r in history),
            "refused": sum(r.get("updates_refused", 0) for r in history),
            "updates": sum(r["clients_sampled"] for r in history)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two workloads, 5 rounds (smoke run)")
    parser.add_argument("--attack-only", action="store_true", help="skip the honest workloads")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # every refused update logs a line
    torch.set_num_threads(1)
    info = machine_info() | {"loadavg_start": list(os.getloadavg())}
    c0, t0 = time.process_time(), time.perf_counter()
    workloads = {} if args.attack_only else dict(list(HONEST.items())[:2]) if args.quick else HONEST
    extra = {"rounds": 5} if args.quick else {}
    honest = {}
    for name, changes in workloads.items():
        base = RunConfig(threads=1, **{**changes, **extra})
        honest[name] = {"bounded": run(base), "unbounded": run(base.updated({"update_bound": 0.0}))}
        b, u = honest[name]["bounded"], honest[name]["unbounded"]
        print(f"{name:38s} scaled {b['scaled']:3d} refused {b['refused']:3d} of {b['updates']:4d}; accuracy "
              f"{b['accuracy']:.4f} bounded, {u['accuracy']:.4f} without", flush=True)
    attack_config = RunConfig(rounds=5 if args.quick else 12, clients=10, partition="iid", seed=3, threads=1)
    attack = {"no attacker": run(attack_config)["accuracy"]}
    for value in (1e38, 1e15):
        attack[f"{value:g}, default bound"] = run(attack_config, value)["accuracy"]
        attack[f"{value:g}, no bound"] = run(attack_config.updated({"update_bound": 0.0}), value)["accuracy"]
    refuse_beyond = influence.REFUSE_BEYOND
    try:
        influence.REFUSE_BEYOND = float("inf")  # the scale-only variant: nothing is refused, all is scaled
        for factor in (2.0, 3.0):
            attack[f"1e15, scale only, factor {factor:g}"] = run(
                attack_config.updated({"update_bound": factor}), 1e15)["accuracy"]
    finally:
        influence.REFUSE_BEYOND = refuse_beyond
    for name, accuracy in attack.items():
        print(f"attacker {name:28s} final accuracy {accuracy:.4f}")
    info["loadavg_end"] = list(os.getloadavg())
    seconds = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    print(f"{seconds['wall']:.0f} s wall, {seconds['cpu']:.0f} s CPU; load {info['loadavg_start'][0]:.2f} -> "
          f"{info['loadavg_end'][0]:.2f}")
    output = args.output or (None if args.quick else RESULTS / "influence_bound.json")
    if output is not None:
        write_results(output, {"benchmark": "influence_bound", "machine": info, "honest": honest, "attack": attack,
                               "seconds": seconds, "argv": sys.argv[1:]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
