"""Gradient reductions and clipping for one rank's stage.

After the 1F1B step every parameter holds this rank's local gradient. `GradientSync`
makes it the fleet's: summed over the stage's DP group and between the two copies of a
tied embedding (island collectives on device memory), then over the pipelines of a
hetero-DP plan (bucketed, hetero.engine.buckets); it also gives this rank's share of the
global squared norm, counting every value once, and clips.
"""

from __future__ import annotations

import torch.distributed as dist

from hetero.engine import tags
from hetero.engine.buckets import GradBuckets, GradShard, fitting_bucket_elements, grad_bucket_elements
from hetero.model import layout


class GradientSync:
    def __init__(self, comms, model, params: dict, accelerator, scope, tied_link=None):
        self.comms, self.model, self.params, self.accel = comms, model, params, accelerator
        self.place = comms.place
        self.scope = scope               # () -> the device scope island collectives run in
        self.tied_link = tied_link       # the link to the other copy of a tied embedding, or None
        self._buckets = None             # hetero-DP gradient buckets, made on first use

    def within_stage(self) -> None:
        """Sum gradients over the stage's DP group and between tied embedding copies."""
        self.comms.flush()
        if self.place.stage.dp > 1:
            with self.scope():
                for param in self.params.values():
                    dist.all_reduce(param.grad, group=self.comms.dp_group)
        if self.tied_link is not None:
            # The two copies may differ in TP: swap full gradients (resharded like
            # activations), then add the other copy's share of ours.
            name = "model.embed_tokens.weight" if self.place.is_first else "lm_head.weight"
            grad = self.params[name].grad
            with self.scope():
                full = self.model.tp.all_gather(grad, 0)
            other = self.tied_link.exchange(full, tags.TIED)
            self.comms.flush()
            with self.scope():
                grad.add_(self.model.tp.shard(other, 0))

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
        for name, param in self.params.items():
            hf = self.model.hf_name(name)
            dim = layout.split_dim(hf)
            part = None
            if dim is not None and self.model.tp.size > 1:
                part = (dim, *self.model.tp.part(layout.full_shape(self.model.config, hf)[dim], hf))
            shards.setdefault(hf, []).append(GradShard(param.grad, part, self.counts_once(name)))
        self._buckets.all_reduce(shards, self.comms.replica_sum, self.comms.device, self.scope)

    def counts_once(self, name: str) -> bool:
        """Whether this rank's copy of `name` is the one that counts in a fleet-wide sum:
        one DP replica, one TP rank for replicated values, the first stage for tied embeddings."""
        if self.place.dp_rank != 0:
            return False
        if name == "lm_head.weight" and self.model.tied_lm_head:
            return False
        return layout.split_dim(self.model.hf_name(name)) is not None or self.place.tp_rank == 0

    def local_sq_norm(self) -> float:
        """This rank's share of the global squared gradient norm, counting each value once."""
        if self.place.dp_rank != 0 or self.place.stage.pipeline != 0:
            return 0.0
        return sum(float(p.grad.double().pow(2).sum()) for n, p in self.params.items() if self.counts_once(n))

    def clip(self, grad_norm: float, limit: float) -> None:
        """Scale every gradient so the global norm is at most `limit` (0 or None: no clipping)."""
        if limit and grad_norm > limit:
            scale = limit / (grad_norm + 1e-6)
            with self.scope():
                for param in self.params.values():
                    param.grad.mul_(scale)
