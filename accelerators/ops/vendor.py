"""Vendor kernels behind `accelerators.ops`, adapted to the reference's signatures.

This is the ONE place where vendor differences are normalised: tuple returns,
mask polarity, layouts, keyword names, out-parameters. Every adapter takes and
returns exactly what the function of the same name in `reference` does (see
its docstring for layouts), and falls back to the reference for the cases its
kernel cannot take. Each `*_kernels` function returns {op name: callable};
an op a vendor lacks is simply absent and the reference runs.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Callable

import torch
import torch.nn.functional as F

from accelerators.ops import blocked, reference

Kernels = dict[str, Callable]


def allowed_positions(q: torch.Tensor, k: torch.Tensor, causal: bool,
                      mask: torch.Tensor | None) -> torch.Tensor | None:
    """Bool mask, True where a query may attend to a key; None when all may.

    Combines `causal` with a bool `mask` (which uses the same True = allowed
    polarity as the reference).
    """
    allowed = None
    if causal:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        allowed = mask if allowed is None else mask & allowed
    return allowed


# NVIDIA ------------------------------------------------------------------------

_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa_attention(q, k, v, causal=True, mask=None):
    """torch's fused attention (flash / memory-efficient kernels on NVIDIA)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    if mask is not None and mask.dtype != torch.bool:
        if causal:  # SDPA refuses is_causal together with a mask: fold it in
            future = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
            mask = mask.masked_fill(future, float("-inf"))
        attn_mask = mask
    else:
        attn_mask = allowed_positions(q, k, causal, mask) if mask is not None else None
    is_causal = causal and attn_mask is None
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    k, v = reference.expand_kv_heads(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=scale)


def _fused_adamw(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, maximize=False):
    """torch's fused AdamW kernel (`torch.optim.AdamW(fused=True)`'s): one pass that reads the
    parameter, gradient and both moments and writes back three, where the reference's eight
    elementwise ops move three times the bytes. Same math as torch.optim.AdamW; tensors of
    different dtypes (the kernel wants one) or a build without the kernel run the reference."""
    reference.check_adamw_step(step)
    if _FUSED_ADAMW is None or not param.dtype == grad.dtype == exp_avg.dtype == exp_avg_sq.dtype:
        reference.adamw_step(param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2,
                             eps=eps, weight_decay=weight_decay, maximize=maximize)
        return
    steps = torch.full((), float(step), dtype=torch.float32, device=param.device)   # the kernel reads it as is
    _FUSED_ADAMW([param], [grad], [exp_avg], [exp_avg_sq], [], [steps],  # pylint: disable=not-callable  # None above
                 lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=maximize)


_FUSED_ADAMW = getattr(torch, "_fused_adamw_", None)     # torch >= 2.2 (CPU since 2.4)


def cuda_kernels() -> Kernels:
    return {"attention": _sdpa_attention, "adamw_step": _fused_adamw}


# Huawei Ascend (torch_npu) ---------------------------------------------------------

# What npu_fusion_attention accepts for query/key/value (torch_npu's API reference).
_FUSION_ATTENTION_DTYPES = (torch.float16, torch.bfloat16)


def ascend_kernels(torch_npu: ModuleType) -> Kernels:
    """Adapters over torch_npu's fused ops (all of which have autograd)."""

    def rms_norm(x, weight, eps=1e-6):
        # npu_rms_norm returns (y, rstd); rstd is kept for its own backward only.
        y, _rstd = torch_npu.npu_rms_norm(x, weight, epsilon=eps)
        return y

    def rotary(x, cos, sin):
        # npu_rotary_mul computes x * r1 + rotate_half(x) * r2 in its default
        # "half" mode (our layout), but only for 4-D tensors.
        if x.dim() != 4 or cos.dim() != 4 or sin.dim() != 4:
            return reference.rotary(x, cos, sin)
        return torch_npu.npu_rotary_mul(x, cos, sin)

    def attention(q, k, v, causal=True, mask=None):
        # npu_fusion_attention takes fp16/bf16 only. fp32 (the default dtype)
        # and fp64 run the reference, exact in their own precision: casting to
        # bf16 and back would silently cost the fp32 parity the fleet relies on.
        if q.dtype not in _FUSION_ATTENTION_DTYPES or not q.dtype == k.dtype == v.dtype:
            return reference.attention(q, k, v, causal, mask)
        if mask is not None and mask.dtype != torch.bool:
            return reference.attention(q, k, v, causal, mask)  # the kernel takes bool masks only
        allowed = allowed_positions(q, k, causal, mask)
        # atten_mask has the opposite polarity: True = masked OUT. Shapes SS or
        # B1SS/BNSS/11SS are accepted, so lift 3-D masks to 4-D.
        atten_mask = None
        if allowed is not None:
            atten_mask = ~allowed
            if atten_mask.dim() not in (2, 4):
                atten_mask = atten_mask.reshape((1,) * (4 - atten_mask.dim()) + atten_mask.shape)
        outputs = torch_npu.npu_fusion_attention(
            q, k, v, q.shape[1], input_layout="BNSD", atten_mask=atten_mask,
            scale=1.0 / math.sqrt(q.shape[-1]), keep_prob=1.0,
        )
        return outputs[0]  # (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)

    def swiglu(gate, up):
        # npu_swiglu takes [A, B] concatenated along `dim` and returns silu(A) * B.
        return torch_npu.npu_swiglu(torch.cat((gate, up), dim=-1), dim=-1)

    @torch.no_grad()
    def adamw_step(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.999,
                   eps=1e-8, weight_decay=0.0, maximize=False):
        reference.check_adamw_step(step)
        # The kernel multiplies beta*_power by beta itself, so it takes the
        # powers of the *previous* step; it updates var, m, v in place (out=).
        torch_npu.npu_apply_adam_w(
            beta1 ** (step - 1), beta2 ** (step - 1), lr, weight_decay, beta1, beta2, eps,
            grad, None, False, maximize, out=(param, exp_avg, exp_avg_sq),
        )

    return {"rms_norm": rms_norm, "rotary": rotary, "attention": attention,
            "swiglu": swiglu, "adamw_step": adamw_step}


# Baidu Kunlun (kunlun_ops) -----------------------------------------------------------

def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def kunlun_kernels(kunlun_ops: ModuleType | None) -> Kernels:
    """Attention blocked over queries (`accelerators.ops.blocked`: exact, with a
    backward, never the full seq x seq scores per head), since neither
    torch_xmlir nor kunlun_ops documents a fused attention with a backward;
    plus adapters over kunlun_ops, whose kernels write into out-tensors and have
    no autograd, so they serve only when no gradient is needed."""
    if kunlun_ops is None:
        return {"attention": blocked.attention}

    def rms_norm(x, weight, eps=1e-6):
        if _needs_grad(x, weight):
            return reference.rms_norm(x, weight, eps)
        out = torch.empty_like(x)
        kunlun_ops.rmsnorm(x, weight, out, eps)
        return out

    def swiglu(gate, up):
        if _needs_grad(gate, up):
            return reference.swiglu(gate, up)
        out = torch.empty_like(gate)
        kunlun_ops.swiglu(x=torch.cat((gate, up), dim=-1), y=out)
        return out

    return {"rms_norm": rms_norm, "swiglu": swiglu, "attention": blocked.attention}


# Emulated chip ------------------------------------------------------------------------

def emulated_kernels(accelerator) -> Kernels:
    """The reference math, run inside the emulated device scope so it is charged
    to the chip's virtual clock and memory."""

    def scoped(function: Callable) -> Callable:
        def run(*args, **kwargs):
            if accelerator.in_scope():
                return function(*args, **kwargs)
            with accelerator.device_scope():
                return function(*args, **kwargs)

        run.__name__ = function.__name__
        return run

    kernels = {name: scoped(getattr(reference, name)) for name in ("rms_norm", "rotary", "attention", "swiglu")}
    kernels["adamw_step"] = scoped(_fused_adamw)   # as the vendors' fused AdamW (CUDA, npu_apply_adam_w)
    return kernels
