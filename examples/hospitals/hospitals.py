"""Three hospitals, one pneumonia classifier: FedAvg and FedProx beside each hospital alone and centralized.

Every run trains the same initial weights with the library's round loop on the site-skewed split
of PneumoniaMNIST (sites.py), then scores the final model on the official test split (624 images):
accuracy, ROC AUC, sensitivity, specificity and balanced accuracy (positive class = pneumonia).
Writes <output>/results.md (one markdown table) and <output>/results.json.

    .venv/bin/python examples/hospitals/hospitals.py --data-dir ../shared/datasets/medmnist
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from fedlearn.client.app import ClientApp
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data import DatasetBundle, load_dataset
from fedlearn.models import build_model
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.params import ModelVector
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.evaluation import CentralEvaluator
from fedlearn.server.loop import RoundLoop
from fedlearn.strategies import build_strategy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sites import DATASET, Site, describe_sites, split_sites  # noqa: E402

# Chosen to fit the whole comparison in about 45 minutes of one CPU thread: one local epoch per round;
# ResNet-18-GN costs ~75 ms per training image there (~280 s per pass over the 3,767 training images),
# so it gets 2 rounds. Its lr is 0.01: at 0.05 one epoch on hospital-a diverged (train loss 1.35).
MODEL_SETTINGS: dict[str, dict[str, Any]] = {
    "seed-cnn": {"rounds": 20, "local_epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.0},
    "resnet18-gn": {"rounds": 2, "local_epochs": 1, "batch_size": 32, "lr": 0.01, "momentum": 0.0},
}
FEDPROX_MU = 0.01
COLUMNS = (("accuracy", "accuracy"), ("auc", "ROC AUC"), ("sensitivity", "sensitivity"),
           ("specificity", "specificity"), ("balanced_accuracy", "balanced accuracy"))


def site_clients(bundle: DatasetBundle, sites: list[Site]) -> dict[str, ClientData]:
    """Each hospital's training share and local test share, as views of the normalized training split."""
    return {s.name: ClientData(Subset(bundle.train, torch.as_tensor(s.train)),
                               Subset(bundle.train, torch.as_tensor(s.test))) for s in sites}


def comparison_runs(bundle: DatasetBundle, sites: list[Site]) -> list[tuple[str, str, dict[str, ClientData]]]:
    """(row label, algorithm, clients) for FedAvg, FedProx, each hospital alone and all training data pooled."""
    clients = site_clients(bundle, sites)
    pooled = np.sort(np.concatenate([s.train for s in sites]))
    runs = [("FedAvg", "fedavg", clients), (f"FedProx (mu={FEDPROX_MU})", "fedprox", clients)]
    runs += [(f"{name} alone", "fedavg", {name: data}) for name, data in clients.items()]
    pooled_data = ClientData(Subset(bundle.train, torch.as_tensor(pooled)))
    runs.append(("centralized (pooled)", "fedavg", {"pooled": pooled_data}))
    return runs


def train_and_score(model_name: str, algorithm: str, clients: dict[str, ClientData], bundle: DatasetBundle,
                    settings: dict[str, Any], seed: int, device: str, site_tests: Subset | None) -> dict[str, Any]:
    """Train one configuration with the round loop and score its final weights on the official test split."""
    torch.manual_seed(seed)  # the same initial weights for every run of this model
    model = build_model(model_name, bundle.input_shape, bundle.num_classes)
    server_model = build_model(model_name, bundle.input_shape, bundle.num_classes)
    vector = ModelVector(model)
    local = LocalConfig(local_epochs=settings["local_epochs"], batch_size=settings["batch_size"], lr=settings["lr"],
                        momentum=settings["momentum"])
    runtime = InProcessRuntime(ClientApp(LocalTrainer(model, device), clients))
    loop = RoundLoop(build_strategy(algorithm, local, mu=FEDPROX_MU), runtime, vector.spec,
                     vector.read(), seed=seed,
                     callbacks=[lambda row: print(f"    round {row['round']}: train loss {row['train_loss']:.4f}, "
                                                  f"{row['seconds']:.1f} s", file=sys.stderr, flush=True)])
    start, cpu_start = time.perf_counter(), time.process_time()
    loop.run(settings["rounds"])
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    evaluator = CentralEvaluator(server_model, bundle.test, device)
    result: dict[str, Any] = {**evaluator.score(loop.weights), "train_seconds": seconds,
                              "train_cpu_seconds": cpu_seconds,
                              "train_images": sum(len(c.train) for c in clients.values())}
    if site_tests is not None:
        # Federated evaluation on the hospitals' own test shares (pooled counts, histogram AUC) beside the
        # exact metrics of the same images pooled in one place: the histogram AUC's real error.
        result["federated"] = loop.evaluate_federated()
        result["site_tests_exact"] = CentralEvaluator(server_model, site_tests, device).score(loop.weights)
    return result


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per (model, training), the official test split's metrics as columns."""
    head = "| model | training | " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|---|---|" + "---:|" * len(COLUMNS)
    lines = [head, rule]
    for r in results:
        cells = ["-" if r[key] is None else f"{r[key]:.3f}" for key, _ in COLUMNS]
        lines.append(f"| {r['model']} | {r['training']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sites_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| site | images | train (normal/pneumonia) | local test (normal/pneumonia) | pneumonia |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        tr, te = r["train_label_counts"], r["test_label_counts"]
        lines.append(f"| {r['site']} | {r['images']} | {r['train']} ({tr[0]}/{tr[1]}) | {r['test']} ({te[0]}/{te[1]}) "
                     f"| {r['prevalence']:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/datasets/medmnist", help=f"folder holding {DATASET}.npz")
    parser.add_argument("--output", default="runs/hospitals", help="where results.md and results.json go")
    parser.add_argument("--models", nargs="+", default=list(MODEL_SETTINGS), choices=list(MODEL_SETTINGS))
    parser.add_argument("--rounds", type=int, default=None, help="override every model's rounds (quick checks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = load_dataset(DATASET, args.data_dir, download=False)
    labels = bundle.train.y.numpy()
    sites = split_sites(labels, seed=args.seed)
    site_rows = describe_sites(sites, labels)
    site_tests = Subset(bundle.train, torch.as_tensor(np.sort(np.concatenate([s.test for s in sites]))))
    results = []
    started, cpu_started = time.perf_counter(), time.process_time()
    for model_name in args.models:
        settings = dict(MODEL_SETTINGS[model_name])
        if args.rounds is not None:
            settings["rounds"] = args.rounds
        for label, algorithm, clients in comparison_runs(bundle, sites):
            print(f"{model_name}: {label}", file=sys.stderr, flush=True)
            federated = len(clients) > 1
            scored = train_and_score(model_name, algorithm, clients, bundle, settings, args.seed, args.device,
                                     site_tests if federated else None)
            results.append({"model": model_name, "training": label, **settings, **scored})
            print(f"  accuracy {scored['accuracy']:.4f}, AUC {scored['auc']}", file=sys.stderr, flush=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps({
        "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv), "seed": args.seed,
        "fedprox_mu": FEDPROX_MU, "sites": site_rows, "results": results,
        "total_seconds": time.perf_counter() - started, "total_cpu_seconds": time.process_time() - cpu_started,
        "threads": args.threads, "device": args.device,
    }, indent=1))
    print(sites_table(site_rows))
    print(table)
    print(f"written to {out / 'results.md'} and {out / 'results.json'} in {time.perf_counter() - started:.0f} s "
          f"({time.process_time() - cpu_started:.0f} s of CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
