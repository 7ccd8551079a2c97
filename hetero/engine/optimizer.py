"""AdamW over one stage's parameters (the fused `accelerators.ops.adamw_step`), owning its
state — fp32 master weights where the parameters are low precision, fp32 moments, sharded
over the stage's DP group under ZeRO-1 — and that state's save and load.

Two layouts (hetero.engine.precision has the policy):
- per parameter: fp32 without ZeRO-1. The parameters are the master weights; the moments
  are one fp32 tensor per parameter; the update runs in place.
- flat (`FlatShard`, hetero.engine.zero): ZeRO-1 and/or bf16/fp16. The master weights
  and moments of this rank's shard of the stage's flat vector; the update runs on the
  shard and the new parameters are all-gathered over the DP group (in the compute dtype)
  and copied into the model. fp32 ZeRO-1 keeps no master copy: its shard of the
  parameters is read out of the model for each step.

Checkpoints hold full tensors under Hugging Face names whatever the layout: saving
all-gathers the shards (DP) and the TP slices; loading takes this rank's TP slice and
then its DP shard of each full tensor.
"""

from __future__ import annotations

import torch

from accelerators import ops
from hetero.engine.checkpoint import MOMENT_KINDS
from hetero.engine.zero import FlatShard
from hetero.model import layout


class AdamW:
    def __init__(self, model, params: dict, lr: float, weight_decay: float, *, shard: FlatShard | None = None,
                 master: bool = False, betas=(0.9, 0.999), eps: float = 1e-8):
        self.model, self.params = model, params    # params: {module name: parameter}
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.shard = shard                         # None: the per-parameter layout
        self.steps = 0
        if shard is None:
            self.exp_avg = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
            self.exp_avg_sq = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
            self.master = None
        else:
            device = next(iter(params.values())).device
            self.exp_avg = torch.zeros(shard.shard_numel, dtype=torch.float32, device=device)
            self.exp_avg_sq = torch.zeros_like(self.exp_avg)
            self.master = self._param_shard() if master else None

    # -- the update ---------------------------------------------------------------
    @torch.no_grad()
    def step(self, grads, lr: float | None = None) -> None:
        """One AdamW step. `grads`: {name: fp32 gradient} (per-parameter layout) or this rank's
        fp32 gradient shard (flat layout), already summed fleet-wide and clipped."""
        self.steps += 1
        lr = self.lr if lr is None else lr
        if self.shard is None:
            for name, param in self.params.items():
                self._adamw(param, grads[name], self.exp_avg[name], self.exp_avg_sq[name], lr)
            return
        weights = self.master if self.master is not None else self._param_shard()
        self._adamw(weights, grads, self.exp_avg, self.exp_avg_sq, lr)
        self._write_params(weights)

    def _adamw(self, weights, grad, exp_avg, exp_avg_sq, lr: float) -> None:
        ops.adamw_step(weights, grad, exp_avg, exp_avg_sq, step=self.steps, lr=lr, beta1=self.betas[0],
                       beta2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay)

    def _param_shard(self) -> torch.Tensor:
        """This rank's shard of the parameters, as a new fp32 vector."""
        out = torch.zeros(self.shard.shard_numel, dtype=torch.float32, device=self.exp_avg.device)
        for piece in self.shard.pieces():
            out[piece.at:piece.at + piece.stop - piece.start].copy_(
                self.params[piece.name].detach().reshape(-1)[piece.start:piece.stop])
        return out

    def _write_params(self, weights: torch.Tensor) -> None:
        """All-gather the updated shards in the compute dtype and copy them into the parameters."""
        dtype = next(iter(self.params.values())).dtype
        full = self.shard.all_gather(weights.to(dtype))
        for name, view in self.shard.views(full).items():
            self.params[name].copy_(view)

    def zero_grad(self) -> None:
        for param in self.params.values():
            param.grad = None

    # -- state, by parameter ---------------------------------------------------------
    def local_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"exp_avg." | "exp_avg_sq." | "master.": {name: this rank's part}} (no communication),
        for checks such as finiteness."""
        if self.shard is None:
            return {"exp_avg.": self.exp_avg, "exp_avg_sq.": self.exp_avg_sq}
        stores = {"exp_avg.": self.exp_avg, "exp_avg_sq.": self.exp_avg_sq}
        if self.master is not None:
            stores["master."] = self.master
        return {prefix: {p.name: store[p.at:p.at + p.stop - p.start] for p in self.shard.pieces()}
                for prefix, store in stores.items()}

    def _whole(self, store) -> dict[str, torch.Tensor]:
        """{name: this rank's TP slice of the parameter's state, whole over DP} (collective under ZeRO-1)."""
        if self.shard is None:
            return store
        return self.shard.views(self.shard.all_gather(store))

    # -- checkpoints -------------------------------------------------------------------
    def save_tensors(self, host_copy) -> tuple[dict | None, dict]:
        """(master weights, moments) as full host tensors under HF names: {hf: fp32} (None when the
        parameters are the master weights) and {"exp_avg.<hf>" / "exp_avg_sq.<hf>": fp32}. A collective
        over the stage's TP group and, under ZeRO-1, its DP group: every rank of the stage calls it."""
        moments = {}
        for kind, store in zip(MOMENT_KINDS, (self.exp_avg, self.exp_avg_sq)):
            for name, tensor in self._whole(store).items():
                moments[f"{kind}.{self.model.hf_name(name)}"] = host_copy(self._tp_full(name, tensor))
        if self.master is None:
            return None, moments
        weights = {self.model.hf_name(n): host_copy(self._tp_full(n, t)) for n, t in self._whole(self.master).items()}
        return weights, moments

    def _tp_full(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        dim = layout.split_dim(self.model.hf_name(name))
        return tensor if dim is None else self.model.tp.all_gather(tensor, dim)

    def checkpoint_names(self) -> list[str]:
        """The checkpoint tensors `load` reads: every moment and, with a master copy, every weight."""
        names = [self.model.hf_name(n) for n in self.params]
        moments = [f"{kind}.{hf}" for kind in MOMENT_KINDS for hf in names]
        return moments + (names if self.master is not None else [])

    @torch.no_grad()
    def load_master(self, full: dict, to_device, scope) -> None:
        """Set the master weights from full host tensors ({module name: full tensor})."""
        self._load_store(self.master, full, to_device, scope)

    @torch.no_grad()
    def load(self, full: dict, steps: int, to_device, scope) -> None:
        """Take this rank's part of a checkpoint's full host tensors (`checkpoint_names` -> tensor):
        the weights into the master copy, and the moments."""
        names = {n: self.model.hf_name(n) for n in self.params}
        for kind, store in zip(MOMENT_KINDS, (self.exp_avg, self.exp_avg_sq)):
            self._load_store(store, {n: full[f"{kind}.{hf}"] for n, hf in names.items()}, to_device, scope)
        if self.master is not None:
            self._load_store(self.master, {n: full[hf] for n, hf in names.items()}, to_device, scope)
        self.steps = steps

    def _load_store(self, store, full: dict, to_device, scope) -> None:
        """Copy this rank's TP slice (and, flat, its DP shard) of each full host tensor into `store`.
        Slices are cut on the host and only they cross the host link (`to_device`), so a rank never
        holds a full tensor in device memory; the copies into `store` run in the device `scope`."""
        for name, tensor in full.items():
            local = self.model.tp.shard(tensor.float(), layout.split_dim(self.model.hf_name(name)))
            if self.shard is None:
                piece = to_device(local.contiguous())
                with scope():
                    store[name].copy_(piece)
                continue
            flat = local.reshape(-1)
            for piece in self.shard.pieces():
                if piece.name == name:
                    part = to_device(flat[piece.start:piece.stop].contiguous())
                    with scope():
                        store[piece.at:piece.at + piece.stop - piece.start].copy_(part)
