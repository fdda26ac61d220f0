"""The gRPC runtime on loopback: moving a ResNet-18 to 10 clients and back, and 50 clients held for 20 rounds.

Part 1, transfer. One round = the server sends a ResNet-18-GN task (11,173,962 float32 values,
44.7 MB encoded) to each of 10 clients and receives 10 updates of the same size: ~894 MB on
loopback. Four ways of doing the same round, interleaved with a rotating start:

  raw      plain TCP sockets: the server sendall()s the 10 pre-encoded task bodies (length-prefixed)
           and recv_into()s 10 result bodies of the same size. Nothing else: the floor.
  bare     gRPC with FedLearn's own wire messages (PollTask, DownloadTask streaming 1 MiB Chunks,
           UploadResult) carrying the same pre-encoded bytes, but no encoding, decoding, checksum
           or runtime bookkeeping: what gRPC's transport itself costs.
  runtime  the real thing: GrpcRuntime.deliver(tasks) on the server, RemoteClient on the clients (a
           ClientApp whose trainer answers at once with the task's weights as its update). Timed from
           the call to deliver() to the 10th result yielded, so it includes encoding each task, its
           SHA-256, the chunked download, the client's checksum and decode, the result's encoding
           and upload, and the server's checksum, decode and checks.
  inprocess InProcessRuntime.deliver(tasks) with the same ClientApp: messages passed by reference.

Concurrency: the 10 clients of every networked variant are 10 threads of ONE separate client
process (spawned), the server is the main process. A process per client would put 11 processes
with torch on 2 cores and make every variant a scheduling benchmark; one client process keeps the
same two-process shape for the raw, bare and runtime variants, and each side can use one core.

Part 2, concurrency. 50 RemoteClients (each with its own ClientApp from ``run.experiment.client_app``,
so its own LocalTrainer; mcmahan-2nn on digits 1x8x8, IID split by ``build_clients``) as threads of
two spawned processes (25 each; a process per client would need ~50 x 800 MB), against
``build_experiment(config, runtime=GrpcRuntime)`` and ``loop.run(20)`` in this process. Checked:
50/50 clients succeed in every round, and the final weights equal an in-process run of the same config.

    python benchmarks/grpc_transfer.py           # full run (~1.5 min) -> benchmarks/results/grpc_transfer.json
    python benchmarks/grpc_transfer.py --quick   # smoke run (2 clients x 2 reps, 10 clients x 3 rounds);
                                                 # writes nothing unless --output
Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import threading
import time
from concurrent import futures
from datetime import datetime, timezone
from pathlib import Path

import grpc
import torch
from machine import machine_info, write_results

from fedlearn.client.app import ClientApp
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalOutcome
from fedlearn.models import build_model
from fedlearn.protocol.codec import decode, encode
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import TrainResult, TrainTask
from fedlearn.protocol.params import ModelVector, ParamSpec
from fedlearn.runtime.grpc import fedlearn_pb2 as pb
from fedlearn.runtime.grpc import fedlearn_pb2_grpc as pb_grpc
from fedlearn.runtime.grpc.auth import CLIENT_ID_HEADER, claimed_identity
from fedlearn.runtime.grpc.transfer import Assembly, chunks, digest
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.strategies import ServerState, build_strategy

RESULTS = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
LEN = struct.Struct("<Q")
CHANNEL_OPTIONS = [("grpc.keepalive_time_ms", 30_000)]  # RemoteClient's own


# ============================================================================================
# Shared helpers
# ============================================================================================

class EchoTrainer:
    """Answers a TrainTask at once with the task's weights as the update: transfer cost only, no training.

    It stands in for LocalTrainer inside a ClientApp, so the answer goes through the app's real
    finish step (no transforms or sealing are requested here). The decoded task's weights are a fresh
    tensor owned by this client, so no clone is needed; in process the update is the server's weights
    tensor itself, only read.
    """

    def fit(self, task: TrainTask, data, hooks=(), state=None) -> LocalOutcome:
        return LocalOutcome({"update": task.weights}, 1, {}, {})

    def evaluate(self, task, data, state=None):  # pragma: no cover - never asked here
        raise NotImplementedError


def echo_app(ids: list[str]) -> ClientApp:
    """A ClientApp hosting ``ids`` (no data) whose trainer is the EchoTrainer."""
    return ClientApp(EchoTrainer(), {cid: ClientData([]) for cid in ids})


def proc_stat(pid: int | str = "self") -> dict:
    """CPU seconds (user+system), resident MiB, peak resident MiB and OS thread count of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return {
        "cpu_s": (int(fields[11]) + int(fields[12])) / ticks,
        "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
        "hwm_mib": int(status["VmHWM"].split()[0]) / 1024,
        "threads": int(status["Threads"]),
    }


def client_ids(n: int) -> list[str]:
    return [f"client-{i}" for i in range(n)]


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


# ============================================================================================
# Part 1 servers (this process)
# ============================================================================================

class RawServer:
    """One thread per client connection: sendall(task body), recv_into(result body)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((HOST, 0))
        self.listener.listen(n)
        self.port = self.listener.getsockname()[1]
        self.inbox: list[list] = [[] for _ in range(n)]
        self.cv = threading.Condition()
        self.round = 0
        self.done = 0
        self.bodies: list[bytes] = []
        self.received: list[int] = [0] * n
        self.threads: list[threading.Thread] = []

    def accept_all(self) -> None:
        for i in range(self.n):
            conn, _ = self.listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(i, conn), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, i: int, conn: socket.socket) -> None:
        seen = 0
        buffer = bytearray()
        head = bytearray(LEN.size)
        while True:
            with self.cv:
                while self.round == seen:
                    self.cv.wait()
                seen = self.round
                body = self.bodies[i] if self.bodies else None
            if body is None:  # finish
                conn.sendall(LEN.pack(0))
                conn.close()
                return
            conn.sendall(LEN.pack(len(body)))
            conn.sendall(body)
            recv_exact(conn, memoryview(head))
            (size,) = LEN.unpack(head)
            if len(buffer) != size:
                buffer = bytearray(size)
            recv_exact(conn, memoryview(buffer))
            with self.cv:
                self.received[i] = size
                self.done += 1
                self.cv.notify_all()

    def run_round(self, bodies: list[bytes]) -> float:
        start = time.perf_counter()
        with self.cv:
            self.bodies, self.done = bodies, 0
            self.round += 1
            self.cv.notify_all()
            while self.done < self.n:
                self.cv.wait()
        return time.perf_counter() - start

    def close(self) -> None:
        with self.cv:
            self.bodies = []
            self.round += 1
            self.cv.notify_all()
        for t in self.threads:
            t.join(timeout=10)
        self.listener.close()


class BareService(pb_grpc.FedLearnServicer):
    """FedLearn's RPCs moving pre-encoded bytes: no encode/decode, no SHA-256, no runtime bookkeeping."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.cv = threading.Condition()
        self.round = 0
        self.finished = False
        self.seen: dict[str, int] = {}
        self.bodies: dict[str, tuple[bytes, bytes]] = {}  # client -> (body, sha256 sent as an opaque field)
        self.done = 0
        self.received: dict[str, int] = {}

    def Join(self, request, context):  # noqa: N802
        return pb.JoinReply(run_id="bare")

    def PollTask(self, request, context):  # noqa: N802
        cid = claimed_identity(context)
        deadline = time.monotonic() + request.wait_seconds
        with self.cv:
            while True:
                if self.finished:
                    return pb.TaskInfo(finished=True)
                if self.round > self.seen.get(cid, 0) and cid in self.bodies:
                    self.seen[cid] = self.round
                    body, sha = self.bodies[cid]
                    return pb.TaskInfo(has_task=True, task_id=f"{self.round}-{cid}", kind="train", round=self.round,
                                       size=len(body), sha256=sha)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return pb.TaskInfo()
                self.cv.wait(remaining)

    def DownloadTask(self, request, context):  # noqa: N802
        cid = claimed_identity(context)
        body, sha = self.bodies[cid]
        yield from chunks(body, request.task_id, request.offset, sha)

    def UploadResult(self, request_iterator, context):  # noqa: N802
        cid = claimed_identity(context)
        buffer = bytearray()
        for chunk in request_iterator:
            buffer += chunk.data
        with self.cv:
            self.received[cid] = len(buffer)
            self.done += 1
            self.cv.notify_all()
        return pb.UploadReply(received=len(buffer), complete=True)

    def run_round(self, bodies: dict[str, bytes], sha: bytes) -> float:
        start = time.perf_counter()
        with self.cv:
            self.bodies = {cid: (b, sha) for cid, b in bodies.items()}
            self.done = 0
            self.round += 1
            self.cv.notify_all()
            while self.done < self.n:
                self.cv.wait()
        return time.perf_counter() - start

    def finish(self) -> None:
        with self.cv:
            self.finished = True
            self.cv.notify_all()


def grpc_server(servicer) -> tuple[grpc.Server, int]:
    """Same pool and options as fedlearn.runtime.grpc.server.start_server."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=256), options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_FedLearnServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    return server, port


# ============================================================================================
# Part 1 client process (spawned): 10 raw socket clients, 10 bare gRPC clients, 10 RemoteClients
# ============================================================================================

def transfer_worker(conn, ids: list[str], numel: int, raw_port: int, bare_port: int, runtime_port: int) -> None:
    from fedlearn.runtime.grpc.client import RemoteClient

    torch.set_num_threads(1)
    result_bodies = {cid: encode(TrainResult(1, cid, 1, {"update": torch.zeros(numel)}, {})) for cid in ids}
    errors: list[str] = []
    stop = threading.Event()

    def guarded(fn, *a):
        try:
            fn(*a)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            errors.append(f"{fn.__name__}: {type(exc).__name__}: {exc}")

    def raw_client(cid: str) -> None:
        sock = socket.create_connection((HOST, raw_port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = bytearray(LEN.size)
        buffer = bytearray()
        out = result_bodies[cid]
        while True:
            recv_exact(sock, memoryview(head))
            (size,) = LEN.unpack(head)
            if size == 0:
                sock.close()
                return
            if len(buffer) != size:
                buffer = bytearray(size)
            recv_exact(sock, memoryview(buffer))
            sock.sendall(LEN.pack(len(out)))
            sock.sendall(out)

    def bare_client(cid: str) -> None:
        channel = grpc.insecure_channel(f"{HOST}:{bare_port}", CHANNEL_OPTIONS)
        stub = pb_grpc.FedLearnStub(channel)
        md = [(CLIENT_ID_HEADER, cid)]
        out = result_bodies[cid]
        sha = digest(out)  # sent as an opaque field; nobody checks it
        while not stop.is_set():
            info = stub.PollTask(pb.PollRequest(wait_seconds=10.0), metadata=md, timeout=60)
            if info.finished:
                break
            if not info.has_task:
                continue
            buffer = bytearray()
            for chunk in stub.DownloadTask(pb.DownloadRequest(task_id=info.task_id), metadata=md, timeout=120):
                buffer.extend(chunk.data)
            assert len(buffer) == info.size
            stub.UploadResult(chunks(out, info.task_id, 0, sha), metadata=md, timeout=120)
        channel.close()

    def remote_client(cid: str) -> None:
        client = RemoteClient(f"{HOST}:{runtime_port}", cid, echo_app([cid]), poll_seconds=10.0,
                              give_up_after=60.0, stop=stop)
        try:
            client.run()
        finally:
            client.close()

    threads = [threading.Thread(target=guarded, args=(fn, cid), daemon=True)
               for fn in (raw_client, bare_client, remote_client) for cid in ids]
    for t in threads:
        t.start()
    conn.send("ready")
    conn.recv()  # "stop": the parent has finished every server
    for t in threads:
        t.join(timeout=15)
    conn.send({"errors": errors, "alive": sum(t.is_alive() for t in threads), **proc_stat()})


# ============================================================================================
# Part 1 driver
# ============================================================================================

def codec_costs(task: TrainTask, reps: int) -> dict:
    """Single-thread CPU cost of each byte-level step the runtime does per 44.7 MB message (median, s)."""
    result = TrainResult(task.round, task.client_id, 1, {"update": task.weights.clone()}, {})
    body = encode(task)
    rbody = encode(result)
    steps = {
        "encode_task": lambda: encode(task),
        "sha256": lambda: digest(body),
        "decode_task": lambda: decode(body),
        "encode_result": lambda: encode(result),
        "decode_result": lambda: decode(rbody),
        "bytes_copy": lambda: bytes(bytearray(body)),  # one memcpy-ish copy of the body (two here: /2 below)
        "chunks_1MiB": lambda: sum(1 for _ in chunks(body, "t", 0, b"x" * 32)),
        "assembly": lambda: _assemble(body),
    }
    out = {}
    for name, fn in steps.items():
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    out["bytes_copy"] /= 2
    return out


def _assemble(body: bytes) -> None:
    a = Assembly(len(body), digest(body))
    for c in chunks(body, "t", 0, a.checksum):
        a.add(c)
    a.body()  # bytes(buffer) + SHA-256


def transfer_part(n_clients: int, reps: int, warmup: int) -> dict:
    from fedlearn.runtime.grpc.server import GrpcRuntime, start_server

    torch.manual_seed(0)
    model = build_model("resnet18-gn", (3, 32, 32), 10)
    spec = ParamSpec.from_module(model)
    weights = ModelVector(model).read()
    ids = client_ids(n_clients)
    strategy = build_strategy("fedavg", LocalConfig())
    state = ServerState(weights)
    probe = strategy.configure_train(1, state, ids[:1], 0)[0]
    task_bytes = len(encode(probe))
    result_bytes = len(encode(TrainResult(1, ids[0], 1, {"update": weights}, {})))
    print(f"ResNet-18-GN: {spec.numel:,} parameters; task {task_bytes:,} B, result {result_bytes:,} B; "
          f"{n_clients} clients -> {(task_bytes + result_bytes) * n_clients / 1e6:.0f} MB a round", flush=True)

    raw = RawServer(n_clients)
    bare = BareService(n_clients)
    bare_server, bare_port = grpc_server(bare)
    runtime = GrpcRuntime(spec, round_timeout=300.0)
    rt_server, rt_port = start_server(runtime, f"{HOST}:0")

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    worker = ctx.Process(target=transfer_worker, daemon=True,
                         args=(child, ids, spec.numel, raw.port, bare_port, rt_port))
    worker.start()
    raw.accept_all()
    assert parent.recv() == "ready"
    runtime.wait_for_clients(n_clients, poll=0.2)

    inproc = InProcessRuntime(echo_app(ids))
    rnd = [0]

    def tasks() -> list[TrainTask]:
        rnd[0] += 1
        return strategy.configure_train(rnd[0], state, ids, 0)

    def run_raw() -> float:
        bodies = [encode(t) for t in tasks()]  # the same bytes the runtime sends; encoded outside the timing
        elapsed = raw.run_round(bodies)
        assert all(r == result_bytes for r in raw.received), raw.received
        return elapsed

    def run_bare() -> float:
        ts = tasks()
        bodies = {t.client_id: encode(t) for t in ts}
        elapsed = bare.run_round(bodies, digest(bodies[ids[0]]))
        assert all(bare.received[cid] == result_bytes for cid in ids)
        return elapsed

    def run_runtime() -> float:
        ts = tasks()
        start = time.perf_counter()
        results = list(runtime.deliver(ts))
        elapsed = time.perf_counter() - start
        assert all(isinstance(r, TrainResult) and r.arrays["update"].numel() == spec.numel
                   for r in results), results[:1]
        return elapsed

    def run_inprocess() -> float:
        ts = tasks()
        start = time.perf_counter()
        results = list(inproc.deliver(ts))
        elapsed = time.perf_counter() - start
        assert len(results) == n_clients and all(isinstance(r, TrainResult) for r in results), results[:1]
        return elapsed

    variants = {"raw": run_raw, "bare": run_bare, "runtime": run_runtime, "inprocess": run_inprocess}
    names = list(variants)
    samples: dict[str, dict[str, list[float]]] = {n: {"wall": [], "server_cpu": [], "client_cpu": []} for n in names}
    for rep in range(warmup + reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            s0, c0 = proc_stat()["cpu_s"], proc_stat(worker.pid)["cpu_s"]
            wall = variants[name]()
            s1, c1 = proc_stat()["cpu_s"], proc_stat(worker.pid)["cpu_s"]
            if rep >= warmup:
                samples[name]["wall"].append(wall)
                samples[name]["server_cpu"].append(s1 - s0)
                samples[name]["client_cpu"].append(c1 - c0)
        tag = "warm-up" if rep < warmup else f"rep {rep - warmup + 1}/{reps}"
        print(f"  {tag}: " + ", ".join(f"{n} {samples[n]['wall'][-1]:.3f} s" if rep >= warmup else n for n in names),
              flush=True)

    server_stat = proc_stat()
    runtime.finish()
    bare.finish()
    raw.close()
    time.sleep(0.3)
    parent.send("stop")
    client_report = parent.recv()
    worker.join(timeout=30)
    bare_server.stop(0)
    rt_server.stop(0)
    if client_report["errors"]:
        raise RuntimeError(f"client process errors: {client_report['errors']}")

    codec = codec_costs(probe, reps=3)
    summary = {}
    for name in names:
        s = samples[name]
        summary[name] = {
            "wall_median_s": statistics.median(s["wall"]),
            "wall_min_s": min(s["wall"]),
            "wall_max_s": max(s["wall"]),
            "server_cpu_median_s": statistics.median(s["server_cpu"]),
            "client_cpu_median_s": statistics.median(s["client_cpu"]),
            "throughput_MB_s": (task_bytes + result_bytes) * n_clients / 1e6 / statistics.median(s["wall"]),
            "samples": s,
        }
    raw_med = summary["raw"]["wall_median_s"]
    for name in names:
        summary[name]["ratio_to_raw"] = summary[name]["wall_median_s"] / raw_med
        pairs = [w / r for w, r in zip(samples[name]["wall"], samples["raw"]["wall"])]
        summary[name]["ratio_to_raw_paired_median"] = statistics.median(pairs)
    summary["runtime"]["ratio_to_bare"] = summary["runtime"]["wall_median_s"] / summary["bare"]["wall_median_s"]
    # CPU the runtime's byte handling needs per round, from the single-thread step costs:
    # server: encode + SHA-256 of each task, then each result's assembly copy, SHA-256 and decode;
    # client: download copy (bytes(buffer)), SHA-256, decode of the task, encode + SHA-256 of the result.
    n = n_clients
    codec_server = n * (codec["encode_task"] + codec["sha256"] + codec["bytes_copy"] + codec["sha256"]
                        + codec["decode_result"])
    codec_client = n * (codec["bytes_copy"] + codec["sha256"] + codec["decode_task"] + codec["encode_result"]
                        + codec["sha256"])
    return {
        "model": "resnet18-gn", "input_shape": [3, 32, 32], "num_classes": 10, "parameters": spec.numel,
        "clients": n_clients, "task_bytes": task_bytes, "result_bytes": result_bytes,
        "bytes_per_round": (task_bytes + result_bytes) * n_clients,
        "reps": reps, "warmup": warmup,
        "client_layout": f"{n_clients} threads in one spawned client process; server in the main process",
        "variants": summary,
        "codec_step_costs_s": codec,
        "codec_cpu_per_round_s": {"server": codec_server, "client": codec_client},
        "server_process_end": server_stat,
        "client_process_end": {k: v for k, v in client_report.items() if k != "errors"},
    }


# ============================================================================================
# Part 2: 50 clients held through 20 rounds
# ============================================================================================

def concurrency_config(clients: int, rounds: int):
    from fedlearn.run.config import RunConfig

    return RunConfig(
        dataset="digits", model="mcmahan-2nn", algorithm="fedavg", clients=clients, partition="iid", fraction=1.0,
        min_clients=clients, min_fit_fraction=1.0, round_timeout=120.0, rounds=rounds, local_epochs=1,
        batch_size=10, lr=0.05, seed=0, threads=1, evaluation="centralized", device="cpu", download=False,
    )


def concurrency_worker(conn, config, indices: list[int], target: str) -> None:
    from fedlearn.data import load_dataset
    from fedlearn.run.experiment import build_clients, client_app, initial_model
    from fedlearn.runtime.grpc.client import RemoteClient

    torch.set_num_threads(1)
    bundle = load_dataset(config.dataset, config.data_dir, download=config.download)
    clients, _ = build_clients(config, bundle)
    items = list(clients.items())
    done: dict[str, int] = {}
    errors: list[str] = []

    def one(cid: str, data: ClientData) -> None:
        # Its own ClientApp, so its own model: the threads train at once. As `fedlearn client` builds it.
        app = client_app(config, initial_model(config, bundle), {cid: data}, config.task_name or bundle.task)
        client = RemoteClient(target, cid, app, poll_seconds=10.0, give_up_after=120.0)
        try:
            done[cid] = client.run()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            errors.append(f"{cid}: {type(exc).__name__}: {exc}")
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=items[i], daemon=True) for i in indices]
    for t in threads:
        t.start()
    conn.send("started")
    peak_threads = 0
    while any(t.is_alive() for t in threads):
        peak_threads = max(peak_threads, proc_stat()["threads"])
        time.sleep(0.5)
    conn.send({"tasks_done": done, "errors": errors, "peak_os_threads": peak_threads, **proc_stat()})


def concurrency_part(clients: int, rounds: int, helpers: int) -> dict:
    from fedlearn.run.experiment import build_experiment
    from fedlearn.runtime.grpc.server import GrpcRuntime, start_server

    config = concurrency_config(clients, rounds)
    holder: dict = {}

    def factory(cfg, spec):
        holder["runtime"] = GrpcRuntime(spec, round_timeout=cfg.round_timeout, total_rounds=cfg.rounds)
        return holder["runtime"]

    server_samples: list[dict] = []
    experiment = build_experiment(config, runtime=factory, callbacks=[lambda row: server_samples.append(proc_stat())])
    runtime = holder["runtime"]
    server, port = start_server(runtime, f"{HOST}:0")
    before = proc_stat()
    ctx = mp.get_context("spawn")
    workers = []
    for h in range(helpers):
        parent, child = ctx.Pipe()
        indices = list(range(h, clients, helpers))
        p = ctx.Process(target=concurrency_worker, args=(child, config, indices, f"{HOST}:{port}"), daemon=True)
        p.start()
        workers.append((p, parent))
    for _, parent in workers:
        assert parent.recv() == "started"
    t_join = time.perf_counter()
    runtime.wait_for_clients(clients, poll=0.2)
    join_s = time.perf_counter() - t_join
    print(f"  {clients} clients joined in {join_s:.1f} s (after the helpers loaded data and models)", flush=True)
    start = time.perf_counter()
    history = experiment.loop.run(rounds)
    wall = time.perf_counter() - start
    during = proc_stat()
    runtime.finish()
    reports = [parent.recv() for _, parent in workers]
    for p, _ in workers:
        p.join(timeout=30)
    server.stop(grace=1).wait()
    errors = [e for r in reports for e in r["errors"]]
    tasks_done = {cid: n for r in reports for cid, n in r["tasks_done"].items()}

    # Reference: the same config simulated in-process; gRPC must give the same weights.
    ref = build_experiment(config)
    t0 = time.perf_counter()
    ref_history = ref.loop.run(rounds)
    ref_wall = time.perf_counter() - t0
    max_diff = float((experiment.loop.weights - ref.loop.weights).abs().max())

    per_round = [{"round": r["round"], "clients_succeeded": r["clients_succeeded"], "failed": r["failed_clients"],
                  "aggregated": r["aggregated"], "seconds": r["seconds"], "test_accuracy": r["test_accuracy"],
                  "server_os_threads": s["threads"], "server_rss_mib": s["rss_mib"]}
                 for r, s in zip(history, server_samples)]
    failed_rounds = [r["round"] for r in history if r["clients_succeeded"] < clients or not r["aggregated"]]
    return {
        "config": config.to_dict(),
        "client_layout": f"{clients} RemoteClient threads in {helpers} spawned processes, each with its own "
                         "LocalTrainer; server (build_experiment + GrpcRuntime + RoundLoop) in the main process",
        "rounds_completed": len(history),
        "failed_rounds": failed_rounds,
        "min_clients_succeeded": min(r["clients_succeeded"] for r in history),
        "client_errors": errors,
        "tasks_done_per_client": sorted(set(tasks_done.values())),
        "clients_reporting": len(tasks_done),
        "join_s": join_s,
        "wall_s": wall,
        "round_seconds_median": statistics.median(r["seconds"] for r in history),
        "round_seconds_max": max(r["seconds"] for r in history),
        "final_accuracy": history[-1]["test_accuracy"],
        "inprocess_final_accuracy": ref_history[-1]["test_accuracy"],
        "inprocess_wall_s": ref_wall,
        "inprocess_round_seconds_median": statistics.median(r["seconds"] for r in ref_history),
        "max_abs_weight_diff_vs_inprocess": max_diff,
        "server_before_clients": before,
        "server_end": during,
        "server_peak_os_threads": max(s["threads"] for s in server_samples),
        "client_processes_end": [{k: v for k, v in r.items() if k not in ("tasks_done", "errors")} for r in reports],
        "per_round": per_round,
    }


# ============================================================================================

def malloc_env() -> dict[str, str]:
    """glibc malloc settings from the environment (they change this benchmark's copies a lot)."""
    return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 clients x 2 reps; 10 clients x 3 rounds")
    parser.add_argument("--reps", type=int, default=None, help="timed transfer rounds per variant (default 7)")
    parser.add_argument("--transfer-clients", type=int, default=None)
    parser.add_argument("--clients", type=int, default=None, help="concurrency part: clients (default 50)")
    parser.add_argument("--rounds", type=int, default=None, help="concurrency part: rounds (default 20)")
    parser.add_argument("--skip-transfer", action="store_true")
    parser.add_argument("--skip-concurrency", action="store_true")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file (default benchmarks/results/grpc_transfer.json; none for --quick)")
    args = parser.parse_args(argv)
    reps = args.reps or (2 if args.quick else 7)
    n_transfer = args.transfer_clients or (2 if args.quick else 10)
    clients = args.clients or (10 if args.quick else 50)
    rounds = args.rounds or (3 if args.quick else 20)
    default = None if args.quick else RESULTS / "grpc_transfer.json"
    output = args.output or default

    doc: dict = {"benchmark": "grpc_transfer", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": machine_info(grpcio=grpc.__version__, malloc_env=malloc_env()), "argv": sys.argv[1:]}
    started = time.perf_counter()
    if not args.skip_transfer:
        print(f"Part 1: transfer, {n_transfer} clients, {reps} timed reps (+1 warm-up), interleaved", flush=True)
        t = doc["transfer"] = transfer_part(n_transfer, reps, warmup=1)
        print(f"\n{'variant':<10} {'median ms':>10} {'min ms':>9} {'MB/s':>7} {'x raw':>6} {'server cpu':>10} "
              f"{'client cpu':>10}")
        for name, v in t["variants"].items():
            print(f"{name:<10} {v['wall_median_s'] * 1e3:10.3f} {v['wall_min_s'] * 1e3:9.3f} "
                  f"{v['throughput_MB_s']:7.0f} "
                  f"{v['ratio_to_raw']:6.2f} {v['server_cpu_median_s']:10.2f} {v['client_cpu_median_s']:10.2f}")
        c = t["codec_step_costs_s"]
        print("codec steps (s per 44.7 MB message): " + ", ".join(f"{k} {v:.4f}" for k, v in c.items()))
        print(f"codec CPU per round: server {t['codec_cpu_per_round_s']['server']:.2f} s, "
              f"client {t['codec_cpu_per_round_s']['client']:.2f} s")
        ratio = t["variants"]["runtime"]["ratio_to_raw"]
        print(f"gRPC transport alone (bare) / raw: {t['variants']['bare']['ratio_to_raw']:.2f}x; "
              f"runtime / bare: {t['variants']['runtime']['ratio_to_bare']:.2f}x")
        doc["goal_transfer"] = {"goal": "runtime wall <= 1.5x raw socket copy", "ratio": ratio, "met": ratio <= 1.5}
        print(f"goal gRPC runtime <= 1.5x raw socket: {ratio:.2f}x -> {'met' if ratio <= 1.5 else 'NOT met'}\n",
              flush=True)
    if not args.skip_concurrency:
        print(f"Part 2: {clients} clients through {rounds} rounds", flush=True)
        c = doc["concurrency"] = concurrency_part(clients, rounds, helpers=2)
        for r in c["per_round"]:
            print(f"  round {r['round']:2d}: {r['clients_succeeded']}/{clients} ok, {r['seconds']:.3f} s, "
                  f"acc {r['test_accuracy']:.4f}, server {r['server_os_threads']} threads "
                  f"{r['server_rss_mib']:.0f} MiB", flush=True)
        met = c["rounds_completed"] == rounds and not c["failed_rounds"] and not c["client_errors"]
        doc["goal_concurrency"] = {"goal": f"{clients} clients through {rounds} rounds, no failed round",
                                   "rounds_completed": c["rounds_completed"], "failed_rounds": c["failed_rounds"],
                                   "met": met}
        print(f"rounds {c['rounds_completed']}, failed rounds {c['failed_rounds']}, client errors "
              f"{len(c['client_errors'])}, round median {c['round_seconds_median']:.3f} s, "
              f"final accuracy {c['final_accuracy']:.4f} (in-process {c['inprocess_final_accuracy']:.4f}, max |dw| "
              f"{c['max_abs_weight_diff_vs_inprocess']:.2e}) -> {'met' if met else 'NOT met'}; in-process round "
              f"median {c['inprocess_round_seconds_median']:.3f} s", flush=True)
    doc["total_s"] = time.perf_counter() - started
    print(f"total {doc['total_s']:.0f} s")
    if output is not None:
        write_results(output, doc)
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
