"""comm_bridge.frames: header round trips, strict rejection, and a fuzzed parser."""

import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from comm_bridge import frames as F

AUTH = F.auth_tag("job-token")
LIMIT = 1 << 30


def header(**kw):
    base = dict(sender=3, tag=7, seq=11, dtype=torch.float32, shape=(2, 3), nbytes=24, step=5, micro_batch=2)
    base.update(kw)
    return F.Header(**base)


@pytest.mark.parametrize("dtype", list(F.DTYPE_CODES))
@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 0, 2), (2, 3, 4, 1, 1, 1, 1, 5)])
def test_round_trip_every_dtype_and_shape(dtype, shape):
    nbytes = F.nbytes_for(dtype, shape)
    original = header(dtype=dtype, shape=shape, nbytes=nbytes)
    data = F.pack_header(original, AUTH)
    assert len(data) == F.HEADER_BYTES
    assert F.parse_header(data, AUTH, LIMIT) == original


def corrupt(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


GOOD = F.pack_header(header(), AUTH)


@pytest.mark.parametrize("data, reason", [
    (GOOD[:-1], "bad_length"),
    (GOOD + b"\0", "bad_length"),
    (corrupt(GOOD, 0, b"XXXX"), "bad_magic"),
    (corrupt(GOOD, 4, b"\x09"), "bad_version"),
    (corrupt(GOOD, 5, b"\x63"), "bad_kind"),
    (corrupt(GOOD, 6, b"\x01\x00"), "bad_flags"),
    (F.pack_header(header(), F.auth_tag("other-job")), "unauthenticated"),
    (F.pack_header(header(nbytes=25), AUTH), "bad_nbytes"),
    (F.pack_header(header(nbytes=0), AUTH), "bad_nbytes"),
    (F.pack_header(header(shape=(1 << 20, 1 << 20), nbytes=4 << 40), AUTH), "oversized"),
    (F.pack_header(header(shape=(-1, 3), nbytes=24), AUTH), "bad_shape"),
])
def test_malformed_headers_are_rejected_with_a_reason(data, reason):
    with pytest.raises(F.FrameError) as info:
        F.parse_header(data, AUTH, LIMIT)
    assert info.value.reason == reason


def test_unknown_dtype_code_and_ndim_and_stray_dims_are_rejected():
    fields = list(struct.unpack(F._STRUCT.format, GOOD))
    for index, value, reason in [(9, 200, "bad_dtype"), (10, 9, "bad_ndim"), (11, 1, "bad_flags")]:
        bad = list(fields)
        bad[index] = value
        with pytest.raises(F.FrameError) as info:
            F.parse_header(struct.pack(F._STRUCT.format, *bad), AUTH, LIMIT)
        assert info.value.reason == reason
    bad = list(fields)
    bad[13 + 5] = 4  # a dim past ndim must be zero
    with pytest.raises(F.FrameError, match="bad_shape"):
        F.parse_header(struct.pack(F._STRUCT.format, *bad), AUTH, LIMIT)


def test_chunk_descriptor_must_tile_the_tensor():
    assert F.parse_chunk(F.pack_chunk(F.Chunk(2, 3, 4096)), 9000, 1 << 20) == F.Chunk(2, 3, 4096)
    assert F.Chunk(2, 3, 4096).length(9000) == 9000 - 8192
    for chunk, nbytes in [(F.Chunk(3, 3, 4096), 9000), (F.Chunk(0, 2, 4096), 9000), (F.Chunk(0, 1, 0), 0),
                          (F.Chunk(0, 1, 1 << 21), 10)]:
        with pytest.raises(F.FrameError):
            F.parse_chunk(F.pack_chunk(chunk), nbytes, 1 << 20)
    assert F.chunk_count(0, 4096) == 1  # an empty tensor still sends one (empty) chunk


def test_shm_descriptor_bounds():
    good = F.ShmChunk(1, 2, 3, 4096, 4096)
    assert F.parse_shm_chunk(F.pack_shm_chunk(good), 8192, 8, 4096) == good
    for chunk in [F.ShmChunk(2, 2, 0, 0, 1), F.ShmChunk(0, 1, 8, 0, 1), F.ShmChunk(0, 1, 0, 0, 4097),
                  F.ShmChunk(0, 1, 0, 8000, 4096)]:
        with pytest.raises(F.FrameError):
            F.parse_shm_chunk(F.pack_shm_chunk(chunk), 8192, 8, 4096)


def test_reject_counter_counts_by_reason():
    counter = F.RejectCounter()
    for reason in ["bad_magic", "bad_magic", "oversized"]:
        counter.add(reason)
    assert counter.as_dict() == {"bad_magic": 2, "oversized": 1}
    assert counter.total() == 3


# ------------------------------------------------------------------- fuzzing
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=F.HEADER_BYTES + 8))
def test_fuzz_random_bytes_only_ever_raise_frame_error(data):
    try:
        parsed = F.parse_header(data, AUTH, LIMIT)
    except F.FrameError:
        return
    assert parsed.nbytes == F.nbytes_for(parsed.dtype, parsed.shape) <= LIMIT


@settings(max_examples=800, deadline=None)
@given(st.integers(0, F.HEADER_BYTES - 1), st.binary(min_size=1, max_size=16), st.integers(0, 8),
       st.sampled_from(list(F.DTYPE_CODES)))
def test_fuzz_mutated_headers_parse_consistently_or_are_rejected(offset, patch, ndim, dtype):
    shape = tuple(range(1, ndim + 1))
    data = bytearray(F.pack_header(header(dtype=dtype, shape=shape, nbytes=F.nbytes_for(dtype, shape)), AUTH))
    data[offset:offset + len(patch)] = patch
    data = bytes(data[:F.HEADER_BYTES])
    try:
        parsed = F.parse_header(data, AUTH, LIMIT)
    except F.FrameError as exc:
        assert exc.reason
        return
    # Anything accepted is self-consistent and re-packs to the same bytes.
    assert parsed.nbytes == F.nbytes_for(parsed.dtype, parsed.shape)
    assert F.pack_header(parsed, AUTH) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=32), st.integers(0, 1 << 40))
def test_fuzz_descriptors(data, nbytes):
    for parse in (lambda d: F.parse_chunk(d, nbytes, 64 << 20), lambda d: F.parse_shm_chunk(d, nbytes, 8, 1 << 22)):
        try:
            parse(data)
        except F.FrameError:
            pass
