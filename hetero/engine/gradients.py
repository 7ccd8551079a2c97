"""Gradient reductions and clipping for one rank's stage.

After the 1F1B step every parameter holds this rank's local gradient. `GradientSync`
takes them as the step's fp32 gradients (`collect`: the parameters' own gradients in
fp32 without ZeRO-1, else an fp32 copy in the stage's flat layout, unscaled by fp16's
loss scale) and makes them the fleet's, in this order:

1. between the two copies of a tied embedding (each DP replica with its partner),
2. over the stage's DP group: all-reduced, or under ZeRO-1 reduce-scattered so each
   rank holds the sum of its own shard only (zeros elsewhere),
3. over the pipelines of a hetero-DP or hybrid plan (bucketed, hetero.engine.buckets, by ownership
   where the islands are of one size: hetero.engine.owned_sum); under ZeRO-1 every DP rank
   contributes its own shard, so the buckets still add each value once,
4. this rank's share of the global squared norm (fp64, every value counted once: one
   DP replica or, under ZeRO-1, each rank's own shard), and clipping.

The sums are linear, so the tied swap may come before the DP sum: both stages of a
pipeline have the same DP degree and swap replica by replica.

Step 2 overlaps the backward (`after_backward`, on by default; HETERO_OVERLAP_GRAD_REDUCE=0 turns
it off): the stage's gradients are cut by model chunk (hetero.engine.buckets.StageBuckets) and a
chunk whose last backward of the step is not the stage's last action (interleaved 1F1B: every
chunk but chunk 0) starts its DP reduction at once, asynchronously, on the gradients the later
backwards no longer touch: an all-reduce of its gradients, or under ZeRO-1 a reduce of each DP
rank's part of the chunk's range to that rank (a reduce-scatter of the range: NCCL's
reduce_scatter_tensor needs equal shards, and the chunk's range is not cut at the shards'
edges). fp32 only, where backward writes the gradients in their final form: bf16/fp16 reduce
an fp32 copy that the memory model places at collection, not beside the drain's activations, so
their chunks all start at the end (partitioner/schedule_time.py costs it so). The rest start
in `within_stage`, which waits for all of them; everything after it (hetero-DP
buckets, fp64 norm, clipping) sees the same sums as without the overlap.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from hetero.engine import tags
from hetero.engine.buckets import (END_OF_COMPUTE, GradBuckets, GradShard, StageBuckets, chunk_names,
                                   fitting_bucket_elements, grad_bucket_elements, held_names)
from hetero.engine.owned_sum import IslandHoldings, OwnedSum
from hetero.model import layout

OVERLAP_ENV = "HETERO_OVERLAP_GRAD_REDUCE"      # "0": every DP reduction waits for the whole backward


def overlap_wanted(environ=None) -> bool:
    """Whether DP reductions start during the backward (HETERO_OVERLAP_GRAD_REDUCE, default on)."""
    return (os.environ if environ is None else environ).get(OVERLAP_ENV, "1").strip() not in ("0", "false", "no")


class GradientSync:
    def __init__(self, comms, model, params: dict, accelerator, scope, tied_link=None, shard=None,
                 zero: bool = False, schedule=None):
        self.comms, self.model, self.params, self.accel = comms, model, params, accelerator
        self.place = comms.place
        self.scope = scope               # () -> the device scope island collectives run in
        self.tied_link = tied_link       # the link to the other copy of a tied embedding, or None
        self.shard = shard               # the stage's flat layout (hetero.engine.zero), or None
        self.zero = zero                 # ZeRO-1: reduce-scatter over the DP group
        self.grads: dict = {}            # {name: fp32 gradient} of the step being reduced
        self.flat: torch.Tensor | None = None      # their flat vector (flat layout only)
        self._buckets: GradBuckets | None = None   # hetero-DP gradient buckets, made on first use
        self._bucket_islands: list[list[str]] = []   # per bucket, the islands holding its values
        self._owned: OwnedSum | bool | None = None   # the sum by ownership; False where it does not apply
        self._prepared = False           # backward accumulates straight into `flat`
        # the DP reduction by chunk, started during the backward (None: all of it after)
        self.overlap: StageBuckets | None = None
        if schedule is not None and self.place.stage.dp > 1 and overlap_wanted():
            names = chunk_names(params, getattr(model, "chunks", None))
            held = {c for c, group in enumerate(names) if tied_link is not None and self._tied_name() in group}
            # bf16/fp16 gradients become fp32 at collection: none can start during the backward
            final_form = shard is None or next(iter(params.values())).dtype == torch.float32
            self.overlap = StageBuckets(names, schedule if final_form else [], held)

    def _tied_name(self) -> str:
        """This stage's copy of a tied embedding."""
        return layout.EMBED if self.place.is_first else layout.LM_HEAD

    def prepare(self) -> None:
        """Before backward: fp32 parameters in the flat layout get their gradients as views of one
        fresh flat vector, so backward accumulates straight into it (no second copy of the gradients)."""
        if self.overlap is not None:
            self.overlap.begin()
        self._prepared = False
        if self.shard is None or next(iter(self.params.values())).dtype != torch.float32:
            return
        self._prepared = True
        with self.scope():
            self.flat = torch.zeros(self.shard.padded, dtype=torch.float32, device=self.comms.device)
        for name, view in self.shard.views(self.flat).items():
            self.params[name].grad = view

    def collect(self, loss_scale: float = 1.0) -> None:
        """Take the parameters' gradients as this step's fp32 gradients, divided by `loss_scale`."""
        if self.shard is None:
            self.grads = {name: param.grad for name, param in self.params.items()}
            return
        if not self._prepared:           # bf16/fp16: into the fp32 flat vector (chunks taken early are)
            self._take([name for name, param in self.params.items() if param.grad is not None], loss_scale)
        for param in self.params.values():
            param.grad = None
        self.grads = self.shard.views(self.flat)

    def _take(self, names: list[str], loss_scale: float) -> None:
        """Move the gradients of `names` into the flat fp32 vector (made on first use), unscaled."""
        with self.scope():
            if self.flat is None:
                self.flat = torch.zeros(self.shard.padded, dtype=torch.float32, device=self.comms.device)
            views = self.shard.views(self.flat)
            for name in names:
                views[name].copy_(self.params[name].grad)
                if loss_scale != 1.0:
                    views[name].mul_(1.0 / loss_scale)
                self.params[name].grad = None

    def after_backward(self, index: int) -> None:
        """Action `index` of the schedule (a backward) has run: start the DP reduction of the chunk
        whose gradients it made final, if any (StageBuckets says which)."""
        overlap = self.overlap
        chunk = None if overlap is None else overlap.final_after(index)
        if overlap is None or chunk is None:
            return
        overlap.start(chunk, index, self._reduce_async(overlap.names[chunk]))

    def _reduce_async(self, names: list[str]) -> list:
        """Issue the DP reduction of the gradients of `names` (one chunk's); return its works."""
        group = self.comms.dp_group
        with self.scope():
            if self.shard is None:
                return [dist.all_reduce(self.params[n].grad, group=group, async_op=True) for n in names]
            spans = _spans(sorted((self.shard.offsets[n], self.shard.offsets[n] + self.params[n].numel())
                                  for n in names))
            if not self.zero:
                return [dist.all_reduce(self._vector()[lo:hi], group=group, async_op=True) for lo, hi in spans]
            works = []
            size = self.shard.shard_numel
            for lo, hi in spans:
                for rank in range(self.shard.size):      # each DP rank's part of [lo, hi), summed onto it
                    start, stop = max(lo, rank * size), min(hi, (rank + 1) * size)
                    if start < stop:
                        works.append(dist.reduce(self._vector()[start:stop], dst=dist.get_global_rank(group, rank),
                                                 group=group, async_op=True))
            return works

    def release(self) -> None:
        self.grads, self.flat = {}, None
        self._prepared = False

    def within_stage(self) -> None:
        """Sum gradients between tied embedding copies, then over the stage's DP group."""
        self.comms.flush()
        if self.tied_link is not None:
            # The two copies may differ in TP: swap full gradients (resharded like
            # activations), then add the other copy's share of ours.
            name = self._tied_name()
            grad = self.grads[name]
            with self.scope():
                full = self.model.tp.all_gather(grad, 0)
            other = self.tied_link.exchange(full, tags.TIED)
            self.comms.flush()
            with self.scope():
                grad.add_(self.model.tp.shard(other, 0))
        if self.place.stage.dp == 1:
            return
        if self.overlap is not None:
            self._finish_overlap()
            return
        with self.scope():
            if self.zero:
                flat = self._vector()
                mine = self.shard.reduce_scatter(flat)
                flat.zero_()
                self.shard.shard_of(flat).copy_(mine)
            elif self.flat is not None:
                dist.all_reduce(self.flat, group=self.comms.dp_group)
            else:
                for grad in self.grads.values():
                    dist.all_reduce(grad, group=self.comms.dp_group)

    def _finish_overlap(self) -> None:
        """Start the chunks not started during the backward, wait for all; under ZeRO-1 keep only
        this rank's shard (zeros elsewhere, as after a reduce-scatter)."""
        assert self.overlap is not None
        for chunk in self.overlap.remaining():
            names = self.overlap.names[chunk]
            if names:
                self.overlap.start(chunk, END_OF_COMPUTE, self._reduce_async(names))
        self.overlap.wait()
        if self.zero:
            with self.scope():
                self._vector()[:self.shard.lo].zero_()
                self._vector()[self.shard.hi:].zero_()

    def _vector(self) -> torch.Tensor:
        """The flat gradient vector (flat layout: made by `prepare`, an early chunk or `collect`)."""
        assert self.flat is not None, "no flat gradient vector yet"
        return self.flat

    def across_pipelines(self) -> None:
        """hetero-DP and hybrid: sum gradients over the pipelines (each a whole model replica, on one
        island or, hybrid, cut over several).

        Replicas may split layers and TP differently, so the sum runs over the
        full-model layout, streamed in fixed-size buckets (GradBuckets): each rank
        writes its own TP shard of the gradients of pipeline-unique values at their
        full-model positions (zeros elsewhere) into a device bucket, and the
        island-aware all-reduce (Comms.bucket_sum) adds the bucket up fleet-wide.
        A bucket is summed over the islands holding any of its values only
        (GradBuckets.holders): in a hybrid plan a pipeline cut over two islands
        brings its first layers' buckets from one and the rest from the other, each
        over that island's bridge links, and still adds each pipeline's gradient once;
        in a replicas plan every island holds every bucket, as before.
        No full-model vector is ever built. Where the islands are of one size, the sum goes by
        ownership instead (hetero.engine.owned_sum): the same buckets, but each rank moves only the
        gradients it holds, never a full bucket.
        """
        if len(self.comms.topology.plan.pipelines) == 1:
            return
        if self._buckets is None:
            wanted = fitting_bucket_elements(grad_bucket_elements(), self.accel.free_memory(), self.comms.fleet_sum)
            self._buckets = GradBuckets(self.model.config, wanted)
            held = {island: held_names(self.model.config, parts)
                    for island, parts in self.comms.topology.island_holdings().items()}
            self._bucket_islands = self._buckets.holders(held)
        shards: dict[str, list[GradShard]] = {}
        for name in self.params:
            hf = self.model.hf_name(name)
            dim = layout.split_dim(hf)
            part = None
            if dim is not None and self.model.tp.size > 1:
                part = (dim, *self.model.tp.part(layout.full_shape(self.model.config, hf)[dim], hf))
            shards.setdefault(hf, []).append(GradShard(self.grads[name], part, self.counts_once(name)))
        island, islands = self.place.island, self._bucket_islands
        indices = [k for k, holders in enumerate(islands) if island in holders]
        owned = self._owned_sum(self._buckets, shards)
        if owned is not None:
            owned.all_reduce(shards, indices)
            return
        self._buckets.all_reduce(shards, self.comms.bucket_sum(islands.__getitem__), self.comms.device, self.scope,
                                 indices=indices)

    def _owned_sum(self, buckets: GradBuckets, shards: dict) -> OwnedSum | None:
        """The sum by ownership (hetero.engine.owned_sum) where the islands are of one size, made on
        first use (the island's ranks learn each other's holdings then); None: the bucket path."""
        if self._owned is None:
            ring = self.comms.owned_ring(self._bucket_islands.__getitem__)
            self._owned = False
            if ring is not None:
                names = list(buckets.shapes)
                group = self.comms._island_group()  # pylint: disable=protected-access
                holdings = IslandHoldings(names, shards, group, self.comms.device, self.scope)
                me = dist.get_rank(group) if group is not None else 0
                self._owned = OwnedSum(buckets, holdings, me, group, self.comms.device, self.scope, ring)
        return self._owned if isinstance(self._owned, OwnedSum) else None

    def counts_once(self, name: str) -> bool:
        """Whether this rank's copy of `name` is the one that counts in a fleet-wide sum:
        one DP replica (under ZeRO-1 every rank: it holds its own shard and zeros), one TP rank for
        replicated values, the first stage for tied embeddings."""
        if self.place.dp_rank != 0 and not self.zero:
            return False
        if name == "lm_head.weight" and self.model.tied_lm_head:
            return False
        return layout.split_dim(self.model.hf_name(name)) is not None or self.place.tp_rank == 0

    def local_sq_norm(self) -> float:
        """This rank's share of the global squared gradient norm (fp64), counting each value once."""
        if self.place.stage.pipeline != 0:
            return 0.0
        if self.zero:
            mine = self.shard.shard_of(self.flat)
            return self._squared_sum([mine[p.at:p.at + p.stop - p.start]
                                      for p in self.shard.pieces() if self.counts_once(p.name)])
        if self.place.dp_rank != 0:
            return 0.0
        return self._squared_sum([g for n, g in self.grads.items() if self.counts_once(n)])

    def _squared_sum(self, tensors: list[torch.Tensor]) -> float:
        """The sum of squares of `tensors` in fp64: each read once by a norm that accumulates in
        fp64 (no fp64 copy of a gradient on the device), one read back by the host for them all."""
        if not tensors:
            return 0.0
        with self.scope():
            norms = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors])
            return float(norms.square().sum())

    def clip(self, grad_norm: float, limit: float) -> None:
        """Scale every gradient so the global norm is at most `limit` (0 or None: no clipping)."""
        if limit and grad_norm > limit:
            scale = limit / (grad_norm + 1e-6)
            with self.scope():
                if self.flat is not None:
                    (self.shard.shard_of(self.flat) if self.zero else self.flat).mul_(scale)
                else:
                    for grad in self.grads.values():
                        grad.mul_(scale)

    def for_optimizer(self):
        """What the optimizer steps with: {name: gradient}, or this rank's flat shard of them."""
        if self.flat is None:
            return self.grads
        return self.shard.shard_of(self.flat)


def _spans(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted [start, stop) ranges merged where they touch (a chunk's parameters lie end to end in
    the flat layout: one span; anything else still reduces each value once)."""
    out: list[tuple[int, int]] = []
    for start, stop in ranges:
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    return out
