"""Fused ops with one signature each: the selected vendor's kernel where it has
one, the plain-torch reference otherwise.

    rms_norm(x, weight, eps=1e-6)
    rotary(x, cos, sin)                          half-rotation (NeoX) layout
    attention(q, k, v, causal=True, mask=None)   (batch, heads, seq, head_dim), GQA
    swiglu(gate, up)                             silu(gate) * up
    adamw_step(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps,
               weight_decay, maximize)           in place

Layouts and semantics are defined once, in `accelerators.ops.reference`; the
vendor adapters in `accelerators.ops.vendor` match them exactly.

Debugging: HETERO_REFERENCE_OPS=rms_norm,attention (or "all") runs the named
ops on the reference whatever the vendor offers. `kernel_sources()` says which
implementation each op uses now.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from accelerators import registry
from accelerators.ops import reference

REFERENCE_ENV = "HETERO_REFERENCE_OPS"
OP_NAMES = ("rms_norm", "rotary", "attention", "swiglu", "adamw_step")

# (accelerator, env value) -> {op name: (callable, source)}; rebuilt when either changes.
_cache: tuple[object, str, dict[str, tuple[Callable, str]]] | None = None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMS normalisation over the last dimension, scaled by `weight`."""
    return _table()["rms_norm"][0](x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, half-rotation layout: x * cos + cat(-x2, x1) * sin."""
    return _table()["rotary"][0](x, cos, sin)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention, scale 1/sqrt(head_dim); bool mask True = may attend."""
    return _table()["attention"][0](q, k, v, causal, mask)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up."""
    return _table()["swiglu"][0](gate, up)


def adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
               exp_avg_sq: torch.Tensor, *, step: int, lr: float, beta1: float = 0.9,
               beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
               maximize: bool = False) -> None:
    """One AdamW step (torch.optim.AdamW's math) in place; `step` counts from 1."""
    _table()["adamw_step"][0](param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1,
                              beta2=beta2, eps=eps, weight_decay=weight_decay, maximize=maximize)


def kernel_sources() -> dict[str, str]:
    """Which implementation each op runs now: '<vendor>' or 'reference'."""
    return {name: source for name, (_fn, source) in _table().items()}


def reference_overrides(value: str | None = None) -> frozenset[str]:
    """The op names HETERO_REFERENCE_OPS (or `value`) forces onto the reference."""
    value = os.environ.get(REFERENCE_ENV, "") if value is None else value
    names = {part.strip() for part in value.split(",") if part.strip()}
    if "all" in names:
        return frozenset(OP_NAMES)
    unknown = names - set(OP_NAMES)
    if unknown:
        raise ValueError(f"{REFERENCE_ENV} names unknown op(s) {sorted(unknown)}; "
                         f"known: {', '.join(OP_NAMES)} or 'all'")
    return frozenset(names)


def _table() -> dict[str, tuple[Callable, str]]:
    global _cache
    accelerator = registry._current or registry.current_accelerator()
    env_value = os.environ.get(REFERENCE_ENV, "")
    cached = _cache
    if cached is not None and cached[0] is accelerator and cached[1] == env_value:
        return cached[2]
    forced = reference_overrides(env_value)
    vendor_kernels = accelerator.kernels()
    table = {}
    for name in OP_NAMES:
        if name in vendor_kernels and name not in forced:
            table[name] = (vendor_kernels[name], accelerator.vendor)
        else:
            table[name] = (getattr(reference, name), "reference")
    _cache = (accelerator, env_value, table)
    return table
