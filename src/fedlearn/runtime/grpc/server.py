"""The gRPC runtime: the round loop's tasks wait here until their clients poll, download and answer.

The server never dials a client. Each task is encoded once (the round's weights once for all
clients), offered to its client through PollTask and DownloadTask, and its result is assembled from
UploadResult chunks, checked and decoded before the round loop sees it. Results are handed to the
loop in task order, so the aggregate is the same sum in the same order as in the in-process runtime.

Only admitted clients hold anything here: the run's ``max_clients`` (or those ``admit`` accepts),
each with at most one open long poll and a few transfer streams (``limits``). Every malformed
request gets a specific status with a one-line message; a client is told whether the run is over
(FINISHED) or the server is only stopping (STOPPING: rejoin when it is back).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedlearn.errors import InvalidUpdateError
from fedlearn.protocol.codec import FORMAT_VERSION, decode, encode_parts
from fedlearn.protocol.messages import (
    MAX_EXAMPLES_PER_CLIENT,
    EvalResult,
    EvalTask,
    Message,
    SecureReply,
    SecureTask,
    TrainResult,
    TrainTask,
)
from fedlearn.protocol.params import ParamSpec
from fedlearn.runtime.base import ClientFailure
from fedlearn.runtime.grpc import fedlearn_pb2 as pb
from fedlearn.runtime.grpc import fedlearn_pb2_grpc as pb_grpc
from fedlearn.runtime.grpc.auth import AuthError, check_format, claimed_identity
from fedlearn.runtime.grpc.limits import OpenStream, StreamLimits, StreamWatch
from fedlearn.runtime.grpc.transfer import Assembly, Body, TransferError
from fedlearn.security import Authenticator

log = logging.getLogger(__name__)

SERVICE_NAME = "fedlearn.v1.FedLearn"
HEADER_SLACK = 1 << 20  # bytes allowed beyond the raw tensor for a result's JSON header
MAX_ID_CHARS = 256  # task and transfer ids are ours (about 60 characters); longer ones are malformed
RESERVED_WORKERS = 32  # threads beyond the poll and stream limits, for Join, UploadStatus and refusals
RUNNING, FINISHED, STOPPING = pb.RUN_STATE_RUNNING, pb.RUN_STATE_FINISHED, pb.RUN_STATE_STOPPING
MAX_DETAIL = 500  # characters of a refusal's message; gRPC's metadata limit is 16 KiB


def _one_line(text: str) -> str:
    """A refusal's text on one line of at most MAX_DETAIL characters."""
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 15] + " ... (shortened)"


@dataclass
class _Task:
    task_id: str
    client_id: str
    kind: str
    round: int
    body: Body | None  # None once the task is closed
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
    joined: bool = False  # Join accepted (a state made only by delivering a task to an id is not joined)
    declared: tuple[int, int] | None = None  # (train, test) examples declared at Join
    polls: int = 0  # long polls open now
    poll_seq: int = 0  # the newest poll's number: an older poll still waiting returns at once


class GrpcRuntime:
    """A Runtime whose clients are remote processes that poll this server.

    ``round_timeout`` bounds how long a round waits for answers; clients silent for longer than
    ``liveness_seconds`` are not sampled. Who may join: ``admit(client_id)`` when given (an
    allow-list; PERMISSION_DENIED otherwise), and at most ``max_clients`` ids (None: no cap;
    RESOURCE_EXHAUSTED beyond it, after dropping ids silent longer than ``liveness_seconds``).
    A Join declaring more than ``max_examples_per_client`` examples is refused. ``max_polls`` long
    polls (of at most ``max_poll_seconds``) and ``streams`` bound the threads callers can hold.
    """

    def __init__(self, spec: ParamSpec, *, round_timeout: float = 300.0, liveness_seconds: float = 60.0,
                 total_rounds: int = 0, bytes_per_value: float = 4.0, max_clients: int | None = None,
                 admit: Callable[[str], bool] | None = None,
                 max_examples_per_client: int = MAX_EXAMPLES_PER_CLIENT, max_polls: int = 128,
                 max_poll_seconds: float = 30.0, streams: StreamLimits | None = None) -> None:
        self.spec = spec
        self.round_timeout = round_timeout
        self.liveness_seconds = liveness_seconds
        self.run_id = uuid.uuid4().hex
        self.total_rounds = total_rounds
        self.completed_rounds = 0
        self.state = RUNNING
        self.max_clients = max_clients
        self.admit = admit
        self.max_examples_per_client = max_examples_per_client
        self.max_polls = max_polls
        self.max_poll_seconds = max_poll_seconds
        # a stream open longer than a round cannot deliver a result in time for it
        self.streams = StreamWatch(streams or StreamLimits(max_seconds=round_timeout + 60.0))
        self._polling = 0  # clients with a long poll open
        self._cv = threading.Condition()
        self._clients: dict[str, _ClientState] = {}
        self._tasks: dict[str, _Task] = {}
        self._uploads: dict[tuple[str, str], Assembly] = {}
        # float32 updates; secure aggregation's 64-bit sums and CKKS ciphertexts are larger per value.
        # A result may be as large as the arrays its task declares (SCAFFOLD: two model-sized vectors).
        self.bytes_per_value = bytes_per_value

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    # ----- the Runtime side, called by the round loop -------------------------------------
    def client_ids(self) -> list[str]:
        now = time.monotonic()
        with self._cv:
            return [cid for cid, c in self._clients.items()
                    if c.joined and now - c.last_seen <= self.liveness_seconds]

    def declared_examples(self, client_id: str) -> tuple[int, int] | None:
        """(train, test) examples ``client_id`` declared when it joined (within the ceiling); None if unknown."""
        with self._cv:
            state = self._clients.get(client_id)
            return None if state is None else state.declared

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
        shared: dict[tuple, bytes] = {}  # the round's weights become bytes once, and every body references them
        if tasks:
            self._forget_before(min(t.round for t in tasks) - 1)
        for task in tasks:  # offer each task as soon as it is encoded: downloads overlap the encoding
            body = Body(encode_parts(task, shared))
            uplink = tuple(task.config.get("uplink", ("update",))) if isinstance(task, TrainTask) else ()
            entry = _Task(f"{task.round}-{kind}-{task.client_id}-{uuid.uuid4().hex[:12]}", task.client_id, kind,
                          task.round, body, stage=getattr(task, "stage", ""), uplink=uplink,
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
        """Tell polling clients the run is over (they exit)."""
        self._set_state(FINISHED)

    def stop(self) -> None:
        """Tell polling clients the server is stopping before the run is over (they wait and rejoin)."""
        self._set_state(STOPPING)

    def _set_state(self, state: int) -> None:
        with self._cv:
            self.state = state
            self._cv.notify_all()
        self.streams.shutdown()

    def wake(self) -> None:
        """Wake waiting polls (a caller went away)."""
        with self._cv:
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
        return state

    def _close(self, entry: _Task) -> None:
        entry.closed = True
        state = self._clients.get(entry.client_id)
        if state is not None and entry in state.queue:
            state.queue.remove(entry)
        self._uploads.pop((entry.client_id, entry.task_id), None)
        entry.body = None  # the round has moved on: keep only a small tombstone for late or replayed uploads
        entry.result = None

    def _admit(self, client_id: str) -> None:
        """Let a new id join, or raise: not admitted, or the run already has its ``max_clients``."""
        if self.admit is not None and not self.admit(client_id):
            raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                            f"client {client_id[:80]!r} is not admitted to this run; ask the operator to add it")
        if self.max_clients is None:
            return
        joined = [cid for cid, c in self._clients.items() if c.joined]
        if len(joined) < self.max_clients:
            return
        now = time.monotonic()
        for cid in joined:  # an id silent past liveness with nothing pending gives its place up
            c = self._clients[cid]
            if now - c.last_seen > self.liveness_seconds and not c.queue and c.polls == 0:
                del self._clients[cid]
                log.info("client %s dropped after %.0f s of silence; %s takes its place", cid,
                         now - c.last_seen, client_id)
                return
        raise AuthError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"this run takes {self.max_clients} clients and all have joined; {client_id[:80]!r} is not "
                        "one of them (retry later, or start the server with more --clients)")

    def require_joined(self, client_id: str) -> None:
        """Raise FAILED_PRECONDITION unless ``client_id`` has joined (before it may hold a stream)."""
        with self._cv:
            self._joined(client_id)

    def _joined(self, client_id: str) -> _ClientState:
        state = self._clients.get(client_id)
        if state is None or not state.joined:
            raise AuthError(grpc.StatusCode.FAILED_PRECONDITION,
                            f"client {client_id[:80]!r} has not joined this server (it may have restarted); "
                            "call Join first")
        return state

    # ----- the service side, called from gRPC handler threads ------------------------------
    def join(self, client_id: str, examples: tuple[int, int] | None = None) -> pb.JoinReply:
        """Admit ``client_id`` (or refuse it) and record the (train, test) example counts it declares (None: it
        declares none, and its results are bounded by the ceiling alone)."""
        if self.state == STOPPING:
            raise AuthError(grpc.StatusCode.UNAVAILABLE, "the server is stopping; join again when it is back")
        ceiling = self.max_examples_per_client
        if examples is not None and max(examples) > ceiling:
            raise AuthError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"client declares {examples[0]} training and {examples[1]} test examples; this "
                            f"server accepts at most {ceiling} per client (max_examples_per_client)")
        with self._cv:
            state = self._clients.get(client_id)
            if state is None or not state.joined:
                self._admit(client_id)
                state = self._client(client_id)
                state.joined = True
                log.info("client %s connected", client_id)
            state.declared = None if examples is None else (int(examples[0]), int(examples[1]))
            state.last_seen = time.monotonic()
            self._cv.notify_all()
            return pb.JoinReply(run_id=self.run_id, completed_rounds=self.completed_rounds,
                                total_rounds=self.total_rounds)

    def poll(self, client_id: str, wait_seconds: float, active: Callable[[], bool] | None = None) -> pb.TaskInfo:
        """The client's next task, waiting up to ``wait_seconds`` (capped) for one; a newer poll by the same client
        ends this one, and ``active()`` turning false (the caller went away) ends it too."""
        if not (math.isfinite(wait_seconds) and wait_seconds >= 0):
            raise AuthError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"wait_seconds must be a finite number >= 0; got {wait_seconds}")
        deadline = time.monotonic() + min(wait_seconds, self.max_poll_seconds)
        with self._cv:
            if self.state != RUNNING:
                return pb.TaskInfo(state=self.state, finished=self.state == FINISHED)
            state = self._joined(client_id)
            if state.polls == 0 and self._polling >= self.max_polls:
                raise AuthError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"server has {self._polling} long polls open, its limit; retry with backoff")
            state.poll_seq += 1
            mine = state.poll_seq
            state.polls += 1
            self._polling += state.polls == 1
            self._cv.notify_all()  # an older poll of this client returns now
            try:
                while True:
                    state.last_seen = time.monotonic()
                    if self.state != RUNNING:
                        return pb.TaskInfo(state=self.state, finished=self.state == FINISHED)
                    if state.queue:
                        t = state.queue[0]
                        return pb.TaskInfo(has_task=True, task_id=t.task_id, kind=t.kind, round=t.round,
                                           size=t.body.size, sha256=t.body.sha256)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or state.poll_seq != mine or (active is not None and not active()):
                        return pb.TaskInfo()
                    self._cv.wait(timeout=remaining)
            finally:
                state.polls -= 1
                self._polling -= state.polls == 0

    def task_for_download(self, client_id: str, task_id: str) -> tuple[str, Body]:
        """The id and body of an open task given to ``client_id``."""
        _check_id(task_id, "task_id")
        with self._cv:
            entry = self._tasks.get(task_id)
            if entry is None or entry.closed or entry.body is None:
                raise AuthError(grpc.StatusCode.NOT_FOUND, f"task {task_id} is not open (finished or expired)")
            if entry.client_id != client_id:
                raise AuthError(grpc.StatusCode.PERMISSION_DENIED, f"task {task_id} was not given to {client_id}")
            self._client(client_id).last_seen = time.monotonic()
            return entry.task_id, entry.body

    def upload_status(self, client_id: str, transfer_id: str) -> pb.UploadReply:
        _check_id(transfer_id, "transfer_id")
        with self._cv:
            entry = self._tasks.get(transfer_id)
            if entry is not None and entry.client_id == client_id and entry.accepted:
                return pb.UploadReply(received=entry.result_size, complete=True)
            assembly = self._uploads.get((client_id, transfer_id))
            return pb.UploadReply(received=assembly.received if assembly else 0)

    def receive(self, client_id: str, stream: Iterator[pb.Chunk],
                progress: Callable[[], None] | None = None) -> pb.UploadReply:
        """Take one upload stream (possibly resuming an earlier one) and accept the result when complete.

        ``progress()`` is called after each chunk placed (the stream watchdog's sign of life)."""
        assembly = entry = None
        for chunk in stream:
            if not chunk.data:
                raise AuthError(grpc.StatusCode.INVALID_ARGUMENT,
                                "empty upload chunk: every chunk must carry data (resume from UploadStatus's "
                                "offset)")
            if assembly is None:
                _check_id(chunk.transfer_id, "transfer_id")
                entry = self._open_task_for_upload(client_id, chunk.transfer_id)
                if chunk.total_size > entry.max_bytes:
                    raise AuthError(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"result of {chunk.total_size} bytes is larger than this task's "
                                    f"{entry.max_bytes}; send the task's arrays ({', '.join(entry.uplink)}) of "
                                    f"{self.spec.numel} values each in this run's format")
                if chunk.total_size < 1 or len(chunk.sha256) != 32:
                    raise AuthError(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"upload declares {chunk.total_size} bytes and a {len(chunk.sha256)}-byte "
                                    "checksum; send the body's size (> 0) and its 32-byte SHA-256")
                with self._cv:
                    key = (client_id, entry.task_id)
                    assembly = self._uploads.get(key)
                    if assembly is None or (assembly.total_size, assembly.checksum) != (chunk.total_size,
                                                                                      chunk.sha256):
                        assembly = self._uploads[key] = Assembly(chunk.total_size, chunk.sha256)
            elif chunk.transfer_id != entry.task_id:
                raise AuthError(grpc.StatusCode.INVALID_ARGUMENT, "one upload stream carries one transfer")
            if chunk.offset < 0:
                raise AuthError(grpc.StatusCode.INVALID_ARGUMENT, f"chunk offset {chunk.offset} is negative")
            try:
                assembly.add(chunk)
            except TransferError as exc:
                raise AuthError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
            if progress is not None:
                progress()
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
        except Exception as exc:  # noqa: BLE001 - hostile bytes: whatever decoding trips on, the body is malformed
            raise AuthError(grpc.StatusCode.INVALID_ARGUMENT, f"result is malformed ({type(exc).__name__}); the "
                            "sender must use fedlearn's encoder") from None
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


def _check_id(value: str, name: str) -> None:
    if not value or len(value) > MAX_ID_CHARS:
        raise AuthError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"{name} must be 1 to {MAX_ID_CHARS} characters (the id PollTask gave); got {len(value)}")


class FedLearnServicer(pb_grpc.FedLearnServicer):
    """Maps RPCs to the runtime after authenticating the caller; every refusal is a clear status.

    A fault of the server itself answers INTERNAL with one line (the traceback goes to the log), never
    gRPC's bare UNKNOWN."""

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

    def _guard(self, context: grpc.ServicerContext, call, rpc: str):
        client_id = self._identify(context)
        try:
            return call(client_id)
        except AuthError as exc:
            # a message may quote hostile input (an id, a dtype): one short line, within gRPC's metadata limit
            refusal = (exc.code, _one_line(str(exc)))
            log.warning("refused %s %s: %s", rpc, client_id[:80], refusal[1])
        except grpc.RpcError:  # the caller cancelled, or the stream watchdog cut the call: nothing to answer
            raise
        except Exception:  # noqa: BLE001 - a server fault: answer one line, keep the traceback in the log
            log.exception("%s from %s failed inside the server", rpc, client_id[:80])
            refusal = (grpc.StatusCode.INTERNAL, f"{rpc} failed inside the server; the server's log has the details")
        context.abort(*refusal)

    def Join(self, request, context):  # noqa: N802 (gRPC method names)
        def call(client_id: str):
            check_format(context, FORMAT_VERSION)
            if request.client_id and request.client_id != client_id:
                raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                                f"authenticated as {client_id!r}, cannot join as {request.client_id[:80]!r}")
            declared = [request.HasField(f) for f in ("train_examples", "test_examples")]
            if any(declared) and not all(declared):
                raise AuthError(grpc.StatusCode.INVALID_ARGUMENT,
                                "declare both train_examples and test_examples at Join, or neither")
            examples = (request.train_examples, request.test_examples) if all(declared) else None
            return self.runtime.join(client_id, examples)

        return self._guard(context, call, "Join")

    def PollTask(self, request, context):  # noqa: N802
        context.add_callback(self.runtime.wake)  # a caller that goes away ends its poll at once
        return self._guard(context, lambda cid: self.runtime.poll(cid, request.wait_seconds, context.is_active),
                           "PollTask")

    def DownloadTask(self, request, context):  # noqa: N802
        def call(client_id: str) -> tuple[str, Body, OpenStream]:
            task_id, body = self.runtime.task_for_download(client_id, request.task_id)
            if request.offset < 0 or request.offset > body.size:
                raise AuthError(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} outside 0..{body.size}")
            return task_id, body, self.runtime.streams.open(client_id, "download", context.cancel)

        task_id, body, stream = self._guard(context, call, "DownloadTask")
        context.add_callback(lambda: self.runtime.streams.close(stream))
        try:
            for chunk in body.chunks(task_id, request.offset):
                stream.progress()
                yield chunk
        finally:
            self.runtime.streams.close(stream)

    def UploadResult(self, request_iterator, context):  # noqa: N802
        def call(client_id: str) -> pb.UploadReply:
            self.runtime.require_joined(client_id)  # ids that never joined hold no stream
            stream = self.runtime.streams.open(client_id, "upload", context.cancel)
            context.add_callback(lambda: self.runtime.streams.close(stream))
            try:
                return self.runtime.receive(client_id, request_iterator, stream.progress)
            finally:
                self.runtime.streams.close(stream)

        return self._guard(context, call, "UploadResult")

    def UploadStatus(self, request, context):  # noqa: N802
        return self._guard(context, lambda cid: self.runtime.upload_status(cid, request.transfer_id), "UploadStatus")


def start_server(runtime: GrpcRuntime, address: str, *, auth: Authenticator | None = None,
                 credentials: grpc.ServerCredentials | None = None,
                 max_workers: int | None = None) -> tuple[grpc.Server, int]:
    """Serve the runtime (and gRPC health checking) on ``address``; returns the server and its bound port.

    Each open long poll or transfer holds a worker thread; the runtime caps both, and the pool is
    larger than the caps together, so Join and UploadStatus always find a free thread.
    """
    if max_workers is None:
        max_workers = runtime.max_polls + runtime.streams.limits.max_streams + RESERVED_WORKERS
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=[("grpc.so_reuseport", 0)])
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
