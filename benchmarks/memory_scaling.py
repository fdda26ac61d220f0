"""Peak memory of an in-process simulation as the number of clients grows, total data fixed.

The claim under test (DESIGN.md principle 7, issue goal): the in-process runtime reuses one model
instance for all clients, and clients hold only index tensors into one shared data tensor, so
simulating 10,000 clients costs about as much memory as simulating 100 (peak within 20%).

Workload: 20,000 synthetic 1x28x28 images (+2,000 test images, centralized evaluation), model
mcmahan-cnn (1,663,370 parameters), FedAvg, 10 clients sampled per round, 1 local epoch,
batch 10, lr 0.05, 3 rounds. The data are split into equal shares of 200 (100 clients) or 2
(10,000 clients) samples. Each configuration runs in a fresh Python subprocess (the runtime ones
3 times, interleaved, reporting the median run by peak, since the allocator moves the peak by a
few tens of MiB from run to run), which reports:

- rss_after_import: VmRSS after importing torch and fedlearn
- rss_after_setup: VmRSS after building data, clients, model, runtime and round loop (before training)
- rss_end / peak_rss: VmRSS and ru_maxrss (the high-water mark) after training
- wall and CPU seconds (user + system) of the whole child and of training, and /proc/loadavg at its
  start and end (the machine is shared)

Built from the low-level parts (LocalTrainer, ClientData over Subset index tensors, ClientApp,
InProcessRuntime, RoundLoop, a strategy from build_strategy with a uniform Sampler). With
``--seed-api`` it also measures the seed API (FedClient/FedServer) where every FedClient is given
its own nn.Module, as the seed example does, and the same API with one model instance shared by
all FedClients.

``--algorithm scaffold`` runs SCAFFOLD instead of FedAvg: every client keeps a model-sized control
variate (6.35 MiB for mcmahan-cnn) in a ``ClientStateStore`` spilled to a folder (only an LRU of its
``max_cached`` entries stays in RAM; ``--state-cache`` sets it, default the store's 64), passed to
both the ClientApp and the RoundLoop, and the loop checkpoints every round (state files first, then
the server checkpoint, then superseded files pruned). After each round's checkpoint the child lists
the state folder and counts the files written (new, or rewritten: inode or mtime changed) and
removed, and checks that the written ones are exactly the files of the clients trained that round.

    python benchmarks/memory_scaling.py            # writes benchmarks/results/memory_scaling.json
    python benchmarks/memory_scaling.py --quick    # smaller smoke run, writes nothing unless --output
    python benchmarks/memory_scaling.py --seed-api # adds the FedServer/FedClient measurements
    python benchmarks/memory_scaling.py --algorithm scaffold --repeats 1
                                                   # writes benchmarks/results/memory_scaling_scaffold.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from machine import machine_info, write_results

RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 1.20


def vm_rss_kib() -> int:
    """Current resident set size in KiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_kib() -> int:
    """High-water RSS of this process; ru_maxrss is in KiB on Linux."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (the machine is shared: they say how busy it was)."""
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def state_files(directory: Path) -> dict[str, tuple[int, int, int]]:
    """(inode, mtime_ns, size) of every file in the client state folder, by name.

    The loop prunes superseded files in its background checkpoint thread: one may vanish while listed.
    """
    out = {}
    for path in directory.iterdir():
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        out[path.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


def state_file_name(client_id: str, version: int) -> str:
    """The name ClientStateStore gives a committed entry: ``<sha256(client id)[:32]>-<version>.pt``."""
    return f"{hashlib.sha256(client_id.encode()).hexdigest()[:32]}-{version}.pt"


# --------------------------------------------------------------------------------------------
# Child: one configuration, measured in a fresh process
# --------------------------------------------------------------------------------------------

def child(spec: dict) -> dict:
    wall0, load0 = time.perf_counter(), loadavg()
    import torch

    from fedlearn.client.app import ClientApp
    from fedlearn.client.data import ClientData
    from fedlearn.client.state import ClientStateStore
    from fedlearn.client.trainer import LocalTrainer
    from fedlearn.data.arrays import ArrayDataset
    from fedlearn.models import build_model
    from fedlearn.protocol.local import LocalConfig
    from fedlearn.protocol.params import ModelVector
    from fedlearn.runtime.inprocess import InProcessRuntime
    from fedlearn.server.evaluation import CentralEvaluator
    from fedlearn.server.loop import RoundLoop
    from fedlearn.strategies import Sampler, build_strategy

    class RecordingApp(ClientApp):
        """A ClientApp that notes which clients it trained, to check what each checkpoint wrote."""

        touched: set[str]

        def train(self, task):
            self.touched.add(task.client_id)
            return super().train(task)

    torch.set_num_threads(spec["threads"])
    out: dict = {"rss_after_import": vm_rss_kib(), "peak_after_import": peak_rss_kib(), "loadavg_start": load0}
    t_start = time.perf_counter()

    num_clients, total, per_round = spec["clients"], spec["samples"], spec["per_round"]
    gen = torch.Generator().manual_seed(0)
    train = ArrayDataset(torch.randn(total, 1, 28, 28, generator=gen),
                         torch.randint(0, 10, (total,), generator=gen))
    test = ArrayDataset(torch.randn(spec["test_samples"], 1, 28, 28, generator=gen),
                        torch.randint(0, 10, (spec["test_samples"],), generator=gen))
    order = torch.randperm(total, generator=gen)
    # Each client owns its own index tensor (as run.experiment.build_clients makes them).
    shares = [chunk.clone() for chunk in order.tensor_split(num_clients)]
    local = LocalConfig(local_epochs=1, batch_size=10, lr=0.05)
    fraction = per_round / num_clients
    algorithm = spec.get("algorithm", "fedavg")

    torch.manual_seed(0)
    workdir = None
    if spec["mode"] == "runtime":
        model = build_model(spec["model"], (1, 28, 28), 10)
        server_model = build_model(spec["model"], (1, 28, 28), 10)
        server_model.load_state_dict(model.state_dict())
        clients = {f"client-{i}": ClientData(torch.utils.data.Subset(train, idx)) for i, idx in enumerate(shares)}
        trainer = LocalTrainer(model, "cpu")
        vector = ModelVector(server_model)
        strategy = build_strategy(algorithm, local, sampler=Sampler(fraction))
        store = checkpoint = None
        callbacks = []
        if algorithm == "scaffold":
            # Client state spilled to disk, committed by the loop's checkpoint after every round.
            workdir = tempfile.TemporaryDirectory(prefix="fedlearn-memory-scaling-", dir=spec.get("state_root"))
            state_dir = Path(workdir.name) / "client_state"
            checkpoint = Path(workdir.name) / "checkpoint.pt"
            store = ClientStateStore(state_dir, **({} if spec.get("state_cache") is None
                                                   else {"max_cached": spec["state_cache"]}))
            out["state_max_cached"] = store.max_cached
            app = RecordingApp(trainer, clients, state=store)
            touched = app.touched = set()
            ever: set[str] = set()
            rounds_io: list[dict] = []
            before = [state_files(state_dir)]

            def count_files(row: dict) -> None:
                # Runs after save(): the state files are committed (synchronously) by then; the server
                # checkpoint and the pruning of superseded files may still be running in the loop's
                # writer thread, so only files written (new name, or new inode/mtime) are counted here.
                after = state_files(state_dir)
                written = sorted(n for n, st in after.items() if before[0].get(n) != st)
                expected = sorted(state_file_name(cid, row["round"]) for cid in touched)
                rounds_io.append({
                    "round": row["round"], "clients_trained": len(touched),
                    "clients_trained_before": len(touched & ever), "files_written": len(written),
                    "bytes_written": sum(after[n][2] for n in written),
                    "written_are_the_trained_clients": written == expected,
                    "store_cached_entries": store.cached_count,
                })
                before[0] = after
                ever.update(touched)
                touched.clear()

            callbacks.append(count_files)
            out["client_state_io"] = rounds_io
        else:
            app = ClientApp(trainer, clients)
        loop = RoundLoop(
            strategy, InProcessRuntime(app), vector.spec, vector.read(), seed=0,
            evaluator=CentralEvaluator(server_model, test, "cpu"),
            checkpoint_path=checkpoint, client_state=store, callbacks=callbacks,
        )
        out["num_params"] = vector.spec.numel
        out["rss_after_setup"] = vm_rss_kib()
        out["setup_seconds"] = time.perf_counter() - t_start
        t0, c0 = time.perf_counter(), cpu_seconds()
        history = loop.run(spec["rounds"])
        if store is not None:  # run() has waited for the last checkpoint and its pruning
            end = state_files(state_dir)
            out["state_files_end"] = len(end)
            out["state_folder_bytes_end"] = sum(st[2] for st in end.values())
            out["state_clients_end"] = len(store)
            out["checkpoint_bytes"] = checkpoint.stat().st_size
    else:
        from fedlearn.core import FedClient, FedServer

        shared = build_model(spec["model"], (1, 28, 28), 10) if spec["mode"] == "seed_api_shared_model" else None
        fed_clients = []
        for i, idx in enumerate(shares):
            # The seed example's style: each party constructs its own model.
            model = shared if shared is not None else build_model(spec["model"], (1, 28, 28), 10)
            fed_clients.append(FedClient(model, torch.utils.data.Subset(train, idx), client_id=f"client-{i}",
                                         batch_size=local.batch_size, device="cpu"))
        server = FedServer(fed_clients, "fedavg", fraction=fraction, seed=0, test_dataset=test)
        out["num_params"] = server.weights.numel()
        out["rss_after_setup"] = vm_rss_kib()
        out["setup_seconds"] = time.perf_counter() - t_start
        t0, c0 = time.perf_counter(), cpu_seconds()
        for _ in range(spec["rounds"]):
            server.train(num_epochs=local.local_epochs, lr=local.lr)
        history = server.history
    out["train_seconds"] = time.perf_counter() - t0
    out["train_cpu_seconds"] = cpu_seconds() - c0
    out["rss_end"] = vm_rss_kib()
    out["peak_rss"] = peak_rss_kib()
    out["clients_per_round"] = [row["clients_sampled"] for row in history]
    out["final_test_accuracy"] = history[-1]["test_accuracy"]
    out["samples_per_client"] = [int(min(len(s) for s in shares)), int(max(len(s) for s in shares))]
    if workdir is not None:
        workdir.cleanup()
    out["wall_seconds"] = time.perf_counter() - wall0
    out["cpu_seconds"] = cpu_seconds()  # the whole process, interpreter start and imports included
    out["loadavg_end"] = loadavg()
    return out


def run_child(spec: dict) -> dict:
    """Run one configuration in a fresh interpreter and return what it measured."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed ({proc.returncode}):\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**spec, **result}


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------

def mib(kib: int) -> float:
    return kib / 1024.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="1 round, seed-cnn (smoke run)")
    parser.add_argument("--model", default=None, help="zoo model (default mcmahan-cnn)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--seed-api", action="store_true",
                        help="also measure FedServer/FedClient with one model per client (100 and 1,000 clients) "
                             "and with one shared model (10,000 clients)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="fresh processes per runtime configuration (default 3; --quick 1)")
    parser.add_argument("--algorithm", choices=("fedavg", "scaffold"), default="fedavg",
                        help="scaffold: per-client control variates in a ClientStateStore spilled to disk, "
                             "checkpointed every round (default fedavg)")
    parser.add_argument("--state-cache", type=int, default=None,
                        help="scaffold: ClientStateStore max_cached (default: the store's own, 64)")
    parser.add_argument("--state-root", default=None,
                        help="scaffold: folder for the temporary client-state folders (default: the system temp)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.seed_api and args.algorithm != "fedavg":
        parser.error("--seed-api measures the FedServer/FedClient API with FedAvg only; leave out --algorithm")

    base = {
        "model": args.model or ("seed-cnn" if args.quick else "mcmahan-cnn"),
        "samples": 20_000, "test_samples": 2_000, "per_round": 10,
        "rounds": args.rounds or (1 if args.quick else 3), "threads": 1, "algorithm": args.algorithm,
    }
    if args.algorithm == "scaffold":
        base.update(state_cache=args.state_cache, state_root=args.state_root)
    default_name = "memory_scaling.json" if args.algorithm == "fedavg" else f"memory_scaling_{args.algorithm}.json"
    output = args.output or (None if args.quick else RESULTS / default_name)
    args.repeats = args.repeats or (1 if args.quick else 3)
    specs = [{**base, "mode": "runtime", "clients": k} for k in args.clients]
    if args.seed_api:
        specs += [{**base, "mode": "seed_api_own_models", "clients": k} for k in (100, 1_000)]
        specs += [{**base, "mode": "seed_api_shared_model", "clients": 10_000}]

    # Runtime configurations are repeated (interleaved) because the allocator makes the peak vary by
    # a few tens of MiB from run to run; each summary uses the median run (by peak RSS).
    runs: dict[tuple[str, int], list[dict]] = {}
    schedule = [s for _ in range(args.repeats) for s in specs if s["mode"] == "runtime"]
    schedule += [s for s in specs if s["mode"] != "runtime"]
    for spec in schedule:
        t0 = time.perf_counter()
        r = run_child(spec)
        r["process_wall_seconds"] = time.perf_counter() - t0
        print(f"  {r['mode']:22s} clients={r['clients']:>6}: setup {mib(r['rss_after_setup']):8.1f} MiB, "
              f"peak {mib(r['peak_rss']):8.1f} MiB ({r['process_wall_seconds']:.1f} s wall, "
              f"{r['cpu_seconds']:.1f} s CPU, load {r['loadavg_start'][0]:.2f} -> {r['loadavg_end'][0]:.2f})",
              flush=True)
        for io in r.get("client_state_io", []):
            print(f"      round {io['round']}: {io['clients_trained']} clients trained "
                  f"({io['clients_trained_before']} had state), {io['files_written']} state files written "
                  f"({io['bytes_written'] / 2**20:.1f} MiB), {io['store_cached_entries']} entries in RAM; "
                  f"written = the trained clients' files: {io['written_are_the_trained_clients']}", flush=True)
        if "state_files_end" in r:
            print(f"      end: {r['state_files_end']} state files ({r['state_folder_bytes_end'] / 2**20:.1f} MiB) "
                  f"for {r['state_clients_end']} clients with state; server checkpoint "
                  f"{r['checkpoint_bytes'] / 2**20:.1f} MiB", flush=True)
        runs.setdefault((spec["mode"], spec["clients"]), []).append(r)
    results = []
    for rs in runs.values():
        med = sorted(rs, key=lambda r: r["peak_rss"])[(len(rs) - 1) // 2]
        results.append({**med, "repeats": len(rs), "peak_rss_all": [r["peak_rss"] for r in rs],
                        "rss_after_setup_all": [r["rss_after_setup"] for r in rs]})

    print()
    print(f"{args.algorithm}, model {base['model']} ({results[0]['num_params']:,} params), "
          f"{base['samples']:,} train samples, "
          f"{base['per_round']} clients/round, {base['rounds']} rounds; RSS in MiB")
    print("median run of each configuration (by peak); min..max of peak over the repeats")
    print(f"{'mode':>22} {'clients':>7} {'import':>8} {'setup':>8} {'end':>8} {'peak':>8} "
          f"{'peak-imp':>9} {'train s':>8} {'wall s':>7} {'cpu s':>7} {'peak range':>17}")
    for r in results:
        print(f"{r['mode']:>22} {r['clients']:>7} {mib(r['rss_after_import']):>8.1f} {mib(r['rss_after_setup']):>8.1f} "
              f"{mib(r['rss_end']):>8.1f} {mib(r['peak_rss']):>8.1f} "
              f"{mib(r['peak_rss'] - r['rss_after_import']):>9.1f} {r['train_seconds']:>8.2f} "
              f"{r['process_wall_seconds']:>7.1f} {r['cpu_seconds']:>7.1f} "
              f"{mib(min(r['peak_rss_all'])):>8.1f}..{mib(max(r['peak_rss_all'])):<8.1f}")

    summary: dict = {}
    runtime = {r["clients"]: r for r in results if r["mode"] == "runtime"}
    if 100 in runtime and 10_000 in runtime:
        small, large = runtime[100], runtime[10_000]
        ratio = large["peak_rss"] / small["peak_rss"]
        summary = {
            "peak_ratio_10000_over_100": ratio,
            "peak_above_import_ratio_10000_over_100":
                (large["peak_rss"] - large["rss_after_import"]) / (small["peak_rss"] - small["rss_after_import"]),
            "setup_bytes_per_extra_client":
                (large["rss_after_setup"] - small["rss_after_setup"]) * 1024 / (large["clients"] - small["clients"]),
            "goal_max_ratio": GOAL,
            "goal_met": ratio <= GOAL,
        }
        print()
        print(f"peak RSS 10,000 / 100 clients: {ratio:.3f} (goal <= {GOAL}) -> "
              f"{'MET' if summary['goal_met'] else 'NOT MET'}; above the import baseline: "
              f"{summary['peak_above_import_ratio_10000_over_100']:.3f}; setup cost per extra client: "
              f"{summary['setup_bytes_per_extra_client']:.0f} bytes")
    io_rows = {r["clients"]: r["client_state_io"] for r in results if r.get("client_state_io")}
    if io_rows:
        summary["client_state_files_written_per_round"] = {k: [io["files_written"] for io in v]
                                                           for k, v in io_rows.items()}
        summary["client_state_clients_trained_per_round"] = {k: [io["clients_trained"] for io in v]
                                                             for k, v in io_rows.items()}
        only_touched = all(io["written_are_the_trained_clients"] for v in io_rows.values() for io in v)
        summary["checkpoint_writes_only_trained_clients"] = only_touched
        one_file_each = all(r["state_files_end"] == r["state_clients_end"] for r in results if "state_files_end" in r)
        summary["one_state_file_per_client_at_end"] = one_file_each
        for r in results:
            if "client_state_io" in r:
                v = r["client_state_io"]
                print(f"{r['clients']:>6} clients: state files written per round {[io['files_written'] for io in v]} "
                      f"for {[io['clients_trained'] for io in v]} clients trained; folder holds "
                      f"{r['state_files_end']} files for {r['state_clients_end']} clients at the end")
        print(f"every checkpoint wrote exactly the files of the clients trained that round: {only_touched}; "
              f"one file per client at the end (superseded ones pruned): {one_file_each}")
    own = {r["clients"]: r for r in results if r["mode"] == "seed_api_own_models"}
    if 100 in own and 1_000 in own:
        per_client = (own[1_000]["rss_after_setup"] - own[100]["rss_after_setup"]) * 1024 / 900
        summary["seed_api_own_models_bytes_per_client"] = per_client
        summary["seed_api_own_models_extrapolated_10000_peak_mib"] = (
            mib(own[100]["peak_rss"]) + per_client * 9_900 / 2**20)
        print(f"seed API, one model per FedClient: {per_client / 2**20:.2f} MiB per client "
              f"(model fp32 weights {results[0]['num_params'] * 4 / 2**20:.2f} MiB); 10,000 clients would peak near "
              f"{summary['seed_api_own_models_extrapolated_10000_peak_mib'] / 1024:.1f} GiB")

    if output is not None:
        doc = {
            "benchmark": "memory_scaling",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
            "machine": machine_info(),
            "units": "KiB (rss_*, peak_*); seconds (*_seconds)",
            "workload": base,
            "summary": summary,
            "results": results,
            "argv": sys.argv[1:],
        }
        write_results(output, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
