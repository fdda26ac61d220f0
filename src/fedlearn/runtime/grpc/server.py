"""The gRPC runtime: the round loop's tasks wait here until their clients poll, download and answer.

The server never dials a client. Each task is encoded once, offered to its client through
PollTask and DownloadTask, and its result is assembled from UploadResult chunks, checked and
decoded before the round loop sees it. Results are handed to the loop in task order, so the
aggregate is the same sum in the same order as in the in-process runtime.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedlearn.errors import InvalidUpdateError
from fedlearn.protocol.codec import FORMAT_VERSION, decode, encode
from fedlearn.protocol.messages import EvalResult, EvalTask, Message, SecureReply, SecureTask, TrainResult, TrainTask
from fedlearn.protocol.params import ParamSpec
from fedlearn.runtime.base import ClientFailure
from fedlearn.runtime.grpc import fedlearn_pb2 as pb
from fedlearn.runtime.grpc import fedlearn_pb2_grpc as pb_grpc
from fedlearn.runtime.grpc.auth import AuthError, check_format, claimed_identity
from fedlearn.runtime.grpc.transfer import Assembly, TransferError, chunks, digest
from fedlearn.security import Authenticator

log = logging.getLogger(__name__)

SERVICE_NAME = "fedlearn.v1.FedLearn"
HEADER_SLACK = 1 << 20  # bytes allowed beyond the raw tensor for a result's JSON header


@dataclass
class _Task:
    task_id: str
    client_id: str
    kind: str
    round: int
    body: bytes
    sha256: bytes
    result: Message | None = None
    accepted: bool = False  # a result was accepted (kept after the round drops the result itself)
    result_size: int = 0
    closed: bool = False  # answered, expired or refused: no further upload is accepted
    stage: str = ""  # a secure-aggregation step's name (SecureTask.stage)
    uplink: tuple[str, ...] = ()  # the arrays a train result must carry (declared by the task)
    max_bytes: int = 0


@dataclass
class _ClientState:
    last_seen: float
    queue: list[_Task] = field(default_factory=list)


class GrpcRuntime:
    """A Runtime whose clients are remote processes that poll this server.

    ``round_timeout`` bounds how long a round waits for answers; clients silent for longer than
    ``liveness_seconds`` are not sampled.
    """

    def __init__(self, spec: ParamSpec, *, round_timeout: float = 300.0, liveness_seconds: float = 60.0,
                 total_rounds: int = 0, bytes_per_value: float = 4.0) -> None:
        self.spec = spec
        self.round_timeout = round_timeout
        self.liveness_seconds = liveness_seconds
        self.run_id = uuid.uuid4().hex
        self.total_rounds = total_rounds
        self.completed_rounds = 0
        self.finished = False
        self._cv = threading.Condition()
        self._clients: dict[str, _ClientState] = {}
        self._tasks: dict[str, _Task] = {}
        self._uploads: dict[tuple[str, str], Assembly] = {}
        # float32 updates; secure aggregation's 64-bit sums and CKKS ciphertexts are larger per value.
        # A result may be as large as the arrays its task declares (SCAFFOLD: two model-sized vectors).
        self.bytes_per_value = bytes_per_value

    # ----- the Runtime side, called by the round loop -------------------------------------
    def client_ids(self) -> list[str]:
        now = time.monotonic()
        with self._cv:
            return [cid for cid, c in self._clients.items() if now - c.last_seen <= self.liveness_seconds]

    def wait_for_clients(self, count: int, poll: float = 1.0) -> None:
        """Block until ``count`` live clients have joined (logging progress)."""
        last = -1
        while len(self.client_ids()) < count:
            live = len(self.client_ids())
            if live != last:
                log.info("waiting for clients: %d of %d connected", live, count)
                last = live
            with self._cv:
                self._cv.wait(timeout=poll)

    def deliver(self, tasks: Sequence[Message]) -> Iterator[Message | ClientFailure]:
        kinds = {type(t) for t in tasks}
        if len(kinds) > 1:
            raise ValueError("deliver one kind of task at a time")
        kind = {TrainTask: "train", EvalTask: "evaluate", SecureTask: "secure"}[kinds.pop()] if tasks else "train"
        return self._dispatch(tasks, kind)

    def _dispatch(self, tasks: Sequence[Message], kind: str) -> Iterator:
        entries = []
        shared: dict[tuple, bytes] = {}  # the round's weights are converted to bytes once
        if tasks:
            self._forget_before(min(t.round for t in tasks) - 1)
        for task in tasks:  # offer each task as soon as it is encoded: downloads overlap the encoding
            body = encode(task, shared)
            uplink = tuple(task.config.get("uplink", ("update",))) if isinstance(task, TrainTask) else ()
            entry = _Task(f"{task.round}-{kind}-{task.client_id}-{uuid.uuid4().hex[:12]}", task.client_id, kind,
                          task.round, body, digest(body), stage=getattr(task, "stage", ""), uplink=uplink,
                          max_bytes=int(self.spec.numel * self.bytes_per_value * max(len(uplink), 1)) + HEADER_SLACK)
            entries.append(entry)
            with self._cv:
                self._tasks[entry.task_id] = entry
                self._client(entry.client_id).queue.append(entry)
                self._cv.notify_all()
        shared.clear()
        deadline = time.monotonic() + self.round_timeout
        for entry in entries:  # in task order, so the aggregate is summed in a fixed order
            with self._cv:
                while entry.result is None and not entry.closed and time.monotonic() < deadline:
                    self._cv.wait(timeout=max(0.0, deadline - time.monotonic()))
                result = entry.result
                self._close(entry)
            if result is None:
                yield ClientFailure(entry.client_id, f"no valid {kind} result before the round deadline")
            else:
                yield result

    def finish(self) -> None:
        """Tell polling clients the run is over."""
        with self._cv:
            self.finished = True
            self._cv.notify_all()

    def _forget_before(self, oldest: int) -> None:
        """Drop the tombstones of tasks from rounds before ``oldest`` (late uploads then get NOT_FOUND)."""
        with self._cv:
            for stale in [tid for tid, t in self._tasks.items() if t.closed and t.round < oldest]:
                del self._tasks[stale]

    # ----- helpers under the lock ----------------------------------------------------------
    def _client(self, client_id: str) -> _ClientState:
        state = self._clients.get(client_id)
        if state is None:
            state = self._clients[client_id] = _ClientState(time.monotonic())
            log.info("client %s connected", client_id)
        return state

    def _close(self, entry: _Task) -> None:
        entry.closed = True
        state = self._clients.get(entry.client_id)
        if state is not None and entry in state.queue:
            state.queue.remove(entry)
        self._uploads.pop((entry.client_id, entry.task_id), None)
        entry.body = b""  # the round has moved on: keep only a small tombstone for late or replayed uploads
        entry.result = None

    # ----- the service side, called from gRPC handler threads ------------------------------
    def join(self, client_id: str) -> pb.JoinReply:
        with self._cv:
            self._client(client_id).last_seen = time.monotonic()
            self._cv.notify_all()
            return pb.JoinReply(run_id=self.run_id, completed_rounds=self.completed_rounds,
                                total_rounds=self.total_rounds)

    def poll(self, client_id: str, wait_seconds: float) -> pb.TaskInfo:
        deadline = time.monotonic() + max(0.0, min(wait_seconds, 60.0))
        with self._cv:
            state = self._client(client_id)
            while True:
                state.last_seen = time.monotonic()
                if state.queue:
                    t = state.queue[0]
                    return pb.TaskInfo(has_task=True, task_id=t.task_id, kind=t.kind, round=t.round,
                                       size=len(t.body), sha256=t.sha256)
                if self.finished:
                    return pb.TaskInfo(finished=True)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return pb.TaskInfo()
                self._cv.wait(timeout=remaining)

    def task_for_download(self, client_id: str, task_id: str) -> _Task:
        with self._cv:
            entry = self._tasks.get(task_id)
            if entry is None or entry.closed:
                raise AuthError(grpc.StatusCode.NOT_FOUND, f"task {task_id} is not open (finished or expired)")
            if entry.client_id != client_id:
                raise AuthError(grpc.StatusCode.PERMISSION_DENIED, f"task {task_id} was not given to {client_id}")
            self._client(client_id).last_seen = time.monotonic()
            return entry

    def upload_status(self, client_id: str, transfer_id: str) -> pb.UploadReply:
        with self._cv:
            entry = self._tasks.get(transfer_id)
            if entry is not None and entry.client_id == client_id and entry.accepted:
                return pb.UploadReply(received=entry.result_size, complete=True)
            assembly = self._uploads.get((client_id, transfer_id))
            return pb.UploadReply(received=assembly.received if assembly else 0)

    def receive(self, client_id: str, stream: Iterator[pb.Chunk]) -> pb.UploadReply:
        """Take one upload stream (possibly resuming an earlier one) and accept the result when complete."""
        assembly = entry = None
        for chunk in stream:
            if assembly is None:
                entry = self._open_task_for_upload(client_id, chunk.transfer_id)
                if chunk.total_size > entry.max_bytes:
                    raise AuthError(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"result of {chunk.total_size} bytes is larger than this task's "
                                    f"{entry.max_bytes}; send the task's arrays ({', '.join(entry.uplink)}) of "
                                    f"{self.spec.numel} values each in this run's format")
                with self._cv:
                    key = (client_id, entry.task_id)
                    assembly = self._uploads.get(key)
                    if assembly is None or (assembly.total_size, assembly.checksum) != (chunk.total_size,
                                                                                      chunk.sha256):
                        assembly = self._uploads[key] = Assembly(chunk.total_size, chunk.sha256)
            elif chunk.transfer_id != entry.task_id:
                raise AuthError(grpc.StatusCode.INVALID_ARGUMENT, "one upload stream carries one transfer")
            try:
                assembly.add(chunk)
            except TransferError as exc:
                raise AuthError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        if assembly is None:
            raise AuthError(grpc.StatusCode.INVALID_ARGUMENT, "empty upload")
        if not assembly.complete:
            return pb.UploadReply(received=assembly.received)
        try:
            body = assembly.body()
        except TransferError as exc:
            with self._cv:
                self._uploads.pop((client_id, entry.task_id), None)
            raise AuthError(grpc.StatusCode.DATA_LOSS, str(exc)) from None
        with self._cv:  # complete: accepted or refused, the body is no longer held for resumption
            self._uploads.pop((client_id, entry.task_id), None)
        self._accept(entry, body)
        return pb.UploadReply(received=len(body), complete=True)

    def _open_task_for_upload(self, client_id: str, task_id: str) -> _Task:
        with self._cv:
            entry = self._tasks.get(task_id)
            if entry is None:
                raise AuthError(grpc.StatusCode.NOT_FOUND,
                                f"no task {task_id!r} on this server (it may have restarted)")
            if entry.client_id != client_id:
                raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                                f"task {task_id} was given to another client, not {client_id}")
            if entry.accepted:
                raise AuthError(grpc.StatusCode.ALREADY_EXISTS, f"a result for task {task_id} was already accepted")
            if entry.closed:
                log.warning("late result from %s for round %d discarded (the round has moved on)",
                            client_id, entry.round)
                raise AuthError(grpc.StatusCode.FAILED_PRECONDITION,
                                f"round {entry.round} is over; the late result was discarded")
            self._client(client_id).last_seen = time.monotonic()
            return entry

    def _accept(self, entry: _Task, body: bytes) -> None:
        try:
            result = decode(body)
        except InvalidUpdateError as exc:
            raise AuthError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        expected = {"train": TrainResult, "evaluate": EvalResult, "secure": SecureReply}[entry.kind]
        if not isinstance(result, expected):
            raise AuthError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"expected a {expected.__name__} for task {entry.task_id}")
        if result.client_id != entry.client_id or result.round != entry.round:
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                            f"result names client {result.client_id!r} round {result.round}, but the task was "
                            f"for {entry.client_id!r} round {entry.round}")
        if isinstance(result, SecureReply) and result.stage != entry.stage:
            raise AuthError(grpc.StatusCode.INVALID_ARGUMENT, f"reply is for stage {result.stage!r}, the task was "
                            f"{entry.stage!r}")
        # Masked or encrypted payloads are not plain vectors; the secure round checks them itself.
        if isinstance(result, TrainResult) and not result.sealed:
            if set(result.arrays) != set(entry.uplink):
                raise AuthError(grpc.StatusCode.INVALID_ARGUMENT, f"result carries arrays {sorted(result.arrays)}; "
                                f"the task declared {sorted(entry.uplink)}")
            for name, value in result.arrays.items():
                if value.dim() != 1 or value.numel() != self.spec.numel:
                    raise AuthError(grpc.StatusCode.INVALID_ARGUMENT, f"array {name!r} has shape "
                                    f"{tuple(value.shape)}; the model needs {self.spec.numel} values")
        with self._cv:
            if entry.closed or entry.accepted:
                raise AuthError(grpc.StatusCode.FAILED_PRECONDITION, f"task {entry.task_id} is no longer open")
            entry.result, entry.accepted, entry.result_size = result, True, len(body)
            self._uploads.pop((entry.client_id, entry.task_id), None)
            state = self._clients.get(entry.client_id)
            if state is not None and entry in state.queue:
                state.queue.remove(entry)  # answered: the next poll offers the next task
            self._cv.notify_all()


class FedLearnServicer(pb_grpc.FedLearnServicer):
    """Maps RPCs to the runtime after authenticating the caller; every refusal is a clear status."""

    def __init__(self, runtime: GrpcRuntime, auth: Authenticator | None = None) -> None:
        self.runtime = runtime
        self.auth = auth

    def _identify(self, context: grpc.ServicerContext) -> str:
        if self.auth is not None:
            return self.auth.identify(context)  # aborts the call itself when it refuses
        try:
            return claimed_identity(context)
        except AuthError as exc:
            context.abort(exc.code, str(exc))

    def _guard(self, context: grpc.ServicerContext, call):
        client_id = self._identify(context)
        try:
            return call(client_id)
        except AuthError as exc:
            log.warning("refused %s: %s", client_id, exc)
            context.abort(exc.code, str(exc))

    def Join(self, request, context):  # noqa: N802 (gRPC method names)
        def call(client_id: str):
            check_format(context, FORMAT_VERSION)
            if request.client_id and request.client_id != client_id:
                raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                                f"authenticated as {client_id!r}, cannot join as {request.client_id!r}")
            return self.runtime.join(client_id)

        return self._guard(context, call)

    def PollTask(self, request, context):  # noqa: N802
        return self._guard(context, lambda cid: self.runtime.poll(cid, request.wait_seconds))

    def DownloadTask(self, request, context):  # noqa: N802
        entry = self._guard(context, lambda cid: self.runtime.task_for_download(cid, request.task_id))
        if request.offset < 0 or request.offset > len(entry.body):
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} outside 0..{len(entry.body)}")
        yield from chunks(entry.body, entry.task_id, request.offset, entry.sha256)

    def UploadResult(self, request_iterator, context):  # noqa: N802
        return self._guard(context, lambda cid: self.runtime.receive(cid, request_iterator))

    def UploadStatus(self, request, context):  # noqa: N802
        return self._guard(context, lambda cid: self.runtime.upload_status(cid, request.transfer_id))


def start_server(runtime: GrpcRuntime, address: str, *, auth: Authenticator | None = None,
                 credentials: grpc.ServerCredentials | None = None, max_workers: int = 256) -> tuple[grpc.Server, int]:
    """Serve the runtime (and gRPC health checking) on ``address``; returns the server and its bound port.

    Each waiting client holds a worker thread during its long poll, hence the large pool.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_FedLearnServicer_to_server(FedLearnServicer(runtime, auth), server)
    health_servicer = health.HealthServicer()
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}: address in use or not available here")
    server.start()
    return server, port
