"""The byte encoding of messages: a versioned JSON header plus raw little-endian tensor bytes, never pickle.

Anything malformed raises InvalidUpdateError and never executes: types of the plain fields are
checked against the message's declaration, arrays against an allow-list of dtypes and their
declared byte counts, and a message of another format version is refused naming both versions.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import fields
from functools import cache
from typing import Any

import numpy as np
import torch

from fedlearn.errors import InvalidUpdateError
from fedlearn.protocol.messages import MESSAGE_TYPES, Message

FORMAT_VERSION = 2
_MAGIC = b"FLM"
_HEADER = struct.Struct("<3sBI")
MAX_HEADER_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
_PLAIN_TYPES = {"round": int, "client_id": str, "num_examples": int, "model_version": int, "stage": str,
                "config": dict, "metrics": dict, "sealed": dict, "data": dict}


def _array_meta(t: torch.Tensor, offset: int, convert: bool = True) -> tuple[dict[str, Any], torch.Tensor]:
    if convert:  # the bytes that travel: on the CPU, contiguous (sizing a message needs neither)
        t = t.detach().to("cpu").contiguous()
    nbytes = t.numel() * t.element_size()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "offset": offset,
            "nbytes": nbytes}, t


@cache
def _field_names(message_type: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(message_type))


def _header(message: Message, convert: bool = True) -> tuple[bytes, list[torch.Tensor]]:
    plain: dict[str, Any] = {}
    tensors: dict[str, dict[str, Any]] = {}
    out: list[torch.Tensor] = []
    offset = 0
    for field_name in _field_names(type(message)):
        value = getattr(message, field_name)
        if isinstance(value, torch.Tensor):
            named = {field_name: value}
        elif field_name == "arrays":
            named = {f"arrays/{k}": v for k, v in value.items()}
        else:
            plain[field_name] = value
            continue
        for name, tensor in named.items():
            meta, t = _array_meta(tensor, offset, convert)
            tensors[name] = meta
            offset += meta["nbytes"]
            out.append(t)
    doc = {"version": FORMAT_VERSION, "type": type(message).__name__, "fields": plain, "tensors": tensors}
    return json.dumps(doc, separators=(",", ":"), allow_nan=True).encode(), out


def _raw(t: torch.Tensor) -> bytes:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    array = t.numpy()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def encode(message: Message, shared: dict[tuple, bytes] | None = None) -> bytes:
    """Serialize a message to bytes (header JSON, then each tensor's raw little-endian bytes).

    ``shared`` caches tensor bytes by storage address across calls, so a round's tasks, which all
    carry the same weights tensor, convert it once; use one dict per batch of messages and do not
    modify the tensors while it lives.
    """
    return b"".join(encode_parts(message, shared))


def encode_parts(message: Message, shared: dict[tuple, bytes] | None = None) -> list[bytes]:
    """``encode``'s output as its pieces, not joined: with ``shared``, messages that carry the same tensor
    reference one bytes object for it (a round's tasks hold the global weights once, not once per client)."""
    header, tensors = _header(message)
    parts = [_HEADER.pack(_MAGIC, FORMAT_VERSION, len(header)), header]
    for t in tensors:
        key = (t.data_ptr(), t.numel(), t.dtype)
        raw = shared.get(key) if shared is not None else None
        if raw is None:
            raw = _raw(t)
            if shared is not None:
                shared[key] = raw
        parts.append(raw)
    return parts


def wire_size(message: Message) -> int:
    """Bytes ``encode(message)`` would produce, computed without copying any tensor."""
    header, tensors = _header(message, convert=False)
    return _HEADER.size + len(header) + sum(t.numel() * t.element_size() for t in tensors)


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def _tensor(body: memoryview, meta: Any, name: str) -> torch.Tensor:
    if not isinstance(meta, dict):
        raise ValueError(f"array {name!r} has no metadata")
    dtype, shape, start, nbytes = meta.get("dtype"), meta.get("shape"), meta.get("offset"), meta.get("nbytes")
    if dtype not in DTYPES:
        raise ValueError(f"array {name!r} has dtype {dtype!r}, not one of {', '.join(DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= 8
            and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ValueError(f"array {name!r} has an invalid shape")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (start, nbytes)):
        raise ValueError(f"array {name!r} has an invalid offset or size")
    item = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    if math.prod(shape) * item != nbytes:
        raise ValueError(f"array {name!r} declares {nbytes} bytes for shape {shape}")
    if start + nbytes > len(body):
        raise ValueError("truncated tensor")
    raw = body[start : start + nbytes]
    if dtype == "bfloat16":
        ints = np.frombuffer(raw, dtype="<i2").astype(np.int16, copy=True)
        return torch.from_numpy(ints).view(torch.bfloat16).reshape(shape)
    array = np.frombuffer(raw, dtype=np.dtype("bool" if dtype == "bool" else dtype).newbyteorder("<"))
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True)).reshape(shape)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Parse bytes from ``encode``; anything malformed raises InvalidUpdateError, never executes."""
    try:
        magic, version, length = _HEADER.unpack_from(data, 0)
        if magic != _MAGIC:
            raise ValueError("bad magic")
        if version != FORMAT_VERSION:
            if version == ord("1"):  # format 1 had no version byte: its magic was b"FLM1"
                version = 1
            raise InvalidUpdateError(f"message format version {version}, but this fedlearn speaks version "
                                     f"{FORMAT_VERSION}; run the same fedlearn release on server and clients")
        if length > MAX_HEADER_BYTES or _HEADER.size + length > len(data):
            raise ValueError("header length out of range")
        doc = json.loads(bytes(data[_HEADER.size : _HEADER.size + length]).decode())
        if not (isinstance(doc, dict) and isinstance(doc.get("fields"), dict) and isinstance(doc.get("tensors"), dict)):
            raise ValueError("header is not a message")
        if _depth(doc) > MAX_JSON_DEPTH:
            raise ValueError("header nests too deeply")
        cls = MESSAGE_TYPES[doc["type"]]
        declared = {f.name for f in fields(cls)}
        values = dict(doc["fields"])
        unknown = set(values) - declared
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
        for name, value in values.items():
            kind = _PLAIN_TYPES.get(name)
            if kind is None:  # "arrays" or a tensor field (blob): only ever in the tensors section
                raise ValueError(f"field {name!r} must travel as an array")
            if not (isinstance(value, kind) and not isinstance(value, bool)):
                raise ValueError(f"field {name!r} must be {kind.__name__}")
        body = memoryview(data)[_HEADER.size + length :]
        arrays: dict[str, torch.Tensor] = {}
        for name, meta in doc["tensors"].items():
            if not isinstance(name, str):
                raise ValueError("array names must be strings")
            if name.startswith("arrays/") and "arrays" in declared:
                arrays[name.removeprefix("arrays/")] = _tensor(body, meta, name)
            elif name in declared and name not in _PLAIN_TYPES and name != "arrays":
                values[name] = _tensor(body, meta, name)
            else:
                raise ValueError(f"unexpected array {name!r}")
        if "arrays" in declared:
            values["arrays"] = arrays
        return cls(**values)
    except InvalidUpdateError:
        raise
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidUpdateError(f"message is malformed ({exc}); the sender must use fedlearn's encoder") from None


def join_blob(chunks: list[bytes]) -> tuple[torch.Tensor, list[int]]:
    """Byte chunks (ciphertexts) as one uint8 tensor, a message array, and their sizes, for ``split_blob``."""
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8), [len(c) for c in chunks]


def split_blob(blob: torch.Tensor, sizes: list[int]) -> list[bytes]:
    """Cut a byte tensor back into the chunks it concatenates; a mismatch is refused."""
    if not isinstance(blob, torch.Tensor) or blob.dtype != torch.uint8 or not isinstance(sizes, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise InvalidUpdateError("encrypted payload does not match its chunk sizes; the sender must use fedlearn")
    data = blob.numpy().tobytes()
    if sum(sizes) != len(data):
        raise InvalidUpdateError("encrypted payload does not match its chunk sizes; the sender must use fedlearn")
    offsets = np.cumsum([0, *sizes])
    return [data[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
