"""The gRPC runtime's wire protocol: every bad upload or download gets a clear status, and none spoils the round.

Each test plays the clients by hand over a raw stub (so it controls every byte sent) against a
real server on 127.0.0.1, while the round loop's side, ``runtime.deliver``, runs in a thread. After
each refusal a well-behaved client must still be served, and the round must yield exactly its
result.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Iterable, Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from torch import nn

from fedlearn.protocol.codec import FORMAT_VERSION, decode, encode
from fedlearn.protocol.messages import EvalResult, TrainResult, TrainTask
from fedlearn.protocol.params import ParamSpec
from fedlearn.runtime.base import ClientFailure
from fedlearn.runtime.grpc import fedlearn_pb2 as pb
from fedlearn.runtime.grpc import fedlearn_pb2_grpc as pb_grpc
from fedlearn.runtime.grpc.auth import CLIENT_ID_HEADER, FORMAT_HEADER
from fedlearn.runtime.grpc.server import HEADER_SLACK, SERVICE_NAME, GrpcRuntime, start_server
from fedlearn.runtime.grpc.transfer import CHUNK_BYTES, chunks, digest
from fedlearn.security import Authenticator, TokenStore

SMALL_SPEC = ParamSpec.from_module(nn.Linear(4, 3))  # 15 values
WAIT = 10.0  # the longest any step may block before the test fails instead of hanging

# ----- helpers: a served runtime, a round running in a thread, a hand-played client ---------------


class Round:
    """``list(runtime.deliver(tasks))`` in a background thread, as the round loop would run it."""

    def __init__(self, runtime: GrpcRuntime, tasks: list[TrainTask]) -> None:
        self.results: list | None = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.elapsed = 0.0
        self.thread = threading.Thread(target=self._run, args=(runtime, tasks), daemon=True)
        self.thread.start()

    def _run(self, runtime: GrpcRuntime, tasks: list[TrainTask]) -> None:
        try:
            self.results = list(runtime.deliver(tasks))
        except BaseException as exc:  # re-raised in the test's thread by wait()
            self.error = exc
        self.elapsed = time.monotonic() - self.started

    def wait(self, timeout: float = WAIT) -> list:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "runtime.deliver did not finish"
        if self.error is not None:
            raise self.error
        assert self.results is not None
        return self.results


class Served:
    """A GrpcRuntime served on 127.0.0.1 (a free port) and a channel to it."""

    def __init__(self, spec: ParamSpec, *, round_timeout: float = WAIT, auth: Authenticator | None = None) -> None:
        self.runtime = GrpcRuntime(spec, round_timeout=round_timeout)
        self.server, self.port = start_server(self.runtime, "127.0.0.1:0", auth=auth)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.FedLearnStub(self.channel)

    def round(self, tasks: list[TrainTask]) -> Round:
        return Round(self.runtime, tasks)

    def peer(self, client_id: str, metadata: list[tuple[str, str]] | None = None) -> Peer:
        return Peer(self.stub, client_id, metadata)

    def close(self) -> None:
        self.runtime.finish()  # ends long polls
        self.channel.close()
        self.server.stop(0)


class Peer:
    """One client played by hand over a raw stub; ``metadata`` defaults to the claimed-id header."""

    def __init__(self, stub: pb_grpc.FedLearnStub, client_id: str, metadata: list[tuple[str, str]] | None) -> None:
        self.stub, self.client_id = stub, client_id
        self.metadata = [*(metadata if metadata is not None else [(CLIENT_ID_HEADER, client_id)]),
                         (FORMAT_HEADER, str(FORMAT_VERSION))]

    def join(self, client_id: str | None = None) -> pb.JoinReply:
        request = pb.JoinRequest(client_id=self.client_id if client_id is None else client_id)
        return self.stub.Join(request, metadata=self.metadata, timeout=WAIT)

    def poll(self, wait: float = WAIT) -> pb.TaskInfo:
        return self.stub.PollTask(pb.PollRequest(wait_seconds=wait), metadata=self.metadata, timeout=wait + WAIT)

    def task(self) -> pb.TaskInfo:
        info = self.poll()
        assert info.has_task, f"{self.client_id} was offered no task"
        return info

    def download(self, task_id: str, offset: int = 0) -> bytes:
        stream = self.stub.DownloadTask(pb.DownloadRequest(task_id=task_id, offset=offset), metadata=self.metadata,
                                        timeout=WAIT)
        return b"".join(chunk.data for chunk in stream)

    def upload(self, stream: Iterable[pb.Chunk]) -> pb.UploadReply:
        return self.stub.UploadResult(iter(stream), metadata=self.metadata, timeout=WAIT)

    def send(self, task_id: str, body: bytes, *, offset: int = 0, checksum: bytes | None = None,
             size: int | None = None) -> pb.UploadReply:
        """Upload ``body`` from ``offset``, by default in about five chunks (several per stream, as a real upload)."""
        size = size or min(CHUNK_BYTES, max(16, len(body) // 5))
        return self.upload(chunks(body, task_id, offset, checksum, size=size))

    def status(self, task_id: str) -> pb.UploadReply:
        return self.stub.UploadStatus(pb.UploadStatusRequest(transfer_id=task_id), metadata=self.metadata,
                                      timeout=WAIT)


@pytest.fixture
def serve():
    """Start servers on demand; every one is stopped (and its runtime finished) afterwards."""
    started: list[Served] = []

    def make(spec: ParamSpec = SMALL_SPEC, **kwargs) -> Served:
        served = Served(spec, **kwargs)
        started.append(served)
        return served

    yield make
    for served in started:
        served.close()


def refusal(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def assert_refused(error: grpc.RpcError, code: grpc.StatusCode, *words: str) -> None:
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    for word in words:
        assert word in error.details(), error.details()


def task_for(client_id: str, rnd: int = 1, spec: ParamSpec = SMALL_SPEC, config: dict | None = None) -> TrainTask:
    g = torch.Generator().manual_seed(rnd)
    return TrainTask(rnd, client_id, {"weights": torch.randn(spec.numel, generator=g)},
                     {"lr": 0.1, "local_epochs": 1} if config is None else config)


def answer(client_id: str, rnd: int = 1, numel: int = SMALL_SPEC.numel, scale: float = 0.5) -> TrainResult:
    update = torch.arange(numel, dtype=torch.float32).mul_(scale)
    return TrainResult(rnd, client_id, 8 + len(client_id), {"update": update}, {"train_loss": 0.25})


def assert_same_result(got, expected: TrainResult) -> None:
    assert isinstance(got, TrainResult), got
    assert (got.round, got.client_id, got.num_examples, got.metrics, got.sealed) == (
        expected.round, expected.client_id, expected.num_examples, expected.metrics, expected.sealed)
    assert sorted(got.arrays) == sorted(expected.arrays)
    for name, value in expected.arrays.items():
        assert got.arrays[name].dtype == value.dtype, name
        assert torch.equal(got.arrays[name], value), name


def answer_task(peer: Peer, info: pb.TaskInfo, result: TrainResult) -> None:
    body = encode(result)
    reply = peer.send(info.task_id, body)
    assert (reply.received, reply.complete) == (len(body), True)


def one_open_round(serve, client_id: str = "c1", **kwargs) -> tuple[Served, Peer, Round, pb.TaskInfo]:
    """A server, a joined client, a running round with one task for it, and the task as polled."""
    served = serve(**kwargs)
    peer = served.peer(client_id)
    peer.join()
    rnd = served.round([task_for(client_id)])
    return served, peer, rnd, peer.task()


def finish_with_good_answer(peer: Peer, info: pb.TaskInfo, rnd: Round) -> None:
    """The well-behaved client answers; the round must yield exactly that result."""
    good = answer(peer.client_id, info.round)
    answer_task(peer, info, good)
    results = rnd.wait()
    assert len(results) == 1
    assert_same_result(results[0], good)


# ----- 1. garbage bodies ----------------------------------------------------------------------------


def _garbage(kind: str, client_id: str) -> bytes:
    if kind == "random":
        return bytes((i * 131 + 7) % 256 for i in range(3000))
    if kind == "magic-then-junk":
        return b"FLM" + bytes([FORMAT_VERSION]) + (40).to_bytes(4, "little") + b"{" * 40 + b"\x00" * 100
    if kind == "truncated-message":
        body = encode(answer(client_id))
        return body[: len(body) - 9]
    if kind == "eval-result":  # a well-formed message of the wrong kind
        return encode(EvalResult(1, client_id, 5, {"loss": 0.5, "accuracy": 0.5}))
    if kind == "task-echoed":
        return encode(task_for(client_id))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["random", "magic-then-junk", "truncated-message", "eval-result", "task-echoed"])
def test_garbage_body_is_invalid_argument_and_the_task_stays_open(serve, kind):
    served, c1, rnd, info = one_open_round(serve)
    garbage = _garbage(kind, "c1")
    # valid chunks carrying a valid SHA-256 of the garbage: only decoding can refuse it
    error = refusal(c1.send, info.task_id, garbage)
    assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT)
    assert any(w in error.details() for w in ("malformed", "expected a TrainResult")), error.details()
    again = c1.poll(wait=0)
    assert again.has_task and again.task_id == info.task_id, "a refused body must leave the task open"
    finish_with_good_answer(c1, info, rnd)


@pytest.mark.parametrize("refused", ["garbage", "wrong-shape", "wrong-round"])
def test_a_refused_body_is_not_held_so_resuming_from_upload_status_succeeds(serve, refused):
    """RemoteClient._upload asks UploadStatus and sends from ``received``: that must work after a refusal."""
    served, c1, rnd, info = one_open_round(serve)
    bad = {"garbage": _garbage("random", "c1"),
           "wrong-shape": encode(TrainResult(1, "c1", 4, {"update": torch.ones(SMALL_SPEC.numel + 1)}, {})),
           "wrong-round": encode(answer("c1", rnd=7))}[refused]
    code = refusal(c1.send, info.task_id, bad).code()
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED)
    status = c1.status(info.task_id)
    assert (status.received, status.complete) == (0, False), (
        "the refused body is still held: a client resuming from UploadStatus would send the real body from "
        f"byte {status.received} and be refused")
    good = answer("c1")
    body = encode(good)
    reply = c1.send(info.task_id, body, offset=status.received)
    assert (reply.received, reply.complete) == (len(body), True)
    assert_same_result(rnd.wait()[0], good)


# ----- 2. truncated stream, resumed ----------------------------------------------------------------


def test_truncated_upload_reports_what_arrived_and_resumes_from_there(serve):
    served, c1, rnd, info = one_open_round(serve)
    good = answer("c1")
    body = encode(good)
    half = len(body) // 2
    first_half = [c for c in chunks(body, info.task_id, size=16) if c.offset < half]
    held = first_half[-1].offset + len(first_half[-1].data)
    reply = c1.upload(first_half)  # the stream ends early, as when a connection drops
    assert (reply.received, reply.complete) == (held, False)
    status = c1.status(info.task_id)
    assert (status.received, status.complete) == (held, False)
    assert rnd.thread.is_alive(), "a partial upload is not a result: the round still waits"

    reply = c1.send(info.task_id, body, offset=status.received)
    assert (reply.received, reply.complete) == (len(body), True)
    assert_same_result(rnd.wait()[0], good)


def test_upload_status_after_acceptance_reports_the_result_size(serve):
    served, c1, rnd, info = one_open_round(serve)
    good = answer("c1")
    body = encode(good)
    answer_task(c1, info, good)
    rnd.wait()
    status = c1.status(info.task_id)
    assert status.complete
    assert status.received == len(body), (
        f"UploadStatus says {status.received} bytes held, but the result was {len(body)} bytes "
        f"(the task was {info.size})")


# ----- 3. chunks that do not continue the held bytes -----------------------------------------------


def test_chunk_that_does_not_continue_the_held_offset_is_failed_precondition(serve):
    served, c1, rnd, info = one_open_round(serve)
    good = answer("c1")
    body = encode(good)
    total, checksum = len(body), digest(body)

    def chunk(offset: int, end: int) -> pb.Chunk:
        return pb.Chunk(transfer_id=info.task_id, offset=offset, data=body[offset:end], total_size=total,
                        sha256=checksum)

    # nothing held yet: a stream must start at byte 0
    assert_refused(refusal(c1.upload, [chunk(10, total)]), grpc.StatusCode.FAILED_PRECONDITION, "resume")
    half = total // 2
    assert c1.upload([chunk(0, half)]).received == half
    for offset in (half + 1, half - 1, 0):  # a gap, an overlap, a restart
        error = refusal(c1.upload, [chunk(offset, total)])
        assert_refused(error, grpc.StatusCode.FAILED_PRECONDITION, "UploadStatus")
    # a gap inside one stream
    error = refusal(c1.upload, [chunk(half, half + 8), chunk(half + 9, total)])
    assert_refused(error, grpc.StatusCode.FAILED_PRECONDITION)
    # a chunk running past the announced size
    over = pb.Chunk(transfer_id=info.task_id, offset=half + 8, data=body[half + 8 :] + b"!", total_size=total,
                    sha256=checksum)
    assert_refused(refusal(c1.upload, [over]), grpc.StatusCode.FAILED_PRECONDITION, "past")
    # one stream carries one transfer
    stray = pb.Chunk(transfer_id="other", offset=half + 8, data=body[half + 8 :], total_size=total, sha256=checksum)
    assert_refused(refusal(c1.upload, [chunk(half + 8, half + 8), stray]), grpc.StatusCode.INVALID_ARGUMENT)

    status = c1.status(info.task_id)
    assert (status.received, status.complete) == (half + 8, False)
    reply = c1.send(info.task_id, body, offset=status.received)
    assert (reply.received, reply.complete) == (total, True)
    assert_same_result(rnd.wait()[0], good)


def test_empty_upload_stream_is_invalid_argument(serve):
    served, c1, rnd, info = one_open_round(serve)
    assert_refused(refusal(c1.upload, []), grpc.StatusCode.INVALID_ARGUMENT, "empty")
    finish_with_good_answer(c1, info, rnd)


# ----- 4. checksum mismatch ------------------------------------------------------------------------


def test_body_failing_its_sha256_is_data_loss_and_a_correct_upload_then_succeeds(serve):
    served, c1, rnd, info = one_open_round(serve)
    good = answer("c1")
    body = encode(good)
    error = refusal(c1.send, info.task_id, body, checksum=digest(b"some other body"))
    assert_refused(error, grpc.StatusCode.DATA_LOSS, "SHA-256")
    assert (c1.status(info.task_id).received, c1.status(info.task_id).complete) == (0, False)
    # also when the mismatch shows only at the end of a resumed upload
    flipped = bytearray(body)
    flipped[-1] ^= 0xFF
    half = len(body) // 2
    c1.upload([pb.Chunk(transfer_id=info.task_id, offset=0, data=bytes(flipped[:half]), total_size=len(body),
                        sha256=digest(body))])
    error = refusal(c1.send, info.task_id, bytes(flipped), offset=half, checksum=digest(body))
    assert_refused(error, grpc.StatusCode.DATA_LOSS)
    finish_with_good_answer(c1, info, rnd)


# ----- 5. oversized and wrong-shape updates --------------------------------------------------------


def test_oversized_upload_is_refused_before_the_body_arrives(serve):
    served, c1, rnd, info = one_open_round(serve)
    release = threading.Event()
    sent: list[pb.Chunk] = []

    def stream() -> Iterator[pb.Chunk]:
        chunk = pb.Chunk(transfer_id=info.task_id, offset=0, data=b"\0" * 1024,
                         total_size=upload_limit(served.runtime) + 1, sha256=digest(b"huge"))
        sent.append(chunk)
        yield chunk
        release.wait(WAIT)  # the rest of the body would follow: the server must not wait for it

    started = time.monotonic()
    try:
        error = refusal(c1.upload, stream())
    finally:
        release.set()
    assert time.monotonic() - started < WAIT / 2, "the server waited for the body before refusing its size"
    assert len(sent) == 1
    assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, "larger than", str(SMALL_SPEC.numel))
    assert c1.status(info.task_id).received == 0
    finish_with_good_answer(c1, info, rnd)


def upload_limit(runtime: GrpcRuntime, arrays: int = 1) -> int:
    """The largest result a task declaring ``arrays`` model-sized uplink arrays may send."""
    return int(runtime.spec.numel * runtime.bytes_per_value * arrays) + HEADER_SLACK


def test_a_task_declaring_two_uplink_arrays_accepts_both_and_a_larger_body(serve):
    """SCAFFOLD-like: the task declares ``update`` and ``control_delta``; both arrive intact."""
    served = serve()
    c1 = served.peer("c1")
    c1.join()
    rnd = served.round([task_for("c1", config={"lr": 0.1, "uplink": ["update", "control_delta"]})])
    info = c1.task()
    good = answer("c1")
    good.arrays["control_delta"] = torch.full((SMALL_SPEC.numel,), -0.25)
    one_array_limit = upload_limit(served.runtime)
    over_one = pb.Chunk(transfer_id=info.task_id, offset=0, data=b"\0" * 16, total_size=one_array_limit + 1,
                        sha256=digest(b"big"))
    assert c1.upload([over_one]).received == 16, "two declared arrays allow a body past one array's limit"
    answer_task(c1, info, good)
    assert_same_result(rnd.wait()[0], good)


@pytest.mark.parametrize("arrays", [("update", "extra"), ("gradient",), ()])
def test_result_carrying_other_arrays_than_the_task_declared_is_invalid_argument(serve, arrays):
    served, c1, rnd, info = one_open_round(serve)
    bad = TrainResult(1, "c1", 4, {name: torch.ones(SMALL_SPEC.numel) for name in arrays}, {})
    error = refusal(c1.send, info.task_id, encode(bad))
    assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, "declared", "update")
    finish_with_good_answer(c1, info, rnd)


def test_message_of_another_format_version_is_invalid_argument_naming_both_versions(serve):
    served, c1, rnd, info = one_open_round(serve)
    body = bytearray(encode(answer("c1")))
    body[3] = FORMAT_VERSION - 1
    error = refusal(c1.send, info.task_id, bytes(body))
    assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, f"version {FORMAT_VERSION - 1}",
                   f"version {FORMAT_VERSION}")
    finish_with_good_answer(c1, info, rnd)


@pytest.mark.parametrize("shape", [(14,), (16,), (3, 5), (0,)])
def test_wrong_shape_update_is_invalid_argument(serve, shape):
    served, c1, rnd, info = one_open_round(serve)
    bad = TrainResult(1, "c1", 4, {"update": torch.ones(shape)}, {})
    error = refusal(c1.send, info.task_id, encode(bad))
    assert_refused(error, grpc.StatusCode.INVALID_ARGUMENT, f"{SMALL_SPEC.numel} values")
    finish_with_good_answer(c1, info, rnd)


# ----- 6. results that are not this client's to give, replays, unknown and late tasks ---------------


@pytest.mark.parametrize(("rnd_no", "client_id"), [(2, "c1"), (0, "c1"), (1, "c2")])
def test_result_naming_another_round_or_client_is_permission_denied(serve, rnd_no, client_id):
    served, c1, rnd, info = one_open_round(serve)
    forged = answer(client_id, rnd_no)
    error = refusal(c1.send, info.task_id, encode(forged))
    assert_refused(error, grpc.StatusCode.PERMISSION_DENIED, "round")
    finish_with_good_answer(c1, info, rnd)


def test_upload_for_another_clients_task_is_permission_denied(serve):
    served = serve()
    c1, c2 = served.peer("c1"), served.peer("c2")
    c1.join()
    c2.join()
    rnd = served.round([task_for("c1"), task_for("c2")])
    info1, info2 = c1.task(), c2.task()
    assert info1.task_id != info2.task_id
    for forged in (answer("c2"), answer("c1")):
        error = refusal(c1.send, info2.task_id, encode(forged))
        assert_refused(error, grpc.StatusCode.PERMISSION_DENIED, "another client")
    assert c2.status(info2.task_id).received == 0
    good1, good2 = answer("c1", scale=1.0), answer("c2", scale=2.0)
    answer_task(c2, info2, good2)
    answer_task(c1, info1, good1)
    results = rnd.wait()
    assert len(results) == 2
    assert_same_result(results[0], good1)  # in task order, not arrival order
    assert_same_result(results[1], good2)


def test_replayed_result_is_already_exists(serve):
    served = serve()
    c1, c2 = served.peer("c1"), served.peer("c2")
    c1.join()
    c2.join()
    rnd = served.round([task_for("c1"), task_for("c2")])
    info1, info2 = c1.task(), c2.task()
    good1, good2 = answer("c1"), answer("c2")
    answer_task(c1, info1, good1)
    # while the round is still open, and with a different (even valid-looking) body
    for body in (encode(good1), encode(answer("c1", scale=3.0))):
        assert_refused(refusal(c1.send, info1.task_id, body), grpc.StatusCode.ALREADY_EXISTS)
    assert not c1.poll(wait=0).has_task, "an answered task is not offered again"
    answer_task(c2, info2, good2)
    results = rnd.wait()
    # after the round has moved on, too
    assert_refused(refusal(c1.send, info1.task_id, encode(good1)), grpc.StatusCode.ALREADY_EXISTS)
    assert [r.client_id for r in results] == ["c1", "c2"]
    assert_same_result(results[0], good1)
    assert_same_result(results[1], good2)


def test_upload_for_an_unknown_task_is_not_found(serve):
    served, c1, rnd, info = one_open_round(serve)
    error = refusal(c1.send, "1-train-c1-000000000000", encode(answer("c1")))
    assert_refused(error, grpc.StatusCode.NOT_FOUND, "1-train-c1-000000000000")
    assert_refused(refusal(c1.download, "no-such-task"), grpc.StatusCode.NOT_FOUND)
    finish_with_good_answer(c1, info, rnd)


def test_late_upload_after_the_round_deadline_is_failed_precondition(serve):
    served, c1, rnd, info = one_open_round(serve, round_timeout=1.0)
    body = encode(answer("c1"))
    half = len(body) // 2
    c1.upload([pb.Chunk(transfer_id=info.task_id, offset=0, data=body[:half], total_size=len(body),
                        sha256=digest(body))])
    results = rnd.wait()
    assert len(results) == 1 and isinstance(results[0], ClientFailure) and results[0].client_id == "c1"
    # a new upload, and the resumption of the one begun before the deadline: both are too late
    assert_refused(refusal(c1.send, info.task_id, body), grpc.StatusCode.FAILED_PRECONDITION, "over")
    assert_refused(refusal(c1.send, info.task_id, body, offset=half), grpc.StatusCode.FAILED_PRECONDITION)
    assert_refused(refusal(c1.download, info.task_id), grpc.StatusCode.NOT_FOUND)
    assert not c1.poll(wait=0).has_task
    # the server goes on: the next round is served normally
    rnd2 = served.round([task_for("c1", rnd=2)])
    info2 = c1.task()
    assert info2.round == 2 and info2.task_id != info.task_id
    finish_with_good_answer(c1, info2, rnd2)


def test_finished_round_releases_its_results(serve):
    """A long run must not keep every round's results (and task bodies) alive in the runtime."""
    served, c1, rnd, info = one_open_round(serve)
    answer_task(c1, info, answer("c1"))
    results = rnd.wait()
    payload = weakref.ref(results[0].arrays["update"])
    del results
    rnd.results = None
    gc.collect()
    assert payload() is None, "the runtime still holds the payload of a finished round's result"


# ----- 7. downloads --------------------------------------------------------------------------------


def test_download_resumes_from_an_offset_and_refuses_strangers_and_bad_offsets(serve):
    spec = ParamSpec.from_module(nn.Linear(1000, 700, device="meta"))  # 700,700 values: ~2.8 MB, 3 chunks
    served = serve(spec)
    c1, c2 = served.peer("c1"), served.peer("c2")
    c1.join()
    c2.join()
    task = task_for("c1", spec=spec)
    expected = encode(task)
    rnd = served.round([task])
    info = c1.task()
    assert (info.size, info.sha256, info.kind, info.round) == (len(expected), digest(expected), "train", 1)

    stream = c1.stub.DownloadTask(pb.DownloadRequest(task_id=info.task_id), metadata=c1.metadata, timeout=WAIT)
    first = next(stream)
    stream.cancel()  # the connection breaks after the first chunk
    assert (first.transfer_id, first.offset, first.total_size, first.sha256) == (
        info.task_id, 0, info.size, info.sha256)
    assert 0 < len(first.data) < info.size
    received = bytearray(first.data)
    for chunk in c1.stub.DownloadTask(pb.DownloadRequest(task_id=info.task_id, offset=len(received)),
                                      metadata=c1.metadata, timeout=WAIT):
        assert chunk.offset == len(received)
        received += chunk.data
    assert bytes(received) == expected and digest(bytes(received)) == info.sha256
    assert torch.equal(decode(bytes(received)).weights, task.weights)

    assert c1.download(info.task_id, offset=12345) == expected[12345:]  # any offset, not only chunk borders
    tail = list(c1.stub.DownloadTask(pb.DownloadRequest(task_id=info.task_id, offset=info.size),
                                     metadata=c1.metadata, timeout=WAIT))
    assert [(c.offset, c.data, c.total_size) for c in tail] == [(info.size, b"", info.size)]

    assert_refused(refusal(c2.download, info.task_id), grpc.StatusCode.PERMISSION_DENIED)
    for offset in (info.size + 1, -1):
        assert_refused(refusal(c1.download, info.task_id, offset), grpc.StatusCode.OUT_OF_RANGE, str(offset))

    good = answer("c1", numel=spec.numel)
    answer_task(c1, info, good)
    assert_same_result(rnd.wait()[0], good)


# ----- 8. deadline ---------------------------------------------------------------------------------


def test_round_deadline_yields_the_answer_and_a_failure_in_task_order(serve):
    served = serve(round_timeout=1.0)
    silent, talker = served.peer("silent"), served.peer("talker")
    silent.join()
    talker.join()
    assert sorted(served.runtime.client_ids()) == ["silent", "talker"]
    rnd = served.round([task_for("silent"), task_for("talker")])
    assert silent.task().has_task  # it fetched its task, then never answers
    info = talker.task()
    good = answer("talker")
    answer_task(talker, info, good)
    results = rnd.wait()
    assert 0.9 <= rnd.elapsed < 3.0, rnd.elapsed
    assert len(results) == 2
    assert isinstance(results[0], ClientFailure) and results[0].client_id == "silent"
    assert "deadline" in results[0].reason
    assert_same_result(results[1], good)
    assert not silent.poll(wait=0).has_task, "an expired task is not offered any more"


# ----- 9. health checking --------------------------------------------------------------------------


def test_health_check_reports_serving(serve):
    served = serve()
    health = health_pb2_grpc.HealthStub(served.channel)
    for service in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    error = refusal(health.Check, health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=WAIT)
    assert error.code() == grpc.StatusCode.NOT_FOUND


# ----- 10. authentication with bearer tokens -------------------------------------------------------


@pytest.fixture
def token_server(serve, tmp_path):
    store = TokenStore(tmp_path / "tokens.txt", missing_ok=True)
    tokens = {"site-a": store.add("site-a"), "site-b": store.add("site-b")}
    served = serve(auth=Authenticator(tokens=store))
    return served, tokens


def _bearer(token: str, claimed: str | None = None) -> list[tuple[str, str]]:
    metadata = [("authorization", f"Bearer {token}")]
    return metadata + ([(CLIENT_ID_HEADER, claimed)] if claimed else [])


def _every_rpc(peer: Peer) -> list:
    return [
        lambda: peer.join(),
        lambda: peer.poll(wait=0),
        lambda: peer.download("1-train-site-a-000000000000"),
        lambda: peer.status("1-train-site-a-000000000000"),
        lambda: peer.send("1-train-site-a-000000000000", b"x"),
    ]


@pytest.mark.parametrize("metadata", [
    pytest.param([(CLIENT_ID_HEADER, "site-a")], id="no-token"),
    pytest.param(_bearer("not-a-token", "site-a"), id="wrong-token"),
    pytest.param([("authorization", "Basic c2l0ZS1hOnB3"), (CLIENT_ID_HEADER, "site-a")], id="not-bearer"),
    pytest.param([("authorization", "Bearer "), (CLIENT_ID_HEADER, "site-a")], id="empty-token"),
])
def test_calls_without_a_valid_token_are_unauthenticated(token_server, metadata):
    served, tokens = token_server
    stranger = served.peer("site-a", metadata)
    for call in _every_rpc(stranger):
        error = refusal(call)
        assert_refused(error, grpc.StatusCode.UNAUTHENTICATED, "token")
    assert served.runtime.client_ids() == []


def test_token_identifies_the_client_and_it_may_not_join_as_another(token_server):
    served, tokens = token_server
    site_a = served.peer("site-a", _bearer(tokens["site-a"]))
    reply = site_a.join()
    assert reply.run_id == served.runtime.run_id
    assert served.runtime.client_ids() == ["site-a"]
    error = refusal(site_a.join, "site-b")
    assert_refused(error, grpc.StatusCode.PERMISSION_DENIED, "site-b")
    # a claimed id that is not the token's owner is refused, not silently replaced by the owner
    spoofer = served.peer("site-b", _bearer(tokens["site-a"], claimed="site-b"))
    assert_refused(refusal(spoofer.join, ""), grpc.StatusCode.PERMISSION_DENIED, "'site-b'", "'site-a'")
    assert served.runtime.client_ids() == ["site-a"]

    rnd = served.round([task_for("site-a")])
    info = site_a.task()
    # site-b has a valid token but never joined: it is told to join first, and is given nothing
    error = refusal(served.peer("site-b", _bearer(tokens["site-b"])).poll, wait=0)
    assert_refused(error, grpc.StatusCode.FAILED_PRECONDITION, "Join first")
    error = refusal(served.peer("site-b", _bearer(tokens["site-b"])).download, info.task_id)
    assert_refused(error, grpc.StatusCode.PERMISSION_DENIED)
    assert decode(site_a.download(info.task_id)).client_id == "site-a"
    finish_with_good_answer(site_a, info, rnd)


@pytest.mark.parametrize("sent", [None, "1", "3"])
def test_a_client_of_another_message_format_is_refused_at_join_naming_both(serve, sent):
    served = serve()
    peer = served.peer("site-a", [(CLIENT_ID_HEADER, "site-a")])
    peer.metadata = [(k, v) for k, v in peer.metadata if k != FORMAT_HEADER] + (
        [(FORMAT_HEADER, sent)] if sent else [])
    error = refusal(lambda: peer.join())
    assert_refused(error, grpc.StatusCode.FAILED_PRECONDITION, f"server speaks format {FORMAT_VERSION}")
    assert (sent or "older message format (1)") in error.details()
    assert served.runtime.client_ids() == []
