"""Hostile bytes at the message decoder: random, mutated and boundary inputs give a message or one-line error.

Every case is generated from a fixed seed and the count is bounded, so a failure reproduces. The only
outcomes allowed are a decoded Message or ``InvalidUpdateError`` with a one-line message; anything
else (a crash, a hang, a traceback-type exception, a multi-line error) is a bug.
"""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch

from fedlearn.errors import InvalidUpdateError
from fedlearn.protocol.codec import _HEADER, FORMAT_VERSION, decode, encode
from fedlearn.protocol.messages import EvalResult, Message, TrainResult, TrainTask

CASES = 400
BOUNDARY = [0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**400, 1e308, -1e308, float("nan"), float("inf"), "", "x" * 5000,
            None, True, [], {}, [[[[]]]], {"a": {"b": {"c": {}}}}, "\u0000", "\ud800"]


def samples() -> list[Message]:
    weights = torch.linspace(-1, 1, 16)
    return [
        TrainTask(3, "client-0", {"weights": weights}, {"lr": 0.1, "local_epochs": 1}),
        TrainResult(3, "client-0", 40, {"update": weights * 0.01}, {"train_loss": 0.5}),
        EvalResult(3, "client-0", 20, {"accuracy": 0.7, "loss": 0.4}),
    ]


def check(data: bytes) -> None:
    try:
        message = decode(data)
    except InvalidUpdateError as exc:
        text = str(exc)
        assert text and "\n" not in text, repr(text)
        return
    assert isinstance(message, (TrainTask, TrainResult, EvalResult)) or hasattr(message, "client_id")


def split(data: bytes) -> tuple[dict, bytes]:
    _, _, length = _HEADER.unpack_from(data, 0)
    return json.loads(data[_HEADER.size:_HEADER.size + length]), data[_HEADER.size + length:]


def join(doc: object, body: bytes) -> bytes:
    header = json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")
    return _HEADER.pack(b"FLM", FORMAT_VERSION, len(header)) + header + body


def test_random_bytes() -> None:
    rng = random.Random(0)
    for _ in range(CASES):
        check(bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 200))))
        check(b"FLM" + bytes([FORMAT_VERSION]) + bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64))))


def test_truncations_and_bit_flips_of_valid_messages() -> None:
    rng = random.Random(1)
    for message in samples():
        data = encode(message)
        for cut in range(0, len(data), max(1, len(data) // 60)):
            check(data[:cut])
        for _ in range(CASES // 3):
            flipped = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            check(bytes(flipped))


def test_every_header_field_with_boundary_values() -> None:
    for message in samples():
        doc, body = split(encode(message))
        for name in list(doc["fields"]):
            for value in BOUNDARY:
                mutated = json.loads(json.dumps(doc))
                mutated["fields"][name] = value
                check(join(mutated, body))
        for name in list(doc["tensors"]):
            for key in ("dtype", "shape", "offset", "nbytes"):
                for value in [*BOUNDARY, "float64", "object", [2**40], [-1], [3, -3], "int64"]:
                    mutated = json.loads(json.dumps(doc))
                    mutated["tensors"][name][key] = value
                    check(join(mutated, body))
        for top in ("version", "type", "fields", "tensors"):
            for value in BOUNDARY + ["TrainTask", "Message", "__class__"]:
                mutated = dict(doc)
                mutated[top] = value
                check(join(mutated, body))


def test_deep_nesting_and_huge_declared_lengths() -> None:
    doc, body = split(encode(samples()[1]))
    for depth in (33, 100_000):  # past the decoder's limit, and past json's own recursion limit
        text = json.dumps(doc).replace('"metrics": {', '"metrics": {"x": ' + "[" * depth + "0" + "]" * depth + ", ")
        header = text.encode()
        with pytest.raises(InvalidUpdateError, match="malformed"):
            decode(_HEADER.pack(b"FLM", FORMAT_VERSION, len(header)) + header + body)
    huge = _HEADER.pack(b"FLM", FORMAT_VERSION, 2**32 - 1) + b"{}"
    with pytest.raises(InvalidUpdateError):
        decode(huge)
    with pytest.raises(InvalidUpdateError):
        decode(struct.pack("<3sB", b"FLM", FORMAT_VERSION))


def test_another_format_version_names_both() -> None:
    data = bytearray(encode(samples()[0]))
    data[3] = FORMAT_VERSION + 1
    with pytest.raises(InvalidUpdateError, match=f"version {FORMAT_VERSION + 1}.*speaks version {FORMAT_VERSION}"):
        decode(bytes(data))
