"""ZeRO-1's layout: one stage's parameters laid end to end in a flat fp32 vector, padded
to equal shards over the stage's DP group, and the two collectives that move it.

Rank d of a DP group of size D owns elements [d*S, (d+1)*S) of the padded vector
(S = ceil(N / D)): its fp32 master weights and Adam moments for that range only.
Gradients are reduce-scattered into those shards and the updated parameters
all-gathered from them, on the island's native backend (NCCL's
reduce_scatter_tensor / all_gather_into_tensor need equal shards, hence the padding),
on device tensors. With D = 1 the same layout holds the whole stage (mixed
precision without ZeRO): the collectives are then no-ops.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

# torch 2.13 renamed the *_tensor collectives *_single; older torch has only the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Piece(NamedTuple):
    """The part of parameter `name` inside this rank's shard: its flat elements [start, stop),
    at `at` in the shard."""
    name: str
    start: int
    stop: int
    at: int


class FlatShard:
    def __init__(self, params: dict, size: int = 1, rank: int = 0, group=None):
        self.shapes = {name: tuple(p.shape) for name, p in params.items()}
        self.offsets, total = {}, 0
        for name, shape in self.shapes.items():
            self.offsets[name] = total
            total += math.prod(shape)
        self.numel, self.size, self.rank, self.group = total, size, rank, group
        self.shard_numel = max(1, -(-total // size))
        self.padded = self.shard_numel * size
        self.lo, self.hi = rank * self.shard_numel, (rank + 1) * self.shard_numel

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: the parameter-shaped view of `flat` (a padded full vector)}."""
        return {name: flat[off:off + math.prod(shape)].view(shape)
                for (name, shape), off in zip(self.shapes.items(), self.offsets.values())}

    def pieces(self) -> list[Piece]:
        """The parameters that overlap this rank's shard, and where."""
        found = []
        for name, shape in self.shapes.items():
            start, stop = self.offsets[name], self.offsets[name] + math.prod(shape)
            lo, hi = max(start, self.lo), min(stop, self.hi)
            if lo < hi:
                found.append(Piece(name, lo - start, hi - start, lo - self.lo))
        return found

    def flatten(self, tensors: dict, dtype: torch.dtype, device) -> torch.Tensor:
        """A new padded full vector holding `tensors` (by name), cast to `dtype`; zeros elsewhere."""
        flat = torch.zeros(self.padded, dtype=dtype, device=device)
        for name, view in self.views(flat).items():
            view.copy_(tensors[name])
        return flat

    def shard_of(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a padded full vector (a view)."""
        return flat[self.lo:self.hi]

    def reduce_scatter(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum `flat` over the DP group; return this rank's shard of the sum (a new tensor)."""
        if self.size == 1:
            return flat.clone()
        out = torch.empty(self.shard_numel, dtype=flat.dtype, device=flat.device)
        _reduce_scatter(out, flat.contiguous(), group=self.group)
        return out

    def all_gather(self, shard: torch.Tensor) -> torch.Tensor:
        """Every rank's shard, concatenated in rank order: the padded full vector."""
        if self.size == 1:
            return shard
        out = torch.empty(self.padded, dtype=shard.dtype, device=shard.device)
        _all_gather(out, shard.contiguous(), group=self.group)
        return out
