"""`hetero-strict`'s first rule: every tensor of every operation lives in the island's device
memory (accelerators/strict_backend.py has the whole contract).

Which memory is device memory is decided by `is_device_tensor`, pluggable with
`set_device_tensor_predicate` (tests, other devices). By default: the current
accelerator's `is_device_memory` when it has one (the emulated chip: its memory
ledger holds the tensor's storage); otherwise a non-`cpu` tensor.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from accelerators.strict_errors import BACKEND_NAME, HostTensorRefused

_predicate: Callable[[torch.Tensor], bool] | None = None


def set_device_tensor_predicate(predicate: Callable[[torch.Tensor], bool] | None) -> None:
    """Decide device memory with `predicate` (tests, other devices); None restores the default."""
    global _predicate
    _predicate = predicate


def is_device_tensor(tensor: torch.Tensor) -> bool:
    """Whether `tensor` lives in the island's device memory (see the module docstring)."""
    if _predicate is not None:
        return bool(_predicate(tensor))
    from accelerators import registry

    accel = registry._current  # pylint: disable=protected-access  # never select one from here
    ask = getattr(accel, "is_device_memory", None) or getattr(accel, "is_device_tensor", None)
    if ask is not None:
        return bool(ask(tensor))
    ledger = getattr(accel, "ledger", None)
    if ledger is not None:  # an emulated chip without the query: ask its ledger directly
        return tensor.untyped_storage().data_ptr() in ledger._live  # pylint: disable=protected-access
    return tensor.device.type != "cpu"


def check_device(op: str, tensors: Iterable[Any]) -> None:
    """Raise HostTensorRefused, naming `op` and the tensor, for the first host tensor in `tensors`
    (nested lists and tuples of tensors, as collectives take them)."""
    for tensor in _flatten(tensors):
        if not is_device_tensor(tensor):
            raise HostTensorRefused(
                f"{BACKEND_NAME}: {op} was given a host tensor ({describe(tensor)}); NCCL/HCCL take only "
                "tensors in the island's device memory: allocate it on the accelerator's device "
                "(inside its device scope on an emulated chip) or copy it there first")


def _flatten(items: Iterable[Any]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for item in items:
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, (list, tuple)):
            found.extend(_flatten(item))
    return found


def describe(tensor: torch.Tensor) -> str:
    """'float32[4, 8] on cpu': a tensor as error messages name it."""
    dtype = str(tensor.dtype).replace("torch.", "")
    return f"{dtype}{list(tensor.shape)} on {tensor.device}"
