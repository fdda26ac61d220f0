"""The gRPC runtime's lifecycle and resource bounds, against a real server on 127.0.0.1.

"The run is over" is not "the server stopped": a stopping server says STOPPING and a RemoteClient
waits for it and rejoins. Callers cannot pin the server's threads (long polls and transfer streams
are capped, per client and in total, and idle or endless streams are cut), fake client ids get
nothing, a round's tasks share one copy of the weights, every malformed request gets a specific
status, the client does not retry what retrying cannot change, and a plaintext client reaching a
TLS server says so at once.
"""

from __future__ import annotations

import copy
import threading
import time
import tracemalloc
from collections.abc import Iterator

import grpc
import pytest
import torch
from torch import nn

from fedlearn.client.app import ClientApp
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.protocol.codec import FORMAT_VERSION, encode, encode_parts
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import TrainResult, TrainTask
from fedlearn.protocol.params import ParamSpec, flatten_module
from fedlearn.runtime.grpc import fedlearn_pb2 as pb
from fedlearn.runtime.grpc import fedlearn_pb2_grpc as pb_grpc
from fedlearn.runtime.grpc.auth import CLIENT_ID_HEADER, FORMAT_HEADER
from fedlearn.runtime.grpc.client import RemoteClient, RequestRefused, ServerUnreachable, speaks_tls
from fedlearn.runtime.grpc.limits import StreamLimits
from fedlearn.runtime.grpc.server import GrpcRuntime, start_server
from fedlearn.runtime.grpc.transfer import Body, chunks, digest

SPEC = ParamSpec.from_module(nn.Linear(4, 3))  # 15 values
WAIT = 10.0


# ----- helpers ------------------------------------------------------------------------------------


class Served:
    """A GrpcRuntime on 127.0.0.1 (``port`` 0: a free one) and a raw stub to it."""

    def __init__(self, runtime: GrpcRuntime, port: int = 0, credentials: grpc.ServerCredentials | None = None):
        self.runtime = runtime
        self.server, self.port = start_server(runtime, f"127.0.0.1:{port}", credentials=credentials)
        self.target = f"127.0.0.1:{self.port}"
        self.channel = grpc.insecure_channel(self.target)
        self.stub = pb_grpc.FedLearnStub(self.channel)

    def close(self) -> None:
        self.runtime.finish()
        self.channel.close()
        self.server.stop(0).wait()


@pytest.fixture
def serve():
    started: list[Served] = []

    def make(runtime: GrpcRuntime | None = None, **kwargs) -> Served:
        served = Served(runtime or GrpcRuntime(SPEC, round_timeout=WAIT), **kwargs)
        started.append(served)
        return served

    yield make
    for served in started:
        served.close()


def md(client_id: str) -> list[tuple[str, str]]:
    return [(CLIENT_ID_HEADER, client_id), (FORMAT_HEADER, str(FORMAT_VERSION))]


def join(stub, client_id: str, train: int | None = None, test: int | None = None) -> pb.JoinReply:
    request = pb.JoinRequest(client_id=client_id)
    if train is not None:
        request.train_examples = train
    if test is not None:
        request.test_examples = test
    return stub.Join(request, metadata=md(client_id), timeout=WAIT)


def poll(stub, client_id: str, wait: float = 0.0) -> pb.TaskInfo:
    return stub.PollTask(pb.PollRequest(wait_seconds=wait), metadata=md(client_id), timeout=wait + WAIT)


def refused(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, *words: str) -> None:
    assert error.code() == code, f"expected {code.name}, got {error.code().name}: {error.details()}"
    for word in words:
        assert word in error.details(), error.details()
    assert "\n" not in error.details()


def task_for(client_id: str, rnd: int = 1, spec: ParamSpec = SPEC) -> TrainTask:
    return TrainTask(rnd, client_id, {"weights": torch.randn(spec.numel, generator=torch.Generator().manual_seed(rnd))},
                     {"lr": 0.1})


class InThread:
    def __init__(self, fn) -> None:
        self.value = self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.value = fn()
        except BaseException as exc:
            self.error = exc

    def wait(self, timeout: float = WAIT):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "still running"
        if self.error is not None:
            raise self.error
        return self.value


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def tiny_app(client_id: str) -> ClientApp:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    g = torch.Generator().manual_seed(11)
    data = ClientData(ArrayDataset(torch.randn(24, 1, 4, 4, generator=g), torch.randint(0, 4, (24,), generator=g)))
    return ClientApp(LocalTrainer(copy.deepcopy(model), device="cpu"), {client_id: data})


# ----- 1. the run is over vs the server stopped -----------------------------------------------------------


def test_a_stopping_server_says_stopping_not_finished_and_refuses_joins(serve):
    served = serve()
    join(served.stub, "c1")
    waiting = InThread(lambda: poll(served.stub, "c1", wait=5.0))
    wait_until(lambda: served.runtime._polling == 1, WAIT, "the long poll to open")
    served.runtime.stop()
    info = waiting.wait()
    assert info.state == pb.RUN_STATE_STOPPING and not info.finished and not info.has_task
    assert poll(served.stub, "c1").state == pb.RUN_STATE_STOPPING
    assert_status(refused(join, served.stub, "c2"), grpc.StatusCode.UNAVAILABLE, "stopping")
    served.runtime.finish()
    info = poll(served.stub, "c1")
    assert info.state == pb.RUN_STATE_FINISHED and info.finished


def test_remote_client_waits_for_a_stopped_server_and_rejoins_the_resumed_one(serve):
    model = tiny_app("c1").trainer.model
    spec = ParamSpec.from_module(model)
    first = serve(GrpcRuntime(spec, round_timeout=WAIT))
    runs: list[str] = []
    client = RemoteClient(first.target, "c1", tiny_app("c1"), poll_seconds=1.0, rpc_timeout=WAIT, max_backoff=0.5,
                          give_up_after=30.0, on_join=runs.append, examples=(24, 0))
    running = InThread(client.run)
    try:
        wait_until(lambda: first.runtime.client_ids() == ["c1"], WAIT, "the client to join")
        first.runtime.stop()  # Ctrl-C on the server: it tells its clients, then goes away
        time.sleep(0.5)
        first.server.stop(0).wait()
        time.sleep(2.0)  # the old protocol's client exited here, believing the run was over
        assert running.thread.is_alive(), "the client stopped with the server"

        resumed = GrpcRuntime(spec, round_timeout=WAIT)
        resumed.run_id = first.runtime.run_id  # a resumed server keeps its run's id
        second = serve(resumed, port=first.port)
        wait_until(lambda: resumed.client_ids() == ["c1"], 20.0, "the client to rejoin")
        assert resumed.declared_examples("c1") == (24, 0)
        task = TrainTask(1, "c1", {"weights": flatten_module(model)}, LocalConfig(local_epochs=1, batch_size=8,
                                                                                   seed=1).to_dict())
        (result,) = list(resumed.deliver([task]))
        assert isinstance(result, TrainResult) and result.client_id == "c1"
        second.runtime.finish()
        assert running.wait() == 1
        assert runs == [first.runtime.run_id], "the same run: the client's state is opened once"
    finally:
        client.stop.set()
        running.thread.join(WAIT)
        client.close()


def test_remote_client_gives_up_after_its_limit_when_the_server_never_returns(serve):
    served = serve()
    client = RemoteClient(served.target, "c1", tiny_app("c1"), poll_seconds=1.0, rpc_timeout=2.0, max_backoff=0.3,
                          give_up_after=1.5)
    running = InThread(client.run)
    try:
        wait_until(lambda: served.runtime.client_ids() == ["c1"], WAIT, "the client to join")
        served.runtime.stop()
        time.sleep(0.3)
        served.server.stop(0).wait()
        with pytest.raises(ServerUnreachable, match="unreachable for 2 s"):
            running.wait(15.0)
    finally:
        client.stop.set()
        running.thread.join(WAIT)
        client.close()


# ----- 2. concurrency bounds --------------------------------------------------------------------------


def idle_stream(release: threading.Event) -> Iterator[pb.Chunk]:
    """An upload request stream that sends nothing until released: it holds a server thread."""
    release.wait(WAIT)
    yield from ()


def test_polls_and_idle_streams_are_capped_so_joins_stay_fast(serve):
    limits = StreamLimits(max_streams=6, per_client=2, idle_seconds=1.0, max_seconds=30.0)
    served = serve(GrpcRuntime(SPEC, round_timeout=WAIT, max_polls=6, max_poll_seconds=5.0, streams=limits))
    pool = 6 + 6 + 32  # the server's whole thread pool: the limits leave 32 threads free
    ids = [f"p{i}" for i in range(pool + 10)]
    for cid in ids:
        join(served.stub, cid)
    polls = [served.stub.PollTask.future(pb.PollRequest(wait_seconds=5.0), metadata=md(cid), timeout=WAIT)
             for cid in ids]
    release = threading.Event()
    uploads = [served.stub.UploadResult.future(idle_stream(release), metadata=md(cid), timeout=WAIT)
               for cid in ids]
    try:
        wait_until(lambda: sum(f.done() for f in polls) >= len(ids) - 6, WAIT, "excess polls to be refused")
        refused_polls = [f for f in polls if f.done()]
        assert len(refused_polls) == len(ids) - 6  # the six admitted polls are still waiting
        for future in refused_polls:
            assert_status(future.exception(), grpc.StatusCode.RESOURCE_EXHAUSTED, "retry")
        started = time.monotonic()
        join(served.stub, "honest")
        assert time.monotonic() - started < 1.0, "Join waited for a thread"
        # the idle streams that were admitted are cut after idle_seconds, and their slots freed
        wait_until(lambda: all(f.done() for f in uploads), 5.0, "idle streams to be cut")
        codes = [f.exception().code() for f in uploads]
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= len(ids) - 12, codes
        assert set(codes) <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}, codes
        assert served.runtime.streams.open_count() == 0
    finally:
        release.set()
        served.runtime.finish()
        for future in polls:
            future.cancel()


def test_a_client_holds_one_poll_and_the_wait_is_capped(serve):
    served = serve(GrpcRuntime(SPEC, round_timeout=1.0, max_poll_seconds=0.5))
    join(served.stub, "c1")
    started = time.monotonic()
    assert not poll(served.stub, "c1", wait=60.0).has_task
    assert time.monotonic() - started < 3.0, "the poll outlived the server's cap"
    served.runtime.max_poll_seconds = 5.0
    older = InThread(lambda: poll(served.stub, "c1", wait=5.0))
    wait_until(lambda: served.runtime._polling == 1, WAIT, "the first poll")
    newer = InThread(lambda: poll(served.stub, "c1", wait=5.0))
    started = time.monotonic()
    assert not older.wait(3.0).has_task  # the newer poll ended it at once
    assert time.monotonic() - started < 2.0
    rnd = InThread(lambda: list(served.runtime.deliver([task_for("c1")])))
    assert newer.wait().has_task
    assert len(rnd.wait()) == 1


def test_a_stream_that_trickles_past_its_time_limit_is_cut(serve):
    limits = StreamLimits(idle_seconds=5.0, max_seconds=1.0)
    served = serve(GrpcRuntime(SPEC, round_timeout=WAIT, streams=limits))
    join(served.stub, "c1")
    rnd = InThread(lambda: list(served.runtime.deliver([task_for("c1")])))
    info = poll(served.stub, "c1", wait=WAIT)
    body = encode(TrainResult(1, "c1", 8, {"update": torch.zeros(SPEC.numel)}, {}))

    def trickle() -> Iterator[pb.Chunk]:
        for chunk in chunks(body, info.task_id, size=1):  # one byte every 0.05 s: progress, but too slow
            time.sleep(0.05)
            yield chunk

    started = time.monotonic()
    error = refused(served.stub.UploadResult, trickle(), metadata=md("c1"), timeout=WAIT)
    assert error.code() == grpc.StatusCode.CANCELLED and time.monotonic() - started < 4.0
    assert served.runtime.streams.open_count() == 0
    status = served.stub.UploadStatus(pb.UploadStatusRequest(transfer_id=info.task_id), metadata=md("c1"))
    rest = served.stub.UploadResult(chunks(body, info.task_id, status.received), metadata=md("c1"), timeout=WAIT)
    assert rest.complete  # a legitimate client resumes from what arrived
    assert isinstance(rnd.wait()[0], TrainResult)


def test_empty_chunks_are_refused_at_once(serve):
    served = serve()
    join(served.stub, "c1")
    rnd = InThread(lambda: list(served.runtime.deliver([task_for("c1")])))
    info = poll(served.stub, "c1", wait=WAIT)
    body = encode(TrainResult(1, "c1", 8, {"update": torch.zeros(SPEC.numel)}, {}))
    empties = (pb.Chunk(transfer_id=info.task_id, offset=0, data=b"", total_size=len(body), sha256=digest(body))
               for _ in range(100_000))
    started = time.monotonic()
    error = refused(served.stub.UploadResult, empties, metadata=md("c1"), timeout=WAIT)
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "empty upload chunk")
    assert time.monotonic() - started < 2.0
    assert served.stub.UploadResult(chunks(body, info.task_id), metadata=md("c1"), timeout=WAIT).complete
    assert isinstance(rnd.wait()[0], TrainResult)


# ----- 3. unknown ids cost nothing; a round's tasks share the weights ------------------------------------


def test_only_the_runs_clients_join_and_fake_ids_get_nothing(serve):
    served = serve(GrpcRuntime(SPEC, round_timeout=WAIT, max_clients=2))
    join(served.stub, "c1")
    join(served.stub, "c2")
    for i in range(200):
        assert_status(refused(join, served.stub, f"fake-{i}"), grpc.StatusCode.RESOURCE_EXHAUSTED, "2 clients")
    assert sorted(served.runtime.client_ids()) == ["c1", "c2"]
    assert len(served.runtime._clients) == 2, "a refused id must leave nothing behind"
    assert_status(refused(poll, served.stub, "fake-0"), grpc.StatusCode.FAILED_PRECONDITION, "Join first")
    release = threading.Event()
    stream = served.stub.UploadResult.future(idle_stream(release), metadata=md("fake-1"), timeout=WAIT)
    try:  # an id that never joined cannot hold a stream either
        assert_status(stream.exception(timeout=WAIT), grpc.StatusCode.FAILED_PRECONDITION, "Join first")
    finally:
        release.set()
    assert served.runtime.streams.open_count() == 0
    join(served.stub, "c1")  # a known client rejoins freely
    served.runtime.liveness_seconds = 0.3
    time.sleep(0.5)  # c2 falls silent past liveness; c1 keeps polling
    poll(served.stub, "c1")
    join(served.stub, "c3")  # takes the silent client's place
    assert sorted(served.runtime.client_ids()) == ["c1", "c3"]


def test_admit_decides_who_may_join(serve):
    served = serve(GrpcRuntime(SPEC, round_timeout=WAIT, admit=lambda cid: cid.startswith("site-")))
    join(served.stub, "site-a")
    assert_status(refused(join, served.stub, "mallory"), grpc.StatusCode.PERMISSION_DENIED, "not admitted")
    assert served.runtime.client_ids() == ["site-a"]


def test_a_rounds_tasks_share_one_copy_of_the_weights():
    spec = ParamSpec.from_module(nn.Linear(500, 500, device="meta"))  # 250,500 values: 1 MB of float32
    runtime = GrpcRuntime(spec, round_timeout=1.0)
    weights = torch.randn(spec.numel)
    tasks = [TrainTask(1, f"c{i}", {"weights": weights}, {"lr": 0.1}) for i in range(40)]
    tracemalloc.start()
    try:
        rnd = InThread(lambda: list(runtime.deliver(tasks)))
        wait_until(lambda: len(runtime._tasks) == 40, WAIT, "the round's tasks")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * weights.numel() * 4, f"{peak / 1e6:.1f} MB held for 40 tasks of a 1 MB model"
    bodies = [t.body for t in runtime._tasks.values()]
    assert all(b.parts[-1] is bodies[0].parts[-1] for b in bodies)
    assert len(rnd.wait(5.0)) == 40


def test_a_body_in_parts_reads_and_chunks_as_the_joined_bytes():
    task = task_for("c1")
    whole = encode(task)
    body = Body(encode_parts(task))
    assert (body.size, body.sha256) == (len(whole), digest(whole))
    for size in (1, 7, 64, len(whole)):
        for offset in (0, 5, len(whole) - 3):
            got = list(body.chunks("t", offset, size=size))
            assert b"".join(c.data for c in got) == whole[offset:]
            assert [c.offset for c in got] == list(range(offset, len(whole), size))
    assert body.read(3, 300) == whole[3:300]


# ----- 4. malformed requests get specific statuses; the client does not retry them ----------------------


def test_malformed_requests_get_invalid_argument_with_one_line(serve):
    served = serve()
    join(served.stub, "c1")
    rnd = InThread(lambda: list(served.runtime.deliver([task_for("c1")])))
    info = poll(served.stub, "c1", wait=WAIT)
    body = encode(TrainResult(1, "c1", 8, {"update": torch.zeros(SPEC.numel)}, {}))
    sha = digest(body)
    bad_chunks = {
        "negative size": pb.Chunk(transfer_id=info.task_id, offset=0, data=b"x", total_size=-5, sha256=sha),
        "zero size": pb.Chunk(transfer_id=info.task_id, offset=0, data=b"x", total_size=0, sha256=sha),
        "short checksum": pb.Chunk(transfer_id=info.task_id, offset=0, data=b"x", total_size=len(body), sha256=b"1"),
        "negative offset": pb.Chunk(transfer_id=info.task_id, offset=-1, data=b"x", total_size=len(body), sha256=sha),
        "huge id": pb.Chunk(transfer_id="t" * 10_000, offset=0, data=b"x", total_size=len(body), sha256=sha),
    }
    for name, chunk in bad_chunks.items():
        error = refused(served.stub.UploadResult, iter([chunk]), metadata=md("c1"), timeout=WAIT)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.code(), error.details())
        assert_status(error, grpc.StatusCode.INVALID_ARGUMENT)
    for wait in (float("nan"), -1.0, float("inf")):
        error = refused(served.stub.PollTask, pb.PollRequest(wait_seconds=wait), metadata=md("c1"), timeout=WAIT)
        assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "wait_seconds")
    error = refused(lambda: list(served.stub.DownloadTask(pb.DownloadRequest(task_id="x" * 10_000),
                                                          metadata=md("c1"), timeout=WAIT)))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "task_id")
    nested = b'{"version":2,"type":"TrainResult","fields":{"metrics":' + b'{"a":' * 5000 + b"1" + b"}" * 5002
    deep = b"FLM\x02" + len(nested).to_bytes(4, "little") + nested
    error = refused(served.stub.UploadResult, chunks(deep, info.task_id), metadata=md("c1"), timeout=WAIT)
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "malformed")
    assert served.stub.UploadResult(chunks(body, info.task_id), metadata=md("c1"), timeout=WAIT).complete
    assert isinstance(rnd.wait()[0], TrainResult)


def test_a_fault_inside_the_server_answers_internal_not_unknown(serve, monkeypatch):
    served = serve()
    join(served.stub, "c1")

    def broken(client_id: str, transfer_id: str):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(served.runtime, "upload_status", broken)
    error = refused(served.stub.UploadStatus, pb.UploadStatusRequest(transfer_id="t"), metadata=md("c1"),
                    timeout=WAIT)
    assert_status(error, grpc.StatusCode.INTERNAL, "UploadStatus failed inside the server")


def test_join_declares_counts_and_the_ceiling_refuses_more(serve):
    served = serve()
    served.runtime.max_examples_per_client = 1000
    join(served.stub, "c1", train=800, test=200)
    assert served.runtime.declared_examples("c1") == (800, 200)
    assert served.runtime.declared_examples("nobody") is None
    join(served.stub, "quiet")  # declares nothing: the server knows no count (its ceiling bounds the results)
    assert served.runtime.declared_examples("quiet") is None
    join(served.stub, "empty", train=0, test=0)  # an empty partition is a count too
    assert served.runtime.declared_examples("empty") == (0, 0)
    for train, test in ((1001, 0), (0, 2**64 - 1)):
        error = refused(join, served.stub, "c2", train, test)
        assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "at most 1000")
    assert_status(refused(join, served.stub, "c2", 5), grpc.StatusCode.INVALID_ARGUMENT, "both")
    assert served.runtime.declared_examples("c2") is None
    assert sorted(served.runtime.client_ids()) == ["c1", "empty", "quiet"]
    # the real client declares what it holds, and stops at once on the refusal instead of retrying it
    client = RemoteClient(served.target, "c3", tiny_app("c3"), rpc_timeout=WAIT, give_up_after=WAIT,
                          examples=(5000, 0))
    started = time.monotonic()
    with pytest.raises(RequestRefused, match="at most 1000"):
        client.run()
    client.close()
    assert time.monotonic() - started < 2.0


class FaultyJoin(pb_grpc.FedLearnServicer):
    """A server whose Join crashes (gRPC answers UNKNOWN), counting how often it is asked."""

    def __init__(self) -> None:
        self.calls = 0

    def Join(self, request, context):  # noqa: N802
        self.calls += 1
        raise RuntimeError("bug")


def test_the_client_retries_unknown_a_few_times_only():
    from concurrent import futures

    faulty = FaultyJoin()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_FedLearnServicer_to_server(faulty, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = RemoteClient(f"127.0.0.1:{port}", "c1", tiny_app("c1"), rpc_timeout=WAIT, max_backoff=0.05,
                              give_up_after=60.0)
        with pytest.raises(RequestRefused, match="UNKNOWN"):
            client.run()
        client.close()
        assert faulty.calls == 4
    finally:
        server.stop(0)


# ----- 5. a plaintext client and a TLS server ---------------------------------------------------------


def test_a_plaintext_client_of_a_tls_server_stops_with_one_line(serve, tmp_path):
    from fedlearn.security import init_ca, issue, server_credentials

    init_ca(tmp_path)
    paths = issue(tmp_path, "server", server=True, hosts=["127.0.0.1", "localhost"])
    tls = serve(credentials=server_credentials(paths.cert, paths.key, host="127.0.0.1:0"))
    plain = serve()
    assert speaks_tls(tls.target) and not speaks_tls(plain.target)
    client = RemoteClient(tls.target, "c1", tiny_app("c1"), rpc_timeout=WAIT, give_up_after=600.0)
    started = time.monotonic()
    with pytest.raises(ServerUnreachable, match="speaks TLS.*pass --ca"):
        client.run()
    client.close()
    assert time.monotonic() - started < 5.0
