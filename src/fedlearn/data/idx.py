"""Read IDX files (the MNIST file format), gzip-compressed or not, with numpy and a checked header."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from fedlearn.errors import DataError

# IDX type byte -> big-endian numpy dtype (see http://yann.lecun.com/exdb/mnist/).
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when it ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path} cannot be read ({type(exc).__name__}: {exc}); download it again") from None


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file whose header declares ``ndim`` dimensions; DataError naming the file if it is corrupt."""
    raw = _read_bytes(path)
    header = 4 + 4 * ndim
    magic = raw[:4]
    if len(raw) < header or magic[0] != 0 or magic[1] != 0 or magic[2] not in _DTYPES or magic[3] != ndim:
        raise DataError(
            f"{path} is not an IDX file with {ndim} dimension(s) (magic number {magic.hex() or 'missing'}); "
            "download it again"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_DTYPES[magic[2]])
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path} is truncated or damaged ({len(raw)} bytes, its header says {expected}); download it again"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
