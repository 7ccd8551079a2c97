"""An emulated chip's device memory: the ledger of the storages it holds, against its capacity.
Split from accelerators.emulated (one concern per module); its names are importable from there."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

from accelerators.emulated_pace import ChipPace
from accelerators.errors import EmulatedOutOfMemory


class EmulatedDeviceOutOfMemory(torch.OutOfMemoryError, EmulatedOutOfMemory):
    """What the ledger raises: a `torch.OutOfMemoryError` (what real vendors raise) that is
    also the layer's torch-free `EmulatedOutOfMemory`, with its byte counts."""

    def __init__(self, message: str, **numbers: Any):
        EmulatedOutOfMemory.__init__(self, message, **numbers)


class MemoryLedger:
    """Bytes of the storages the emulated device holds, against its capacity."""

    def __init__(self, chip: ChipPace):
        self.chip = chip
        self.allocated = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # storage data_ptr -> bytes
        # storage data_ptr -> when the device work that last wrote it is done (the compute clock's time)
        self.written_at: dict[int, float] = {}
        self._lock = threading.Lock()

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor`'s storage is device memory (a view of device memory is too)."""
        return tensor.untyped_storage().data_ptr() in self._live

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._live:
            return
        with self._lock:
            if self.allocated + nbytes > self.chip.capacity_bytes:
                reserve = f" - memory_reserve_gb={self.chip.reserve_gb:g}" if self.chip.reserve_gb else ""
                raise EmulatedDeviceOutOfMemory(
                    f"emulated chip {self.chip.name!r} is out of memory: tried to allocate "
                    f"{_mib(nbytes)} with {_mib(self.allocated)} of {_mib(self.chip.capacity_bytes)} "
                    f"(memory_gb={self.chip.memory_gb:g}{reserve}) already in use",
                    chip=self.chip.name, requested=nbytes, in_use=self.allocated,
                    capacity=self.chip.capacity_bytes,
                )
            self._live[key] = nbytes
            self.allocated += nbytes
            self.peak = max(self.peak, self.allocated)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        with self._lock:
            self.allocated -= self._live.pop(key, 0)
            self.written_at.pop(key, None)

    def wrote(self, tensors, done_at: float) -> None:
        """Device work done at `done_at` wrote `tensors` (those in device memory are noted)."""
        for tensor in tensors:
            key = tensor.untyped_storage().data_ptr()
            if key in self._live:
                self.written_at[key] = done_at

    def reset_peak(self) -> None:
        self.peak = self.allocated


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
