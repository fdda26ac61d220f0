"""Whole transfers over the gRPC runtime: a 200 MB model both ways with broken streams, and RemoteClient end to end."""

from __future__ import annotations

import copy
import hashlib
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
import torch
from torch import nn

from fedlearn.client.app import ClientApp
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data.arrays import ArrayDataset
from fedlearn.protocol.codec import FORMAT_VERSION, decode, encode
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import TrainResult, TrainTask
from fedlearn.protocol.params import ParamSpec, flatten_module
from fedlearn.runtime.grpc import fedlearn_pb2 as pb
from fedlearn.runtime.grpc import fedlearn_pb2_grpc as pb_grpc
from fedlearn.runtime.grpc.auth import CLIENT_ID_HEADER, FORMAT_HEADER
from fedlearn.runtime.grpc.client import ClientRefused, RemoteClient
from fedlearn.runtime.grpc.server import GrpcRuntime, start_server
from fedlearn.runtime.grpc.transfer import CHUNK_BYTES, chunks, digest
from fedlearn.security import Authenticator, TokenStore

WAIT = 10.0


# ----- helpers ----------------------------------------------------------------------------------------


@contextmanager
def serving(spec: ParamSpec, *, round_timeout: float = WAIT, auth: Authenticator | None = None):
    """A GrpcRuntime served on 127.0.0.1 (free port); finished and stopped on the way out."""
    runtime = GrpcRuntime(spec, round_timeout=round_timeout)
    server, port = start_server(runtime, "127.0.0.1:0", auth=auth)
    try:
        yield runtime, f"127.0.0.1:{port}"
    finally:
        runtime.finish()
        server.stop(0)


class InThread:
    """Run ``fn()`` in a daemon thread; ``wait()`` returns its value or re-raises its error."""

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


def assert_same_result(got, expected: TrainResult) -> None:
    assert isinstance(got, TrainResult), got
    assert (got.round, got.client_id, got.num_examples, got.metrics, got.model_version, got.sealed) == (
        expected.round, expected.client_id, expected.num_examples, expected.metrics, expected.model_version,
        expected.sealed)
    assert sorted(got.arrays) == sorted(expected.arrays)
    for name, value in expected.arrays.items():
        assert got.arrays[name].dtype == value.dtype, name
        assert torch.equal(got.arrays[name], value), name


# ----- 11. a 200 MB model, each way interrupted once ----------------------------------------------------


def test_200mb_task_and_result_survive_one_broken_stream_each():
    spec = ParamSpec.from_module(nn.Linear(5000, 10000, device="meta"))  # 50,010,000 float32 values, no memory
    n = spec.numel
    assert n >= 50_000_000
    weights = torch.arange(n, dtype=torch.float32).mul_(1e-6)
    task = TrainTask(3, "c1", {"weights": weights}, {"lr": 0.05})
    meta = [(CLIENT_ID_HEADER, "c1"), (FORMAT_HEADER, str(FORMAT_VERSION))]
    started = time.perf_counter()
    with serving(spec, round_timeout=120.0) as (runtime, target), grpc.insecure_channel(target) as channel:
        stub = pb_grpc.FedLearnStub(channel)
        stub.Join(pb.JoinRequest(client_id="c1"), metadata=meta, timeout=WAIT)
        rnd = InThread(lambda: list(runtime.deliver([task])))
        info = stub.PollTask(pb.PollRequest(wait_seconds=60), metadata=meta, timeout=90)
        assert info.has_task and info.size > n * 4 and info.round == 3

        # download into one preallocated buffer, the stream broken after about half the chunks
        buffer = bytearray(info.size)
        view = memoryview(buffer)
        got = 0
        stream = stub.DownloadTask(pb.DownloadRequest(task_id=info.task_id), metadata=meta, timeout=120)
        for chunk in stream:
            assert chunk.offset == got and chunk.total_size == info.size and chunk.sha256 == info.sha256
            view[got : got + len(chunk.data)] = chunk.data
            got += len(chunk.data)
            if got >= info.size // 2:
                stream.cancel()
                break
        broken_at = got
        assert 0 < broken_at < info.size
        for chunk in stub.DownloadTask(pb.DownloadRequest(task_id=info.task_id, offset=got), metadata=meta,
                                       timeout=120):
            assert chunk.offset == got
            view[got : got + len(chunk.data)] = chunk.data
            got += len(chunk.data)
        view.release()
        assert got == info.size
        assert hashlib.sha256(buffer).digest() == info.sha256
        downloaded = decode(buffer)
        del buffer
        assert isinstance(downloaded, TrainTask) and torch.equal(downloaded.weights, weights)
        downloaded_at = time.perf_counter()

        # answer with an update of the right size (computed in place: no extra 200 MB copy)
        update = downloaded.weights.mul_(-0.5)
        sent = TrainResult(3, "c1", 1234, {"update": update}, {"train_loss": 0.125})
        del downloaded
        body = encode(sent)
        checksum = digest(body)
        half = (len(body) // CHUNK_BYTES // 2) * CHUNK_BYTES

        def first_half(whole: bytes) -> Iterator[pb.Chunk]:
            for chunk in chunks(whole, info.task_id, 0, checksum):
                if chunk.offset >= half:
                    return  # the stream ends early, as when the connection drops
                yield chunk

        reply = stub.UploadResult(first_half(body), metadata=meta, timeout=120)
        assert (reply.received, reply.complete) == (half, False)
        status = stub.UploadStatus(pb.UploadStatusRequest(transfer_id=info.task_id), metadata=meta, timeout=WAIT)
        assert (status.received, status.complete) == (half, False)
        reply = stub.UploadResult(chunks(body, info.task_id, status.received, checksum), metadata=meta,
                                  timeout=120)
        assert (reply.received, reply.complete) == (len(body), True)
        del body
        results = rnd.wait(timeout=60)
        elapsed = time.perf_counter() - started
        assert len(results) == 1
        assert_same_result(results[0], sent)
        del results
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n200 MB round trip ({info.size / 1e6:.0f} MB task, broken at {broken_at / 1e6:.0f} MB): "
          f"download {downloaded_at - started:.1f} s, total {elapsed:.1f} s, peak RSS {peak_mb:.0f} MB")


# ----- 12. RemoteClient end to end ---------------------------------------------------------------------


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _client_data() -> ClientData:
    g = torch.Generator().manual_seed(11)
    return ClientData(ArrayDataset(torch.randn(24, 1, 4, 4, generator=g), torch.randint(0, 4, (24,), generator=g)))


def _app(model: nn.Module, client_id: str, data: ClientData) -> ClientApp:
    """One client's ClientApp on its own copy of the model (the same entry point every runtime calls)."""
    return ClientApp(LocalTrainer(copy.deepcopy(model), device="cpu"), {client_id: data})


def test_remote_client_answers_exactly_as_local_training_and_exits_when_the_run_finishes():
    model = _tiny_model()
    spec = ParamSpec.from_module(model)
    data = _client_data()
    config = LocalConfig(local_epochs=2, batch_size=5, lr=0.1, momentum=0.9, seed=5).to_dict()
    direct = _app(model, "c1", data)  # the same ClientApp, called in this process
    with serving(spec) as (runtime, target):
        client = RemoteClient(target, "c1", _app(model, "c1", data), poll_seconds=5.0, rpc_timeout=WAIT,
                              give_up_after=WAIT)
        running = InThread(client.run)
        try:
            weights = flatten_module(model)
            for rnd in (1, 2):  # the client keeps polling between rounds
                task = TrainTask(rnd, "c1", {"weights": weights}, config, model_version=rnd - 1)
                expected = direct(task)
                results = list(runtime.deliver([task]))
                assert len(results) == 1
                assert_same_result(results[0], expected)
                weights = weights + results[0].arrays["update"]
            assert runtime.client_ids() == ["c1"]
            runtime.finish()
            assert running.wait() == 2
        finally:
            client.stop.set()
            running.thread.join(WAIT)
            client.close()


def test_remote_client_with_a_wrong_token_stops_instead_of_retrying(tmp_path):
    model = _tiny_model()
    store = TokenStore(tmp_path / "tokens.txt", missing_ok=True)
    token = store.add("site-a")
    with serving(ParamSpec.from_module(model), auth=Authenticator(tokens=store)) as (runtime, target):
        refused = RemoteClient(target, "site-a", _app(model, "site-a", _client_data()), token=token[::-1],
                               rpc_timeout=WAIT, give_up_after=WAIT)
        started = time.monotonic()
        with pytest.raises(ClientRefused, match="token"):
            refused.run()
        refused.close()
        assert time.monotonic() - started < 2.0
        assert runtime.client_ids() == []

        accepted = RemoteClient(target, "site-a", _app(model, "site-a", _client_data()), token=token,
                                poll_seconds=5.0, rpc_timeout=WAIT, give_up_after=WAIT)
        running = InThread(accepted.run)
        try:
            task = TrainTask(1, "site-a", {"weights": flatten_module(model)}, {"lr": 0.1, "batch_size": 8, "seed": 1})
            results = list(runtime.deliver([task]))
            assert_same_result(results[0], _app(model, "site-a", _client_data())(task))
            runtime.finish()
            assert running.wait() == 1
        finally:
            accepted.stop.set()
            running.thread.join(WAIT)
            accepted.close()


def test_remote_client_refuses_a_malformed_task_and_keeps_serving_the_run():
    """A task the client cannot run (a hook asking for an array the task lacks) costs that task only."""
    from fedlearn.runtime.base import ClientFailure

    model = _tiny_model()
    spec = ParamSpec.from_module(model)
    data = _client_data()
    config = LocalConfig(local_epochs=1, batch_size=5, lr=0.1, seed=5).to_dict()
    with serving(spec, round_timeout=3.0) as (runtime, target):
        client = RemoteClient(target, "c1", _app(model, "c1", data), poll_seconds=1.0, rpc_timeout=WAIT,
                              give_up_after=WAIT)
        running = InThread(client.run)
        try:
            weights = flatten_module(model)
            bad = TrainTask(1, "c1", {"weights": weights}, {**config, "hooks": {"scaffold": {}}})
            (first,) = list(runtime.deliver([bad]))
            assert isinstance(first, ClientFailure)
            good = TrainTask(2, "c1", {"weights": weights}, config, model_version=1)
            (second,) = list(runtime.deliver([good]))
            assert isinstance(second, TrainResult) and set(second.arrays) == {"update"}
            runtime.finish()
            assert running.wait() == 1  # one task answered; the process did not die on the bad one
        finally:
            client.stop.set()
            running.thread.join(WAIT)
            client.close()
