"""The hetero-DP gradient sum by ownership: each rank moves only the gradients it holds.

The island-aware sum of hetero.engine.buckets has every rank fill a full-model bucket (zeros
where it holds nothing), reduce-scatter it over its island and all-gather the island's total
back: per step, every rank writes and receives the whole model's fp32 gradients, whatever
the island's size. For islands of equal size n this module does the same sum in O(model / n)
per rank. Bucket k is cut into n shards, the same cut in every island; island rank l owns
shard l:

1. every rank sends each owner the values it holds inside the owner's shard (one
   all_to_all over the island), and the owner adds them into its shard;
2. the owner rings its shard with the same-local-rank owners of the other islands over the
   bridge (comm_bridge.allreduce's staged ring, as before);
3. every owner sends each rank the sums of the values that rank holds (a second all_to_all,
   holders of replicated values included), landed straight in the gradients.

A rank's holding of a bucket piece is a rectangle of the piece's row-major layout (the whole
piece, the rows of a dim-0 TP shard, the columns of a dim-1 one). An owner's range cuts it into
at most three rectangles (a partial first row, whole rows, a partial last row), so every move
is a strided copy and no index tensor is built. The ranks of an island learn each other's
holdings once (`IslandHoldings`, one all-gather of a few integers per gradient shard).
"""

from __future__ import annotations

import collections
import sys
from typing import NamedTuple

import torch
import torch.distributed as dist

from hetero.engine import progress
from hetero.engine.buckets import BucketPiece, GradBuckets, Rect, held_view, overlapped, rect_of

_NONE = -1      # encodes "no TP split" in a holding's dim


class Holding(NamedTuple):
    """Rank-independent description of one gradient shard: HF name index, which copy of that
    name (a tied embedding has two), its TP part (dim, start, stop) or None, and whether it counts
    in the sum."""
    name: int
    copy: int
    part: tuple[int, int, int] | None
    counts: bool


def cut(rect: Rect, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
    """The parts of `rect` inside bucket positions [lo, hi), as (first row, rows, first column,
    columns) of the rectangle, in position order: at most a partial first row, whole rows and a
    partial last row."""
    o, s, c = rect.offset, rect.stride, rect.cols
    first = max(0, (lo - o - c) // s + 1)                 # first row ending after lo
    last = min(rect.rows - 1, -(-(hi - o) // s) - 1)       # last row starting before hi
    if first > last:
        return []
    out: list[tuple[int, int, int, int]] = []

    def span(row: int) -> tuple[int, int]:
        start = o + row * s
        return max(0, lo - start), min(c, hi - start)

    head, tail = span(first), span(last)
    if first == last:
        return [(first, 1, head[0], head[1] - head[0])] if head[1] > head[0] else []
    whole_from, whole_to = first, last + 1
    if head != (0, c):
        out.append((first, 1, head[0], head[1] - head[0]))
        whole_from += 1
    if tail != (0, c):
        whole_to -= 1
    if whole_to > whole_from:
        out.append((whole_from, whole_to - whole_from, 0, c))
    if tail != (0, c) and tail[1] > tail[0]:
        out.append((last, 1, tail[0], tail[1] - tail[0]))
    return out


def shard_bounds(length: int, n: int, owner: int) -> tuple[int, int]:
    """Positions [lo, hi) of bucket shard `owner` of `n` (the island reduce-scatter's cut)."""
    size = -(-length // n)
    return min(length, owner * size), min(length, (owner + 1) * size)


class IslandHoldings:
    """Every island rank's holdings (lists of Holding), learnt once over the island group; this
    rank's come from GradientSync's {HF name: [GradShard]} (`shards`)."""

    def __init__(self, names: list[str], shards: dict, group, device, scope):
        self.index = {name: k for k, name in enumerate(names)}
        mine = [Holding(self.index[hf], copy, shard.part, shard.counts)
                for hf, copies in shards.items() for copy, shard in enumerate(copies)]
        size = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
        if size == 1:
            self.ranks = [mine]
            return
        rows = [[h.name, h.copy, *(h.part if h.part is not None else (_NONE, 0, 0)), int(h.counts)] for h in mine]
        with scope():
            count = torch.tensor([len(rows)], dtype=torch.int64, device=device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=group)
            width = int(count.item())
            table = torch.full((width, 6), _NONE, dtype=torch.int64, device=device)
            if rows:
                table[:len(rows)] = torch.tensor(rows, dtype=torch.int64, device=device)
            gathered = [torch.empty_like(table) for _ in range(size)]
            dist.all_gather(gathered, table, group=group)
            values = [g.tolist() for g in gathered]
        self.ranks = [[Holding(r[0], r[1], None if r[2] == _NONE else (r[2], r[3], r[4]), bool(r[5]))
                       for r in rank_rows if r[0] != _NONE] for rank_rows in values]


class Move(NamedTuple):
    """One rectangle part of a holding inside an owner's shard of a bucket."""
    key: tuple[int, int]     # the holding's (name, copy)
    piece: BucketPiece
    rect: Rect               # the holding's rectangle in the bucket
    part: tuple[int, int, int, int]   # (first row, rows, first column, columns) of it

    @property
    def size(self) -> int:
        return self.part[1] * self.part[3]


class OwnedSum:
    """Sums GradientSync's shards fleet-wide, bucket by bucket, by ownership (module docstring).

    `ring.start(shard, index)` stages this rank's island-summed shard of bucket `index` and returns
    a pending sum whose `finish(shard)` rings it over the bridge and returns the total on the device
    (comm_bridge.allreduce.start_bridge_ring with this bucket's peers)."""

    def __init__(self, buckets: GradBuckets, holdings: IslandHoldings, me: int, group, device, scope, ring):
        self.buckets, self.holdings, self.me, self.group = buckets, holdings, me, group
        self.device, self.scope, self.ring = device, scope, ring
        self.n = len(holdings.ranks)
        self.parts = {(h.name, h.copy): h.part for h in holdings.ranks[me]}
        self._by_name: list[dict[int, list[Holding]]] = [collections.defaultdict(list) for _ in holdings.ranks]
        for rank, held in enumerate(holdings.ranks):
            for holding in held:
                self._by_name[rank][holding.name].append(holding)
        self._plans: dict[int, tuple] = {}
        if me == 0:
            print(f"hetero: hetero-DP sum by ownership: {self.n} rank(s) per island, each moves only the "
                  "gradients it holds", file=sys.stderr, flush=True)

    def all_reduce(self, shards: dict, indices: list[int]) -> None:
        """Sum this rank's `shards` ({HF name: [GradShard]}, as learnt) over the fleet in place,
        buckets `indices` in order; up to BUCKETS_AHEAD are started ahead of the one finishing."""
        grads = {(self.holdings.index[hf], copy): shard.grad for hf, copies in shards.items()
                 for copy, shard in enumerate(copies)}
        overlapped(indices, lambda index: self._start(index, grads),
                   lambda index, started: self._finish(index, grads, *started))

    # -- the moves of one bucket (fixed for the run: computed once) -------------------------
    def _moves(self, index: int, rank: int, owner: int, counted: bool) -> list[Move]:
        """Rank `rank`'s holdings inside `owner`'s shard of bucket `index`, in position order;
        `counted`: only those that count in the sum."""
        lo, hi = shard_bounds(self.buckets.length(index), self.n, owner)
        out: list[Move] = []
        for piece in self.buckets.buckets[index]:
            for holding in self._by_name[rank].get(self.holdings.index[piece.hf], ()):
                if counted and not holding.counts:
                    continue
                rect = rect_of(piece, holding.part, self.buckets.shapes[piece.hf])
                if rect is not None:
                    out.extend(Move((holding.name, holding.copy), piece, rect, part) for part in cut(rect, lo, hi))
        return out

    def _plan(self, index: int) -> tuple:
        """(what this rank sends each owner, what each rank sends it, what it returns each rank,
        what each owner returns it) for bucket `index`."""
        plan = self._plans.get(index)
        if plan is None:
            plan = self._plans[index] = (
                [self._moves(index, self.me, owner, True) for owner in range(self.n)],
                [self._moves(index, rank, self.me, True) for rank in range(self.n)],
                [self._moves(index, rank, self.me, False) for rank in range(self.n)],
                [self._moves(index, self.me, owner, False) for owner in range(self.n)])
        return plan

    # -- views --------------------------------------------------------------------------
    def _grad_view(self, grads: dict, move: Move) -> torch.Tensor:
        """The gradient's elements of `move` (a strided view of this rank's gradient)."""
        view = held_view(grads[move.key], move.piece, move.rect, self.parts[move.key], self.buckets.shapes[move.piece.hf])
        r0, nr, c0, nc = move.part
        return view[r0:r0 + nr, c0:c0 + nc]

    @staticmethod
    def _shard_view(shard: torch.Tensor, lo: int, move: Move) -> torch.Tensor:
        """The elements of `move` in an owner's shard (bucket positions [lo, ...))."""
        rect, (r0, nr, c0, nc) = move.rect, move.part
        return shard.as_strided((nr, nc), (rect.stride, 1),
                                shard.storage_offset() + rect.offset + r0 * rect.stride + c0 - lo)

    def _exchange(self, sources: list[list[torch.Tensor]], recv: list[list[Move]]) -> torch.Tensor:
        """One all_to_all over the island: the views `sources[l]` (packed, in order) to rank l;
        returns what every rank sent here, back to back in rank order (as `recv` lays it out)."""
        sizes = [sum(int(v.numel()) for v in views) for views in sources]
        flat = self._buffer(sum(sizes))
        at = 0
        for views in sources:
            for view in views:
                flat[at:at + view.numel()].view(view.shape).copy_(view)
                at += view.numel()
        if self.n == 1:
            return flat
        out = self._buffer(sum(m.size for moves in recv for m in moves))
        with progress.during("island collective"):      # the head's hang watchdog names the phase
            dist.all_to_all_single(out, flat, [sum(m.size for m in moves) for moves in recv], sizes, group=self.group)
        return out

    def _buffer(self, size: int) -> torch.Tensor:
        """`size` fp32 elements of device memory; a rank with nothing to move still passes an
        allocation (an empty tensor has none, and the strict chip could not tell it is the device's)."""
        return torch.empty(max(1, size), dtype=torch.float32, device=self.device)[:size]

    # -- one bucket -----------------------------------------------------------------------
    def _start(self, index: int, grads: dict):
        """Phases 1 and 2's staging: this rank's shard of bucket `index` summed over the island."""
        sends, incoming, _, _ = self._plan(index)
        lo, hi = shard_bounds(self.buckets.length(index), self.n, self.me)
        with self.scope():
            received = self._exchange([[self._grad_view(grads, m) for m in moves] for moves in sends], incoming)
            shard = torch.zeros(hi - lo, dtype=torch.float32, device=self.device)
            at = 0
            for moves in incoming:
                for move in moves:
                    self._shard_view(shard, lo, move).add_(received[at:at + move.size].view(move.part[1], move.part[3]))
                    at += move.size
        return self.ring.start(shard, index), shard

    def _finish(self, index: int, grads: dict, pending, shard: torch.Tensor) -> None:
        """Phases 2 and 3: `pending` (the started ring of this rank's `shard`) rung over the bridge,
        then this rank's held values of bucket `index` from the owners' summed shards."""
        _, _, returns, mine = self._plan(index)
        lo, _ = shard_bounds(self.buckets.length(index), self.n, self.me)
        total = pending.finish(shard).reshape(-1)
        with self.scope():
            received = self._exchange([[self._shard_view(total, lo, m) for m in moves] for moves in returns], mine)
            at = 0
            for moves in mine:
                for move in moves:
                    self._grad_view(grads, move).copy_(received[at:at + move.size].view(move.part[1], move.part[3]))
                    at += move.size
