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

Checkpoints (hetero.checkpoint) hold chunks of full tensors under Hugging Face names whatever the
layout: each rank saves only what it owns (its TP slices; under ZeRO-1 its shard's pieces), never
gathering; loading reads the chunks that overlap this rank's TP slice and DP shard.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Union

import torch

from accelerators import ops
from hetero.checkpoint import format as fmt
from hetero.checkpoint.format import MOMENT_KINDS
from hetero.engine.zero import FlatShard
from hetero.model import layout

# A moment or master store: {module name: tensor} per parameter, or this rank's flat shard vector.
Store = Union[dict[str, torch.Tensor], torch.Tensor]
ToDevice = Callable[[torch.Tensor], torch.Tensor]
Scope = Callable[[], ContextManager]


class AdamW:
    def __init__(self, model, params: dict, lr: float, weight_decay: float, *, shard: FlatShard | None = None,
                 master: bool = False, betas=(0.9, 0.999), eps: float = 1e-8):
        self.model, self.params = model, params    # params: {module name: parameter}
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.shard = shard                         # None: the per-parameter layout
        self.steps = 0
        self.exp_avg: Store
        self.exp_avg_sq: Store
        self.master: torch.Tensor | None = None    # the flat layout's fp32 master shard, where kept
        if shard is None:
            self.exp_avg = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
            self.exp_avg_sq = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        else:
            device = next(iter(params.values())).device
            self.exp_avg = torch.zeros(shard.shard_numel, dtype=torch.float32, device=device)
            self.exp_avg_sq = torch.zeros_like(self.exp_avg)
            self.master = self._param_shard() if master else None

    def _per_param(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The per-parameter layout's moments (exp_avg, exp_avg_sq)."""
        if isinstance(self.exp_avg, dict) and isinstance(self.exp_avg_sq, dict):
            return self.exp_avg, self.exp_avg_sq
        raise RuntimeError("AdamW: per-parameter state asked of the flat layout")

    def _flat(self) -> tuple[FlatShard, torch.Tensor, torch.Tensor]:
        """The flat layout's shard and moment vectors (exp_avg, exp_avg_sq)."""
        if self.shard is not None and isinstance(self.exp_avg, torch.Tensor) \
                and isinstance(self.exp_avg_sq, torch.Tensor):
            return self.shard, self.exp_avg, self.exp_avg_sq
        raise RuntimeError("AdamW: flat state asked of the per-parameter layout")

    # -- the update ---------------------------------------------------------------
    @torch.no_grad()
    def step(self, grads, lr: float | None = None) -> None:
        """One AdamW step. `grads`: {name: fp32 gradient} (per-parameter layout) or this rank's
        fp32 gradient shard (flat layout), already summed fleet-wide and clipped."""
        self.steps += 1
        lr = self.lr if lr is None else lr
        if self.shard is None:
            exp_avg, exp_avg_sq = self._per_param()
            for name, param in self.params.items():
                self._adamw(param, grads[name], exp_avg[name], exp_avg_sq[name], lr)
            return
        _, exp_avg_flat, exp_avg_sq_flat = self._flat()
        weights = self.master if self.master is not None else self._param_shard()
        self._adamw(weights, grads, exp_avg_flat, exp_avg_sq_flat, lr)
        self._write_params(weights)

    def _adamw(self, weights, grad, exp_avg, exp_avg_sq, lr: float) -> None:
        ops.adamw_step(weights, grad, exp_avg, exp_avg_sq, step=self.steps, lr=lr, beta1=self.betas[0],
                       beta2=self.betas[1], eps=self.eps, weight_decay=self.weight_decay)

    def _param_shard(self) -> torch.Tensor:
        """This rank's shard of the parameters, as a new fp32 vector."""
        shard, exp_avg, _ = self._flat()
        out = torch.zeros(shard.shard_numel, dtype=torch.float32, device=exp_avg.device)
        for piece in shard.pieces():
            out[piece.at:piece.at + piece.stop - piece.start].copy_(
                self.params[piece.name].detach().reshape(-1)[piece.start:piece.stop])
        return out

    def _write_params(self, weights: torch.Tensor) -> None:
        """All-gather the updated shards in the compute dtype and copy them into the parameters."""
        shard = self._flat()[0]
        dtype = next(iter(self.params.values())).dtype
        full = shard.all_gather(weights.to(dtype))
        for name, view in shard.views(full).items():
            self.params[name].copy_(view)

    def zero_grad(self) -> None:
        for param in self.params.values():
            param.grad = None

    # -- state, by parameter ---------------------------------------------------------
    def local_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"exp_avg." | "exp_avg_sq." | "master.": {name: this rank's part}} (no communication),
        for checks such as finiteness."""
        if self.shard is None:
            exp_avg, exp_avg_sq = self._per_param()
            return {"exp_avg.": exp_avg, "exp_avg_sq.": exp_avg_sq}
        shard, exp_avg_flat, exp_avg_sq_flat = self._flat()
        stores = {"exp_avg.": exp_avg_flat, "exp_avg_sq.": exp_avg_sq_flat}
        if self.master is not None:
            stores["master."] = self.master
        return {prefix: {p.name: store[p.at:p.at + p.stop - p.start] for p in shard.pieces()}
                for prefix, store in stores.items()}

    # -- checkpoints -------------------------------------------------------------------
    def own_chunks(self, host_copy, names) -> list[fmt.Chunk]:
        """What this rank owns of parameters `names` (module names), as chunks of the full tensors under
        HF names, in host memory (`host_copy`: the device->host copy, the only blocking part of a save):
        the weights (the fp32 master copy where there is one), "exp_avg.<hf>" and "exp_avg_sq.<hf>".
        Per parameter: this rank's TP slices. Flat: its shard's pieces, each cut into boxes
        (format.flat_boxes) that are views of three host vectors. A tensor every TP rank holds whole
        (a norm) is written by TP rank 0 only. No communication."""
        names = {n for n in names if self.model.tp.rank == 0 or layout.split_dim(self.model.hf_name(n)) is not None}
        chunks: list[fmt.Chunk] = []
        if self.shard is None:
            exp_avg, exp_avg_sq = self._per_param()
            for name in (n for n in self.params if n in names):
                hf, shape, (offsets, lengths) = self._geometry(name)
                for prefix, tensor in (("", self.params[name]), ("exp_avg.", exp_avg[name]),
                                       ("exp_avg_sq.", exp_avg_sq[name])):
                    chunks.append(fmt.Chunk(prefix + hf, shape, offsets, lengths, host_copy(tensor.detach())))
            return chunks
        shard, exp_avg_flat, exp_avg_sq_flat = self._flat()
        vectors = {"exp_avg.": host_copy(exp_avg_flat), "exp_avg_sq.": host_copy(exp_avg_sq_flat)}
        if self.master is not None:
            vectors[""] = host_copy(self.master)
        for piece in (p for p in shard.pieces() if p.name in names):
            hf, shape, (tp_offsets, local_shape) = self._geometry(piece.name)
            for flat_at, offsets, lengths in fmt.flat_boxes(local_shape, piece.start, piece.stop):
                at, count = piece.at + flat_at - piece.start, fmt.volume(lengths)
                box = fmt.shifted(offsets, tp_offsets)
                if self.master is None:       # fp32 ZeRO-1: the weights are the parameters' own elements
                    own = self.params[piece.name].detach().reshape(-1)[flat_at:flat_at + count]
                    chunks.append(fmt.Chunk(hf, shape, box, lengths, host_copy(own).view(lengths)))
                for prefix, vector in vectors.items():
                    chunks.append(fmt.Chunk(prefix + hf, shape, box, lengths, vector[at:at + count].view(lengths)))
        return chunks

    def _geometry(self, name: str) -> tuple[str, tuple, tuple[tuple, tuple]]:
        """(HF name, full shape, this rank's TP box (offsets, lengths)) of parameter `name`."""
        hf = self.model.hf_name(name)
        shape = layout.full_shape(self.model.config, hf)
        return hf, shape, fmt.tp_box(shape, layout.split_dim(hf), self.model.tp)

    def read_part(self, saved) -> dict:
        """This rank's part of checkpoint `saved`, read on the host (only the chunks that overlap it):
        {"weights": {name: TP slice}, "exp_avg" / "exp_avg_sq": {name: TP slice} per parameter, or
        {name: flat piece} for this rank's shard}. Raises CorruptCheckpoint for a damaged checkpoint."""
        part: dict[str, dict] = {"weights": {}}
        for name in self.params:
            hf, _, box = self._geometry(name)
            part["weights"][name] = saved.read(hf, *box)
        for kind in MOMENT_KINDS:
            if self.shard is None:
                part[kind] = {n: saved.read(f"{kind}.{self._geometry(n)[0]}", *self._geometry(n)[2])
                              for n in self.params}
            else:
                part[kind] = {p.name: self._read_piece(saved, f"{kind}.", p) for p in self.shard.pieces()}
        return part

    def _read_piece(self, saved, prefix: str, piece) -> torch.Tensor:
        """Flat elements [piece.start, piece.stop) of this rank's TP slice of `prefix + hf`, read as the
        whole rows that hold them."""
        hf, _, (tp_offsets, local_shape) = self._geometry(piece.name)
        flat_at, offsets, lengths = fmt.rows_box(local_shape, piece.start, piece.stop)
        rows = saved.read(prefix + hf, fmt.shifted(offsets, tp_offsets), lengths).reshape(-1)
        return rows[piece.start - flat_at:piece.stop - flat_at]

    @torch.no_grad()
    def load_part(self, part: dict, steps: int, to_device: ToDevice, scope: Scope) -> None:
        """Take `read_part`'s host tensors: the parameters, the moments and the master copy. Only this
        rank's slices cross the host link (`to_device`); the copies run in the device `scope`."""
        for name, param in self.params.items():
            piece = to_device(part["weights"][name].to(param.dtype).contiguous())
            with scope():
                param.copy_(piece)
        for kind, store in zip(MOMENT_KINDS, (self.exp_avg, self.exp_avg_sq)):
            self._load_own(store, part[kind], to_device, scope)
        if self.master is not None:
            weights = {p.name: part["weights"][p.name].float().reshape(-1)[p.start:p.stop]
                       for p in self._flat()[0].pieces()}
            self._load_own(self.master, weights, to_device, scope)
        self.steps = steps

    def _load_own(self, store: Store, own: dict, to_device: ToDevice, scope: Scope) -> None:
        """Copy host tensors already cut to this rank's part into `store` (per parameter or flat)."""
        if isinstance(store, dict):
            for name, tensor in own.items():
                moved = to_device(tensor.float().contiguous())
                with scope():
                    store[name].copy_(moved)
            return
        for piece in self._flat()[0].pieces():
            part = to_device(own[piece.name].float().contiguous())
            with scope():
                store[piece.at:piece.at + piece.stop - piece.start].copy_(part)

    @torch.no_grad()
    def load_master(self, full: dict, to_device: ToDevice, scope: Scope) -> None:
        """Set the master weights from full host tensors ({module name: full tensor}). Only the flat
        layout with low-precision parameters keeps a master copy; asking any other refuses."""
        if self.master is None:
            raise RuntimeError("AdamW.load_master: this optimizer keeps no fp32 master copy "
                               "(per-parameter layout, or fp32 parameters under ZeRO-1)")
        self._load_store(self.master, full, to_device, scope)

    def _load_store(self, store: Store, full: dict, to_device: ToDevice, scope: Scope) -> None:
        """Copy this rank's TP slice (and, flat, its DP shard) of each full host tensor into `store`.
        Slices are cut on the host and only they cross the host link (`to_device`), so a rank never
        holds a full tensor in device memory; the copies into `store` run in the device `scope`."""
        for name, tensor in full.items():
            local = self.model.tp.shard(tensor.float(), layout.split_dim(self.model.hf_name(name)))
            if isinstance(store, dict):
                moved = to_device(local.contiguous())
                with scope():
                    store[name].copy_(moved)
                continue
            flat = local.reshape(-1)
            for piece in self._flat()[0].pieces():
                if piece.name == name:
                    part = to_device(flat[piece.start:piece.stop].contiguous())
                    with scope():
                        store[piece.at:piece.at + piece.stop - piece.start].copy_(part)
