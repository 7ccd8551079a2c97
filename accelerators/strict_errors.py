"""The `hetero-strict` backend's name and the errors it raises (accelerators/strict_backend.py
has the contract). A module of its own so that the backend's parts (strict_device,
strict_p2p, strict_watchdog) can raise them without importing the process group."""

from __future__ import annotations

BACKEND_NAME = "hetero-strict"


class StrictBackendError(RuntimeError):
    """An operation NCCL/HCCL would refuse or hang on."""


class HostTensorRefused(StrictBackendError):
    """A host tensor was handed to the island's collective backend."""


class P2PDeadlock(StrictBackendError):
    """Two ranks wait on each other's point-to-point operations."""
