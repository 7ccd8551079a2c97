"""Accelerator plugin layer: one interface over CUDA, Ascend, Kunlun, CPU and an emulated chip.

    import accelerators
    accel = accelerators.get_accelerator()       # or ("emulated", chip={...})
    x = torch.randn(8, 64, device=accel.device())
    y = accelerators.ops.rms_norm(x, w, 1e-6)    # vendor kernel or plain-torch reference

`accelerators.names()` lists the known vendors without importing torch or any
vendor package. See registry.py for the selection rules, base.py for the
Accelerator interface, ops/ for the fused ops.
"""

from __future__ import annotations

import importlib
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
    "probe_order", "reset_accelerator", "set_accelerator",
]


def __getattr__(name: str) -> Any:
    # Lazy: importing `accelerators` must stay cheap (no torch) for names().
    if name == "Accelerator":
        from accelerators.base import Accelerator

        return Accelerator
    if name == "ops":
        return importlib.import_module("accelerators.ops")
    raise AttributeError(f"module 'accelerators' has no attribute {name!r}")
