"""FedLearn's in-process overhead against a hand-written PyTorch FedAvg loop doing the same SGD steps.

Workload: digits, seed-cnn, 100 clients (Dirichlet alpha 0.5), 10 sampled per round, 1 local
epoch, batch 10, lr 0.05, 50 rounds, seed 0, centralized evaluation after every round.

Both sides start from the same initial weights, train the same sampled clients on the same
batches in the same order (per-(round, client) seeds from ``fedlearn.seeding.derive_seed``),
and evaluate the same way, so they must end at the same accuracy and (nearly) the same weights.
Data preparation (loading, partitioning, building per-client tensors) is not timed; the timed
part is ``experiment.loop.run(rounds)`` against the plain loop's ``for round in ...``.

Runs are interleaved (plain, fedlearn, plain, fedlearn, ...) so that background load on the
machine hits both alike; the median and the min of wall time (and CPU time) are reported.

The plain loop seeds only its shuffling generator: the model has no dropout, so it needs no
global seed, and it pays nothing FedLearn's loop must (message objects, update checks, byte
accounting, seeding torch's global generator per client for models that do use randomness).

    python benchmarks/overhead.py            # full run (7 reps, threads 1 and 2)
                                             # -> benchmarks/results/overhead.json
    python benchmarks/overhead.py --quick    # smoke run (10 rounds, 2 reps), writes nothing unless --output
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import machine_info, write_results

from fedlearn.models import build_model
from fedlearn.run.config import RunConfig
from fedlearn.run.experiment import build_experiment
from fedlearn.seeding import derive_seed
from fedlearn.strategies.base import Sampler

RESULTS = Path(__file__).resolve().parent / "results"
EVAL_BATCH = 512  # CentralEvaluator's default batch size
GOAL = 1.03  # issue 10: the per-round time at most 1.03x the plain loop


WORKLOAD = {"clients": 100, "fraction": 0.1, "partition": "dirichlet", "min_partition_size": 1}  # W1


def make_config(rounds: int, threads: int) -> RunConfig:
    return RunConfig(
        dataset="digits", model="seed-cnn", algorithm="fedavg", clients=WORKLOAD["clients"],
        partition=WORKLOAD["partition"], alpha=0.5, min_partition_size=WORKLOAD["min_partition_size"],
        fraction=WORKLOAD["fraction"], min_clients=1, rounds=rounds, local_epochs=1, batch_size=10, lr=0.05,
        momentum=0.0, weight_decay=0.0, seed=0, threads=threads, evaluation="centralized", device="cpu",
        download=False,
    )


# --------------------------------------------------------------------------------------------
# The plain PyTorch loop: what a competent user writes by hand for the same experiment.
# --------------------------------------------------------------------------------------------

class PlainSetup:
    """Everything the plain loop needs, prepared outside the timed region."""

    def __init__(self, config: RunConfig, experiment) -> None:
        self.config = config
        bundle = experiment.bundle
        self.client_ids = [cid for cid, data in experiment.clients.items() if len(data.train) > 0]  # as sampled
        # Per-client tensors gathered once from the experiment's own Subset indices.
        self.client_data = {}
        for cid, data in experiment.clients.items():
            idx = torch.as_tensor(data.train.indices, dtype=torch.long)
            self.client_data[cid] = (bundle.train.x[idx].contiguous(), bundle.train.y[idx].contiguous())
        self.test_x = bundle.test.x
        self.test_y = bundle.test.y
        self.input_shape = bundle.input_shape
        self.num_classes = bundle.num_classes


def plain_build_models(setup: PlainSetup) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Initial model exactly as build_experiment makes it, plus a second instance for evaluation."""
    cfg = setup.config
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, setup.input_shape, setup.num_classes)
    eval_model = build_model(cfg.model, setup.input_shape, setup.num_classes)
    return model, eval_model


def plain_run(setup: PlainSetup, model: torch.nn.Module, eval_model: torch.nn.Module, rounds: int):
    """Hand-written FedAvg. Returns (final global state_dict, per-round history)."""
    history, final = [], None
    for state, row in plain_rounds(setup, model, eval_model, rounds):
        history.append(row)
        final = state
    return final, history


def plain_rounds(setup: PlainSetup, model: torch.nn.Module, eval_model: torch.nn.Module, rounds: int):
    """The plain loop one round at a time: yields (global state_dict, history row) after each round."""
    cfg = setup.config
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_test = setup.test_y.shape[0]
    for rnd in range(1, rounds + 1):
        sampled = Sampler(cfg.fraction, cfg.min_clients).sample(setup.client_ids, rnd, cfg.seed)
        weighted_sum = {k: torch.zeros_like(v) for k, v in global_state.items()}
        total = 0
        train_loss_sum = 0.0
        for cid in sampled:
            x, y = setup.client_data[cid]
            n = y.shape[0]
            s = derive_seed(cfg.seed, rnd, cid)
            model.load_state_dict(global_state)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.0, weight_decay=0.0)
            g = torch.Generator().manual_seed(s)
            loss_sum = torch.zeros(())
            for _ in range(cfg.local_epochs):
                perm = torch.randperm(n, generator=g)
                for start in range(0, n, cfg.batch_size):
                    idx = perm[start:start + cfg.batch_size]
                    xb, yb = x[idx], y[idx]
                    opt.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    opt.step()
                    loss_sum += loss.detach() * yb.shape[0]
            train_loss_sum += float(loss_sum) / (n * cfg.local_epochs) * n
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    weighted_sum[k].add_(v, alpha=n)
            total += n
        global_state = {k: v / total for k, v in weighted_sum.items()}

        # Centralized evaluation of the new global model, batch 512.
        eval_model.load_state_dict(global_state)
        eval_model.eval()
        loss_t = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.long)
        with torch.no_grad():
            for start in range(0, n_test, EVAL_BATCH):
                xb = setup.test_x[start:start + EVAL_BATCH]
                yb = setup.test_y[start:start + EVAL_BATCH]
                logits = eval_model(xb)
                loss_t += F.cross_entropy(logits, yb, reduction="sum").double()
                correct += (logits.argmax(dim=1) == yb).sum()
        yield global_state, {
            "round": rnd, "train_loss": train_loss_sum / total,
            "test_loss": float(loss_t) / n_test, "test_accuracy": int(correct) / n_test,
        }


def flat_state(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1).float() for v in state.values() if v.is_floating_point()])


# --------------------------------------------------------------------------------------------
# Timed runs
# --------------------------------------------------------------------------------------------

def run_fedlearn(config: RunConfig, rounds: int):
    experiment = build_experiment(config)  # not timed: data loading, partitioning, model init
    c0, t0 = time.process_time(), time.perf_counter()
    history = experiment.loop.run(rounds)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return elapsed, cpu, experiment, history


def run_plain(setup: PlainSetup, rounds: int):
    model, eval_model = plain_build_models(setup)  # not timed (FedLearn's model init is not timed either)
    c0, t0 = time.process_time(), time.perf_counter()
    state, history = plain_run(setup, model, eval_model, rounds)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return elapsed, cpu, state, history


def compare(experiment, fl_history, plain_state, plain_history) -> dict:
    fl_weights = experiment.loop.weights
    plain_weights = flat_state(plain_state)
    # Both are in the model's state_dict order (ModelVector's spec order is the state_dict order).
    assert experiment.loop.spec.names == tuple(k for k, v in plain_state.items() if v.is_floating_point())
    max_diff = float((fl_weights - plain_weights).abs().max())
    fl_acc = [row["test_accuracy"] for row in fl_history]
    plain_acc = [row["test_accuracy"] for row in plain_history]
    rounds_acc_equal = sum(a == b for a, b in zip(fl_acc, plain_acc))
    max_loss_diff = max(abs(a["test_loss"] - b["test_loss"]) for a, b in zip(fl_history, plain_history))
    max_train_loss_diff = max(abs(a["train_loss"] - b["train_loss"]) for a, b in zip(fl_history, plain_history))
    return {
        "final_accuracy_fedlearn": fl_acc[-1],
        "final_accuracy_plain": plain_acc[-1],
        "final_accuracy_equal": fl_acc[-1] == plain_acc[-1],
        "rounds_with_equal_accuracy": rounds_acc_equal,
        "rounds": len(fl_acc),
        "max_abs_weight_diff": max_diff,
        "weights_within_1e-4": max_diff <= 1e-4,
        "max_abs_test_loss_diff": max_loss_diff,
        "max_abs_train_loss_diff": max_train_loss_diff,
    }


def _summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "all": times}


def bench(threads: int, rounds: int, reps: int) -> dict:
    torch.set_num_threads(threads)
    config = make_config(rounds, threads)
    t0 = time.perf_counter()
    first = build_experiment(config)
    build_seconds = time.perf_counter() - t0
    setup = PlainSetup(config, first)
    del first

    # Warm-up (untimed): one short run of each so lazy initialisation is paid before timing.
    run_fedlearn(config, min(rounds, 3))
    run_plain(setup, min(rounds, 3))

    sides = ["plain", "fedlearn"]
    wall = {side: [] for side in sides}
    cpu = {side: [] for side in sides}
    runs = {}
    for rep in range(reps):
        # Interleave the sides and rotate which goes first, so background load hits all alike.
        order = sides[rep % len(sides):] + sides[: rep % len(sides)]
        for side in order:
            torch.set_num_threads(threads)
            if side == "plain":
                t, c, state, p_hist = run_plain(setup, rounds)
                runs.setdefault("plain", (state, p_hist))
            else:
                t, c, experiment, f_hist = run_fedlearn(config, rounds)
                runs.setdefault(side, (experiment, f_hist))
            wall[side].append(t)
            cpu[side].append(c)
            print(f"  threads={threads} rep {rep + 1}/{reps} {side:16s} wall {t:7.3f} s  cpu {c:7.3f} s", flush=True)
    equivalence = compare(*runs["fedlearn"], *runs["plain"])
    med_plain = statistics.median(wall["plain"])
    return {
        "threads": threads,
        "rounds": rounds,
        "reps": reps,
        "build_experiment_seconds": build_seconds,
        "wall_seconds": {side: _summary(v) for side, v in wall.items()},
        "cpu_seconds": {side: _summary(v) for side, v in cpu.items()},
        "ratio_median": {side: statistics.median(wall[side]) / med_plain for side in sides},
        "ratio_min": {side: min(wall[side]) / min(wall["plain"]) for side in sides},
        "cpu_ratio_median": {side: statistics.median(cpu[side]) / statistics.median(cpu["plain"]) for side in sides},
        # Each repetition's side / plain from the same repetition (adjacent in time), then the median:
        # less sensitive to load that comes and goes over the minutes the benchmark runs.
        "paired_ratio_median": {
            side: statistics.median(a / b for a, b in zip(wall[side], wall["plain"])) for side in sides
        },
        "loadavg_end": list(os.getloadavg()),
        "equivalence": equivalence,
    }


def bench_segments(threads: int, rounds: int, reps: int, segment: int) -> dict:
    """Both sides advance ``segment`` rounds at a time, alternating, each timed: a segment's ratio is taken
    against the other side's adjacent segment, so load that drifts over seconds cancels out of the pairs."""
    torch.set_num_threads(threads)
    config = make_config(rounds, threads)
    setup = PlainSetup(config, build_experiment(config))
    run_fedlearn(config, min(rounds, 3))
    run_plain(setup, min(rounds, 3))
    wall = {"plain": [], "fedlearn": []}
    cpu = {"plain": [], "fedlearn": []}

    def timed(side: str, step) -> None:
        c0, t0 = time.process_time(), time.perf_counter()
        step()
        wall[side].append(time.perf_counter() - t0)
        cpu[side].append(time.process_time() - c0)

    for rep in range(reps):
        experiment = build_experiment(config)
        plain = plain_rounds(setup, *plain_build_models(setup), rounds)
        for k, end in enumerate(range(segment, rounds + 1, segment)):
            steps = {"fedlearn": lambda end=end, loop=experiment.loop: loop.run(end),
                     "plain": lambda rounds_left=plain: [next(rounds_left) for _ in range(segment)]}
            order = ["plain", "fedlearn"] if (rep + k) % 2 == 0 else ["fedlearn", "plain"]
            for side in order:
                timed(side, steps[side])
        print(f"  threads={threads} rep {rep + 1}/{reps}: plain {sum(wall['plain'][-rounds // segment:]):.3f} s, "
              f"fedlearn {sum(wall['fedlearn'][-rounds // segment:]):.3f} s", flush=True)
    pairs = [a / b for a, b in zip(wall["fedlearn"], wall["plain"])]
    cpu_pairs = [a / b for a, b in zip(cpu["fedlearn"], cpu["plain"])]
    quartiles = statistics.quantiles(pairs, n=4)
    return {
        "threads": threads, "rounds": rounds, "reps": reps, "segment_rounds": segment, "segments": len(pairs),
        "wall_seconds": {side: sum(v) for side, v in wall.items()},
        "cpu_seconds": {side: sum(v) for side, v in cpu.items()},
        "ratio_of_sums": sum(wall["fedlearn"]) / sum(wall["plain"]),
        "cpu_ratio_of_sums": sum(cpu["fedlearn"]) / sum(cpu["plain"]),
        "paired_segment_ratio_median": statistics.median(pairs),
        "paired_segment_ratio_quartiles": [quartiles[0], quartiles[2]],
        "paired_segment_cpu_ratio_median": statistics.median(cpu_pairs),
        "loadavg_end": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 rounds, 2 reps, 1 thread only (smoke run)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts to run (default 1 2)")
    parser.add_argument("--workload", choices=["w1", "w2"], default="w1",
                        help="w1: 100 clients Dirichlet 0.5, 10 a round; w2: 1,000 clients Dirichlet 0.5 (empty "
                             "clients allowed and never sampled), 10%% of the rest a round")
    parser.add_argument("--segment", type=int, default=None,
                        help="time both sides in alternating segments of this many rounds and report the median "
                             "ratio of adjacent segments (robust to drifting load)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path (default benchmarks/results/overhead.json; --quick writes none unless given)")
    args = parser.parse_args(argv)
    if args.workload == "w2":
        WORKLOAD.update(clients=1000, fraction=0.1, partition="dirichlet", min_partition_size=0)
    rounds = args.rounds or (10 if args.quick else 50)
    reps = args.reps or (2 if args.quick else 7)
    threads = args.threads or ([1] if args.quick else [1, 2])
    output = args.output or (None if args.quick else RESULTS / "overhead.json")

    info = machine_info()
    info["loadavg_start"] = list(os.getloadavg())
    print(f"torch {info['torch']}, {info['cpu_count']} CPUs ({info['processor']}), rounds={rounds}, reps={reps}")
    if args.segment:
        return _report_segments([bench_segments(t, rounds, reps, args.segment) for t in threads], info, output)
    results = [bench(t, rounds, reps) for t in threads]

    print()
    print("wall seconds (time.perf_counter); ratio = side / plain (of medians, of mins, median of per-rep pairs)")
    print(f"{'threads':>7} {'side':>16} {'median':>8} {'min':>8} {'cpu med':>8} {'ratio med':>9} {'ratio min':>9} "
          f"{'paired':>7}")
    for r in results:
        w, c = r["wall_seconds"], r["cpu_seconds"]
        for side in w:
            print(f"{r['threads']:>7} {side:>16} {w[side]['median']:>8.3f} {w[side]['min']:>8.3f} "
                  f"{c[side]['median']:>8.3f} {r['ratio_median'][side]:>9.3f} {r['ratio_min'][side]:>9.3f} "
                  f"{r['paired_ratio_median'][side]:>7.3f}")
    print()
    for r in results:
        eq = r["equivalence"]
        print(f"threads={r['threads']}: final accuracy {eq['final_accuracy_fedlearn']:.4f} vs plain "
              f"{eq['final_accuracy_plain']:.4f} (equal in {eq['rounds_with_equal_accuracy']}/{eq['rounds']} "
              f"rounds); max |w - w_plain| = {eq['max_abs_weight_diff']:.2e}")
    goal = GOAL
    one = next((r for r in results if r["threads"] == 1), results[0])
    ratio = one["ratio_median"]["fedlearn"]
    met = ratio <= goal
    print(f"goal: fedlearn/plain <= {goal} (median wall, threads={one['threads']}): "
          f"{ratio:.3f} -> {'MET' if met else 'NOT MET'}")

    if output is not None:
        doc = {
            "benchmark": "overhead",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "machine": info,
            "workload": make_config(rounds, 1).to_dict() | {"threads": threads},
            "timed": "experiment.loop.run(rounds) vs the plain loop; data preparation and model init not timed; "
                     "no run directory or checkpointing",
            "goal": {"max_ratio": goal, "threads": one["threads"], "ratio_median": ratio, "met": met},
            "results": results,
            "argv": sys.argv[1:],
        }
        write_results(output, doc)
    return 0


def _report_segments(results: list[dict], info: dict, output: Path | None) -> int:
    print()
    print("segments: ratio = fedlearn / plain of adjacent segments (median, quartiles), and of the summed times")
    for r in results:
        q1, q3 = r["paired_segment_ratio_quartiles"]
        print(f"threads={r['threads']}: {r['segments']} segments of {r['segment_rounds']} rounds; wall plain "
              f"{r['wall_seconds']['plain']:.2f} s fedlearn {r['wall_seconds']['fedlearn']:.2f} s; CPU plain "
              f"{r['cpu_seconds']['plain']:.2f} s fedlearn {r['cpu_seconds']['fedlearn']:.2f} s")
        print(f"  paired median {r['paired_segment_ratio_median']:.3f} (quartiles {q1:.3f}-{q3:.3f}), CPU "
              f"{r['paired_segment_cpu_ratio_median']:.3f}; of sums {r['ratio_of_sums']:.3f} wall, "
              f"{r['cpu_ratio_of_sums']:.3f} CPU; goal <= {GOAL}")
    if output is not None:
        write_results(output, {"benchmark": "overhead-segments", "date": datetime.now(timezone.utc).strftime(
            "%Y-%m-%d"), "machine": info, "goal": {"max_ratio": GOAL}, "results": results, "argv": sys.argv[1:]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
