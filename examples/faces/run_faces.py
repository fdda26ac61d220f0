"""Federated face recognition with private identity heads on Olivetti faces: one table, several seeds.

Per seed, 40 people are shuffled: 10 are held out of all training (open-set evaluation) and 30 are
dealt to 3 parties, 10 each, no one in two parties. Every method trains the same embedding CNN with
the same recipe through the one round loop, then is scored on the held-out people: ROC AUC and TAR
at FAR 1e-2 / 1e-3 over all photo pairs, and rank-1 identification (1 gallery photo per person).
Writes results/faces_results.json and results/faces_results.md.

    python examples/faces/run_faces.py [--seeds 0 1 2 3 4] [--data-dir ../shared/datasets]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from fedlearn.faces.config import FaceConfig
from fedlearn.faces.data import load_faces
from fedlearn.faces.experiment import METHODS, FaceRunSettings, run_method
from fedlearn.faces.split import split_identities

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[2] / "shared" / "datasets"
METRICS = (("auc", "ROC AUC"), ("tar_at_far_1e-2", "TAR@FAR=1e-2"), ("tar_at_far_1e-3", "TAR@FAR=1e-3"),
           ("rank1", "rank-1"))


def summarize(rows: list[dict], methods: list[str]) -> dict[str, dict[str, list[float]]]:
    """Per method and metric: mean, sample standard deviation (0 for one seed) and the per-seed values."""
    out: dict[str, dict[str, list[float]]] = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        out[method] = {}
        for key, _ in (*METRICS, ("seconds", "")):
            values = [r[key] for r in mine]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            out[method][key] = [statistics.fmean(values), spread, values]
    return out


def paired(rows: list[dict], methods: list[str], baseline: str) -> dict[str, dict[str, list[float]]]:
    """Per method and metric: mean and sample std of (method - baseline) over seeds, and seeds where it is higher.

    A seed fixes the identity split and the initial weights, so the per-seed difference removes
    most of the split-to-split spread that dominates the plain standard deviations.
    """
    by_seed = {(r["method"], r["seed"]): r for r in rows}
    out: dict[str, dict[str, list[float]]] = {}
    for method in methods:
        if method == baseline:
            continue
        seeds = [s for (m, s) in by_seed if m == method and (baseline, s) in by_seed]
        if not seeds:
            continue
        out[method] = {}
        for key, _ in METRICS:
            diffs = [by_seed[(method, s)][key] - by_seed[(baseline, s)][key] for s in seeds]
            spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            out[method][key] = [statistics.fmean(diffs), spread, sum(d > 0 for d in diffs), len(diffs)]
    return out


def markdown(summary: dict, differences: dict, baseline: str, settings: FaceRunSettings, seeds: list[int],
             source: str) -> str:
    """The results table (mean +- standard deviation over seeds) and the paired differences to the baseline."""
    head = "| method | " + " | ".join(name for _, name in METRICS) + " | wall s per run |"
    lines = [head, "|" + "---|" * (len(METRICS) + 2)]
    for method, stats in summary.items():
        cells = [f"{stats[k][0]:.3f} ± {stats[k][1]:.3f}" for k, _ in METRICS]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {stats['seconds'][0]:.0f} |")
    text = (f"Open-set results on {source} faces, mean ± sample standard deviation over seeds {seeds} "
            f"(each seed: its own identity split and initial weights); {settings.rounds} rounds x "
            f"{settings.local_epochs} local epoch(s).\n\n" + "\n".join(lines) + "\n")
    if differences:
        rows = [f"| {m} - {baseline} | " + " | ".join(
            f"{d[k][0]:+.3f} ± {d[k][1]:.3f} ({d[k][2]}/{d[k][3]})" for k, _ in METRICS) + " |"
            for m, d in differences.items()]
        text += (f"\nPaired by seed: mean ± sample standard deviation of the per-seed difference to {baseline} "
                 f"(in brackets: seeds where the method scored higher).\n\n| difference | "
                 + " | ".join(name for _, name in METRICS) + " |\n|" + "---|" * (len(METRICS) + 1) + "\n"
                 + "\n".join(rows) + "\n")
    return text + "\n" + "\n".join(f"- **{m}**: {METHODS[m]}" for m in summary) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA), help="shared/datasets, or the source's own folder")
    parser.add_argument("--source", default="olivetti", choices=["olivetti", "orl"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--rounds", type=int, default=FaceRunSettings.rounds)
    parser.add_argument("--local-epochs", type=int, default=FaceRunSettings.local_epochs)
    parser.add_argument("--lr", type=float, default=FaceRunSettings.lr)
    parser.add_argument("--codebook-size", type=int, default=FaceConfig.codebook_size)
    parser.add_argument("--held-out", type=int, default=10, help="people kept out of all training")
    parser.add_argument("--parties", type=int, default=3)
    parser.add_argument("--output", default=str(HERE / "results"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    settings = FaceRunSettings(rounds=args.rounds, local_epochs=args.local_epochs, lr=args.lr,
                               face=replace(FaceConfig(), codebook_size=args.codebook_size))
    images = load_faces(args.data_dir, args.source)
    people = int(images.identity.max()) + 1
    rows = []
    start = time.perf_counter()
    for seed in args.seeds:
        split = split_identities(people, args.parties, args.held_out, seed)
        for method in args.methods:
            row = run_method(method, images, split, settings, seed)
            row["held_out_people"] = list(split.held_out)
            row["parties"] = [list(p) for p in split.parties]
            rows.append(row)
            print(f"seed {seed} {method:18s} AUC {row['auc']:.3f}  TAR@1e-2 {row['tar_at_far_1e-2']:.3f}  "
                  f"TAR@1e-3 {row['tar_at_far_1e-3']:.3f}  rank-1 {row['rank1']:.3f}  ({row['seconds']:.0f} s)",
                  flush=True)
    summary = summarize(rows, args.methods)
    differences = paired(rows, args.methods, "fedavg")
    table = markdown(summary, differences, "fedavg", settings, args.seeds, args.source)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([str(Path(sys.argv[0]).as_posix()), *sys.argv[1:]]),
        "source": args.source,
        "seeds": args.seeds,
        "held_out_people_per_seed": args.held_out,
        "parties": args.parties,
        "settings": settings.to_dict(),
        "torch": torch.__version__,
        "machine": f"{platform.processor() or platform.machine()}, torch threads 1",
        "wall_seconds": time.perf_counter() - start,
        "summary": summary,
        "paired_vs_fedavg": differences,
        "runs": rows,
    }
    (out / "faces_results.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "faces_results.md").write_text(table)
    print()
    print(table)
    print(f"wrote {out / 'faces_results.json'} and {out / 'faces_results.md'} in {record['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
