"""A client process: dials out to the server, polls for tasks, trains locally and pushes results.

Network faults are ridden out (reconnects with exponential backoff and full jitter, transfers
resumed from the last byte); being refused is not: a bad certificate or token ends the client
with a one-line error instead of retrying forever.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import grpc

from fedlearn.client.app import ClientApp, TaskRefused
from fedlearn.errors import FedLearnError
from fedlearn.privacy.secagg.client import SecAggProtocolError
from fedlearn.protocol.codec import FORMAT_VERSION, decode, encode
from fedlearn.runtime.grpc import fedlearn_pb2 as pb
from fedlearn.runtime.grpc import fedlearn_pb2_grpc as pb_grpc
from fedlearn.runtime.grpc.auth import CLIENT_ID_HEADER, FORMAT_HEADER
from fedlearn.runtime.grpc.transfer import Assembly, TransferError, chunks, digest

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}
REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}


class ClientRefused(FedLearnError):
    """The server refused this client's identity: retrying would not help."""


class Backoff:
    """Exponential backoff with full jitter (sleep uniformly in [0, min(cap, base * 2^attempt)])."""

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> None:
        self.base, self.cap, self.attempt = base, cap, 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        delay = self.rng.uniform(0, min(self.cap, self.base * (2 ** self.attempt)))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class RemoteClient:
    """Serves one client's data to a FedLearn server until the run finishes (or ``stop`` is set)."""

    def __init__(self, target: str, client_id: str, app: ClientApp, *,
                 credentials: grpc.ChannelCredentials | None = None, token: str | None = None,
                 poll_seconds: float = 10.0, rpc_timeout: float = 120.0, max_backoff: float = 30.0,
                 give_up_after: float | None = None, stop: threading.Event | None = None,
                 on_join: Callable[[str], None] | None = None) -> None:
        self.target, self.client_id = target, client_id
        self.on_join = on_join  # told the server's run id before the first task (the client files its state by it)
        self.app = app  # the one client entry point, as in every other runtime
        self.credentials = credentials
        self.metadata = [(CLIENT_ID_HEADER, client_id), (FORMAT_HEADER, str(FORMAT_VERSION))] + (
            [("authorization", f"Bearer {token}")] if token else [])
        self.poll_seconds, self.rpc_timeout = poll_seconds, rpc_timeout
        self.backoff = Backoff(cap=max_backoff)
        self.give_up_after = give_up_after
        self.stop = stop or threading.Event()
        self.tasks_done = 0
        self._channel: grpc.Channel | None = None
        self._stub: pb_grpc.FedLearnStub | None = None

    # ----- connection ----------------------------------------------------------------------
    def _connect(self) -> pb_grpc.FedLearnStub:
        if self._stub is None:
            options = [("grpc.keepalive_time_ms", 30_000)]
            self._channel = (grpc.secure_channel(self.target, self.credentials, options) if self.credentials
                             else grpc.insecure_channel(self.target, options))
            self._stub = pb_grpc.FedLearnStub(self._channel)
        return self._stub

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None

    def _retrying(self, what: str, call: Callable[[pb_grpc.FedLearnStub], T]) -> T:
        """Run ``call`` until it succeeds, backing off on network faults; refusals raise ClientRefused."""
        started = time.monotonic()
        while True:
            try:
                value = call(self._connect())
                self.backoff.reset()
                return value
            except grpc.RpcError as exc:
                code = exc.code()
                if code in REFUSED:
                    raise ClientRefused(f"server refused client {self.client_id!r}: {exc.details()}") from None
                if code == grpc.StatusCode.FAILED_PRECONDITION and what == "join":
                    raise ClientRefused(f"server refused to let {self.client_id!r} join: {exc.details()}") from None
                if code not in RETRYABLE:
                    raise
                if self.give_up_after is not None and time.monotonic() - started > self.give_up_after:
                    raise FedLearnError(f"server {self.target} unreachable for {self.give_up_after:.0f} s during "
                                        f"{what}: {exc.details()}") from None
                delay = self.backoff.next_delay()
                log.info("%s: %s (%s); retrying in %.1f s", what, code.name, exc.details(), delay)
                if self.stop.wait(delay):
                    raise InterruptedError("client stopped") from None
                if code == grpc.StatusCode.UNAVAILABLE:
                    self.close()

    # ----- the loop ------------------------------------------------------------------------
    def run(self) -> int:
        """Join, then answer tasks until the server says the run is finished; returns tasks done."""
        reply = self._retrying("join", lambda s: s.Join(pb.JoinRequest(client_id=self.client_id),
                                                         metadata=self.metadata, timeout=self.rpc_timeout))
        log.info("joined run %s (%d/%d rounds done)", reply.run_id, reply.completed_rounds, reply.total_rounds)
        if self.on_join is not None:
            self.on_join(reply.run_id)
        try:
            while not self.stop.is_set():
                info = self._retrying("poll", lambda s: s.PollTask(
                    pb.PollRequest(wait_seconds=self.poll_seconds), metadata=self.metadata,
                    timeout=self.poll_seconds + self.rpc_timeout))
                if info.finished:
                    log.info("run finished after %d tasks", self.tasks_done)
                    return self.tasks_done
                if info.has_task:
                    self._answer(info)
        except InterruptedError:
            pass
        return self.tasks_done

    def _answer(self, info: pb.TaskInfo) -> None:
        try:
            body = self._download(info)
            result = self.app(decode(body))
            self._upload(info.task_id, encode(result))
            self.tasks_done += 1
        except ClientRefused:
            raise
        except (SecAggProtocolError, TaskRefused) as exc:  # asked for what the protocol or policy forbids: silent
            log.warning("task %s refused: %s", info.task_id, exc)
        except FedLearnError as exc:  # a malformed or impossible task: refuse it and keep serving the run
            log.warning("task %s failed here: %s", info.task_id, exc)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                              grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.INVALID_ARGUMENT):
                log.warning("task %s dropped: %s", info.task_id, exc.details())
                return
            raise

    def _download(self, info: pb.TaskInfo) -> bytearray:
        """Fetch a task's body, resuming from the bytes already received after a broken stream."""
        while True:
            assembly = Assembly(info.size, info.sha256)

            def fetch(stub: pb_grpc.FedLearnStub, assembly: Assembly = assembly) -> bytearray:
                request = pb.DownloadRequest(task_id=info.task_id, offset=assembly.received)
                for chunk in stub.DownloadTask(request, metadata=self.metadata, timeout=self.rpc_timeout):
                    assembly.add_bytes(chunk.offset, chunk.data)
                return assembly.body()

            try:
                return self._retrying(f"download {info.task_id}", fetch)
            except TransferError as exc:  # corrupted or inconsistent: fetch it whole again
                log.warning("task %s download failed (%s); downloading it again", info.task_id, exc)

    def _upload(self, task_id: str, body: bytes) -> None:
        """Send a result's body, resuming from what the server already holds after a broken stream."""
        checksum = digest(body)

        def send(stub: pb_grpc.FedLearnStub) -> pb.UploadReply:
            status = stub.UploadStatus(pb.UploadStatusRequest(transfer_id=task_id), metadata=self.metadata,
                                       timeout=self.rpc_timeout)
            if status.complete:
                return status
            return stub.UploadResult(chunks(body, task_id, status.received, checksum), metadata=self.metadata,
                                     timeout=self.rpc_timeout)

        while True:
            reply = self._retrying(f"upload {task_id}", send)
            if reply.complete:
                return

