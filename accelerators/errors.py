"""Errors raised by the accelerator layer."""

from __future__ import annotations


class AcceleratorUnavailable(RuntimeError):
    """An accelerator was asked for by name but cannot run in this process.

    The message says what is missing (a package, a runtime, a device), so the
    user can fix it. The layer never falls back to the CPU silently.
    """


class UnknownAccelerator(AcceleratorUnavailable):
    """The name matches no built-in vendor and no `hetero.accelerators` entry point."""


class EmulatedOutOfMemory(RuntimeError):
    """The emulated chip's declared memory capacity was exceeded."""
