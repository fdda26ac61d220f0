"""Tests for message encoding: exact round trips, byte accounting, versioning, malformed input, and that a
simulation whose every message is serialized behaves bitwise like one passing them by reference."""

from __future__ import annotations

import functools
import json
import math
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import fields

import pytest
import torch
from torch import nn

from fedlearn.client.app import ClientApp
from fedlearn.client.data import ClientData
from fedlearn.client.trainer import LocalTrainer
from fedlearn.data import ArrayDataset, load_dataset
from fedlearn.errors import InvalidUpdateError
from fedlearn.protocol.codec import DTYPES, FORMAT_VERSION, decode, encode, wire_size
from fedlearn.protocol.local import LocalConfig
from fedlearn.protocol.messages import (
    EvalResult,
    EvalTask,
    Message,
    SecureReply,
    SecureTask,
    TrainResult,
    TrainTask,
)
from fedlearn.protocol.params import ModelVector
from fedlearn.runtime.base import ClientFailure
from fedlearn.runtime.inprocess import InProcessRuntime
from fedlearn.server.loop import RoundLoop
from fedlearn.server.validation import check_result
from fedlearn.strategies import FedAvg, FedProx, FedSGD, Sampler, Scaffold

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
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def assert_same_tensor(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    assert isinstance(b, torch.Tensor), name
    assert a.dtype == b.dtype, name
    assert a.shape == b.shape, name
    assert bits(a) == bits(b), name


def assert_same_message(a, b) -> None:
    assert type(a) is type(b)
    for f in fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, torch.Tensor):
            assert_same_tensor(va, vb, f.name)
        elif f.name == "arrays":
            assert isinstance(vb, dict)
            assert list(va) == list(vb), f.name  # same names, in the same order
            for name in va:
                assert_same_tensor(va[name], vb[name], f"arrays[{name!r}]")
        else:
            assert type(va) is type(vb), f.name
            assert va == vb, f.name


def tensors_of(message: Message) -> dict[str, torch.Tensor]:
    out = {f.name: getattr(message, f.name) for f in fields(message) if isinstance(getattr(message, f.name),
                                                                               torch.Tensor)}
    out.update({f"arrays/{k}": v for k, v in getattr(message, "arrays", {}).items()})
    return out


def sample_messages() -> list:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, generator=g)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-45, 3.4e38])
    return [
        TrainTask(3, "client-7", {"weights": w}, dict(NESTED), model_version=3),
        TrainTask(0, "", {"weights": torch.zeros(0)}, {}),
        TrainTask(0, "", {}, {}),  # no arrays at all
        TrainTask(1, "c", {"weights": torch.randn(4, 3, generator=g).double(), "control": torch.zeros(12)},
                  {"nested": [[1.5, 2], []]}),
        TrainTask(2, "c", {"weights": torch.randn(6, 4, generator=g).t()}, {}),  # non-contiguous
        TrainResult(3, "client-7", 120, {"update": torch.cat([w, special])}, {"train_loss": 0.6931, "acc": 1.0},
                    model_version=2),
        TrainResult(9, "x", 1, {"update": torch.randn(5, generator=g).half()}, {}),
        TrainResult(9, "x", 2, {"update": torch.arange(10, dtype=torch.int64),
                                "control_delta": torch.randn(10, generator=g),
                                "flags": torch.tensor([True, False, True]),
                                "brain": torch.randn(3, generator=g).bfloat16()}, {"m": 2}),
        EvalTask(4, "client-0", {"weights": w}, {"eval_batch_size": 512}),
        EvalTask(4, "client-0", {"weights": torch.tensor(2.5)}, {}),  # 0-d tensor
        EvalResult(5, "client-2", 360, {"loss": 0.123456789012345, "accuracy": 0.97, "per_class": [0.5, 1.0],
                                        "none": None}),
        EvalResult(5, "c", 0),
        TrainResult(6, "m", 0, {"masked": torch.arange(-3, 3, dtype=torch.int32)}, {},
                    sealed={"secagg": True, "secagg_rejected": ["b"]}),
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


def test_encoding_with_a_shared_cache_gives_the_same_bytes() -> None:
    w = torch.randn(50, generator=torch.Generator().manual_seed(1))
    arrays = {"weights": w}
    tasks = [TrainTask(1, f"c{i}", arrays, {"seed": i}) for i in range(4)]
    shared: dict = {}
    assert [encode(t, shared) for t in tasks] == [encode(t) for t in tasks]
    assert len(shared) == 1  # the one weights tensor was converted once


def test_round_trip_preserves_nested_config_types() -> None:
    back = decode(encode(TrainTask(1, "c", {"weights": torch.zeros(2)}, dict(NESTED))))
    assert back.config == NESTED
    assert back.config["big"] == 2**62 + 1 and isinstance(back.config["big"], int)
    assert back.config["third"] == 1 / 3
    assert back.config["tiny"] == 1e-300
    assert back.config["flag"] is True and back.config["off"] is False and back.config["none"] is None
    assert back.config["list"][2][1][1] is None


def test_named_arrays_round_trip_with_their_names_dtypes_and_shapes() -> None:
    g = torch.Generator().manual_seed(2)
    arrays = {
        "update": torch.randn(17, generator=g),
        "control_delta": torch.randn(17, generator=g).double(),
        "half": torch.randn(2, 3, generator=g).half(),
        "counts": torch.tensor([0, 1, -2**63, 2**63 - 1], dtype=torch.int64),
        "index": torch.arange(-5, 5, dtype=torch.int32).reshape(2, 5),
        "short": torch.tensor([-32768, 32767], dtype=torch.int16),
        "tiny": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "bytes": torch.arange(256, dtype=torch.uint8),
        "mask": torch.tensor([[True], [False]]),
        "empty": torch.zeros(0, 4),
    }
    for message in (TrainResult(2, "c", 7, arrays, {"train_loss": 0.5}),
                    TrainTask(2, "c", {"weights": arrays["update"], **arrays}, {}),
                    EvalTask(2, "c", dict(reversed(list(arrays.items()))), {})):
        back = decode(encode(message))
        assert list(back.arrays) == list(message.arrays)
        assert back.arrays is not message.arrays
        for name, t in message.arrays.items():
            out = back.arrays[name]
            assert out.dtype == t.dtype and out.shape == t.shape, name
            assert torch.equal(out, t), name
            assert out is not t and (t.numel() == 0 or out.data_ptr() != t.data_ptr()), name
    back = decode(encode(TrainTask(2, "c", {"weights": arrays["update"], "control": arrays["control_delta"]})))
    assert torch.equal(back.weights, arrays["update"])  # the property reads the named array
    assert back.arrays["control"].dtype == torch.float64


def test_nan_and_inf_metrics_survive() -> None:
    m = EvalResult(1, "c", 3, {"loss": float("nan"), "accuracy": float("inf"), "x": -float("inf")})
    back = decode(encode(m))
    assert math.isnan(back.loss) and back.accuracy == float("inf") and back.metrics["x"] == -float("inf")


def test_decoded_tensor_is_independent_of_the_buffer() -> None:
    data = bytearray(encode(TrainResult(1, "c", 3, {"update": torch.ones(4)})))
    back = decode(bytes(data))
    back.arrays["update"].add_(1)  # writable, and the original bytes are unaffected
    assert torch.equal(decode(bytes(data)).arrays["update"], torch.ones(4))


def test_wire_size_grows_with_the_tensor() -> None:
    small = TrainTask(1, "c", {"weights": torch.zeros(10)}, {})
    large = TrainTask(1, "c", {"weights": torch.zeros(1010)}, {})
    assert wire_size(large) - wire_size(small) == 1000 * 4 + (len("1010") - len("10")) * 2


# -- format version ----------------------------------------------------------------------------


def test_header_carries_the_format_version() -> None:
    data = encode(TrainTask(1, "c", {"weights": torch.ones(3)}, {}))
    assert FORMAT_VERSION == 2
    assert data[:3] == b"FLM" and data[3] == FORMAT_VERSION
    (length,) = struct.unpack_from("<I", data, 4)
    assert json.loads(data[8 : 8 + length])["version"] == FORMAT_VERSION


@pytest.mark.parametrize("version", [0, 1, 3, 255])
def test_message_of_another_format_version_is_refused_naming_both_versions(version: int) -> None:
    data = bytearray(encode(TrainResult(1, "c", 3, {"update": torch.ones(4)})))
    data[3] = version
    with pytest.raises(InvalidUpdateError, match=rf"version {version}\b") as info:
        decode(bytes(data))
    assert f"version {FORMAT_VERSION}" in str(info.value)


def test_a_format_1_message_from_an_older_release_is_refused_naming_both_versions() -> None:
    # what the previous release's encoder wrote: magic b"FLM1", a uint32 header length, JSON, raw bytes
    doc = {"type": "TrainResult", "fields": {"round": 1, "client_id": "c", "num_examples": 2, "metrics": {}},
           "tensors": {"payload": {"dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8}}}
    header = json.dumps(doc).encode()
    old = struct.pack("<4sI", b"FLM1", len(header)) + header + struct.pack("<2f", 1.5, -2.0)
    with pytest.raises(InvalidUpdateError, match=r"version 1\b") as info:
        decode(old)
    assert f"version {FORMAT_VERSION}" in str(info.value)


# -- malformed input ---------------------------------------------------------------------------


def frame(doc: object, body: bytes = b"", magic: bytes = b"FLM", version: int = FORMAT_VERSION) -> bytes:
    header = json.dumps(doc).encode()
    return struct.pack("<3sBI", magic, version, len(header)) + header + body


def good_doc() -> dict:
    return {
        "version": FORMAT_VERSION,
        "type": "TrainResult",
        "fields": {"round": 1, "client_id": "c", "num_examples": 2, "metrics": {}},
        "tensors": {"arrays/update": {"dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8}},
    }


def test_frame_helper_builds_a_valid_message() -> None:
    m = decode(frame(good_doc(), struct.pack("<2f", 1.5, -2.0)))
    assert isinstance(m, TrainResult) and m.arrays["update"].tolist() == [1.5, -2.0]
    assert m.arrays["update"].dtype == torch.float32 and list(m.arrays) == ["update"]


V = bytes([FORMAT_VERSION])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00",
        b"FLM",
        b"FLM" + V,
        b"FLM" + V + b"\x05\x00\x00",
        b"hello world, this is not a message at all",
        bytes(range(256)) * 4,
        b"\x80\x04\x95" + b"\x00" * 64,  # a pickle preamble
        b"FLM" + V + b"\xff\xff\xff\xff{}",
        b"FLM" + V + b"\x00\x00\x10\x00" + b" " * (1 << 20),  # header over the size limit
        b"FLM" + V + b"\x02\x00\x00\x00{}",  # empty header object
        b"FLM" + V + b"\x04\x00\x00\x00\xff\xfe\xfd\xfc",  # header not UTF-8
        b"FLM" + V + b"\x05\x00\x00\x00[1,2]",  # header is a list
        b"FLM" + V + b"\x01\x00\x00\x007",  # header is a number
        b"FLM" + V + b"\x03\x00\x00\x00{\"a",  # header is not JSON
        b"FLM1\x02\x00\x00\x00{}",  # the previous format's magic
    ],
)
def test_garbage_raises_invalid_update_error(data: bytes) -> None:
    with pytest.raises(InvalidUpdateError):
        decode(data)


def test_wrong_magic_raises_invalid_update_error() -> None:
    data = encode(TrainTask(1, "c", {"weights": torch.ones(3)}, {}))
    for magic in (b"FLN", b"flm", b"\x00\x00\x00", b"PK\x03"):
        with pytest.raises(InvalidUpdateError, match="malformed"):
            decode(magic + data[3:])


def test_unknown_type_raises_invalid_update_error() -> None:
    for name in ("Exploit", "dict", "Message", "ClientFailure", "__builtins__", "", 5, None):
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
        doc["tensors"]["arrays/update"][key[2:]] = value
    elif key.startswith("f."):
        doc["fields"][key[2:]] = value
    else:
        doc[key] = value
    return doc


META = good_doc()["tensors"]["arrays/update"]

MALFORMED = {
    "dtype-object": mutate("t.dtype", "object"),  # would build Python objects from bytes
    "dtype-unknown": mutate("t.dtype", "no-such-dtype"),
    "dtype-number": mutate("t.dtype", 5),
    "dtype-null": mutate("t.dtype", None),
    "shape-too-big": mutate("t.shape", [3]),
    "shape-too-many": mutate("t.shape", [2, 2]),
    "shape-string": mutate("t.shape", "2"),
    "shape-negative": mutate("t.shape", [-2]),
    "shape-float": mutate("t.shape", [2.0]),
    "shape-bool": mutate("t.shape", [True, True]),
    "shape-too-deep": mutate("t.shape", [1] * 9 + [2]),
    "offset-past-end": mutate("t.offset", 4),
    "offset-string": mutate("t.offset", "zero"),
    "offset-negative": mutate("t.offset", -1),
    "nbytes-too-big": mutate("t.nbytes", 16),
    "nbytes-negative": mutate("t.nbytes", -8),
    "tensor-meta-number": mutate("tensors", {"arrays/update": 5}),
    "tensor-meta-empty": mutate("tensors", {"arrays/update": {}}),
    "tensor-wrong-field": mutate("tensors", {"weights": META}),  # TrainResult has no weights field
    "tensor-plain-field": mutate("tensors", {"round": META}),  # a plain field sent as an array
    "tensor-old-payload": mutate("tensors", {"payload": META}),  # the previous format's field
    "field-unexpected": mutate("f.unexpected", 1),
    "field-round-string": mutate("f.round", "1"),
    "field-round-bool": mutate("f.round", True),
    "field-round-float": mutate("f.round", 1.0),
    "field-client-id-number": mutate("f.client_id", 7),
    "field-num-examples-string": mutate("f.num_examples", "2"),
    "field-metrics-list": mutate("f.metrics", [1, 2]),
    "field-sealed-string": mutate("f.sealed", "secagg"),
    "field-model-version-null": mutate("f.model_version", None),
    "field-arrays-as-json": mutate("f.arrays", {"update": [1.5, -2.0]}),  # arrays only travel as raw bytes
    "field-arrays-number": mutate("f.arrays", 5),
    "tensor-bare-arrays": mutate("tensors", {"arrays": META}),  # an array named like the field, not arrays/<name>
    "fields-empty": mutate("fields", {}),
    "fields-list": mutate("fields", [1, 2]),
    "fields-null": mutate("fields", None),
    "tensors-list": mutate("tensors", [1, 2]),
    "tensors-null": mutate("tensors", None),
    "tensors-string": mutate("tensors", "arrays/update"),
    "too-deep": mutate("f.metrics", functools.reduce(lambda inner, _: {"x": inner}, range(40), {})),
}


@pytest.mark.parametrize("doc", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_header_raises_invalid_update_error(doc: dict) -> None:
    with pytest.raises(InvalidUpdateError):
        decode(frame(doc, struct.pack("<2f", 1.5, -2.0)))


def test_array_in_a_message_without_arrays_is_refused() -> None:
    doc = {"type": "EvalResult", "fields": {"round": 1, "client_id": "c", "num_examples": 2, "metrics": {}},
           "tensors": {"arrays/update": META}}
    with pytest.raises(InvalidUpdateError, match="unexpected array"):
        decode(frame(doc, b"\x00" * 8))
    doc["tensors"] = {}
    assert decode(frame(doc)) == EvalResult(1, "c", 2, {})


def test_a_tensor_field_sent_as_json_is_refused() -> None:
    doc = {"type": "SecureTask", "fields": {"round": 1, "client_id": "c", "stage": "he-decrypt", "data": {}},
           "tensors": {"blob": {"dtype": "uint8", "shape": [2], "offset": 0, "nbytes": 2}}}
    assert torch.equal(decode(frame(doc, b"\x01\x02")).blob, torch.tensor([1, 2], dtype=torch.uint8))
    doc["tensors"] = {}
    assert decode(frame(doc)).blob.numel() == 0  # the default empty blob
    doc["fields"]["blob"] = [1, 2]
    with pytest.raises(InvalidUpdateError, match="blob"):
        decode(frame(doc))


@pytest.mark.parametrize("dtype", ["complex64", "complex128", "uint16", "uint32", "uint64", "float8_e4m3fn",
                                   "qint8", "object", "str", "torch.float32", "float", "<f4", "FLOAT32", ""])
def test_dtype_outside_the_allow_list_is_refused(dtype: str) -> None:
    assert dtype not in DTYPES
    with pytest.raises(InvalidUpdateError, match="dtype"):
        decode(frame(mutate("t.dtype", dtype), b"\x00" * 64))


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes"),
    [("float32", [2], 4), ("float32", [2], 16), ("float32", [2], 0), ("float32", [2, 2], 8), ("float32", [], 8),
     ("float32", [0], 8), ("float64", [2], 8), ("int64", [3], 16), ("float16", [3], 8), ("int8", [5], 4),
     ("bool", [8], 1), ("uint8", [], 2)],
)
def test_byte_count_that_does_not_match_the_shape_is_refused(dtype: str, shape: list, nbytes: int) -> None:
    doc = good_doc()
    doc["tensors"]["arrays/update"] = {"dtype": dtype, "shape": shape, "offset": 0, "nbytes": nbytes}
    # the body is long enough for any of them: only the mismatch itself is wrong
    with pytest.raises(InvalidUpdateError, match="declares"):
        decode(frame(doc, b"\x00" * 64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_allowed_dtype_decodes_with_its_exact_byte_count(dtype: str) -> None:
    item = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    doc = good_doc()
    doc["tensors"]["arrays/update"] = {"dtype": dtype, "shape": [3, 2], "offset": 0, "nbytes": 6 * item}
    out = decode(frame(doc, b"\x01" * (6 * item))).arrays["update"]
    assert out.dtype == getattr(torch, dtype) and out.shape == (3, 2)
    for wrong in (6 * item - 1, 6 * item + 1, 6 * item + item):
        doc["tensors"]["arrays/update"]["nbytes"] = wrong
        with pytest.raises(InvalidUpdateError):
            decode(frame(doc, b"\x01" * 64))


def test_result_without_its_update_decodes_but_the_server_refuses_it() -> None:
    # a named-array message may legitimately carry no array; the round's check refuses the result
    doc = mutate("tensors", {})
    result = decode(frame(doc))
    assert isinstance(result, TrainResult) and result.arrays == {}
    task = TrainTask(1, "c", {"weights": torch.zeros(2)}, {})
    with pytest.raises(InvalidUpdateError):
        check_result(result, task, {"update": 2})


# -- serialize every simulated message ---------------------------------------------------------


class SerializingRuntime:
    """Wraps a runtime: every task and answer crosses as bytes, and only the decoded copy goes on."""

    def __init__(self, inner: InProcessRuntime) -> None:
        self.inner = inner
        self.bytes_in: Counter[str] = Counter()  # by message type
        self.bytes_out: Counter[str] = Counter()
        self.messages = 0

    def _cross(self, message):
        data = encode(message)
        back = decode(data)
        assert back is not message
        assert_same_message(message, back)
        for name, tensor in tensors_of(message).items():
            assert tensors_of(back)[name] is not tensor, name
        assert encode(back) == data
        self.messages += 1
        return data, back

    def client_ids(self) -> list[str]:
        return list(self.inner.client_ids())

    def deliver(self, tasks: Sequence[Message]) -> Iterator[Message | ClientFailure]:
        decoded = []
        for task in tasks:
            data, back = self._cross(task)
            self.bytes_in[type(task).__name__] += len(data)
            decoded.append(back)
        for answer in self.inner.deliver(decoded):
            if isinstance(answer, ClientFailure):
                yield answer
                continue
            data, back = self._cross(answer)
            self.bytes_out[type(answer).__name__] += len(data)
            yield back

    def close(self) -> None:
        self.inner.close()


@functools.cache
def digits():
    return load_dataset("digits")


LOCAL = LocalConfig(local_epochs=2, batch_size=16, lr=0.1, momentum=0.5, weight_decay=1e-4)

STRATEGIES = {
    "fedavg": lambda sampler: FedAvg(local=LOCAL, sampler=sampler),
    "fedprox": lambda sampler: FedProx(config=FedProx.Config(mu=0.1), local=LOCAL, sampler=sampler),
    "fedsgd": lambda sampler: FedSGD(local=LocalConfig(lr=0.5), sampler=sampler),
    "scaffold": lambda sampler: Scaffold(local=LOCAL, sampler=sampler),
}


def make_experiment(serialize: bool, algorithm: str = "fedavg"):
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
    runtime = InProcessRuntime(ClientApp(trainer, clients))
    if serialize:
        runtime = SerializingRuntime(runtime)
    strategy = STRATEGIES[algorithm](Sampler(0.75, 2))
    weights = trainer.vector.read()
    loop = RoundLoop(strategy, runtime, trainer.vector.spec, weights, min_clients=2, seed=11, federated_eval=True)
    return loop, runtime


def strip_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.mark.parametrize("algorithm", list(STRATEGIES))
def test_serializing_every_message_changes_nothing(algorithm: str) -> None:
    plain, _ = make_experiment(serialize=False, algorithm=algorithm)
    wired, wrapper = make_experiment(serialize=True, algorithm=algorithm)
    initial = plain.weights.clone()
    h_plain = plain.run(3)
    h_wired = wired.run(3)
    assert wrapper.messages > 0
    assert bits(plain.weights) == bits(wired.weights)
    assert plain.state.extras.keys() == wired.state.extras.keys()
    for name in plain.state.extras:  # SCAFFOLD's server control
        assert bits(plain.state.extras[name]) == bits(wired.state.extras[name]), name
    assert strip_seconds(h_plain) == strip_seconds(h_wired)
    assert len(h_wired) == 3
    # the run actually trained and evaluated
    assert not torch.equal(plain.weights, initial)
    assert all(row["aggregated"] and row["clients_succeeded"] == 3 for row in h_wired)
    assert all(row["fed_accuracy"] is not None for row in h_wired)
    # the loop's byte counts are exactly what crossed for training
    assert sum(row["bytes_down"] for row in h_wired) == wrapper.bytes_in["TrainTask"]
    assert sum(row["bytes_up"] for row in h_wired) == wrapper.bytes_out["TrainResult"]
    assert wrapper.bytes_in["EvalTask"] > 0 and wrapper.bytes_out["EvalResult"] > 0
    assert set(wrapper.bytes_in) == {"TrainTask", "EvalTask"} and set(wrapper.bytes_out) == {"TrainResult",
                                                                                             "EvalResult"}


def test_serialized_model_vector_loads_identically() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    mv = ModelVector(model)
    task = TrainTask(1, "c", {"weights": mv.read()}, {})
    back = decode(encode(task))
    assert torch.equal(back.weights, mv.read())
    other = ModelVector(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    other.load(back.weights)
    assert torch.equal(other.read(), mv.read())
