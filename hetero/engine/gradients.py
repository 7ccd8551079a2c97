"""Gradient reductions and clipping for one rank's stage.

After the 1F1B step every parameter holds this rank's local gradient. `GradientSync`
takes them as the step's fp32 gradients (`collect`: the parameters' own gradients in
fp32 without ZeRO-1, else an fp32 copy in the stage's flat layout, unscaled by fp16's
loss scale) and makes them the fleet's, in this order:

1. between the two copies of a tied embedding (each DP replica with its partner),
2. over the stage's DP group: all-reduced, or under ZeRO-1 reduce-scattered so each
   rank holds the sum of its own shard only (zeros elsewhere),
3. over the pipelines of a hetero-DP plan (bucketed, hetero.engine.buckets); under
   ZeRO-1 every DP rank contributes its own shard, so the buckets still add each value once,
4. this rank's share of the global squared norm (fp64, every value counted once: one
   DP replica or, under ZeRO-1, each rank's own shard), and clipping.

The sums are linear, so the tied swap may come before the DP sum: both stages of a
pipeline have the same DP degree and swap replica by replica.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hetero.engine import tags
from hetero.engine.buckets import GradBuckets, GradShard, fitting_bucket_elements, grad_bucket_elements
from hetero.model import layout


class GradientSync:
    def __init__(self, comms, model, params: dict, accelerator, scope, tied_link=None, shard=None,
                 zero: bool = False):
        self.comms, self.model, self.params, self.accel = comms, model, params, accelerator
        self.place = comms.place
        self.scope = scope               # () -> the device scope island collectives run in
        self.tied_link = tied_link       # the link to the other copy of a tied embedding, or None
        self.shard = shard               # the stage's flat layout (hetero.engine.zero), or None
        self.zero = zero                 # ZeRO-1: reduce-scatter over the DP group
        self.grads: dict = {}            # {name: fp32 gradient} of the step being reduced
        self.flat = None                 # their flat vector (flat layout only)
        self._buckets = None             # hetero-DP gradient buckets, made on first use

    def prepare(self) -> None:
        """Before backward: fp32 parameters in the flat layout get their gradients as views of one
        fresh flat vector, so backward accumulates straight into it (no second copy of the gradients)."""
        if self.shard is None or next(iter(self.params.values())).dtype != torch.float32:
            return
        with self.scope():
            self.flat = torch.zeros(self.shard.padded, dtype=torch.float32, device=self.comms.device)
        for name, view in self.shard.views(self.flat).items():
            self.params[name].grad = view

    def collect(self, loss_scale: float = 1.0) -> None:
        """Take the parameters' gradients as this step's fp32 gradients, divided by `loss_scale`."""
        if self.shard is None:
            self.grads = {name: param.grad for name, param in self.params.items()}
            return
        if self.flat is not None:       # prepared: backward wrote into the flat vector
            for param in self.params.values():
                param.grad = None
            self.grads = self.shard.views(self.flat)
            return
        with self.scope():
            self.flat = self.shard.flatten({n: p.grad for n, p in self.params.items()}, torch.float32,
                                           self.comms.device)
            if loss_scale != 1.0:
                self.flat.mul_(1.0 / loss_scale)
        for param in self.params.values():
            param.grad = None
        self.grads = self.shard.views(self.flat)

    def release(self) -> None:
        self.grads, self.flat = {}, None

    def within_stage(self) -> None:
        """Sum gradients between tied embedding copies, then over the stage's DP group."""
        self.comms.flush()
        if self.tied_link is not None:
            # The two copies may differ in TP: swap full gradients (resharded like
            # activations), then add the other copy's share of ours.
            name = "model.embed_tokens.weight" if self.place.is_first else "lm_head.weight"
            grad = self.grads[name]
            with self.scope():
                full = self.model.tp.all_gather(grad, 0)
            other = self.tied_link.exchange(full, tags.TIED)
            self.comms.flush()
            with self.scope():
                grad.add_(self.model.tp.shard(other, 0))
        if self.place.stage.dp == 1:
            return
        with self.scope():
            if self.zero:
                mine = self.shard.reduce_scatter(self.flat)
                self.flat.zero_()
                self.shard.shard_of(self.flat).copy_(mine)
            elif self.flat is not None:
                dist.all_reduce(self.flat, group=self.comms.dp_group)
            else:
                for grad in self.grads.values():
                    dist.all_reduce(grad, group=self.comms.dp_group)

    def across_pipelines(self) -> None:
        """hetero-DP: sum gradients over the pipelines (one whole replica per island).

        Replicas may split layers and TP differently, so the sum runs over the
        full-model layout, streamed in fixed-size buckets (GradBuckets): each rank
        writes its own TP shard of the gradients of pipeline-unique values at their
        full-model positions (zeros elsewhere) into a device bucket, and the
        island-aware all-reduce (Comms.replica_sum) adds the bucket up fleet-wide.
        No full-model vector is ever built.
        """
        if len(self.comms.topology.plan.pipelines) == 1:
            return
        if self._buckets is None:
            wanted = fitting_bucket_elements(grad_bucket_elements(), self.accel.free_memory(), self.comms.fleet_sum)
            self._buckets = GradBuckets(self.model.config, wanted)
        shards = {}
        for name in self.params:
            hf = self.model.hf_name(name)
            dim = layout.split_dim(hf)
            part = None
            if dim is not None and self.model.tp.size > 1:
                part = (dim, *self.model.tp.part(layout.full_shape(self.model.config, hf)[dim], hf))
            shards.setdefault(hf, []).append(GradShard(self.grads[name], part, self.counts_once(name)))
        self._buckets.all_reduce(shards, self.comms.replica_sum, self.comms.device, self.scope)

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
            return sum(float(mine[p.at:p.at + p.stop - p.start].double().pow(2).sum())
                       for p in self.shard.pieces() if self.counts_once(p.name))
        if self.place.dp_rank != 0:
            return 0.0
        return sum(float(g.double().pow(2).sum()) for n, g in self.grads.items() if self.counts_once(n))

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
