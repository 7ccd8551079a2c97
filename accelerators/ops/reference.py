"""Plain-torch reference implementations: the definition every vendor kernel must match.

Layouts and conventions (the same for every vendor):

- rms_norm(x, weight, eps): y = x / sqrt(mean(x**2, -1) + eps) * weight, over the
  last dimension. fp16/bf16 inputs are normalised in fp32 and cast back.
- rotary(x, cos, sin): half-rotation ("NeoX") layout. The last dimension of x
  (head_dim) is split into two halves x1, x2 and
      y = x * cos + cat(-x2, x1) * sin
  cos and sin have head_dim entries (each frequency repeated in both halves,
  i.e. cos = cat(cos(freqs), cos(freqs))) and broadcast against x.
- attention(q, k, v, causal, mask): q is (batch, q_heads, q_seq, head_dim), k and
  v are (batch, kv_heads, kv_seq, head_dim); kv_heads must divide q_heads (GQA:
  each kv head serves q_heads / kv_heads consecutive q heads). Scale is
  1/sqrt(head_dim). `causal` masks key j > query i (top-left aligned, as
  torch's scaled_dot_product_attention). `mask` broadcasts to
  (batch, q_heads, q_seq, kv_seq): a bool mask is True where attention is
  ALLOWED; a float mask is added to the scores.
- swiglu(gate, up) = silu(gate) * up.
- adamw_step(...): one decoupled-weight-decay Adam step (torch.optim.AdamW's
  math), in place on param, exp_avg and exp_avg_sq. `step` counts from 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    compute = x.float() if x.dtype in _LOW_PRECISION else x
    normed = compute * torch.rsqrt(compute.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.to(x.dtype) * weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    k, v = expand_kv_heads(q, k, v)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        q_len, kv_len = q.shape[-2], k.shape[-2]
        future = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    # Softmax in fp32 for fp16/bf16 inputs; fp32/fp64 keep their own precision.
    probs = torch.softmax(scores.float() if scores.dtype in _LOW_PRECISION else scores, dim=-1)
    probs = probs.to(q.dtype)
    return torch.matmul(probs, v)


def expand_kv_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Repeat kv heads so each serves its group of q heads (GQA -> MHA)."""
    q_heads, kv_heads = q.shape[1], k.shape[1]
    if q_heads == kv_heads:
        return k, v
    if q_heads % kv_heads:
        raise ValueError(f"attention: kv_heads ({kv_heads}) must divide q_heads ({q_heads})")
    group = q_heads // kv_heads
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def check_adamw_step(step: int) -> None:
    """adamw_step's `step` counts from 1 (the bias corrections divide by 1 - beta**step); every
    adapter of it refuses 0 alike."""
    if step < 1:
        raise ValueError(f"adamw_step: step counts from 1, got {step}")


@torch.no_grad()
def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
               exp_avg_sq: torch.Tensor, *, step: int, lr: float, beta1: float = 0.9,
               beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
               maximize: bool = False) -> None:
    check_adamw_step(step)
    if maximize:
        grad = -grad
    param.mul_(1.0 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
