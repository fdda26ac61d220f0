"""Tests for message encoding: exact round trips, byte accounting, malformed input, and that a
simulation whose every message is serialized behaves bitwise like one passing them by reference."""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Iterator, Sequence
from dataclasses import fields

import pytest
import torch
from torch import nn

from fedlearn.client.config import LocalConfig
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data import ArrayDataset, load_dataset
from fedlearn.errors import InvalidUpdateError
from fedlearn.protocol.messages import (
    EvalResult,
    EvalTask,
    SecureReply,
    SecureTask,
    TrainResult,
    TrainTask,
    decode,
    encode,
    wire_size,
)
from fedlearn.protocol.params import ModelVector
from fedlearn.runtime.base import ClientFailure
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.loop import RoundLoop
from fedlearn.strategies import FedAvg

torch.set_num_threads(1)

NESTED = {
    "lr": 0.1,
    "third": 1 / 3,
    "tiny": 1e-300,
    "big": 2**62 + 1,
    "neg": -7,
    "flag": True,
    "off": False,
    "none": None,
    "name": "héllo ☃",
    "list": [1, 2.5, [3, [4, None]], "x", True],
    "inner": {"a": [0.1, 0.2], "b": {"c": None, "d": False}},
}


def bits(t: torch.Tensor) -> bytes:
    """A tensor's raw bytes, so NaN payloads and -0.0 compare bitwise."""
    return t.detach().cpu().numpy().tobytes()


def assert_same_message(a, b) -> None:
    assert type(a) is type(b)
    for f in fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, torch.Tensor):
            assert isinstance(vb, torch.Tensor)
            assert va.dtype == vb.dtype, f.name
            assert va.shape == vb.shape, f.name
            assert bits(va) == bits(vb), f.name
        else:
            assert type(va) is type(vb), f.name
            assert va == vb, f.name


def sample_messages() -> list:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, generator=g)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-45, 3.4e38])
    return [
        TrainTask(3, "client-7", w, dict(NESTED)),
        TrainTask(0, "", torch.zeros(0), {}),
        TrainTask(1, "c", torch.randn(4, 3, generator=g).double(), {"nested": [[1.5, 2], []]}),
        TrainTask(2, "c", torch.randn(6, 4, generator=g).t(), {}),  # non-contiguous
        TrainResult(3, "client-7", 120, torch.cat([w, special]), {"train_loss": 0.6931, "acc": 1.0}),
        TrainResult(9, "x", 1, torch.randn(5, generator=g).half(), {}),
        TrainResult(9, "x", 2, torch.arange(10, dtype=torch.int64), {"m": 2}),
        EvalTask(4, "client-0", w, {"eval_batch_size": 512}),
        EvalTask(4, "client-0", torch.tensor(2.5), {}),  # 0-d tensor
        EvalResult(5, "client-2", 360, 0.123456789012345, 0.97, {"per_class": [0.5, 1.0], "none": None}),
        EvalResult(5, "c", 0, 0.0, 0.0),
        TrainResult(6, "m", 0, torch.arange(-3, 3, dtype=torch.int32), {}, {"secagg": True, "secagg_rejected": ["b"]}),
        SecureTask(7, "client-1", "secagg-share", {"peers": {"a": {"x": 1, "c_pk": "AAAA"}}, "threshold": 2}),
        SecureReply(7, "client-1", "he-decrypt", {}, torch.randn(9, generator=g).double()),
        SecureTask(8, "k", "he-decrypt", {"chunk_sizes": [3, 2]}, torch.arange(5, dtype=torch.uint8)),
    ]


@pytest.mark.parametrize("message", sample_messages(), ids=lambda m: type(m).__name__)
def test_round_trip_is_exact(message) -> None:
    data = encode(message)
    assert isinstance(data, bytes)
    back = decode(data)
    assert_same_message(message, back)
    assert encode(back) == data


@pytest.mark.parametrize("message", sample_messages(), ids=lambda m: type(m).__name__)
def test_wire_size_equals_encoded_length(message) -> None:
    assert wire_size(message) == len(encode(message))


def test_round_trip_preserves_nested_config_types() -> None:
    back = decode(encode(TrainTask(1, "c", torch.zeros(2), dict(NESTED))))
    assert back.config == NESTED
    assert back.config["big"] == 2**62 + 1 and isinstance(back.config["big"], int)
    assert back.config["third"] == 1 / 3
    assert back.config["tiny"] == 1e-300
    assert back.config["flag"] is True and back.config["off"] is False and back.config["none"] is None
    assert back.config["list"][2][1][1] is None


def test_nan_and_inf_metrics_survive() -> None:
    m = EvalResult(1, "c", 3, float("nan"), float("inf"), {"x": -float("inf")})
    back = decode(encode(m))
    assert math.isnan(back.loss) and back.accuracy == float("inf") and back.metrics["x"] == -float("inf")


def test_decoded_tensor_is_independent_of_the_buffer() -> None:
    data = bytearray(encode(TrainResult(1, "c", 3, torch.ones(4))))
    back = decode(bytes(data))
    back.payload.add_(1)  # writable, and the original bytes are unaffected
    assert torch.equal(decode(bytes(data)).payload, torch.ones(4))


def test_wire_size_grows_with_the_tensor() -> None:
    small = TrainTask(1, "c", torch.zeros(10), {})
    large = TrainTask(1, "c", torch.zeros(1010), {})
    assert wire_size(large) - wire_size(small) == 1000 * 4 + (len("1010") - len("10")) * 2


# -- malformed input ---------------------------------------------------------------------------


def frame(doc: object, body: bytes = b"", magic: bytes = b"FLM1") -> bytes:
    header = json.dumps(doc).encode()
    return struct.pack("<4sI", magic, len(header)) + header + body


def good_doc() -> dict:
    return {
        "type": "TrainResult",
        "fields": {"round": 1, "client_id": "c", "num_examples": 2, "metrics": {}},
        "tensors": {"payload": {"dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8}},
    }


def test_frame_helper_builds_a_valid_message() -> None:
    m = decode(frame(good_doc(), struct.pack("<2f", 1.5, -2.0)))
    assert isinstance(m, TrainResult) and m.payload.tolist() == [1.5, -2.0]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"FLM",
        b"FLM1",
        b"FLM1\x05\x00\x00",
        b"hello world, this is not a message at all",
        bytes(range(256)) * 4,
        b"\x80\x04\x95" + b"\x00" * 64,  # a pickle preamble
        b"FLM1\xff\xff\xff\xff{}",
        b"FLM1\x02\x00\x00\x00{}",  # empty header object
        b"FLM1\x04\x00\x00\x00\xff\xfe\xfd\xfc",  # header not UTF-8
        b"FLM1\x05\x00\x00\x00[1,2]",  # header is a list
        b"FLM1\x01\x00\x00\x007",  # header is a number
    ],
)
def test_garbage_raises_invalid_update_error(data: bytes) -> None:
    with pytest.raises(InvalidUpdateError):
        decode(data)


def test_wrong_magic_raises_invalid_update_error() -> None:
    data = encode(TrainTask(1, "c", torch.ones(3), {}))
    for magic in (b"FLM2", b"flm1", b"\x00\x00\x00\x00", b"PK\x03\x04"):
        with pytest.raises(InvalidUpdateError, match="malformed"):
            decode(magic + data[4:])


def test_unknown_type_raises_invalid_update_error() -> None:
    for name in ("Exploit", "dict", "Message", "ClientFailure", "__builtins__", ""):
        doc = good_doc()
        doc["type"] = name
        with pytest.raises(InvalidUpdateError):
            decode(frame(doc, b"\x00" * 8))
    doc = good_doc()
    del doc["type"]
    with pytest.raises(InvalidUpdateError):
        decode(frame(doc, b"\x00" * 8))


@pytest.mark.parametrize("message", sample_messages()[::2], ids=lambda m: type(m).__name__)
def test_every_truncation_raises_invalid_update_error(message) -> None:
    data = encode(message)
    for cut in range(len(data)):
        with pytest.raises(InvalidUpdateError):
            decode(data[:cut])


def mutate(key: str, value: object) -> dict:
    doc = good_doc()
    if key.startswith("t."):
        doc["tensors"]["payload"][key[2:]] = value
    elif key.startswith("f."):
        doc["fields"][key[2:]] = value
    else:
        doc[key] = value
    return doc


MALFORMED = {
    "dtype-object": mutate("t.dtype", "object"),  # would build Python objects from bytes
    "dtype-unknown": mutate("t.dtype", "no-such-dtype"),
    "dtype-number": mutate("t.dtype", 5),
    "shape-too-big": mutate("t.shape", [3]),
    "shape-too-many": mutate("t.shape", [2, 2]),
    "shape-string": mutate("t.shape", "2"),
    "offset-past-end": mutate("t.offset", 4),
    "offset-string": mutate("t.offset", "zero"),
    "nbytes-too-big": mutate("t.nbytes", 16),
    "nbytes-negative": mutate("t.nbytes", -8),
    "tensor-meta-number": mutate("tensors", {"payload": 5}),
    "tensor-meta-empty": mutate("tensors", {"payload": {}}),
    "tensor-wrong-field": mutate("tensors", {"weights": good_doc()["tensors"]["payload"]}),  # wrong field name
    "tensor-missing": mutate("tensors", {}),  # payload missing
    "field-unexpected": mutate("f.unexpected", 1),
    "fields-empty": mutate("fields", {}),
    "fields-list": mutate("fields", [1, 2]),
    "fields-null": mutate("fields", None),
    "tensors-list": mutate("tensors", [1, 2]),
    "tensors-null": mutate("tensors", None),
    "tensors-string": mutate("tensors", "payload"),
}


@pytest.mark.parametrize("doc", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_header_raises_invalid_update_error(doc: dict) -> None:
    with pytest.raises(InvalidUpdateError):
        decode(frame(doc, struct.pack("<2f", 1.5, -2.0)))


# -- serialize every simulated message ---------------------------------------------------------


class SerializingRuntime:
    """Wraps a runtime: every task and result crosses as bytes, and only the decoded copy goes on."""

    def __init__(self, inner: InProcessRuntime) -> None:
        self.inner = inner
        self.bytes_in = {"train": 0, "evaluate": 0}
        self.bytes_out = {"train": 0, "evaluate": 0}
        self.messages = 0

    def _cross(self, message):
        data = encode(message)
        back = decode(data)
        assert back is not message
        for f in fields(message):
            if isinstance(getattr(message, f.name), torch.Tensor):
                assert getattr(back, f.name) is not getattr(message, f.name)
        self.messages += 1
        return data, back

    def client_ids(self) -> list[str]:
        return list(self.inner.client_ids())

    def _run(self, kind: str, tasks: Sequence) -> Iterator:
        decoded = []
        for task in tasks:
            data, back = self._cross(task)
            self.bytes_in[kind] += len(data)
            decoded.append(back)
        for answer in getattr(self.inner, kind)(decoded):
            if isinstance(answer, ClientFailure):
                yield answer
                continue
            data, back = self._cross(answer)
            self.bytes_out[kind] += len(data)
            yield back

    def train(self, tasks: Sequence[TrainTask]) -> Iterator[TrainResult | ClientFailure]:
        return self._run("train", tasks)

    def evaluate(self, tasks: Sequence[EvalTask]) -> Iterator[EvalResult | ClientFailure]:
        return self._run("evaluate", tasks)

    def close(self) -> None:
        self.inner.close()


@functools.cache
def digits():
    return load_dataset("digits")


def make_experiment(serialize: bool):
    bundle = digits()
    x, y = bundle.train.x, bundle.train.y
    test = ArrayDataset(bundle.test.x[:120], bundle.test.y[:120])
    sizes = [(0, 60), (60, 150), (150, 190), (190, 290)]
    clients = {
        f"client-{i}": ClientData(
            ArrayDataset(x[a:b], y[a:b]),
            test if i % 2 == 0 else ArrayDataset(bundle.test.x[120 + 30 * i : 150 + 30 * i],
                                                 bundle.test.y[120 + 30 * i : 150 + 30 * i]),
        )
        for i, (a, b) in enumerate(sizes)
    }
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    trainer = LocalTrainer(model, device="cpu")
    runtime = InProcessRuntime(trainer, clients)
    if serialize:
        runtime = SerializingRuntime(runtime)
    strategy = FedAvg(LocalConfig(local_epochs=2, batch_size=16, lr=0.1, momentum=0.5, weight_decay=1e-4))
    weights = trainer.vector.read()
    loop = RoundLoop(strategy, runtime, trainer.vector.spec, weights, fraction=0.75, min_clients=2, seed=11,
                     federated_eval=True)
    return loop, runtime


def strip_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def test_serializing_every_message_changes_nothing() -> None:
    plain, _ = make_experiment(serialize=False)
    wired, wrapper = make_experiment(serialize=True)
    initial = plain.weights.clone()
    h_plain = plain.run(3)
    h_wired = wired.run(3)
    assert wrapper.messages > 0
    assert bits(plain.weights) == bits(wired.weights)
    assert strip_seconds(h_plain) == strip_seconds(h_wired)
    assert len(h_wired) == 3
    # the run actually trained and evaluated
    assert not torch.equal(plain.weights, initial)
    assert all(row["aggregated"] and row["clients_succeeded"] == 3 for row in h_wired)
    assert all(row["fed_accuracy"] is not None for row in h_wired)
    # the loop's byte counts are exactly what crossed for training
    assert sum(row["bytes_down"] for row in h_wired) == wrapper.bytes_in["train"]
    assert sum(row["bytes_up"] for row in h_wired) == wrapper.bytes_out["train"]
    assert wrapper.bytes_in["evaluate"] > 0 and wrapper.bytes_out["evaluate"] > 0


def test_serialized_model_vector_loads_identically() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    mv = ModelVector(model)
    task = TrainTask(1, "c", mv.read(), {})
    back = decode(encode(task))
    assert torch.equal(back.weights, mv.read())
