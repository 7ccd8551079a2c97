"""Activation recompute, per pipeline stage, as the plan's `stages[i].recompute` names it.

    none       every activation backward needs is kept from forward to backward.
    selective  the attention core, softmax(QK^T / sqrt(d)) V, is recomputed in backward
               (Megatron's selective recompute, Korthikanti et al. 2022): its scores and
               probabilities are batch x heads x seq x seq, the largest activations of a
               layer at long sequences and the cheapest to redo. Everything else is kept.
    full       only each decoder layer's input is kept; the whole layer runs again in
               backward (Megatron's full recompute, one checkpoint per layer).

Recompute is torch.utils.checkpoint, non-reentrant: it works with the tensor-parallel
collectives (autograd Functions) inside a layer, and the RNG state is saved and restored
around the second forward, so a layer with dropout would draw the same mask twice.

The second forward runs where backward runs: inside the trainer's device scope, so an
emulated chip charges it to its clock and its memory ledger like the first. A
recomputed layer's TP collectives run again in backward; every rank of a TP group
holds the same stage with the same mode, so all of them recompute alike and their
collectives match.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from hetero.errors import UserError

MODES = ("none", "selective", "full")


def checked_mode(mode: str) -> str:
    """`mode` if it is a recompute mode, else a UserError naming the choices."""
    if mode not in MODES:
        raise UserError(f"recompute must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def recomputed(function: Callable, *args, **kwargs):
    """`function(*args, **kwargs)`, keeping only its tensor inputs for backward and running it
    again there. Without autograd (no_grad, inference) it is just the call."""
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)
