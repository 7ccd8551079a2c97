"""Errors raised by the accelerator layer (torch-free: importing `accelerators` stays cheap)."""

from __future__ import annotations


class AcceleratorUnavailable(RuntimeError):
    """An accelerator was asked for by name but cannot run in this process.

    The message says what is missing (a package, a runtime, a device), so the
    user can fix it. The layer never falls back to the CPU silently.
    """


class UnknownAccelerator(AcceleratorUnavailable):
    """The name matches no built-in vendor and no `hetero.accelerators` entry point."""


class EmulatedOutOfMemory(RuntimeError):
    """The emulated chip's usable memory (memory_gb - memory_reserve_gb) was exceeded.

    What the emulated chip raises is also a `torch.OutOfMemoryError` (see
    accelerators/emulated.py), like a real vendor's; the numbers are kept as
    attributes (bytes) for whoever reports it: `chip`, `requested`, `in_use`, `capacity`.
    """

    def __init__(self, message: str, *, chip: str = "", requested: int = 0, in_use: int = 0,
                 capacity: int = 0):
        super().__init__(message)
        self.chip, self.requested, self.in_use, self.capacity = chip, requested, in_use, capacity


class DeviceContractError(RuntimeError):
    """An emulated chip in strict mode refused what a real device would refuse: a host
    tensor read by a device op, or device work before `set_device` picked a device."""
