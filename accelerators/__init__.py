"""Accelerator plugin layer: one interface over CUDA, Ascend, Kunlun, CPU and an emulated chip.

    import accelerators
    accel = accelerators.get_accelerator()       # or ("emulated", chip={...})
    x = torch.randn(8, 64, device=accel.device())
    y = accelerators.ops.rms_norm(x, w, 1e-6)    # vendor kernel or plain-torch reference

`accelerators.names()` lists the known vendors without importing torch or any
vendor package. See registry.py for the selection rules, base.py for the
Accelerator interface, ops/ for the fused ops, strict_backend.py for
`hetero-strict`, the torch.distributed backend with NCCL/HCCL's contract
(registered here when torch is already loaded, else by `register_dist_backends()`).
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from accelerators.errors import AcceleratorUnavailable, EmulatedOutOfMemory, UnknownAccelerator
from accelerators.registry import (
    SELECT_ENV,
    backends,
    current_accelerator,
    get_accelerator,
    names,
    probe_all,
    probe_order,
    reset_accelerator,
    set_accelerator,
)

__all__ = [
    "Accelerator", "AcceleratorUnavailable", "EmulatedOutOfMemory", "UnknownAccelerator",
    "SELECT_ENV", "backends", "current_accelerator", "get_accelerator", "names", "ops", "probe_all",
    "probe_order", "register_dist_backends", "reset_accelerator", "set_accelerator",
]


def register_dist_backends() -> list[str]:
    """Make the torch.distributed backends `accelerators` provides known to torch (imports torch)."""
    from accelerators import strict_backend

    return [strict_backend.register()]


if "torch.distributed" in sys.modules:  # cheap then; never import torch just for this
    register_dist_backends()


def __getattr__(name: str) -> Any:
    # Lazy: importing `accelerators` must stay cheap (no torch) for names().
    if name == "Accelerator":
        from accelerators.base import Accelerator

        return Accelerator
    if name == "ops":
        return importlib.import_module("accelerators.ops")
    raise AttributeError(f"module 'accelerators' has no attribute {name!r}")
