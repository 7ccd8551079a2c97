"""The hetero-DP gradient sum's buckets: the full model's gradient layout (HF names, in
order) cut into fixed-size buckets of whole rows, so replicas that split layers and TP
differently still sum bucket by bucket without a full-model vector anywhere.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple

import torch

from hetero.errors import UserError
from hetero.model import layout

GRAD_BUCKET_ENV = "HETERO_GRAD_BUCKET_MB"
DEFAULT_GRAD_BUCKET_MB = 25.0        # fp32 elements of one hetero-DP bucket: MB = 1e6 bytes


def fitting_bucket_elements(wanted: int, free_bytes: int, fleet_sum) -> int:
    """The bucket size every rank uses: `wanted` fp32 elements, halved until the bucket takes at
    most half of the device memory free on the tightest rank (a 25 MB bucket is nothing on an
    80 GB chip and too much on a small one). Every rank must cut the same buckets, so the ranks
    agree through `fleet_sum` (a sum of one-hot votes over the halvings: the smallest wins)."""
    ladder = [max(1, wanted >> k) for k in range(24)]
    fits = next((k for k, n in enumerate(ladder) if 4 * n <= free_bytes // 2), len(ladder) - 1)
    votes = fleet_sum(torch.tensor([float(k == fits) for k in range(len(ladder))], dtype=torch.float64))
    return ladder[max(k for k, count in enumerate(votes.tolist()) if count > 0)]


def grad_bucket_elements(environ=None) -> int:
    """fp32 elements per hetero-DP gradient bucket, from HETERO_GRAD_BUCKET_MB (default 25)."""
    raw = (os.environ if environ is None else environ).get(GRAD_BUCKET_ENV, "")
    try:
        mb = float(raw) if raw.strip() else DEFAULT_GRAD_BUCKET_MB
    except ValueError:
        mb = float("nan")
    if not math.isfinite(mb) or mb <= 0:
        raise UserError(f"{GRAD_BUCKET_ENV}={raw!r}: the gradient bucket size must be a positive number of MB")
    return max(1, int(mb * 1e6) // 4)


class GradShard(NamedTuple):
    """One rank's gradient of a parameter: `part` = (split dim, start, stop) of its TP shard, or None
    for the whole tensor; `counts` = whether this copy counts in a fleet-wide sum."""
    grad: torch.Tensor
    part: tuple[int, int, int] | None
    counts: bool


class BucketPiece(NamedTuple):
    """Rows [start, stop) of parameter `hf` (seen as rows x cols), at `offset` in its bucket."""
    hf: str
    start: int
    stop: int
    cols: int
    offset: int


class GradBuckets:
    """The full model's gradient layout (HF names, in order), cut into buckets of whole rows.

    A bucket holds at most `capacity` elements (at least one row, so a row wider than the
    capacity makes a bucket of one row). Every rank of the job cuts the same buckets from
    the model config, so they sum bucket by bucket, in the same order, without a full-model
    vector anywhere.
    """

    def __init__(self, config, capacity: int):
        self.buckets: list[list[BucketPiece]] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        current: list[BucketPiece] = []
        used = 0
        for hf in layout.model_names(config):
            shape = tuple(layout.full_shape(config, hf))
            self.shapes[hf] = shape
            rows, cols = _rows_cols(shape)
            row = 0
            while row < rows:
                if used and used + cols > capacity:
                    self.buckets.append(current)
                    current, used = [], 0
                take = min(rows - row, max(1, (capacity - used) // cols))
                current.append(BucketPiece(hf, row, row + take, cols, used))
                used += take * cols
                row += take
        if current:
            self.buckets.append(current)
        self.widest = max(sum((p.stop - p.start) * p.cols for p in b) for b in self.buckets)

    def all_reduce(self, shards: dict, sum_bucket, device, scope=contextlib.nullcontext) -> None:
        """Sum every rank's `shards` (HF name -> [GradShard]: a tied LM head is a second copy of the
        embedding) over the fleet, in place, bucket by bucket.

        `sum_bucket(buffer, index)` sums one 1-D fp32 device tensor fleet-wide, in place (outside
        `scope`, the device scope the buffer is made and filled in: its bridge hop is host work)."""
        with scope():
            buffer = torch.empty(self.widest, dtype=torch.float32, device=device)
        for index, pieces in enumerate(self.buckets):
            length = pieces[-1].offset + (pieces[-1].stop - pieces[-1].start) * pieces[-1].cols
            bucket = buffer[:length]
            with scope():
                bucket.zero_()
                for piece in pieces:
                    for shard in shards.get(piece.hf, ()):
                        pair = self._pair(bucket, piece, shard) if shard.counts else None
                        if pair:
                            pair[0].copy_(pair[1])
            sum_bucket(bucket, index)
            with scope():
                for piece in pieces:
                    for shard in shards.get(piece.hf, ()):
                        pair = self._pair(bucket, piece, shard)
                        if pair:
                            pair[1].copy_(pair[0])

    def _pair(self, bucket: torch.Tensor, piece: BucketPiece, shard: GradShard):
        """(bucket region, gradient region) of `piece` that this shard holds, or None."""
        rows, cols = piece.stop - piece.start, piece.cols
        region = bucket[piece.offset:piece.offset + rows * cols].view(rows, cols)
        shape = self.shapes[piece.hf]
        if shard.part is None:
            return region, shard.grad.view(_rows_cols(shape))[piece.start:piece.stop]
        dim, start, stop = shard.part
        if dim == 0:
            lo, hi = max(piece.start, start), min(piece.stop, stop)
            if lo >= hi:
                return None
            grad = shard.grad.view(stop - start, cols)
            return region[lo - piece.start:hi - piece.start], grad[lo - start:hi - start]
        if dim != 1 or len(shape) != 2:
            raise ValueError(f"{piece.hf}: cannot bucket a shard split along dim {dim} of {shape}")
        return region[:, start:stop], shard.grad[piece.start:piece.stop]


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """A parameter seen as rows x cols: its first dim by the rest (a vector is a column)."""
    if len(shape) == 1:
        return shape[0], 1
    return shape[0], math.prod(shape[1:])
