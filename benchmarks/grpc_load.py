"""A `fedlearn server` under 500 hostile connections while 3 honest clients train: do honest Joins and rounds slow down?

Workload. A real ``fedlearn server --tokens`` process on 127.0.0.1 and 3 real ``fedlearn client`` processes
(digits, seed-cnn, IID, 4 local epochs, batch 10, lr 0.1, centralized evaluation, 1 thread) run one federation.
After a warm-up round it goes through phases of ``--phase-rounds`` rounds, switched at round boundaries, so all
conditions are measured side by side in the same run, each loaded phase between two unloaded ones:

    U L U C U L U C ... U       (U unloaded, L loaded, C the CPU control; --cycles L phases)

Load (L). A separate process (this file with ``--role load``: grpc.aio, no torch) opens ``--connections``
connections when a loaded phase starts and closes them all when it ends. Every connection is its own TCP
connection (a local subchannel pool), lives at most until the phase's time limit, and each call has a deadline:

  poll         PollTask(wait_seconds=30) as a fake id (every fifth: an honest client's id), no token or a made-up one
  join         a Join flood: fake ids with made-up tokens, one call every ``--join-pace`` seconds per connection
  idle_upload  UploadResult streams that never send a chunk
  trickle      UploadResult streams sending one 1-byte chunk a second
  h2_idle      gRPC connections that finish the HTTP/2 handshake and then send nothing
  tcp_silent   plain TCP connections that never send a byte

A connection whose call ended waits ``--pace`` seconds and calls again (each connection is one attacker retrying),
so the load is 500 concurrent connections at a bounded rate (~600 calls/s with the defaults); smaller paces flood.

CPU control (C). Two processes (``--role burn``) burn as many CPU-seconds per second as the previous loaded phase
added to the machine (the load process's CPU plus the server's beyond its unloaded phase) and talk to nobody: what
the load costs through sharing these cores alone, without a single connection.

Measured per condition (a sample counts only if it lies wholly inside a phase's window: a loaded window runs from
"every connection made its first call" to the phase's last round, an unloaded one from "every load connection
closed" to the next switch): an honest Join's latency (a raw stub Join as client-0, with its real token and the
counts it declares, every ``--probe-every`` seconds, alternately on a kept channel and on a fresh one), the
per-round seconds from the server's metrics.jsonl (median; round 1 is a warm-up), and CPU-seconds from
/proc/<pid>/stat of the server, the honest clients and the load per second of window. Ratios are loaded /
unloaded: of the pooled medians, and paired (each loaded phase over the mean of its two unloaded neighbours).
Goal (issue 11): <= 2x for the honest Join and the round.

    python benchmarks/grpc_load.py           # full run (~2.5 min) -> benchmarks/results/grpc_load.json
    python benchmarks/grpc_load.py --quick   # smoke run (50 connections, U and L of 2 rounds, ~30 s); writes
                                             # nothing unless --output
Only 127.0.0.1 is used; every process is stopped by its pid at the end, on error too.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import grpc

from fedlearn.runtime.grpc import fedlearn_pb2 as pb
from fedlearn.runtime.grpc import fedlearn_pb2_grpc as pb_grpc
from fedlearn.runtime.grpc.auth import CLIENT_ID_HEADER, FORMAT_HEADER

RESULTS = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"
FEDLEARN = [sys.executable, "-m", "fedlearn.cli"]
MIX = (("poll", 0.30), ("join", 0.20), ("idle_upload", 0.20), ("trickle", 0.10), ("h2_idle", 0.10),
       ("tcp_silent", 0.10))
HONEST = 3
BURNERS = 2  # processes of the CPU control (a loaded phase adds CPU in two processes: the server and the load)
PROBE_ID = "client-0"  # the honest Join probe acts as this client: its own token, the counts it declares


def proc_cpu(pid: int) -> float:
    """User + system CPU-seconds of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict:
    """Resident MiB, OS threads and open file descriptors (sockets included) of a process."""
    status = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


# ============================================================================================
# The load process (--role load): grpc.aio, commands on stdin, one JSON line per event on stdout
# ============================================================================================

def connection_kinds(n: int) -> list[str]:
    """``n`` connection kinds in MIX's proportions (largest remainders get the leftovers)."""
    counts = {kind: int(n * share) for kind, share in MIX}
    for kind, _ in sorted(MIX, key=lambda m: (n * m[1]) % 1, reverse=True)[: n - sum(counts.values())]:
        counts[kind] += 1
    return [kind for kind, _ in MIX for _ in range(counts[kind])]


class PhaseStats:
    """What the load saw in one phase: calls and their status codes per kind, refusal latencies, connections."""

    def __init__(self) -> None:
        self.calls: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.closed_by_server = collections.Counter()
        self.first_done = 0

    def record(self, kind: str, code: str, seconds: float) -> None:
        self.calls[kind][code] += 1
        if len(self.latency[kind]) < 200_000:
            self.latency[kind].append(seconds)

    def summary(self, wall: float) -> dict:
        """Per kind and in all; ``calls`` counts every RPC that ended and every connect of the silent kinds."""
        kinds = {}
        total = 0
        for kind, codes in self.calls.items():
            n = sum(codes.values())
            total += n
            lat = self.latency[kind]
            kinds[kind] = {"calls": n, "codes": dict(codes), "median_ms": 1e3 * statistics.median(lat) if lat else None,
                           "p95_ms": 1e3 * quantile(lat, 0.95) if lat else None}
        return {"wall_s": wall, "calls": total, "calls_per_s": total / wall if wall else None, "kinds": kinds,
                "closed_by_server": dict(self.closed_by_server)}


class LoadPhase:
    """One loaded phase: ``n`` connections of MIX's kinds until ``stop`` is set or ``limit`` seconds pass."""

    def __init__(self, target: str, n: int, pace: float, join_pace: float, limit: float) -> None:
        self.target, self.n, self.pace, self.join_pace, self.limit = target, n, pace, join_pace, limit
        self.stats = PhaseStats()
        self.stop = asyncio.Event()
        self.ramped = asyncio.Event()
        self.deadline = 0.0
        self.channels: list[grpc.aio.Channel] = []
        self.writers: list[asyncio.StreamWriter] = []

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def _first(self) -> None:
        self.stats.first_done += 1
        if self.stats.first_done >= self.n:
            self.ramped.set()

    def _channel(self) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1),
                                                                  ("grpc.enable_retries", 0)])
        self.channels.append(channel)
        return channel

    async def _pause(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=max(seconds, 0.0) or 0.0001)
        except TimeoutError:
            pass

    async def _until_stop(self, awaitable):
        """``awaitable``'s result, or None when the phase ends first (it is then cancelled)."""
        work = asyncio.ensure_future(awaitable)
        stopper = asyncio.ensure_future(self.stop.wait())
        done, _ = await asyncio.wait({work, stopper}, timeout=max(self.left(), 0.01),
                                     return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if work in done:
            return work.result()
        work.cancel()
        return None

    async def _calls(self, kind: str, i: int, make_call) -> None:
        """Call ``make_call()`` (an awaitable), record its status, pause, repeat until the phase ends."""
        first = True
        while not self.stop.is_set() and self.left() > 0:
            start = time.monotonic()
            try:
                await make_call()
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            self.stats.record(kind, code, time.monotonic() - start)
            if first:
                first = False
                self._first()
            await self._pause(self.join_pace if kind == "join" else self.pace)

    async def worker(self, kind: str, i: int) -> None:
        rng = random.Random(i)
        fake_id = f"client-{rng.randrange(HONEST)}" if i % 5 == 0 else f"intruder-{i}"  # some claim an honest id
        token = [] if i % 2 == 0 else [("authorization", f"Bearer {secrets.token_urlsafe(32)}")]
        metadata = [(CLIENT_ID_HEADER, fake_id), (FORMAT_HEADER, "2"), *token]
        if kind == "tcp_silent":
            await self._silent_tcp()
            return
        channel = self._channel()
        stub = pb_grpc.FedLearnStub(channel)
        if kind == "h2_idle":
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout=max(self.left(), 0.1))
            except TimeoutError:
                self.stats.record(kind, "NOT_READY", 0.0)
            else:
                self.stats.record(kind, "READY", 0.0)
            self._first()
            await self._pause(self.left())
            return
        if kind == "poll":
            def call():
                return stub.PollTask(pb.PollRequest(wait_seconds=30.0), metadata=metadata,
                                     timeout=min(35.0, max(self.left(), 0.1)))
        elif kind == "join":
            def call():
                return stub.Join(pb.JoinRequest(client_id=f"intruder-{i}-{rng.randrange(1 << 30)}", train_examples=100,
                                                test_examples=0),
                                 metadata=[(CLIENT_ID_HEADER, f"intruder-{i}"), (FORMAT_HEADER, "2"),
                                           ("authorization", f"Bearer {secrets.token_urlsafe(32)}")],
                                 timeout=min(10.0, max(self.left(), 0.1)))
        else:
            trickle = kind == "trickle"

            async def chunks():
                if not trickle:
                    await self._pause(self.left())  # an idle stream: opened, never a byte
                    return
                for k in range(10_000):
                    if self.stop.is_set() or self.left() <= 0:
                        return
                    yield pb.Chunk(transfer_id=f"1-train-{fake_id}-{i:012d}", offset=k, data=b"x",
                                   total_size=1 << 20, sha256=bytes(32))
                    await self._pause(1.0)

            def call():
                return stub.UploadResult(chunks(), metadata=metadata, timeout=max(self.left(), 0.1))
        await self._calls(kind, i, call)

    async def _silent_tcp(self) -> None:
        first = True
        while not self.stop.is_set() and self.left() > 0:
            start = time.monotonic()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.port), timeout=10)
            except (OSError, TimeoutError):
                self.stats.record("tcp_silent", "CONNECT_FAILED", time.monotonic() - start)
                await self._pause(self.pace)
                continue
            self.writers.append(writer)
            self.stats.record("tcp_silent", "CONNECTED", time.monotonic() - start)
            if first:
                first = False
                self._first()
            try:  # wait for the phase's end, or for the server to close the socket
                data = b"-"
                while data and not self.stop.is_set() and self.left() > 0:  # the server may send its settings
                    data = await self._until_stop(reader.read(1 << 16))
                if data == b"":
                    self.stats.closed_by_server["tcp_silent"] += 1
            except OSError:
                pass
            writer.close()
            await self._pause(self.pace)

    @property
    def port(self) -> int:
        return int(self.target.rsplit(":", 1)[1])

    async def run(self, out) -> None:
        self.deadline = time.monotonic() + self.limit
        cpu0, start = time.process_time(), time.monotonic()
        tasks = [asyncio.create_task(self.worker(kind, i)) for i, kind in enumerate(connection_kinds(self.n))]
        try:
            await asyncio.wait_for(self.ramped.wait(), timeout=min(60.0, self.limit))
        except TimeoutError:
            pass
        emit(out, {"event": "ramped", "first_done": self.stats.first_done, "of": self.n,
                   "ramp_s": time.monotonic() - start})
        try:
            await asyncio.wait_for(self.stop.wait(), timeout=max(self.left(), 0.01))
        except TimeoutError:
            pass
        self.stop.set()
        wall = time.monotonic() - start
        try:
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=5)
        except TimeoutError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        errors = [repr(r) for r in (t.exception() for t in tasks if t.done() and not t.cancelled()) if r is not None]
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*(c.close() for c in self.channels), return_exceptions=True)
        emit(out, {"event": "stopped", **self.stats.summary(wall), "worker_errors": errors[:5],
                   "n_worker_errors": len(errors), "load_cpu_s": time.process_time() - cpu0,
                   "close_s": time.monotonic() - start - wall})


def emit(out, doc: dict) -> None:
    out.write(json.dumps(doc) + "\n")
    out.flush()


def burn_main(duty: float, limit: float) -> int:
    """The CPU control (--role burn): burn ``duty`` CPU-seconds per second of wall time (catching up when the
    scheduler held this process back), talk to nobody, stop after ``limit`` seconds or when killed."""
    print("ready", flush=True)
    cpu0, start = time.process_time(), time.monotonic()
    while time.monotonic() - start < limit:
        if time.process_time() - cpu0 < duty * (time.monotonic() - start):
            until = time.process_time() + 0.001
            while time.process_time() < until:
                pass
        else:
            time.sleep(0.001)
    return 0


def load_main(args: argparse.Namespace) -> int:
    """Serve commands from stdin: ``start`` opens a loaded phase, ``stop`` ends it, ``quit`` (or EOF) exits. A
    phase also ends after ``--phase-limit`` seconds."""
    async def serve() -> None:
        loop = asyncio.get_running_loop()
        commands: asyncio.Queue[str] = asyncio.Queue()

        def read_stdin() -> None:
            for line in sys.stdin:
                loop.call_soon_threadsafe(commands.put_nowait, line.strip())
            loop.call_soon_threadsafe(commands.put_nowait, "quit")

        threading.Thread(target=read_stdin, daemon=True).start()
        phase_task = phase = None
        while True:
            command = await commands.get()
            if command == "start" and phase_task is None:
                phase = LoadPhase(args.target, args.connections, args.pace, args.join_pace, args.phase_limit)
                phase_task = asyncio.create_task(phase.run(sys.stdout))
            elif command in ("stop", "quit") and phase_task is not None:
                phase.stop.set()
                await phase_task
                phase_task = phase = None
            if command == "quit":
                return

    asyncio.run(serve())
    return 0


# ============================================================================================
# The orchestrator: server, honest clients, load process, Join probe, phase schedule
# ============================================================================================

class Procs:
    """Child processes with their logs in files; ``stop_all`` ends each by its pid (TERM, then KILL)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], **kwargs) -> subprocess.Popen:
        """Start ``cmd`` in the folder; its stderr (and stdout, unless ``stdout`` is given) go to NAME.log."""
        log = open(self.folder / f"{name}.log", "ab")
        kwargs.setdefault("stdout", log)
        proc = subprocess.Popen(cmd, stderr=log, cwd=self.folder, **kwargs)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


class RoundWatcher(threading.Thread):
    """Reads the server's metrics.jsonl every 50 ms; each row gets the monotonic time it was first seen."""

    def __init__(self, path: Path, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.path, self.stop = path, stop
        self.rows: list[dict] = []
        self.cv = threading.Condition()

    def run(self) -> None:
        offset, partial = 0, b""
        while not self.stop.is_set():
            if self.path.exists():
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
                offset += len(data)
                lines = (partial + data).split(b"\n")
                partial = lines.pop()
                now = time.monotonic()
                with self.cv:
                    for line in lines:
                        if line.strip():
                            row = json.loads(line)
                            row["seen"] = now
                            self.rows.append(row)
                    if lines:
                        self.cv.notify_all()
            self.stop.wait(0.05)

    def wait_rows(self, count: int, timeout: float, alive) -> bool:
        deadline = time.monotonic() + timeout
        with self.cv:
            while len(self.rows) < count and time.monotonic() < deadline:
                if not alive():
                    return False
                self.cv.wait(timeout=0.2)
            return len(self.rows) >= count


class JoinProbe(threading.Thread):
    """An honest client's Join, every ``every`` seconds: alternately on a kept channel and on a fresh one."""

    def __init__(self, target: str, token: str, examples: tuple[int, int], format_version: int, every: float,
                 stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.target, self.every, self.stop = target, every, stop
        self.metadata = [(CLIENT_ID_HEADER, PROBE_ID), (FORMAT_HEADER, str(format_version)),
                         ("authorization", f"Bearer {token}")]
        self.request = pb.JoinRequest(client_id=PROBE_ID, train_examples=examples[0], test_examples=examples[1])
        self.samples: list[dict] = []  # {kind, start, end, seconds, code}

    def _join(self, channel: grpc.Channel, kind: str) -> None:
        start = time.monotonic()
        try:
            pb_grpc.FedLearnStub(channel).Join(self.request, metadata=self.metadata, timeout=30)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        end = time.monotonic()
        self.samples.append({"kind": kind, "start": start, "end": end, "seconds": end - start, "code": code})

    def run(self) -> None:
        kept = grpc.insecure_channel(self.target)
        rng = random.Random(0)
        n = 0
        try:
            while not self.stop.wait(self.every * rng.uniform(0.7, 1.3)):
                if n % 2 == 0:
                    self._join(kept, "kept_channel")
                else:
                    with grpc.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)]) as fresh:
                        self._join(fresh, "fresh_channel")
                n += 1
        finally:
            kept.close()


class Sampler(threading.Thread):
    """The server's RSS, threads and file descriptors every 0.5 s (their peaks per window come from these)."""

    def __init__(self, pid: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop = pid, stop
        self.samples: list[dict] = []

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.samples.append({"t": time.monotonic(), **proc_status(self.pid)})
            except (OSError, ValueError):
                return


def honest_examples(config: dict) -> tuple[tuple[int, int], int]:
    """(train, test) examples client-0 declares at Join (as ``fedlearn client --partition-index 0`` does), and the
    message format version."""
    from fedlearn.data import load_dataset
    from fedlearn.protocol.codec import FORMAT_VERSION
    from fedlearn.run.config import RunConfig
    from fedlearn.run.experiment import build_clients

    cfg = RunConfig(**config)
    clients, _ = build_clients(cfg, load_dataset(cfg.dataset, cfg.data_dir, download=False))
    data = clients[PROBE_ID]
    return (len(data.train), 0 if data.test is None else len(data.test)), FORMAT_VERSION


def read_events(stream, events: list, cv: threading.Condition) -> None:
    for line in stream:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        doc["seen"] = time.monotonic()
        with cv:
            events.append(doc)
            cv.notify_all()


def wait_event(events: list, cv: threading.Condition, name: str, after: int, timeout: float) -> dict | None:
    deadline = time.monotonic() + timeout
    with cv:
        while time.monotonic() < deadline:
            found = [e for e in events[after:] if e.get("event") == name]
            if found:
                return found[0]
            cv.wait(timeout=0.2)
    return None


def schedule_for(cycles: int, control: bool) -> list[str]:
    """Unloaded first, then per cycle: loaded, unloaded (and with the control: CPU control, unloaded), so every
    loaded or control phase has an unloaded one on each side."""
    cycle = ["loaded", "unloaded"] + (["cpu_control", "unloaded"] if control else [])
    return ["unloaded"] + cycle * cycles


def control_duty(windows: list[dict]) -> float:
    """The CPU the last loaded phase added to the machine (the load process's, plus the server's beyond the
    unloaded phase before it), in cores: what the CPU control burns."""
    loaded = [i for i, w in enumerate(windows) if w["condition"] == "loaded"][-1]
    w = windows[loaded]
    before = [u for u in windows[:loaded] if u["condition"] == "unloaded"][-1]
    per_s = lambda x, key: (x[f"{key}1"] - x[f"{key}0"]) / max(x["t1"] - x["t0"], 1e-9)  # noqa: E731
    return per_s(w, "load_cpu") + max(0.0, per_s(w, "cpu") - per_s(before, "cpu"))


def stop_burners(burners: list[subprocess.Popen]) -> None:
    """End the CPU control's processes, by pid."""
    for b in burners:
        if b.poll() is None:
            os.kill(b.pid, signal.SIGKILL)
        b.wait(timeout=10)
    burners.clear()


def run_benchmark(args: argparse.Namespace, folder: Path) -> dict:
    """One federation with the phases of ``args.schedule``; returns the raw samples (every process stopped)."""
    config = {"dataset": "digits", "model": "seed-cnn", "clients": HONEST, "partition": "iid",
              "local_epochs": args.local_epochs, "batch_size": 10, "lr": 0.1, "seed": 0, "threads": 1,
              "evaluation": "centralized", "round_timeout": 60, "download": False}
    schedule = args.schedule
    rounds = 1 + len(schedule) * args.phase_rounds
    (folder / "run.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in config.items()))
    from fedlearn.security import TokenStore

    store = TokenStore(folder / "tokens.txt", missing_ok=True)
    tokens = {f"client-{i}": store.add(f"client-{i}") for i in range(HONEST)}
    for cid, token in tokens.items():
        (folder / f"{cid}.token").write_text(token)
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    target = f"{HOST}:{port}"
    run_dir = folder / "run"
    env = {**os.environ, "FEDLEARN_HOME": str(folder / "home")}
    procs = Procs(folder)
    stop = threading.Event()
    counts: dict = {}
    counter = threading.Thread(target=lambda: counts.update(zip(("examples", "format"), honest_examples(config))),
                               daemon=True)
    load_avg_start = os.getloadavg()
    wall_start = time.monotonic()
    deadline = wall_start + args.time_limit
    windows: list[dict] = []
    events: list[dict] = []
    events_cv = threading.Condition()
    probe = sampler = None

    def left() -> float:
        return max(1.0, deadline - time.monotonic())

    def command(line: str, reply: str) -> dict | None:
        mark = len(events)
        load.stdin.write(line + "\n")
        load.stdin.flush()
        return wait_event(events, events_cv, reply, mark, min(left(), args.phase_limit + 30))

    try:
        server = procs.start("server", [*FEDLEARN, "server", "--config", str(folder / "run.yaml"), "--rounds",
                                        str(rounds), "--address", target, "--tokens", str(folder / "tokens.txt"),
                                        "--output", str(run_dir)], env=env)
        clients = [procs.start(f"client{i}", [*FEDLEARN, "client", "--config", str(folder / "run.yaml"),
                                              "--server", target, "--partition-index", str(i), "--token-file",
                                              str(folder / f"client-{i}.token"), "--give-up-after", "120"], env=env)
                   for i in range(HONEST)]
        load = procs.start("load", [sys.executable, __file__, "--role", "load", "--target", target,
                                    "--connections", str(args.connections), "--pace", str(args.pace),
                                    "--join-pace", str(args.join_pace), "--phase-limit", str(args.phase_limit)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
        threading.Thread(target=read_events, args=(load.stdout, events, events_cv), daemon=True).start()
        counter.start()
        watcher = RoundWatcher(run_dir / "metrics.jsonl", stop)
        watcher.start()
        sampler = Sampler(server.pid, stop)
        sampler.start()

        def alive() -> bool:
            return server.poll() is None

        if not watcher.wait_rows(1, left(), alive):
            raise RuntimeError("no round 1 before the time limit; server log:\n" + procs.log("server")[-3000:])
        counter.join(timeout=left())
        probe = JoinProbe(target, tokens[PROBE_ID], counts["examples"], counts["format"], args.probe_every, stop)
        probe.start()
        print(f"round 1 (warm-up) done after {time.monotonic() - wall_start:.1f} s; phases "
              f"{' '.join(c[0].upper() for c in schedule)} of {args.phase_rounds} rounds each, "
              f"{args.connections} connections in loaded phases", flush=True)
        loaded = False
        burners: list[subprocess.Popen] = []
        for index, condition in enumerate(schedule):
            window: dict = {"phase": index, "condition": condition}
            if loaded:  # end the previous loaded phase: its window closed at its last round
                windows[-1]["load"] = command("stop", "stopped")
                loaded = False
            stop_burners(burners)
            if condition == "loaded":
                window["ramp"] = command("start", "ramped")
                loaded = True
            elif condition == "cpu_control":
                window["burn_duty"] = control_duty(windows)
                burners = [procs.start(f"burn{index}-{k}", [sys.executable, __file__, "--role", "burn", "--duty",
                                                            f"{window['burn_duty'] / BURNERS:.4f}", "--phase-limit",
                                                            str(args.phase_limit)], stdout=subprocess.PIPE)
                           for k in range(BURNERS)]
                for b in burners:  # each says "ready" after its imports, so they are not counted as load
                    b.stdout.readline()
            helpers = burners if condition == "cpu_control" else [load]
            window["t0"], window["cpu0"] = time.monotonic(), proc_cpu(server.pid)
            window["clients_cpu0"] = sum(proc_cpu(c.pid) for c in clients if c.poll() is None)
            window["load_cpu0"] = sum(proc_cpu(h.pid) for h in helpers)
            window["log_bytes0"] = (folder / "server.log").stat().st_size
            ok = watcher.wait_rows(1 + (index + 1) * args.phase_rounds, left(), alive)
            window["t1"], window["cpu1"] = time.monotonic(), proc_cpu(server.pid)
            window["clients_cpu1"] = sum(proc_cpu(c.pid) for c in clients if c.poll() is None)
            window["load_cpu1"] = sum(proc_cpu(h.pid) for h in helpers)
            window["log_bytes1"] = (folder / "server.log").stat().st_size
            windows.append(window)
            print(f"  phase {index:2d} {condition:>11}: {window['t1'] - window['t0']:5.1f} s, server "
                  f"{window['cpu1'] - window['cpu0']:.2f} CPU-s", flush=True)
            if not ok:
                raise RuntimeError(f"phase {index} did not finish its rounds; server log:\n"
                                   + procs.log("server")[-3000:])
        if loaded:
            windows[-1]["load"] = command("stop", "stopped")
        stop_burners(burners)
        stop.set()
        load.stdin.write("quit\n")
        load.stdin.flush()
        server_rc = server.wait(timeout=left())
        client_rcs = [c.wait(timeout=left()) for c in clients]
        load.wait(timeout=30)
        watcher.join(timeout=5)
        probe.join(timeout=35)
    finally:
        stop.set()
        procs.stop_all()
    server_log = procs.log("server")
    return {"config": config, "schedule": schedule, "rounds": rounds, "target": target, "rows": watcher.rows,
            "windows": windows, "probes": probe.samples, "server_samples": sampler.samples, "server_rc": server_rc,
            "client_rcs": client_rcs, "declared_examples": counts["examples"],
            "load_avg_start": load_avg_start, "load_avg_end": os.getloadavg(),
            "wall_s": time.monotonic() - wall_start,
            "server_log_lines": server_log.count("\n"),
            "server_log_refusals": server_log.count("refused a call from"),
            "server_log_tracebacks": server_log.count("Traceback"),
            "server_log_warnings_other": sorted({line.split(": ", 1)[-1][:120] for line in server_log.splitlines()
                                                 if " WARNING " in line and "refused a call from" not in line})[:20],
            "server_log_tail": server_log.splitlines()[-3:]}


# ============================================================================================
# Analysis
# ============================================================================================

def inside(window: dict, start: float, end: float) -> bool:
    return window["t0"] <= start and end <= window["t1"]


def window_stats(w: dict, raw: dict) -> dict:
    """One phase's samples: its clean rounds and Joins (wholly inside the window), CPU and the server's peaks."""
    rounds = [r for r in raw["rows"] if r["round"] > 1 and inside(w, r["seen"] - r["seconds"], r["seen"])]
    joins = {kind: [round(1e3 * p["seconds"], 2) for p in raw["probes"] if p["kind"] == kind and p["code"] == "OK"
                    and inside(w, p["start"], p["end"])] for kind in ("kept_channel", "fresh_channel")}
    both = joins["kept_channel"] + joins["fresh_channel"]
    wall = w["t1"] - w["t0"]
    cpu = w["cpu1"] - w["cpu0"]
    ended = [r for r in raw["rows"] if w["t0"] <= r["seen"] <= w["t1"]]
    samples = [s for s in raw["server_samples"] if w["t0"] <= s["t"] <= w["t1"]]
    return {
        "phase": w["phase"], "condition": w["condition"], "wall_s": wall,
        "clean_rounds": [r["round"] for r in rounds], "round_seconds": [r["seconds"] for r in rounds],
        "round_median_s": statistics.median([r["seconds"] for r in rounds]) if rounds else None,
        "join_ms": joins, "join_median_ms": statistics.median(both) if both else None,
        "failed_joins": [p["code"] for p in raw["probes"] if p["code"] != "OK" and inside(w, p["start"], p["end"])],
        "server_cpu_s": cpu, "server_cpu_per_s": cpu / wall if wall else None, "rounds_ended": len(ended),
        "clients_cpu_per_s": (w["clients_cpu1"] - w["clients_cpu0"]) / wall if wall else None,
        "load_cpu_per_s": (w["load_cpu1"] - w["load_cpu0"]) / wall if wall else None,
        "server_log_bytes_per_s": (w["log_bytes1"] - w["log_bytes0"]) / wall if wall else None,
        "server_peak": {k: max((s[k] for s in samples), default=None) for k in ("rss_mib", "threads", "fds")},
        "ramp": w.get("ramp"), "burn_duty": w.get("burn_duty"), "load": w.get("load"),
    }


def condition_stats(ws: list[dict]) -> dict:
    """All phases of one condition pooled."""
    rounds = [s for w in ws for s in w["round_seconds"]]
    join = {k: [v for w in ws for v in w["join_ms"][k]] for k in ("kept_channel", "fresh_channel")}
    both = join["kept_channel"] + join["fresh_channel"]
    wall = sum(w["wall_s"] for w in ws)
    cpu = sum(w["server_cpu_s"] for w in ws)
    ended = sum(w["rounds_ended"] for w in ws)
    mean = lambda key: statistics.mean(w[key] for w in ws) if ws else None  # noqa: E731
    return {
        "phases": len(ws), "wall_s": wall, "clean_rounds": len(rounds),
        "round_median_s": statistics.median(rounds) if rounds else None, "round_p95_s": quantile(rounds, 0.95),
        "join_samples": len(both), "join_median_ms": statistics.median(both) if both else None,
        "join_p95_ms": quantile(both, 0.95),
        **{f"join_{k}_median_ms": statistics.median(v) if v else None for k, v in join.items()},
        **{f"join_{k}_p95_ms": quantile(v, 0.95) for k, v in join.items()},
        "failed_joins": sum(len(w["failed_joins"]) for w in ws),
        "server_cpu_s": cpu, "server_cpu_per_s": cpu / wall if wall else None,
        "server_cpu_per_round_s": cpu / ended if ended else None,
        "clients_cpu_per_s": mean("clients_cpu_per_s"), "load_cpu_per_s": mean("load_cpu_per_s"),
        "server_log_bytes_per_s": mean("server_log_bytes_per_s"),
        "server_peak": {k: max((w["server_peak"][k] or 0 for w in ws), default=None)
                        for k in ("rss_mib", "threads", "fds")},
    }


RATIO_KEYS = ("round_median_s", "round_p95_s", "join_median_ms", "join_p95_ms", "join_kept_channel_median_ms",
              "join_fresh_channel_median_ms", "server_cpu_per_s", "server_cpu_per_round_s")


def paired(per_window: list[dict], condition: str, key: str) -> list[float]:
    """Each ``condition`` phase's median over the mean of its neighbouring unloaded phases' medians."""
    out = []
    for i, w in enumerate(per_window):
        if w["condition"] != condition or w[key] is None:
            continue
        sides = [per_window[j][key] for j in (i - 1, i + 1) if 0 <= j < len(per_window)
                 and per_window[j]["condition"] == "unloaded" and per_window[j][key] is not None]
        if sides:
            out.append(w[key] / statistics.mean(sides))
    return out


def analyse(raw: dict) -> dict:
    """Per-condition medians and ratios to the unloaded phases (only samples wholly inside a window count)."""
    per_window = [window_stats(w, raw) for w in raw["windows"]]
    names = list(dict.fromkeys(w["condition"] for w in per_window))
    conditions = {c: condition_stats([w for w in per_window if w["condition"] == c]) for c in names}
    ratios, pairs = {}, {}
    for c in names:
        if c == "unloaded":
            continue
        ratios[c] = {k: ratio(conditions[c][k], conditions["unloaded"][k]) for k in RATIO_KEYS}
        pairs[c] = {k: paired(per_window, c, k) for k in ("round_median_s", "join_median_ms")}
        ratios[c]["paired_round"] = statistics.median(pairs[c]["round_median_s"]) if pairs[c]["round_median_s"] \
            else None
        ratios[c]["paired_join"] = statistics.median(pairs[c]["join_median_ms"]) if pairs[c]["join_median_ms"] \
            else None
    if "cpu_control" in conditions:
        ratios["loaded_over_cpu_control"] = {k: ratio(conditions["loaded"][k], conditions["cpu_control"][k])
                                             for k in RATIO_KEYS}
    rows = raw["rows"]
    honest_ok = all(r["clients_succeeded"] == HONEST and not r["failed_clients"] for r in rows)
    lo = ratios["loaded"]
    goal = {"goal": "honest Join and round latency under load <= 2x unloaded (medians)",
            "join_ratio": lo["join_median_ms"], "round_ratio": lo["round_median_s"],
            "met": bool(lo["join_median_ms"] is not None and lo["round_median_s"] is not None
                        and lo["join_median_ms"] <= 2 and lo["round_median_s"] <= 2 and honest_ok)}
    loads = [w["load"] for w in per_window if w["condition"] == "loaded" and w["load"]]
    return {"windows": per_window, "conditions": conditions, "ratios": ratios, "paired_ratios": pairs,
            "honest_clients_succeeded_every_round": honest_ok,
            "failed_rounds": [r["round"] for r in rows if r["failed_clients"] or r["clients_succeeded"] != HONEST],
            "final_accuracy": rows[-1].get("test_accuracy") if rows else None,
            "load_calls_per_s": [w["calls_per_s"] for w in loads], "load_codes": merge_codes(loads),
            "load_refusal_latency_ms": {kind: [w["kinds"][kind]["median_ms"] for w in loads if kind in w["kinds"]]
                                        for kind in ("poll", "join", "idle_upload", "trickle")},
            "goal": goal}


def merge_codes(loads: list[dict]) -> dict:
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for load in loads:
        for kind, v in load["kinds"].items():
            out[kind].update(v["codes"])
    return {k: dict(v) for k, v in out.items()}


def slim(raw: dict) -> dict:
    """The raw record without the per-sample lists the analysis already holds (a results file of tens of KB)."""
    keep = ("round", "seconds", "clients_succeeded", "failed_clients", "test_accuracy")
    out = {k: v for k, v in raw.items() if k not in ("probes", "server_samples", "rows")}
    out["rows"] = [{k: r.get(k) for k in keep} for r in raw["rows"]]
    out["probe_failures"] = [p for p in raw["probes"] if p["code"] != "OK"]
    return out


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def report(doc: dict) -> None:
    a = doc["analysis"]
    print(f"\n{'condition':<11} {'rounds':>6} {'round med s':>11} {'joins':>5} {'join med ms':>11} "
          f"{'join p95 ms':>11} {'kept med':>8} {'fresh med':>9} {'srv CPU/s':>9} {'srv CPU/rnd':>11} "
          f"{'load CPU/s':>10} {'log B/s':>8} {'peak fds':>8} {'peak thr':>8}")
    for cond, c in a["conditions"].items():
        print(f"{cond:<11} {c['clean_rounds']:>6} {fmt(c['round_median_s']):>11} {c['join_samples']:>5} "
              f"{fmt(c['join_median_ms'], '.2f'):>11} {fmt(c['join_p95_ms'], '.2f'):>11} "
              f"{fmt(c['join_kept_channel_median_ms'], '.2f'):>8} {fmt(c['join_fresh_channel_median_ms'], '.2f'):>9} "
              f"{fmt(c['server_cpu_per_s']):>9} {fmt(c['server_cpu_per_round_s']):>11} "
              f"{fmt(c['load_cpu_per_s']):>10} {fmt(c['server_log_bytes_per_s'], '.0f'):>8} "
              f"{c['server_peak']['fds']:>8} {c['server_peak']['threads']:>8}")
    for cond, r in a["ratios"].items():
        label = "loaded / CPU control" if cond == "loaded_over_cpu_control" else f"{cond} / unloaded"
        print(f"{label}: round {fmt(r['round_median_s'])}x"
              + (f" (paired {fmt(r['paired_round'])}x)" if "paired_round" in r else "")
              + f", Join median {fmt(r['join_median_ms'])}x"
              + (f" (paired {fmt(r['paired_join'])}x)" if "paired_join" in r else "")
              + f", Join p95 {fmt(r['join_p95_ms'])}x, server CPU per second {fmt(r['server_cpu_per_s'])}x, "
              f"per round {fmt(r['server_cpu_per_round_s'])}x")
    print(f"load calls/s per loaded phase: {', '.join(fmt(x, '.0f') for x in a['load_calls_per_s'])}; "
          f"codes: {json.dumps(a['load_codes'])}")
    print(f"honest clients succeeded in every round: {a['honest_clients_succeeded_every_round']} "
          f"(failed rounds {a['failed_rounds']}), final accuracy {fmt(a['final_accuracy'], '.4f')}; server rc "
          f"{doc['raw']['server_rc']}, clients {doc['raw']['client_rcs']}, tracebacks in server log "
          f"{doc['raw']['server_log_tracebacks']}, other warnings {doc['raw']['server_log_warnings_other']}")
    la0, la1 = doc["raw"]["load_avg_start"], doc["raw"]["load_avg_end"]
    print(f"load average (1/5/15 min) at start {la0[0]:.2f}/{la0[1]:.2f}/{la0[2]:.2f}, at end "
          f"{la1[0]:.2f}/{la1[1]:.2f}/{la1[2]:.2f}; wall {doc['raw']['wall_s']:.1f} s")
    g = a["goal"]
    print(f"goal {g['goal']}: Join {fmt(g['join_ratio'])}x, round {fmt(g['round_ratio'])}x -> "
          f"{'met' if g['met'] else 'NOT met'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["load", "burn"], help=argparse.SUPPRESS)
    parser.add_argument("--duty", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 50 connections, U and L phases of 2 rounds")
    parser.add_argument("--connections", type=int, default=None, help="hostile connections in a loaded phase (500)")
    parser.add_argument("--cycles", type=int, default=None, help="loaded phases, each between unloaded ones (4)")
    parser.add_argument("--no-control", action="store_true", help="skip the CPU-control phases")
    parser.add_argument("--phase-rounds", type=int, default=None, help="rounds per phase (4)")
    parser.add_argument("--local-epochs", type=int, default=None, help="honest clients' local epochs (4)")
    parser.add_argument("--pace", type=float, default=1.0, help="seconds a connection waits before calling again")
    parser.add_argument("--join-pace", type=float, default=0.2, help="the same for the Join flood's connections")
    parser.add_argument("--probe-every", type=float, default=0.25, help="seconds between honest Join probes")
    parser.add_argument("--phase-limit", type=float, default=120.0, help="hard limit on one loaded phase (s)")
    parser.add_argument("--time-limit", type=float, default=None, help="hard limit on the whole run (s)")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (logs) and print its path")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file (default benchmarks/results/grpc_load.json; none for --quick)")
    args = parser.parse_args(argv)
    if args.role == "load":
        return load_main(args)
    if args.role == "burn":
        return burn_main(args.duty, args.phase_limit)
    args.connections = args.connections or (50 if args.quick else 500)
    args.cycles = args.cycles or (1 if args.quick else 4)
    args.schedule = schedule_for(args.cycles, control=not (args.quick or args.no_control))
    if args.quick:
        args.schedule = args.schedule[:2]  # unloaded, loaded
    args.phase_rounds = args.phase_rounds or (2 if args.quick else 4)
    args.local_epochs = args.local_epochs or (1 if args.quick else 4)
    args.time_limit = args.time_limit or (55.0 if args.quick else 900.0)
    output = args.output or (None if args.quick else RESULTS / "grpc_load.json")
    folder = Path(tempfile.mkdtemp(prefix="fedlearn-grpc-load-"))
    try:
        raw = run_benchmark(args, folder)
    finally:
        if args.keep:
            print(f"run folder kept: {folder}")
        else:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    from machine import machine_info, write_results

    doc = {"benchmark": "grpc_load", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": machine_info(grpcio=grpc.__version__), "argv": sys.argv[1:],
           "settings": {k: getattr(args, k) for k in ("connections", "schedule", "phase_rounds", "local_epochs",
                                                      "pace", "join_pace", "probe_every", "phase_limit",
                                                      "time_limit")},
           "mix": dict(collections.Counter(connection_kinds(args.connections)))}
    doc["analysis"] = analyse(raw)
    doc["raw"] = slim(raw)
    report(doc)
    if output is not None:
        write_results(output, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
