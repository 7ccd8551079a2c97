"""The hetero-DP gradient sum's buckets: the full model's gradient layout (HF names, in
order) cut into fixed-size buckets of whole rows, so replicas that split layers and TP
differently still sum bucket by bucket without a full-model vector anywhere.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
from typing import NamedTuple

import torch

from hetero.errors import UserError
from hetero.model import layout

GRAD_BUCKET_ENV = "HETERO_GRAD_BUCKET_MB"
DEFAULT_GRAD_BUCKET_MB = 25.0        # fp32 elements of one hetero-DP bucket: MB = 1e6 bytes
# Buckets started (island phase done, staged to host memory) ahead of the one on the bridge.
# They cost host memory only (one staged shard each): the device keeps one bucket buffer,
# refilled as soon as a started bucket's bytes have left it. An island that finishes its
# backward early stages this many buckets while the others still compute.
BUCKETS_AHEAD = 4


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


def overlapped(order: list[int], start, finish) -> None:
    """`start(index)` each bucket of `order` up to BUCKETS_AHEAD ahead of the one whose
    `finish(index, started)` runs (in order): the device fills and stages the next buckets while
    the bridge carries this one."""
    pending: collections.deque = collections.deque()
    for position, index in enumerate(order):
        while len(pending) <= BUCKETS_AHEAD and position + len(pending) < len(order):
            pending.append(start(order[position + len(pending)]))
        finish(index, pending.popleft())


class Rect(NamedTuple):
    """Rows x columns of a bucket, starting at bucket position `offset`, rows `stride` apart."""
    offset: int
    rows: int
    cols: int
    stride: int


def rect_of(piece: BucketPiece, part, shape) -> Rect | None:
    """Where a rank's holding of a parameter of `shape` lies in bucket piece `piece`: all of it
    (`part` None), the rows of a dim-0 TP shard or the columns of a dim-1 one (`part` = (dim,
    start, stop)); None if it holds nothing of the piece."""
    rows, cols = piece.stop - piece.start, piece.cols
    if part is None:
        return Rect(piece.offset, rows, cols, cols)
    dim, start, stop = part
    if dim == 0:
        lo, hi = max(piece.start, start), min(piece.stop, stop)
        return Rect(piece.offset + (lo - piece.start) * cols, hi - lo, cols, cols) if lo < hi else None
    if dim != 1 or len(shape) != 2:
        raise ValueError(f"{piece.hf}: cannot bucket a shard split along dim {dim} of {shape}")
    return Rect(piece.offset + start, rows, stop - start, cols)


def held_view(grad: torch.Tensor, piece: BucketPiece, rect: Rect, part, shape) -> torch.Tensor:
    """The elements of `rect` (rect_of(piece, part, shape)) in the holder's gradient `grad`: a
    rows x cols view of it."""
    if part is None:
        return grad.view(_rows_cols(shape))[piece.start:piece.stop]
    if part[0] == 0:
        first = (rect.offset - piece.offset) // piece.cols + piece.start - part[1]   # the rect's first row in the shard
        return grad.view(-1, piece.cols)[first:first + rect.rows]
    return grad[piece.start:piece.stop]


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

    def holders(self, held: dict[str, set[str]]) -> list[list[str]]:
        """Per bucket, the islands (in `held`'s order) holding any of its values (`held`: island -> HF
        names, held_names). The others would add zeros and need none of the sum: a hybrid plan's
        pipeline cut over two islands moves each half of the model over one island's bridge links."""
        return [[island for island, names in held.items() if any(p.hf in names for p in bucket)]
                for bucket in self.buckets]

    def all_reduce(self, shards: dict, sum_bucket, device, scope=contextlib.nullcontext,
                   indices: list[int] | None = None) -> None:
        """Sum every rank's `shards` (HF name -> [GradShard]: a tied LM head is a second copy of the
        embedding) over the fleet, in place, bucket by bucket; `indices`: only those buckets, in
        order (the ones this rank's island holds values of; None: all).

        `sum_bucket` sums one 1-D fp32 device tensor fleet-wide: either a callable
        `sum_bucket(buffer, index)` that sums it in place (one bucket at a time), or an object
        whose `start(buffer, index)` issues the bucket's island phase and device->host staging
        and returns a pending sum whose `finish(buffer)` returns the device tensor holding the
        total (Comms.bucket_sum). With the latter the rounds overlap: buckets k+1..k+BUCKETS_AHEAD
        are filled and started (one device buffer: a started bucket's bytes have left it) before
        bucket k's bridge ring and copy-out, so the device works while the bridge carries. Host work (the
        bridge) runs outside `scope`, the device scope the buffer is made and filled in."""
        order = list(range(len(self.buckets))) if indices is None else list(indices)
        if not order:
            return
        with scope():
            buffer = torch.empty(self.widest, dtype=torch.float32, device=device)
        start = getattr(sum_bucket, "start", None)
        if start is None:
            for index in order:
                bucket = self._fill(buffer, index, shards, scope)
                sum_bucket(bucket, index)
                self._copy_out(bucket, index, shards, scope)
            return
        # no name keeps the landed sum: it is freed before the next bucket's lands beside the buffer
        overlapped(order, lambda index: start(self._fill(buffer, index, shards, scope), index),
                   lambda index, started: self._copy_out(started.finish(buffer[:self.length(index)]), index,
                                                         shards, scope))

    def length(self, index: int) -> int:
        """Elements in bucket `index`."""
        last = self.buckets[index][-1]
        return last.offset + (last.stop - last.start) * last.cols

    def _fill(self, buffer: torch.Tensor, index: int, shards: dict, scope) -> torch.Tensor:
        """Bucket `index` in `buffer`: this rank's counted shards at their places, zeros elsewhere."""
        bucket = buffer[:self.length(index)]
        with scope():
            bucket.zero_()
            for piece in self.buckets[index]:
                for shard in shards.get(piece.hf, ()):
                    pair = self._pair(bucket, piece, shard) if shard.counts else None
                    if pair:
                        pair[0].copy_(pair[1])
        return bucket

    def _copy_out(self, total: torch.Tensor, index: int, shards: dict, scope) -> None:
        """Every shard's region of bucket `index` from the summed `total`."""
        total = total.reshape(-1)
        with scope():
            for piece in self.buckets[index]:
                for shard in shards.get(piece.hf, ()):
                    pair = self._pair(total, piece, shard)
                    if pair:
                        pair[1].copy_(pair[0])

    def _pair(self, bucket: torch.Tensor, piece: BucketPiece, shard: GradShard):
        """(bucket region, gradient region) of `piece` that this shard holds, or None."""
        shape = self.shapes[piece.hf]
        rect = rect_of(piece, shard.part, shape)
        if rect is None:
            return None
        region = bucket.as_strided((rect.rows, rect.cols), (rect.stride, 1), bucket.storage_offset() + rect.offset)
        return region, held_view(shard.grad, piece, rect, shard.part, shape)


def held_names(config, holdings) -> set[str]:
    """The HF names of the values held by stages `holdings`, [(half-layer block ranges, first, last)]
    (Topology.island_holdings); a tied LM head is the embedding's copy."""
    names: set[str] = set()
    for ranges, first, last in holdings:
        for start, end in ranges:
            names.update(name for block in range(start, end) for name in layout.block_names(block))
        if first:
            names.add(layout.EMBED)
        if last:
            names.update((layout.FINAL_NORM, layout.EMBED if config.tie_embeddings else layout.LM_HEAD))
    return names


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """A parameter seen as rows x cols: its first dim by the rest (a vector is a column)."""
    if len(shape) == 1:
        return shape[0], 1
    return shape[0], math.prod(shape[1:])


END_OF_COMPUTE = None               # StageBuckets.issued: a bucket started after the stage's last action


class StageBuckets:
    """The stage's DP gradient reduction cut into one bucket per model chunk, each started as soon
    as its gradients are final and waited for only where the step needs the sums (Megatron's
    overlap_grad_reduce, with a chunk as the bucket: all of its gradients become final together,
    at the chunk's last backward of the step).

    Interleaved 1F1B runs the stage's chunks' last backwards p actions apart (chunk v-1 first), so
    chunk c's reduction overlaps the c*p backwards that follow it on this stage; a plain stage's one
    chunk is final at its last action, as is the interleaved stage's chunk 0: those start with the
    tail (nothing of this stage's compute is left to hide them behind), as do `held` chunks (a
    tied embedding copy: its gradient is first summed with the other copy's). Every DP rank of a
    stage runs the same schedule, so all issue the same collectives in the same order on the DP
    group, as NCCL requires of one communicator.
    """

    def __init__(self, chunk_names: list[list[str]], schedule: list, held: set[int]):
        self.names = chunk_names
        last: dict[int, int] = {}
        for index, action in enumerate(schedule):
            if action.kind == "B":
                last[action.chunk] = index
        end = len(schedule) - 1
        # the action after which each chunk's gradients are final, where that is before the end
        self.final_at = {index: chunk for chunk, index in last.items() if index < end and chunk not in held}
        self.works: list = []
        self.issued: dict[int, int | None] = {}    # chunk -> the action it was started after (None: the end)

    def begin(self) -> None:
        self.works, self.issued = [], {}

    def final_after(self, index: int) -> int | None:
        """The chunk whose gradients became final with action `index` (to be started now), or None."""
        chunk = self.final_at.get(index)
        return None if chunk is None or chunk in self.issued else chunk

    def start(self, chunk: int, at: int | None, works: list) -> None:
        self.issued[chunk] = at
        self.works.extend(works)

    def remaining(self) -> list[int]:
        return [chunk for chunk in range(len(self.names)) if chunk not in self.issued]

    def wait(self) -> None:
        """Block until every started bucket's reduction is done."""
        for work in self.works:
            work.wait()
        self.works = []


def chunk_names(names, chunks) -> list[list[str]]:
    """The stage's parameter names (HF names, in order) by the model chunk holding them: a layer's
    by its index in `chunks` (the stage's layer ranges); the embedding is chunk 0's, the final norm
    and LM head the last chunk's. `chunks` None: one chunk."""
    if not chunks:
        return [list(names)]
    out: list[list[str]] = [[] for _ in chunks]
    for name in names:
        if name.startswith("model.layers."):
            number = int(name.split(".")[2])
            chunk = next(c for c, (start, end) in enumerate(chunks) if start <= number < end)
        else:
            chunk = 0 if name == layout.EMBED else len(chunks) - 1
        out[chunk].append(name)
    return out
