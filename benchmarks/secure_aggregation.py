"""The price of hiding updates: plain vs SecAgg vs SecAgg+ vs CKKS, per round (issue 5's benchmark).

Part 1, the protocols alone: for n clients in {10, 50, 100} and model sizes d in {100k, 1M},
one round of each mechanism on random updates, all parties in this process: mean client seconds
(key generation, sharing, encoding and masking, or encrypting; unmasking answers), server seconds
(relaying, summing, unmasking, or adding ciphertexts; CKKS decryption is the key holder's and shown
apart), and bytes each client sends and receives, counted with the wire encoding of the messages.

Part 2, a whole training round: n = 100 clients on MNIST (600 images each), an MLP with ~1M
weights, 1 local epoch, through the real round loop, plain FedAvg beside each secure mechanism.

    python benchmarks/secure_aggregation.py            # both parts (~15 min on 2 cores)
    python benchmarks/secure_aggregation.py --quick    # n = 10, d = 100k, part 1 only; writes nothing
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from machine import machine_info, write_results

from fedlearn.privacy import he
from fedlearn.privacy.secagg.client import SecAggClient
from fedlearn.privacy.secagg.encoding import FixedPoint
from fedlearn.privacy.secagg.graph import secagg_plus_parameters
from fedlearn.privacy.secagg.server import SecAggServer, resolve_threshold
from fedlearn.protocol.codec import join_blob, wire_size
from fedlearn.protocol.messages import SecureReply, SecureTask, TrainResult, TrainTask

RESULTS = Path(__file__).resolve().parent / "results"
# What SecureAggregationRound adds to every secagg request for FedAvg (server.secure.hidden_sum_request).
HIDDEN_SUM = {"weighting": "examples", "extras": [], "arrays": ["update"]}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


class Clock:
    """Accumulates seconds per party."""

    def __init__(self) -> None:
        self.client = 0.0
        self.server = 0.0
        self.key_holder = 0.0

    def time(self, party: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        setattr(self, party, getattr(self, party) + time.perf_counter() - start)
        return out


def plain_round(n: int, d: int, updates: np.ndarray) -> dict:
    clock = Clock()
    up = 0
    total = np.zeros(d)
    for i in range(n):
        update = torch.from_numpy(updates[i % len(updates)].astype(np.float32))
        result = TrainResult(1, f"c{i}", 100, {"update": update})
        up += wire_size(result)
        clock.time("server", lambda r=result: total.__iadd__(r.arrays["update"].numpy() * r.num_examples))
    return {"client_s": 0.0, "server_s": clock.server, "up_bytes": up / n, "down_bytes": 0.0}


def degree(n: int) -> int | None:
    """SecAgg+'s default neighbours at n (None: the complete graph), as `fedlearn run` derives them."""
    derived = secagg_plus_parameters(n, 1 / 3, 0.1)
    return None if derived is None else derived[0]


def secagg_round(n: int, d: int, updates: np.ndarray, degree: int | None) -> dict:
    """One full SecAgg(+) round; returns per-client means and the server's total, checked against the plain sum."""
    clock = Clock()
    ids = [f"c{i:03d}" for i in range(n)]
    fp = FixedPoint(32, 1.0, n, 100, d)
    server = SecAggServer(1, ids, fp, threshold=resolve_threshold(2 / 3, n), degree=degree, seed=0)
    clients = {c: SecAggClient(c, 1) for c in ids}
    up = down = 0

    def exchange(stage: str, requests: dict, handler) -> dict:
        nonlocal up, down
        replies = {}
        for cid, data in requests.items():
            down += wire_size(SecureTask(1, cid, stage, data))
            replies[cid] = clock.time("client", handler, cid, data)
            up += wire_size(SecureReply(1, cid, stage, replies[cid]))
        return replies

    keys = exchange("secagg-advertise", {c: {} for c in ids}, lambda c, _: clients[c].advertise())
    requests = clock.time("server", server.receive_keys, keys)
    shares = exchange("secagg-share", requests, lambda c, r: clients[c].share_keys(r))
    requests = clock.time("server", server.receive_shares, shares)
    rng = np.random.default_rng(0)
    weights = rng.integers(1, 100, n)
    for i, cid in enumerate(ids):
        # Protocol part only (the weights are the same download for every mechanism): the round's secagg
        # request as SecureAggregationRound sends it, with the hidden-sum fields of plain FedAvg.
        down += wire_size(TrainTask(1, cid, {}, {"secagg": {**requests[cid], **HIDDEN_SUM}}))
        encoded = clock.time("client", fp.encode, updates[i % len(updates)], int(weights[i]), [], rng)
        masked, rejected = clock.time("client", clients[cid].mask, requests[cid], encoded, 32)
        up += wire_size(TrainResult(1, cid, 0, {"masked": torch.from_numpy(masked.view(np.int32))}, {},
                                    sealed={"secagg": True, "secagg_rejected": rejected}))
        clock.time("server", server.add_input, cid, masked, rejected)
    requests = clock.time("server", server.unmask_requests)
    answers = exchange("secagg-unmask", requests, lambda c, r: clients[c].unmask(r))
    total = clock.time("server", server.finish, answers)
    weighted, total_weight, _ = fp.decode(total, n)
    expected = sum(int(weights[i]) * updates[i % len(updates)] for i in range(n))
    assert total_weight == int(weights.sum()) and np.abs(weighted - expected).max() <= fp.error_bound(n)
    return {"client_s": clock.client / n, "server_s": clock.server, "up_bytes": up / n, "down_bytes": down / n,
            "degree": degree if degree is not None else n - 1}


def ckks_round(n: int, d: int, updates: np.ndarray, keys: Path) -> dict:
    clock = Clock()
    public = he.load_public_context(keys / "public.ctx")
    secret = he.load_secret_context(keys / "secret.ctx")
    total = he.EncryptedSum(public, d)
    up = 0
    for i in range(n):
        chunks = clock.time("client", he.encrypt_vector, public, updates[i % len(updates)])
        blob, sizes = join_blob(chunks)
        up += wire_size(TrainResult(1, f"c{i}", 0, {"ciphertext": blob}, {},
                                    sealed={"he": True, "chunk_sizes": sizes}))
        clock.time("server", total.add, chunks)
    summed = clock.time("server", total.serialize)
    plain = clock.time("key_holder", he.decrypt_vector, secret, summed, d)
    expected = sum(updates[i % len(updates)] for i in range(n))
    assert np.abs(plain - expected).max() <= he.ckks_error_bound(he.CKKSParams(), n, 1.0)
    return {"client_s": clock.client / n, "server_s": clock.server, "key_holder_s": clock.key_holder,
            "up_bytes": up / n, "down_bytes": 0.0}


def protocol_table(sizes: list[int], counts: list[int], keys: Path) -> list[dict]:
    rows = []
    for d in sizes:
        updates = np.random.default_rng(1).uniform(-0.5, 0.5, (4, d))  # 4 distinct vectors, reused
        for n in counts:
            for mode in ("plain", "secagg", "secagg+", "ckks"):
                if mode == "plain":
                    row = plain_round(n, d, updates)
                elif mode == "ckks":
                    row = ckks_round(n, d, updates, keys)
                else:
                    row = secagg_round(n, d, updates, None if mode == "secagg" else degree(n))
                row.update({"mode": mode, "n": n, "d": d})
                rows.append(row)
                print(f"d={d:>8,} n={n:>3} {mode:8s} client {row['client_s']:7.3f} s  server {row['server_s']:7.3f} s"
                      f"  up {row['up_bytes'] / 1e6:8.2f} MB  down {row['down_bytes'] / 1e6:6.3f} MB", flush=True)
    return rows


def training_rounds(data_dir: str, keys: Path, repeats: int, modes: list[str],
                    num_clients: int = 100) -> list[dict]:
    """Whole FedAvg rounds, 100 MNIST clients, a 1,010,850-weight MLP: plain and each mechanism, interleaved."""
    from torch import nn

    from fedlearn.client.app import ClientApp
    from fedlearn.client.secure import SecureClients
    from fedlearn.client.trainer import LocalTrainer
    from fedlearn.data import load_dataset
    from fedlearn.protocol.local import LocalConfig
    from fedlearn.run.config import RunConfig
    from fedlearn.run.experiment import build_clients
    from fedlearn.runtime.inprocess import InProcessRuntime
    from fedlearn.server.loop import RoundLoop
    from fedlearn.server.secure import HomomorphicRound, SecAggSettings, SecureAggregationRound
    from fedlearn.strategies import Sampler, Strategy, build_strategy

    config = RunConfig(dataset="mnist", data_dir=data_dir, clients=num_clients, partition="iid",
                       client_test_fraction=0.0, download=False, seed=0).validate()
    bundle = load_dataset(config.dataset, config.data_dir, download=False)
    clients, _ = build_clients(config, bundle)
    n = len(clients)
    local = LocalConfig(local_epochs=1, batch_size=10, lr=0.05)  # McMahan et al.'s E = 1, B = 10

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 200), nn.ReLU(),
                             nn.Linear(200, 10))

    max_weight = max(len(c.train) for c in clients.values())
    loops = {}
    for mode in modes:
        trainer = LocalTrainer(mlp(), "cpu")
        spec = trainer.vector.spec
        strategy: Strategy = build_strategy("fedavg", local, sampler=Sampler(1.0))  # every client, every round
        if mode == "plain":
            sums = None
        elif mode == "ckks":
            sums = HomomorphicRound(str(keys / "public.ctx"), clip=1.0, max_weight=max_weight)  # as SecAgg
        else:
            settings = SecAggSettings(mode, 2 / 3, 32, 1.0, None, max_weight)
            settings.check(strategy)
            sums = SecureAggregationRound(settings)
        runtime = InProcessRuntime(ClientApp(trainer, clients, secure=SecureClients(keys)))
        loops[mode] = RoundLoop(strategy, runtime, spec, trainer.vector.read(), sums=sums)
    seconds: dict[str, list[float]] = {mode: [] for mode in loops}
    for _ in range(repeats):
        for mode, loop in loops.items():  # interleaved, so a busy moment hurts every mechanism alike
            row = loop.run_round()
            if not row["aggregated"] or row.get("secure_aggregation_aborted"):  # a skipped sum is no timing
                raise RuntimeError(f"{mode} round {row['round']} did not aggregate: "
                                   f"{row.get('secure_aggregation_aborted') or row['failed_clients']}")
            seconds[mode].append(row["seconds"])
            print(f"training round, n={n}, d={loop.spec.numel:,}: {mode:8s} {row['seconds']:6.1f} s, "
                  f"up {row['bytes_up'] / 1e6:8.1f} MB", flush=True)
    rows = []
    for mode, values in seconds.items():
        median = float(np.median(values))
        rows.append({"mode": mode, "n": n, "d": loops[mode].spec.numel, "round_s": values, "median_s": median,
                     "x_plain": median / float(np.median(seconds["plain"])) if "plain" in seconds else None,
                     # same start, same seeds: the secure loops' weights differ from plain's by rounding only
                     "max_abs_weight_diff_vs_plain": float((loops[mode].weights - loops["plain"].weights).abs().max())
                     if "plain" in loops else None})
        print(f"{mode:8s} median {median:6.1f} s" + (f" = {rows[-1]['x_plain']:.2f}x plain, max |w - w_plain| "
                                                      f"{rows[-1]['max_abs_weight_diff_vs_plain']:.1e}"
                                                      if "plain" in seconds else ""), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA))
    parser.add_argument("--rounds", type=int, default=2, help="training rounds timed per mechanism in part 2")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-protocol", action="store_true", help="part 2 only (keeps part 1's earlier results)")
    parser.add_argument("--training-modes", nargs="+", default=["plain", "secagg", "secagg+", "ckks"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.sizes, args.clients, args.skip_training = [100_000], [10], True
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp)
        he.generate_keys(keys)
        rows = [] if args.skip_protocol else protocol_table(args.sizes, args.clients, keys)
        training = [] if args.skip_training else training_rounds(args.data_dir, keys, args.rounds,
                                                                 args.training_modes)
    earlier = RESULTS / "secure_aggregation.json"
    if earlier.exists() and not args.quick:  # keep the part not re-run
        previous = json.loads(earlier.read_text())
        rows = rows or previous.get("protocol", [])
        training = training or previous.get("training", [])
    if not args.quick:
        doc = {"benchmark": "secure_aggregation", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": machine_info(threads=1), "argv": sys.argv[1:], "protocol": rows, "training": training}
        write_results(RESULTS / "secure_aggregation.json", doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
