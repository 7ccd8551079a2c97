"""comm_bridge: the CPU-mediated transport between islands whose collective libraries cannot talk.

The public API: an `Endpoint` per process (point-to-point `isend`/`irecv`, which
return `Handle`s), `transport_options` for a cluster file's bridge transport, the
coordinator (`Coordinator`) and its client (`CoordinatorClient`) that hand out the
address book, and the errors every call may raise.

The names are loaded on first use, so `import comm_bridge.client` (the coordinator's
client needs only grpc) does not pull in torch and zmq.
"""

from importlib import import_module

from comm_bridge.errors import (AddressInUseError, AuthenticationError, BridgeError, BridgeTimeoutError,
                                CoordinatorError, CoordinatorTimeoutError, PeerFailedError,
                                TransferMismatchError)

_LAZY = {
    "Endpoint": "comm_bridge.channel",
    "transport_options": "comm_bridge.channel",
    "Handle": "comm_bridge.handle",
    "Coordinator": "comm_bridge.coordinator",
    "CoordinatorClient": "comm_bridge.client",
}

__all__ = [
    "Endpoint", "Handle", "transport_options", "Coordinator", "CoordinatorClient",
    "BridgeError", "PeerFailedError", "BridgeTimeoutError", "TransferMismatchError",
    "AuthenticationError", "CoordinatorError", "CoordinatorTimeoutError", "AddressInUseError",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'comm_bridge' has no attribute {name!r}")
    return getattr(import_module(module), name)
