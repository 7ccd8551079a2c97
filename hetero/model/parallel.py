"""Megatron-style tensor parallelism: the TP group description, its collectives as
autograd Functions, and the column/row-parallel linears, vocab-parallel embedding
and vocab-parallel cross-entropy built on them.

A TP group lives inside one island, so it runs on the island's native backend
through torch.distributed; size 1 means no communication at all (no process
group needed). Layout conventions (Megatron-LM, "Efficient Large-Scale Language
Model Training on GPU Clusters"):

- ColumnParallelLinear splits the OUTPUT dim: rank r holds rows
  [r*out/tp, (r+1)*out/tp) of the (out, in) weight. Its input must be identical
  on every rank; `copy_to_tensor_parallel` marks that point so the input
  gradient is summed over the group in backward.
- RowParallelLinear splits the INPUT dim: rank r holds columns
  [r*in/tp, (r+1)*in/tp); partial outputs are summed over the group.
- VocabParallelEmbedding / the LM head split vocab rows the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in its TP group. `group` None with size > 1 means the
    default (world) group; size 1 never communicates."""

    size: int = 1
    rank: int = 0
    group: Any = None

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"tensor-parallel size must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} is outside [0, {self.size})")

    @classmethod
    def from_group(cls, group: Any = None) -> "TensorParallel":
        """Describe an existing torch.distributed group (None: the world group)."""
        return cls(dist.get_world_size(group), dist.get_rank(group), group)

    def part(self, total: int, what: str) -> tuple[int, int]:
        """This rank's half-open slice [start, stop) of `total` items split evenly."""
        if total % self.size:
            raise ValueError(f"tensor-parallel size {self.size} must divide {what} ({total})")
        each = total // self.size
        return self.rank * each, (self.rank + 1) * each

    def shard(self, full: torch.Tensor, dim: int | None) -> torch.Tensor:
        """This rank's slice of a full tensor along `dim` (None: replicated)."""
        if dim is None or self.size == 1:
            return full
        start, stop = self.part(full.shape[dim], f"dim {dim} of a {tuple(full.shape)} tensor")
        return full.narrow(dim, start, stop - start)

    # -- plain collectives (in place / no autograd) -----------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.size > 1:
            reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
            dist.all_reduce(tensor, op=reduce_op, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenate every rank's `tensor` along `dim`, in rank order."""
        if self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=dim)


NO_TP = TensorParallel()


# -- communication as autograd Functions ----------------------------------------

def _summed(tensor: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    # Clone: the collective is in place and the input may be autograd's own buffer.
    return tp.all_reduce(tensor.clone(memory_format=torch.contiguous_format))


class _CopyToTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _summed(grad, ctx.tp), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        return _summed(x, tp)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return tp.all_gather(x, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        tp = ctx.tp
        return tp.shard(grad, grad.dim() - 1).contiguous(), None


def copy_to_tensor_parallel(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward. Put it where a
    replicated activation enters column-parallel layers (once, however many)."""
    return x if tp.size == 1 else _CopyToTensorParallel.apply(x, tp)


def reduce_from_tensor_parallel(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """All-reduce forward; identity backward (every rank gets the full gradient)."""
    return x if tp.size == 1 else _ReduceFromTensorParallel.apply(x, tp)


def gather_from_tensor_parallel(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """All-gather along the last dim forward; keep this rank's slice backward."""
    return x if tp.size == 1 else _GatherFromTensorParallel.apply(x, tp)


# -- layers ----------------------------------------------------------------------

class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split over TP ranks; no bias (Llama has none).

    `copy_input=False` when the caller already applied copy_to_tensor_parallel
    for several layers sharing one input (q/k/v, gate/up): one gradient
    all-reduce instead of one per layer."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel = NO_TP, *,
                 copy_input: bool = True, gather_output: bool = False,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        start, stop = tp.part(out_features, "the output features")
        self.tp, self.copy_input, self.gather_output = tp, copy_input, gather_output
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(stop - start, in_features, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copy_input:
            x = copy_to_tensor_parallel(x, self.tp)
        y = F.linear(x, self.weight)
        return gather_from_tensor_parallel(y, self.tp) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split over TP ranks; x arrives split (the
    output of a column-parallel layer) and the partial products are summed."""

    def __init__(self, in_features: int, out_features: int, tp: TensorParallel = NO_TP, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        start, stop = tp.part(in_features, "the input features")
        self.tp = tp
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, stop - start, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tensor_parallel(F.linear(x, self.weight), self.tp)


class VocabParallelEmbedding(nn.Module):
    """Embedding whose vocab rows are split over TP ranks: each rank looks up the
    tokens it owns, writes zeros for the rest, and the group sums."""

    def __init__(self, vocab: int, hidden: int, tp: TensorParallel = NO_TP, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        self.tp = tp
        self.vocab_start, self.vocab_stop = tp.part(vocab, "the vocabulary size")
        self.weight = nn.Parameter(torch.empty(self.vocab_stop - self.vocab_start, hidden,
                                               dtype=dtype, device=device))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(tokens, self.weight)
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_stop)
        local = torch.where(outside, 0, tokens - self.vocab_start)
        rows = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel(rows, self.tp)


# -- loss ------------------------------------------------------------------------

class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token -log softmax(logits)[label] with logits split over vocab; two
    all-reduces of (tokens,) tensors plus one for the target logit, never the
    full logits. Computed in fp32 whatever the logits dtype."""

    @staticmethod
    def forward(ctx, logits, labels, tp, ignore_index):
        x = logits.float()
        vocab_start = tp.rank * x.shape[-1]
        # Shift by the global max for a stable exp; the shift has no gradient.
        shifted = x - tp.all_reduce(x.max(dim=-1, keepdim=True).values, op="max")
        exp = shifted.exp()
        sum_exp = tp.all_reduce(exp.sum(dim=-1, keepdim=True))

        local = labels - vocab_start
        here = (local >= 0) & (local < x.shape[-1])
        local = torch.where(here, local, 0)
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~here, 0.0)
        target = tp.all_reduce(target)

        valid = labels != ignore_index
        loss = (sum_exp.squeeze(-1).log() - target).masked_fill(~valid, 0.0)
        ctx.save_for_backward(exp.div_(sum_exp), local, here, valid)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        probs, local, here, valid = ctx.saved_tensors
        grad = probs  # d loss / d logits = softmax - one_hot(label); reuse the buffer
        grad.scatter_add_(-1, local.unsqueeze(-1), -here.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss * valid).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                 tp: TensorParallel = NO_TP, *, ignore_index: int = -100,
                                 reduction: str = "mean") -> torch.Tensor:
    """F.cross_entropy over vocab-split logits (..., vocab/tp) and labels (...).

    Labels equal to `ignore_index` count for nothing; "mean" divides by the
    number of the others (NaN when there are none, as F.cross_entropy).
    Labels are not range-checked (that would need a host sync): one outside
    [0, vocab) other than ignore_index gives a wrong loss, not an error."""
    per_token = _VocabParallelCrossEntropy.apply(logits, labels, tp, ignore_index)
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / (labels != ignore_index).sum()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
