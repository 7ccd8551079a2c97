"""The checkpoint's layout-free format: what a chunk is, and the geometry that maps a rank's
shard (a TP slice, a ZeRO-1 flat range) onto chunks of the full tensors.

A chunk is a box of one full tensor, named by its Hugging Face name: `offsets` and `lengths`
per dim, DCP's ChunkStorageMetadata semantics (torch.distributed.checkpoint.metadata), kept in
one safetensors file under a `key`. The metadata in state.json lists, for every tensor, its
global shape, dtype and chunks; a load of any plan reads the boxes that overlap its own.

A ZeRO-1 piece is a flat range of a (TP-local) parameter. A flat range of a row-major tensor
does not always cover whole rows, so it is cut into at most three boxes (the tail of its first
row, the whole rows, the head of its last row); each is a contiguous run of the flat range, so
no box is ever copied to be written.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.resharding import (_check_shard_metadata_pair_overlap,
                                                     _shards_get_overlap_region_wrt_saved_tensor)

FORMAT = "hetero-checkpoint"
VERSION = 2
LATEST = "latest"
STATE = "state.json"
MAX_STEP = 1 << 30                      # train.steps' own upper bound
MOMENT_KINDS = ("exp_avg", "exp_avg_sq")
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STEP_DIR = re.compile(r"step-(\d{8,})")
DATA_FILE = re.compile(r"rank-\d{5,}\.safetensors")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


class Chunk(NamedTuple):
    """One box of the full tensor `name` (global `shape`) that a rank writes: `tensor` (host,
    contiguous) holds elements [offsets, offsets + lengths)."""
    name: str
    shape: tuple
    offsets: tuple
    lengths: tuple
    tensor: torch.Tensor


def data_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def report_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tp_box(shape: tuple, dim: int | None, tp) -> tuple[tuple, tuple]:
    """(offsets, lengths) of TP rank `tp.rank`'s slice of a full tensor of `shape` split on `dim`."""
    offsets, lengths = [0] * len(shape), list(shape)
    if dim is not None and tp.size > 1:
        start, stop = tp.part(shape[dim], f"dim {dim} of a {tuple(shape)} tensor")
        offsets[dim], lengths[dim] = start, stop - start
    return tuple(offsets), tuple(lengths)


def flat_boxes(shape: tuple, start: int, stop: int) -> list[tuple[int, tuple, tuple]]:
    """The boxes of flat range [start, stop) of a row-major tensor of `shape` (1-D or 2-D):
    [(flat index where the box starts, offsets, lengths)], each a contiguous run."""
    if len(shape) == 1:
        return [(start, (start,), (stop - start,))]
    if len(shape) != 2:
        raise ValueError(f"flat ranges of {len(shape)}-D tensors are not supported")
    cols = shape[1]
    boxes, at = [], start
    while at < stop:
        row, col = divmod(at, cols)
        if col or stop - at < cols:              # a partial row: to its end or to `stop`
            end = min(stop, (row + 1) * cols)
            boxes.append((at, (row, col), (1, end - at)))
        else:                                    # whole rows
            rows = (stop - at) // cols
            boxes.append((at, (row, 0), (rows, cols)))
            end = at + rows * cols
        at = end
    return boxes


def rows_box(shape: tuple, start: int, stop: int) -> tuple[int, tuple, tuple]:
    """The smallest box of whole rows (2-D) or the range itself (1-D) holding flat [start, stop):
    (flat index where it starts, offsets, lengths)."""
    if len(shape) == 1:
        return start, (start,), (stop - start,)
    cols = shape[1]
    first, last = start // cols, -(-stop // cols)
    return first * cols, (first, 0), (last - first, cols)


def shifted(offsets: tuple, by: tuple) -> tuple:
    return tuple(a + b for a, b in zip(offsets, by))


def overlap(saved: tuple[tuple, tuple], wanted: tuple[tuple, tuple]) -> list[tuple[int, int, int, int]] | None:
    """Where box `saved` meets box `wanted` ((offsets, lengths) each): DCP's narrows
    [(dim, offset in saved, offset in wanted, length)], or None when they do not meet."""
    a, b = ChunkStorageMetadata(*map(torch.Size, saved)), ChunkStorageMetadata(*map(torch.Size, wanted))
    if not _check_shard_metadata_pair_overlap(a, b):
        return None
    return _shards_get_overlap_region_wrt_saved_tensor(a, b)


def volume(lengths) -> int:
    return math.prod(lengths)


def covers_exactly(shape: tuple, boxes: list[tuple[tuple, tuple]]) -> bool:
    """Whether `boxes` lie inside `shape`, do not overlap and together cover it."""
    for offsets, lengths in boxes:
        if len(offsets) != len(shape) or len(lengths) != len(shape):
            return False
        if any(o < 0 or n <= 0 or o + n > s for o, n, s in zip(offsets, lengths, shape)):
            return False
    for i, (offsets, lengths) in enumerate(boxes):
        for other, other_lengths in boxes[i + 1:]:
            if all(o < p + m and p < o + n for o, n, p, m in zip(offsets, lengths, other, other_lengths)):
                return False
    return sum(volume(lengths) for _, lengths in boxes) == volume(shape)
