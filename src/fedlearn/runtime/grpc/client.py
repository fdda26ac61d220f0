"""A client process: dials out to the server, polls for tasks, trains locally and pushes results.

Network faults are ridden out (reconnects with exponential backoff and full jitter, transfers
resumed from the last byte), and so is a server that stops before the run is over (it says
STOPPING, or vanishes): the client keeps trying to join again for up to ``give_up_after`` seconds
and carries on with the resumed server. Being refused is not ridden out: a bad certificate or
token, a request the server calls malformed, or a TLS server reached in plaintext ends the client
(or the task) with a one-line error instead of retrying forever.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
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
# Network faults and a busy or restarting server: retried with backoff until give_up_after.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED}
# A broken stream can surface as these, but so does a fault in the server: retried a few times only.
FLAKY = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FLAKY_RETRIES = 3
REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
TLS_PROBE_EVERY = 10.0  # seconds between checks that an unreachable plaintext target is a TLS server
MAX_REJOINS = 5  # "join first" answers in a row, each right after a successful Join, before giving up


class ClientRefused(FedLearnError):
    """The server refused this client's identity: retrying would not help."""


class ServerUnreachable(FedLearnError):
    """No FedLearn server could be reached at the target for ``give_up_after`` seconds, or it speaks TLS to a
    plaintext client: the client stops."""


class RequestRefused(FedLearnError):
    """The server refused one request with a status that retrying cannot change (malformed, out of turn, ...)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def speaks_tls(target: str, timeout: float = 3.0) -> bool:
    """Whether ``target`` (host:port) answers a TLS handshake: the reason a plaintext channel sees only
    "Socket closed". No certificate is checked; nothing is sent after the handshake."""
    from fedlearn.security import split_host_port

    try:
        host, port = split_host_port(target)
    except (FedLearnError, ValueError):
        return False
    if not port:
        return False
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host or None):
            return True
    except ssl.SSLError as exc:  # a TLS alert (say, a client certificate is required) is TLS too
        return "ALERT" in str(exc.reason or exc).upper()
    except OSError:
        return False


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
                 on_join: Callable[[str], None] | None = None, examples: tuple[int, int] | None = None) -> None:
        self.target, self.client_id = target, client_id
        self.on_join = on_join  # told the server's run id before the first task (the client files its state by it)
        self.examples = examples  # (train, test) examples this client holds, declared at Join (None: undeclared)
        self.run_id: str | None = None
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
        self._tls_checked_at = -TLS_PROBE_EVERY

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
        """Run ``call`` until it succeeds, backing off on network faults; an identity refusal raises
        ClientRefused, any other status retrying cannot change raises RequestRefused."""
        started = time.monotonic()
        flaky = 0
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
                if code in FLAKY:
                    flaky += 1
                    if flaky > FLAKY_RETRIES:
                        raise RequestRefused(code, f"{what} failed {flaky} times with {code.name}: "
                                                   f"{exc.details()}") from None
                elif code not in RETRYABLE:
                    raise RequestRefused(code, f"server refused {what} ({code.name}): {exc.details()}") from None
                if code == grpc.StatusCode.UNAVAILABLE:
                    self._refuse_if_tls()
                if self.give_up_after is not None and time.monotonic() - started > self.give_up_after:
                    raise ServerUnreachable(f"server {self.target} unreachable for {self.give_up_after:.0f} s during "
                                            f"{what}: {exc.details()}") from None
                delay = self.backoff.next_delay()
                log.info("%s: %s (%s); retrying in %.1f s", what, code.name, exc.details(), delay)
                if self.stop.wait(delay):
                    raise InterruptedError("client stopped") from None
                if code == grpc.StatusCode.UNAVAILABLE:
                    self.close()

    def _refuse_if_tls(self) -> None:
        """A plaintext channel to a TLS server fails as a bare "Socket closed": say so instead of retrying."""
        now = time.monotonic()
        if self.credentials is not None or now - self._tls_checked_at < TLS_PROBE_EVERY:
            return
        self._tls_checked_at = now
        if speaks_tls(self.target):
            raise ServerUnreachable(f"server {self.target} speaks TLS but this client connects in plaintext; pass --ca "
                                "with the CA certificate that signed the server's certificate")

    # ----- the loop ------------------------------------------------------------------------
    def run(self) -> int:
        """Join, then answer tasks until the server says the run is finished; returns tasks done.

        A server that stops before the end (STOPPING, or gone) is waited for and joined again."""
        try:
            self._join()
            rejoins = 0
            while not self.stop.is_set():
                try:
                    info = self._retrying("poll", lambda s: s.PollTask(
                        pb.PollRequest(wait_seconds=self.poll_seconds), metadata=self.metadata,
                        timeout=self.poll_seconds + self.rpc_timeout))
                except RequestRefused as exc:
                    if exc.code != grpc.StatusCode.FAILED_PRECONDITION or rejoins >= MAX_REJOINS:
                        raise
                    rejoins += 1  # the server restarted and does not know this client yet
                    log.info("server does not know this client (%s); joining again", exc)
                    self._join()
                    continue
                rejoins = 0
                if info.state == pb.RUN_STATE_STOPPING:
                    wait = "" if self.give_up_after is None else f" (for up to {self.give_up_after:.0f} s)"
                    log.info("server is stopping before the run is over; waiting for it to come back%s", wait)
                    self.close()
                    if self.stop.wait(self.backoff.next_delay()):
                        break
                    self._join()
                    continue
                if info.finished or info.state == pb.RUN_STATE_FINISHED:
                    log.info("run finished after %d tasks", self.tasks_done)
                    return self.tasks_done
                if info.has_task:
                    self._answer(info)
        except InterruptedError:
            pass
        return self.tasks_done

    def _join(self) -> None:
        request = pb.JoinRequest(client_id=self.client_id)
        if self.examples is not None:
            request.train_examples, request.test_examples = self.examples
        reply = self._retrying("join", lambda s: s.Join(request, metadata=self.metadata, timeout=self.rpc_timeout))
        log.info("joined run %s (%d/%d rounds done)", reply.run_id, reply.completed_rounds, reply.total_rounds)
        if reply.run_id != self.run_id:
            if self.run_id is not None:
                log.warning("server now serves run %s, not %s: answering the new run", reply.run_id, self.run_id)
            self.run_id = reply.run_id
            if self.on_join is not None:
                self.on_join(reply.run_id)

    def _answer(self, info: pb.TaskInfo) -> None:
        try:
            body = self._download(info)
            result = self.app(decode(body))
            self._upload(info.task_id, encode(result))
            self.tasks_done += 1
        except (ClientRefused, ServerUnreachable):
            raise
        except RequestRefused as exc:  # expired, answered already, or refused as malformed: not worth a retry
            log.warning("task %s dropped: %s", info.task_id, exc)
        except (SecAggProtocolError, TaskRefused) as exc:  # asked for what the protocol or policy forbids: silent
            log.warning("task %s refused: %s", info.task_id, exc)
        except FedLearnError as exc:  # a malformed or impossible task: refuse it and keep serving the run
            log.warning("task %s failed here: %s", info.task_id, exc)

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
            offset = status.received if status.received < len(body) else 0  # never an empty chunk
            return stub.UploadResult(chunks(body, task_id, offset, checksum), metadata=self.metadata,
                                     timeout=self.rpc_timeout)

        while True:
            reply = self._retrying(f"upload {task_id}", send)
            if reply.complete:
                return

