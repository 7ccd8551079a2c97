"""The emulated chip's dispatch mode: every aten op run inside the device scope is charged to the
chip's compute clock (a roofline of its FLOPs and bytes) and its outputs to the memory ledger; strict
mode refuses device ops that read host memory. Split from accelerators.emulated (one concern per
module); its names are importable from there."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from accelerators.emulated import EmulatedAccelerator

aten = torch.ops.aten

# Ops that allocate or reinterpret but move no data.
_FREE_OPS = {
    aten.detach, aten._unsafe_view, aten.empty, aten.empty_strided, aten.new_empty,
    aten.new_empty_strided, aten.empty_like, aten.lift_fresh, aten._local_scalar_dense,
}
# Free ops whose output is a fresh allocation on the device (lift_fresh: torch.tensor(data)
# inside the scope, the constant becoming a device tensor).
_ALLOCATING_OPS = {
    aten.empty, aten.empty_strided, aten.new_empty, aten.new_empty_strided, aten.empty_like,
    aten.lift_fresh,
}


def _cpu_attention_flops(query, key, value, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


# FLOP formulas by op packet: torch's (shape-wrapped, called as f(*args, out_val=out, **kw))
# plus the CPU flash-attention kernels torch's table does not list.
_FLOP_FORMULAS: dict[Any, Any] = dict(flop_counter.flop_registry)
for _packet, _formula in (
    ("_scaled_dot_product_flash_attention_for_cpu", _cpu_attention_flops),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_attention_backward_flops),
):
    if hasattr(aten, _packet):
        _FLOP_FORMULAS[getattr(aten, _packet)] = _formula



class EmulationMode(TorchDispatchMode):
    """Charges every aten op to the virtual clock and its outputs to the ledger."""

    def __init__(self, accelerator: "EmulatedAccelerator", strict: bool = False):
        super().__init__()
        self.accelerator = accelerator
        self.pace = accelerator.pace
        self.clock = accelerator.clock
        self.ledger = accelerator.ledger
        self.copies = accelerator.copies
        self.strict = strict

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        issued_at = time.perf_counter()
        packet = func.overloadpacket
        free = func.is_view or packet in _FREE_OPS
        inputs = _tensors(args) + _tensors(kwargs.values())
        written = [] if free else _mutated(func, args, kwargs)
        if not free and self.copies.active():
            self._follow_copies(inputs, written)
        transfer = self._check_inputs(func, args, inputs) if self.strict and not free else None
        out = func(*args, **kwargs)
        if packet is aten._local_scalar_dense:
            self.clock.wait()  # .item(): the host reads device memory
            return out
        if free:
            if packet in _ALLOCATING_OPS:
                for tensor in _tensors(out):
                    self.ledger.track(tensor)
            return out
        outputs = _tensors(out)
        for tensor in outputs:
            self.ledger.track(tensor)
        if transfer is not None:   # copy_ between host and device memory: the host link's time
            done = self.clock.charge(self.pace.copy_seconds(transfer.nbytes), issued_at)
        else:
            formula = _FLOP_FORMULAS.get(packet)
            flops = formula(*args, out_val=out, **kwargs) if formula is not None else 0
            # what it reads and writes: its outputs, or (an in-place op that returns nothing, as
            # the fused optimizers and the foreach ops) the tensors its schema says it writes
            nbytes = sum(t.nbytes for t in inputs) + sum(t.nbytes for t in outputs or written)
            dtype = _compute_dtype(inputs or outputs)
            done = self.clock.charge(self.pace.seconds(flops, nbytes, dtype), issued_at)
        self.ledger.wrote(written + outputs, done)   # the copy engine's ordering check reads it
        return out

    def _follow_copies(self, inputs: list[torch.Tensor], written: list[torch.Tensor]) -> None:
        """Device work that writes the source of a copy in flight, or touches its host buffer, follows
        that copy: the compute queue waits for it and its bytes land first."""
        done = self.copies.hazards({t.untyped_storage().data_ptr() for t in written},
                                   {t.untyped_storage().data_ptr() for t in inputs})
        if done is not None:
            self.clock.charge(0.0, issued_at=done)

    def _check_inputs(self, func, args, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        """Strict mode: refuse a device op that reads host memory. A copy_ between host and
        device memory is a transfer: returns the tensor whose bytes cross the host link."""
        host = [t for t in inputs if self._is_host(t)]
        if not host:
            return None
        if func.overloadpacket is aten.copy_ and len(host) == 1:
            dst, src = args[0], args[1]
            if self.ledger.holds(dst) or self.ledger.holds(src):
                return src
        tensor = host[0]
        self.accelerator.violation(
            f"{func} reads a host tensor (shape {tuple(tensor.shape)}, {tensor.dtype}) that is not in "
            f"device memory; move it with the accelerator's copy API first (accelerator.to_device(tensor))")
        return None

    def _is_host(self, tensor: torch.Tensor) -> bool:
        return tensor.dim() > 0 and tensor.numel() > 0 and not self.ledger.holds(tensor)



def _tensors(value) -> list[torch.Tensor]:
    """The tensors in an op's output or argument list (one level of nesting)."""
    if isinstance(value, torch.Tensor):
        return [value]
    found = []
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str):
        for item in value:
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif isinstance(item, (list, tuple)):
                found.extend(t for t in item if isinstance(t, torch.Tensor))
    return found


def _mutated(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors `func` writes in place (its schema's mutable arguments, out= included)."""
    found = []
    for index, name in _mutable_arguments(func):
        value = args[index] if index < len(args) else kwargs.get(name)
        found.extend(_tensors(value))
    return found


@functools.lru_cache(maxsize=None)
def _mutable_arguments(func) -> tuple[tuple[int, str], ...]:
    return tuple((index, argument.name) for index, argument in enumerate(func._schema.arguments)
                 if argument.alias_info is not None and argument.alias_info.is_write)


def _compute_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    for tensor in tensors:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32

