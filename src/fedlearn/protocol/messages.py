"""The only things that cross between server and clients, and their byte encoding.

In simulation messages are passed by reference; at a process boundary they are encoded with
``encode``/``decode`` (a JSON header plus raw little-endian tensor bytes, never pickle, so a
peer cannot make the other side run code).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from fedlearn.errors import InvalidUpdateError

_MAGIC = b"FLM1"
_HEADER = struct.Struct("<4sI")


@dataclass
class TrainTask:
    """Train the model given by ``weights`` on local data with the hyper-parameters in ``config``."""

    round: int
    client_id: str
    weights: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """A client's answer: its transformed update (``payload``), sample count and local metrics."""

    round: int
    client_id: str
    num_examples: int
    payload: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    # Secure aggregation's side data (senders whose relayed shares failed authentication, HE chunk
    # sizes); empty for plain results. num_examples is 0 there: the weight travels inside the sum.
    protocol: dict[str, Any] = field(default_factory=dict)


@dataclass
class _ProtocolStep:
    round: int
    client_id: str
    stage: str
    data: dict[str, Any] = field(default_factory=dict)
    blob: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))


@dataclass
class SecureTask(_ProtocolStep):
    """One step of a secure-aggregation protocol (key advertisement, share relay, unmasking, HE decryption)."""


@dataclass
class SecureReply(_ProtocolStep):
    """A client's answer to a SecureTask: JSON-able ``data`` plus an optional byte ``blob`` (ciphertexts)."""


@dataclass
class EvalTask:
    """Evaluate the model given by ``weights`` on the client's local test data."""

    round: int
    client_id: str
    weights: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Loss and accuracy of the global model on one client's test data."""

    round: int
    client_id: str
    num_examples: int
    loss: float
    accuracy: float
    metrics: dict[str, float] = field(default_factory=dict)


Message = TrainTask | TrainResult | EvalTask | EvalResult | SecureTask | SecureReply
_TYPES = {cls.__name__: cls for cls in (TrainTask, TrainResult, EvalTask, EvalResult, SecureTask, SecureReply)}


def _header(message: Message) -> tuple[bytes, list[torch.Tensor]]:
    plain: dict[str, Any] = {}
    tensors: dict[str, dict[str, Any]] = {}
    arrays: list[torch.Tensor] = []
    offset = 0
    for f in fields(message):
        value = getattr(message, f.name)
        if isinstance(value, torch.Tensor):
            t = value.detach().to("cpu").contiguous()
            nbytes = t.numel() * t.element_size()
            dtype = str(t.dtype).removeprefix("torch.")
            tensors[f.name] = {"dtype": dtype, "shape": list(t.shape), "offset": offset, "nbytes": nbytes}
            offset += nbytes
            arrays.append(t)
        else:
            plain[f.name] = value
    doc = {"type": type(message).__name__, "fields": plain, "tensors": tensors}
    return json.dumps(doc, separators=(",", ":"), allow_nan=True).encode(), arrays


def encode(message: Message, shared: dict[tuple, bytes] | None = None) -> bytes:
    """Serialize a message to bytes (header JSON, then each tensor's raw little-endian bytes).

    ``shared`` caches tensor bytes by storage address across calls, so a round's tasks, which all
    carry the same weights tensor, convert it once; use one dict per batch of messages and do not
    modify the tensors while it lives.
    """
    header, arrays = _header(message)
    parts = [_HEADER.pack(_MAGIC, len(header)), header]
    for t in arrays:
        key = (t.data_ptr(), t.numel(), t.dtype)
        raw = shared.get(key) if shared is not None else None
        if raw is None:
            raw = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
            if shared is not None:
                shared[key] = raw
        parts.append(raw)
    return b"".join(parts)


def wire_size(message: Message) -> int:
    """Bytes ``encode(message)`` would produce, computed without copying any tensor."""
    header, arrays = _header(message)
    return _HEADER.size + len(header) + sum(t.numel() * t.element_size() for t in arrays)


def decode(data: bytes) -> Message:
    """Parse bytes from ``encode``; anything malformed raises InvalidUpdateError, never executes."""
    try:
        magic, length = _HEADER.unpack_from(data, 0)
        if magic != _MAGIC:
            raise ValueError("bad magic")
        doc = json.loads(data[_HEADER.size : _HEADER.size + length].decode())
        if not (isinstance(doc, dict) and isinstance(doc.get("fields"), dict) and isinstance(doc.get("tensors"), dict)):
            raise ValueError("header is not a message")
        cls = _TYPES[doc["type"]]
        body = memoryview(data)[_HEADER.size + length :]
        values = dict(doc["fields"])
        for name, meta in doc["tensors"].items():
            start, nbytes = int(meta["offset"]), int(meta["nbytes"])
            if start + nbytes > len(body):
                raise ValueError("truncated tensor")
            dtype = np.dtype(meta["dtype"]).newbyteorder("<")
            array = np.frombuffer(body[start : start + nbytes], dtype=dtype).reshape(meta["shape"])
            values[name] = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
        return cls(**values)
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
        raise InvalidUpdateError(f"message is malformed ({exc}); the sender must use fedlearn's encoder") from None
