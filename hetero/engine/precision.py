"""The precision policy: what each tensor is kept in, and fp16's dynamic loss scale.

`train.dtype` is the compute dtype. fp32: parameters, gradients and Adam moments in
fp32, updated in place. bf16 / fp16: parameters and activations in that dtype; the
optimizer owns fp32 master weights and fp32 moments, gradients are reduced and
clipped in fp32 (their fleet-wide norm summed in fp64), the update runs on the
master copy and is cast back into the parameters (an update smaller than one
bf16 step of a weight accumulates in the master instead of rounding away).
fp16 also scales the loss (`LossScaler`): the last stage multiplies it before
backward, the gradients are unscaled before the norm, and a step whose gradients
overflow anywhere in the fleet is skipped (the scale backs off); the scale grows
again after `growth_interval` good steps in a row.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def needs_master(dtype: torch.dtype) -> bool:
    """Whether parameters of `dtype` need fp32 master weights in the optimizer."""
    return dtype != torch.float32


class LossScaler:
    """fp16's dynamic loss scale (disabled: a constant 1 that never skips).

    `update(overflow)` after every step: an overflow multiplies the scale by `backoff`
    and counts a skipped step; `growth_interval` good steps in a row multiply it by `growth`.
    """

    def __init__(self, enabled: bool, scale: float = 2.0 ** 16, growth: float = 2.0, backoff: float = 0.5,
                 growth_interval: int = 1000, min_scale: float = 1.0):
        self.enabled = enabled
        self.scale = scale if enabled else 1.0
        self.growth, self.backoff, self.growth_interval, self.min_scale = growth, backoff, growth_interval, min_scale
        self.good_steps = 0
        self.skipped_steps = 0

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale = max(self.min_scale, self.scale * self.backoff)
            self.skipped_steps += 1
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth
            self.good_steps = 0

    def state(self) -> dict:
        """What a checkpoint keeps (state.json), so a resumed run scales as the first would have."""
        return ({"loss_scale": self.scale, "skipped_steps": self.skipped_steps, "good_steps": self.good_steps}
                if self.enabled else {})

    def load(self, state: dict) -> None:
        if not self.enabled:
            return
        scale, skipped = state.get("loss_scale"), state.get("skipped_steps")
        if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale >= self.min_scale:
            self.scale = float(scale)
        if isinstance(skipped, int) and not isinstance(skipped, bool) and skipped >= 0:
            self.skipped_steps = skipped
        good = state.get("good_steps")       # absent in older checkpoints: the streak starts again
        if isinstance(good, int) and not isinstance(good, bool) and 0 <= good < self.growth_interval:
            self.good_steps = good
