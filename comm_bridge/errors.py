"""Errors the bridge raises. Each message names the peer and what to check."""


class BridgeError(RuntimeError):
    """Base class of every bridge failure."""


class PeerFailedError(BridgeError):
    """A peer died, left, or stopped answering heartbeats."""

    def __init__(self, rank: int, reason: str):
        self.rank = rank
        self.reason = reason
        super().__init__(f"peer rank {rank} failed: {reason}")


class BridgeTimeoutError(BridgeError, TimeoutError):
    """A wait ran past its deadline without the peer being declared dead."""


class TransferMismatchError(BridgeError):
    """The message that arrived does not fit the receive that was posted for it."""


class AuthenticationError(BridgeError):
    """The coordinator refused our job token."""


class CoordinatorError(BridgeError):
    """The coordinator refused or could not answer a request."""


class CoordinatorTimeoutError(CoordinatorError, TimeoutError):
    """A coordinator call that waits (a key, a barrier, the address book) ran past its timeout."""


class AddressInUseError(BridgeError):
    """A server's host:port is already taken (by another job, most likely); the message names it."""
