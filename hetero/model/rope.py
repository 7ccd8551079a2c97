"""Rotary position tables, computed exactly as Hugging Face Llama does (default
RoPE, no scaling): fp32 inverse frequencies, each repeated in both halves of
head_dim (the half-rotation layout accelerators.ops.rotary expects), then cast
to the activations' dtype."""

from __future__ import annotations

import torch


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq, head_dim) for positions (seq,), or
    (batch, 1, seq, head_dim) for positions (batch, seq): both broadcast
    against (batch, heads, seq, head_dim)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    freqs = positions[..., None].float() * inv_freq
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    if positions.dim() == 2:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return cos, sin
