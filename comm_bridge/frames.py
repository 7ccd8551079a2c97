"""The bridge's wire header: a fixed-size binary struct, packed and parsed strictly.

Every message on the data plane starts with one header; the tensor bytes follow
as raw chunks (or sit in a shared-memory slot). Nothing here unpickles or evals:
a header is numbers only, and `parse_header` rejects anything that does not add
up (bad magic or version, unknown kind/dtype/flags, a shape whose byte count
disagrees with `nbytes`, a size over the receiver's limit, a wrong job tag).
Rejections raise `FrameError` with a short `reason` that callers count.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections import Counter
from dataclasses import dataclass
from threading import Lock
from typing import NamedTuple

import torch

MAGIC = b"HBRG"
VERSION = 1
MAX_DIMS = 8
AUTH_BYTES = 16

# Message kinds.
KIND_TENSOR = 1     # header + raw chunks in the same zmq message
KIND_SHM = 2        # header + chunk descriptor; bytes sit in a shared-memory slot
KIND_CREDIT = 3     # receiver hands shared-memory slots back to the sender
KINDS = (KIND_TENSOR, KIND_SHM, KIND_CREDIT)

FLAGS_KNOWN = 0  # no flags defined yet; a set bit means a newer peer

# dtype <-> wire code. Codes are part of the protocol: append, never renumber.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4,
    torch.int8: 5, torch.uint8: 6, torch.int16: 7, torch.int32: 8, torch.int64: 9,
    torch.bool: 10, torch.complex64: 11, torch.complex128: 12,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_ITEMSIZE = {code: torch.empty((), dtype=dtype).element_size() for dtype, code in DTYPE_CODES.items()}

# magic, version, kind, flags, sender, tag, step, micro_batch, seq, dtype, ndim,
# reserved, nbytes, shape[8], auth
_STRUCT = struct.Struct(f"<4sBBHIIqiQBBHQ{MAX_DIMS}q{AUTH_BYTES}s")
HEADER_BYTES = _STRUCT.size
_PADS = tuple((0,) * (MAX_DIMS - n) for n in range(MAX_DIMS + 1))  # zeros after the last dim

# Shared-memory chunk descriptor, sent after a KIND_SHM header:
# chunk index, chunk count, slot, offset into the tensor, length.
_SHM_CHUNK = struct.Struct("<IIIQQ")
SHM_CHUNK_BYTES = _SHM_CHUNK.size


class FrameError(ValueError):
    """A header or chunk that the receiver refuses. `reason` is a short counter key."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"rejected frame ({reason}): {detail}")


class Header(NamedTuple):  # a tuple, not a dataclass: built once per message received
    sender: int
    tag: int
    seq: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    step: int = 0
    micro_batch: int = 0
    kind: int = KIND_TENSOR
    flags: int = 0


def auth_tag(token: str | bytes | None) -> bytes:
    """The 16-byte job tag every frame carries, derived from the job token."""
    if token is None:
        return b"\0" * AUTH_BYTES
    key = token.encode() if isinstance(token, str) else bytes(token)
    return hmac.new(key, b"hetero-bridge-frame-v1", hashlib.sha256).digest()[:AUTH_BYTES]


def nbytes_for(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * _ITEMSIZE[DTYPE_CODES[dtype]]


def pack_header(header: Header, auth: bytes) -> bytes:
    return pack(header.kind, header.sender, header.tag, header.seq, header.dtype, header.shape,
                header.nbytes, auth, step=header.step, micro_batch=header.micro_batch, flags=header.flags)


def pack(kind: int, sender: int, tag: int, seq: int, dtype: torch.dtype, shape, nbytes: int, auth: bytes,
         *, step: int = 0, micro_batch: int = 0, flags: int = 0) -> bytes:
    """A header's bytes straight from its fields (the send path's per-message cost)."""
    code = DTYPE_CODES.get(dtype)
    if code is None:
        raise TypeError(f"the bridge cannot carry dtype {dtype}")
    if len(shape) > MAX_DIMS:
        raise ValueError(f"the bridge carries at most {MAX_DIMS} dims, got shape {tuple(shape)}")
    return _STRUCT.pack(MAGIC, VERSION, kind, flags, sender, tag, step, micro_batch, seq, code,
                        len(shape), 0, nbytes, *shape, *_PADS[len(shape)], auth)


def parse_header(data, auth: bytes, max_bytes: int) -> Header:
    """Parse and validate one header; raise FrameError on anything wrong."""
    if len(data) != HEADER_BYTES:
        raise FrameError("bad_length", f"header is {len(data)} bytes, expected {HEADER_BYTES}")
    fields = _STRUCT.unpack(data)
    magic, version, kind, flags, sender, tag, step, micro_batch, seq, code, ndim, reserved, nbytes = fields[:13]
    if magic != MAGIC:
        raise FrameError("bad_magic", f"magic {magic!r}")
    if version != VERSION:
        raise FrameError("bad_version", f"version {version}, this bridge speaks {VERSION}")
    # Authenticate before trusting anything else the frame says.
    if not hmac.compare_digest(fields[-1], auth):
        raise FrameError("unauthenticated", f"job tag does not match (sender claims rank {sender})")
    if kind not in KINDS:
        raise FrameError("bad_kind", f"kind {kind}")
    if flags & ~FLAGS_KNOWN or reserved:
        raise FrameError("bad_flags", f"flags {flags:#x}, reserved {reserved:#x}")
    dtype = CODE_DTYPES.get(code)
    if dtype is None:
        raise FrameError("bad_dtype", f"dtype code {code}")
    if ndim > MAX_DIMS:
        raise FrameError("bad_ndim", f"{ndim} dims")
    shape = fields[13:13 + ndim]
    if fields[13 + ndim:13 + MAX_DIMS] != _PADS[ndim] or (shape and min(shape) < 0):
        raise FrameError("bad_shape", f"dims {shape} (unused dims {fields[13 + ndim:13 + MAX_DIMS]})")
    if nbytes > max_bytes:
        raise FrameError("oversized", f"{nbytes} bytes, limit {max_bytes}")
    expected = _ITEMSIZE[code]
    for d in shape:
        expected *= d
        if expected > max_bytes:
            raise FrameError("oversized", f"shape {shape} exceeds limit {max_bytes} bytes")
    if expected != nbytes:
        raise FrameError("bad_nbytes", f"shape {shape} of {dtype} is {expected} bytes, header says {nbytes}")
    return Header(sender, tag, seq, dtype, shape, nbytes, step, micro_batch, kind, flags)


@dataclass(frozen=True)
class ShmChunk:
    index: int
    count: int
    slot: int
    offset: int
    length: int


def pack_shm_chunk(chunk: ShmChunk) -> bytes:
    return _SHM_CHUNK.pack(chunk.index, chunk.count, chunk.slot, chunk.offset, chunk.length)


def parse_shm_chunk(data, nbytes: int, slots: int, slot_bytes: int) -> ShmChunk:
    if len(data) != SHM_CHUNK_BYTES:
        raise FrameError("bad_length", f"shm descriptor is {len(data)} bytes, expected {SHM_CHUNK_BYTES}")
    chunk = ShmChunk(*_SHM_CHUNK.unpack(data))
    if chunk.count == 0 or chunk.index >= chunk.count:
        raise FrameError("bad_chunk", f"chunk {chunk.index} of {chunk.count}")
    if chunk.slot >= slots or chunk.length > slot_bytes:
        raise FrameError("bad_chunk", f"slot {chunk.slot} length {chunk.length} (ring {slots} x {slot_bytes})")
    if chunk.offset + chunk.length > nbytes:
        raise FrameError("truncated", f"chunk [{chunk.offset}, +{chunk.length}) past {nbytes} bytes")
    return chunk


class RejectCounter:
    """Thread-safe counts of rejected frames by reason (exposed as `stats()`)."""

    def __init__(self) -> None:
        self._counts: Counter = Counter()
        self._lock = Lock()

    def add(self, reason: str) -> int:
        """Count one rejection; returns how many of this reason there have been (1: the first)."""
        with self._lock:
            self._counts[reason] += 1
            return self._counts[reason]

    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


# Chunk descriptor, sent after a KIND_TENSOR header: one zmq message carries one
# chunk of the tensor, so the receiver copies chunk i while chunk i+1 is still on
# the wire. Chunk i travels on stripe (connection) i % stripes.
_CHUNK = struct.Struct("<III")
CHUNK_BYTES = _CHUNK.size


@dataclass(frozen=True)
class Chunk:
    index: int
    count: int
    chunk_bytes: int

    @property
    def offset(self) -> int:
        return self.index * self.chunk_bytes

    def length(self, nbytes: int) -> int:
        return max(0, min(self.chunk_bytes, nbytes - self.offset))


def chunk_count(nbytes: int, chunk_bytes: int) -> int:
    """Chunks a tensor of `nbytes` is cut into (an empty tensor still sends one)."""
    return max(1, -(-nbytes // chunk_bytes))


def pack_chunk(chunk: Chunk) -> bytes:
    return _CHUNK.pack(chunk.index, chunk.count, chunk.chunk_bytes)


def parse_chunk(data, nbytes: int, max_chunk_bytes: int) -> Chunk:
    """Parse a chunk descriptor and check it tiles a tensor of `nbytes` exactly."""
    if len(data) != CHUNK_BYTES:
        raise FrameError("bad_length", f"chunk descriptor is {len(data)} bytes, expected {CHUNK_BYTES}")
    chunk = Chunk(*_CHUNK.unpack(data))
    if chunk.chunk_bytes == 0 or chunk.chunk_bytes > max_chunk_bytes:
        raise FrameError("bad_chunk", f"chunk size {chunk.chunk_bytes} (limit {max_chunk_bytes})")
    if chunk.count != chunk_count(nbytes, chunk.chunk_bytes) or chunk.index >= chunk.count:
        raise FrameError("bad_chunk", f"chunk {chunk.index} of {chunk.count} for {nbytes} bytes "
                                      f"in {chunk.chunk_bytes}-byte chunks")
    return chunk
