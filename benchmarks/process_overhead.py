"""The whole `fedlearn run` process against a plain script doing the same import, data loading and rounds.

Workload W1 (as overhead.py): digits, seed-cnn, 100 clients Dirichlet 0.5, 10 per round, 1 epoch, batch 10,
lr 0.05, 50 rounds, centralized evaluation every round, 1 thread. Both sides are fresh Python processes:

- ``fedlearn``: ``fedlearn run`` with those flags (run directory, per-round checkpoint and metrics, summary,
  model and curves included);
- ``plain``: this file with ``--side plain``: imports torch, loads digits and partitions it with FedLearn's own
  data code (the same data loading), runs overhead.py's hand-written FedAvg loop, appends one metrics line per
  round and saves the final state_dict.

Runs are interleaved with a rotating start; wall time and the child's CPU seconds (user + system) are reported.

    python benchmarks/process_overhead.py --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAGS = ["--dataset", "digits", "--model", "seed-cnn", "--clients", "100", "--partition", "dirichlet",
         "--alpha", "0.5", "--fraction", "0.1", "--local-epochs", "1", "--batch-size", "10", "--lr", "0.05",
         "--threads", "1", "--seed", "0", "--no-download", "--quiet"]


def plain_side(rounds: int, out: Path) -> None:
    """The plain script: same imports and data loading as a user's own loop would have, then the loop."""
    import torch

    sys.path.insert(0, str(HERE))
    from overhead import PlainSetup, make_config, plain_build_models, plain_run

    from fedlearn.data import load_dataset
    from fedlearn.run.experiment import build_clients

    torch.set_num_threads(1)
    config = make_config(rounds, 1)
    bundle = load_dataset("digits", None, download=False)
    clients, _ = build_clients(config, bundle)

    class Data:  # what PlainSetup reads of an experiment
        pass

    data = Data()
    data.bundle, data.clients = bundle, clients
    setup = PlainSetup(config, data)
    model, eval_model = plain_build_models(setup)
    state, history = plain_run(setup, model, eval_model, rounds)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    torch.save(state, out / "model.pt")


def timed(cmd: list[str]) -> tuple[float, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["plain"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.side == "plain":
        plain_side(args.rounds, args.out)
        return 0
    python = sys.executable
    fedlearn = str(Path(python).with_name("fedlearn"))
    times: dict[str, list[tuple[float, float]]] = {"plain": [], "fedlearn": []}
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            order = ["plain", "fedlearn"] if rep % 2 == 0 else ["fedlearn", "plain"]
            for side in order:
                out = Path(tmp) / f"{side}-{rep}"
                if side == "plain":
                    cmd = [python, __file__, "--side", "plain", "--rounds", str(args.rounds), "--out", str(out)]
                else:
                    cmd = [fedlearn, "run", *FLAGS, "--rounds", str(args.rounds), "--output", str(out)]
                wall, cpu = timed(cmd)
                times[side].append((wall, cpu))
                print(f"rep {rep + 1}/{args.reps} {side:>8}: wall {wall:.2f} s, cpu {cpu:.2f} s", flush=True)
    med = {s: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for s, v in times.items()}
    pairs = statistics.median(f[0] / p[0] for f, p in zip(times["fedlearn"], times["plain"]))
    print(f"median wall: plain {med['plain'][0]:.2f} s, fedlearn {med['fedlearn'][0]:.2f} s -> "
          f"{med['fedlearn'][0] / med['plain'][0]:.3f}x (per-rep pairs {pairs:.3f}x); median CPU "
          f"{med['plain'][1]:.2f} s vs {med['fedlearn'][1]:.2f} s -> {med['fedlearn'][1] / med['plain'][1]:.3f}x; "
          f"load average {load_start[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
