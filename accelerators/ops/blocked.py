"""Memory-bounded exact attention in plain torch, for vendors without a fused
attention kernel that has a backward (Kunlun today).

`attention(q, k, v, causal, mask)` has the reference's signature and
semantics (see `accelerators.ops.reference`) but never holds more than one
block of `query_block` queries' scores per head: the forward walks the query
sequence in blocks and keeps only the output and each row's log-sum-exp; the
backward walks the blocks again, recomputing each block's probabilities from
the log-sum-exp (FlashAttention's recomputation, without its tiling over
keys). Peak extra memory is batch x heads x query_block x kv_seq scores,
instead of batch x heads x q_seq x kv_seq for the reference.

Softmax and the gradient sums run in fp32 for fp16/bf16 inputs (as the
reference does); fp32 and fp64 keep their own precision. A float mask that
itself requires a gradient is outside this kernel: it goes to the reference.
"""

from __future__ import annotations

import math

import torch

from accelerators.ops import reference

# Queries per block. 256 keeps a block's scores at 1/16 of the full matrix for
# a 4096-token sequence while keeping the per-block matmuls large.
QUERY_BLOCK = 256

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              mask: torch.Tensor | None = None, query_block: int = QUERY_BLOCK) -> torch.Tensor:
    """Exact softmax attention, blocked over queries (reference layouts, GQA)."""
    if query_block < 1:
        raise ValueError(f"attention: query_block must be >= 1, got {query_block}")
    if mask is not None and mask.requires_grad:
        return reference.attention(q, k, v, causal, mask)
    k, v = reference.expand_kv_heads(q, k, v)  # its own autograd sums the groups back
    return _BlockedAttention.apply(q, k, v, causal, mask, query_block)


def _block_scores(q_blk, k, start, causal, mask, scale):
    """Masked, scaled scores of the queries start..start+len(q_blk), in compute precision."""
    compute = torch.float32 if q_blk.dtype in _LOW_PRECISION else q_blk.dtype
    scores = torch.matmul(q_blk, k.transpose(-2, -1)).to(compute) * scale
    rows = q_blk.shape[-2]
    if causal:
        query_pos = torch.arange(start, start + rows, device=q_blk.device).unsqueeze(-1)
        key_pos = torch.arange(k.shape[-2], device=q_blk.device)
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    if mask is not None:
        block_mask = _mask_rows(mask, start, rows)
        if block_mask.dtype == torch.bool:
            scores = scores.masked_fill(~block_mask, float("-inf"))
        else:
            scores = scores + block_mask.to(compute)
    return scores


def _mask_rows(mask, start, rows):
    """The mask's rows for one query block (a mask that broadcasts over queries is kept)."""
    if mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    return mask[..., start:start + rows, :]


class _BlockedAttention(torch.autograd.Function):
    """q, k, v: (batch, heads, seq, head_dim), equal head counts."""

    @staticmethod
    def forward(ctx, q, k, v, causal, mask, query_block):  # pylint: disable=arguments-differ
        scale = 1.0 / math.sqrt(q.shape[-1])
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32 if q.dtype in _LOW_PRECISION else q.dtype,
                          device=q.device)
        for start in range(0, q.shape[-2], query_block):
            rows = slice(start, start + query_block)
            scores = _block_scores(q[..., rows, :], k, start, causal, mask, scale)
            block_lse = torch.logsumexp(scores, dim=-1, keepdim=True)
            probs = torch.exp(scores - block_lse).to(v.dtype)
            out[..., rows, :] = torch.matmul(probs, v)
            lse[..., rows] = block_lse.squeeze(-1)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.query_block, ctx.scale = causal, query_block, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):  # pylint: disable=arguments-differ
        q, k, v, out, lse, mask = ctx.saved_tensors
        compute = lse.dtype
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(k.shape, dtype=compute, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=compute, device=v.device)
        k_c, v_c = k.to(compute), v.to(compute)
        for start in range(0, q.shape[-2], ctx.query_block):
            rows = slice(start, start + ctx.query_block)
            q_blk = q[..., rows, :]
            scores = _block_scores(q_blk, k, start, ctx.causal, mask, ctx.scale)
            probs = torch.exp(scores - lse[..., rows].unsqueeze(-1))
            d_out = grad_out[..., rows, :].to(compute)
            grad_v += torch.matmul(probs.transpose(-2, -1), d_out)
            d_probs = torch.matmul(d_out, v_c.transpose(-2, -1))
            # softmax backward: dS = P * (dP - rowsum(dO * O))
            row_dot = (d_out * out[..., rows, :].to(compute)).sum(dim=-1, keepdim=True)
            d_scores = probs * (d_probs - row_dot) * ctx.scale
            grad_q[..., rows, :] = torch.matmul(d_scores, k_c).to(q.dtype)
            grad_k += torch.matmul(d_scores.transpose(-2, -1), q_blk.to(compute))
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None
