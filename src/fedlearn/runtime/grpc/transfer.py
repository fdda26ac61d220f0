"""Chunked, checksummed, resumable transfers of encoded messages over gRPC streams."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from fedlearn.runtime.grpc import fedlearn_pb2 as pb

CHUNK_BYTES = 1 << 20  # 1 MiB: far below gRPC's 4 MiB default message limit


def digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def chunks(body: bytes, transfer_id: str, offset: int = 0, checksum: bytes | None = None,
           size: int = CHUNK_BYTES) -> Iterator[pb.Chunk]:
    """The body from ``offset`` on, as Chunk messages that each carry the whole body's size and checksum."""
    checksum = checksum if checksum is not None else digest(body)
    view = memoryview(body)
    total = len(body)
    if offset >= total:  # nothing left: one empty chunk still tells the receiver the totals
        yield pb.Chunk(transfer_id=transfer_id, offset=total, data=b"", total_size=total, sha256=checksum)
        return
    for start in range(offset, total, size):
        yield pb.Chunk(transfer_id=transfer_id, offset=start, data=bytes(view[start : start + size]),
                       total_size=total, sha256=checksum)


class Body:
    """An encoded message held as its parts: a round's task bodies reference the one bytes object of the
    global weights instead of each holding a copy; chunks are cut across the parts as they are sent."""

    def __init__(self, parts: list[bytes] | tuple[bytes, ...]) -> None:
        self.parts = tuple(parts)
        self.size = sum(len(p) for p in self.parts)
        h = hashlib.sha256()
        for part in self.parts:
            h.update(part)
        self.sha256 = h.digest()

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``start:end`` of the whole body (one copy of that range only)."""
        out, base = [], 0
        for part in self.parts:
            lo, hi = max(start - base, 0), min(end - base, len(part))
            if lo < hi:
                out.append(memoryview(part)[lo:hi])
            base += len(part)
            if base >= end:
                break
        return b"".join(out)

    def chunks(self, transfer_id: str, offset: int = 0, size: int = CHUNK_BYTES) -> Iterator[pb.Chunk]:
        """The body from ``offset`` on, as Chunks like ``chunks`` makes (an empty one when nothing is left)."""
        if offset >= self.size:
            yield pb.Chunk(transfer_id=transfer_id, offset=self.size, data=b"", total_size=self.size,
                           sha256=self.sha256)
            return
        for start in range(offset, self.size, size):
            yield pb.Chunk(transfer_id=transfer_id, offset=start, data=self.read(start, start + size),
                           total_size=self.size, sha256=self.sha256)


class TransferError(ValueError):
    """A chunk that does not continue the transfer, or a body that fails its checksum."""


class Assembly:
    """Collects one body from chunks that may arrive over several broken and resumed streams.

    The buffer is allocated once at full size and hashed as chunks arrive, so a body is copied
    into place once and never hashed or copied again.
    """

    def __init__(self, total_size: int, checksum: bytes) -> None:
        self.total_size = total_size
        self.checksum = checksum
        self.buffer = bytearray(total_size)
        self.received = 0
        self._hash = hashlib.sha256()

    def add(self, chunk: pb.Chunk) -> None:
        """Place a chunk; it must continue exactly where the held bytes end, with the same totals."""
        if chunk.total_size != self.total_size or chunk.sha256 != self.checksum:
            raise TransferError("chunk belongs to a different body (size or checksum changed)")
        self.add_bytes(chunk.offset, chunk.data)

    def add_bytes(self, offset: int, data: bytes) -> None:
        if offset != self.received:
            raise TransferError(f"chunk starts at byte {offset} but {self.received} bytes are held; "
                                "resume from UploadStatus's offset")
        end = self.received + len(data)
        if end > self.total_size:
            raise TransferError("chunk runs past the announced size")
        self.buffer[self.received : end] = data
        self._hash.update(data)
        self.received = end

    @property
    def complete(self) -> bool:
        return self.received == self.total_size

    def body(self) -> bytearray:
        """The whole body (not copied), after checking its SHA-256."""
        if not self.complete:
            raise TransferError(f"only {self.received} of {self.total_size} bytes arrived")
        if self._hash.digest() != self.checksum:
            raise TransferError("body does not match its SHA-256; send it again")
        return self.buffer
