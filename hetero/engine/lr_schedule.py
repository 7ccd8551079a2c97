"""The learning rate of each step (train.lr_schedule).

Linear warm-up over `warmup_steps` (step s of the warm-up runs at lr * (s+1)/warmup), then
`constant` (lr), or `cosine` / `linear` decay from lr to `min_lr` over the remaining steps
of the run, ending at min_lr on the last step. Steps count from 0.
"""

from __future__ import annotations

import math


def learning_rate(train, step: int, total_steps: int) -> float:
    """The learning rate of step `step` (0-based) of a run of `total_steps` steps."""
    lr, warmup = train.lr, train.warmup_steps
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if train.lr_schedule == "constant":
        return lr
    span = total_steps - 1 - warmup        # decay steps after the first post-warm-up step
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup) / span)
    if train.lr_schedule == "linear":
        factor = 1.0 - progress
    elif train.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr_schedule {train.lr_schedule!r}")
    return train.min_lr + (lr - train.min_lr) * factor
