"""Handles: one pending send or receive, and the small interface they wait through.

A handle knows nothing of sockets or queues. `wait()` asks its `Driver` to make
progress from the waiting thread (so a reply wakes that thread straight from the
kernel) and reads the outcome the bridge left on it with `finish` or `fail`.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import torch

from comm_bridge.errors import BridgeTimeoutError


class Driver(Protocol):
    """What a handle needs from whoever moves the bytes (progress.Progress)."""

    default_timeout: float
    lock: threading.RLock  # guards every handle's outcome

    def drive_until(self, handle: "Handle", deadline: float) -> None:
        """Make progress until `handle` is done or `deadline` (time.monotonic) passes."""

    def to_device(self, tensor: torch.Tensor, device: str | None) -> torch.Tensor:
        """The received host tensor where the caller asked for it."""


class Handle:
    """One pending send or receive. `wait()` returns the received tensor (None for sends).

    `out`, `device` and `landing` describe where a receive should land; the bridge
    reads them when it matches a message, and ends the handle with `finish` or
    `fail` (under the driver's lock)."""

    __slots__ = ("_driver", "peer", "tag", "receiving", "_done", "_sleeper", "_result", "_error",
                 "out", "device", "landing")

    def __init__(self, driver: Driver, peer: int, tag: int, receiving: bool, done: bool = False):
        self._driver = driver
        self.peer = peer
        self.tag = tag
        self.receiving = receiving
        # A flag, not an Event: the waiting thread usually drives the sockets itself and
        # sees the flag flip. Only a waiter that cannot drive sleeps, on `_sleeper`.
        self._done = done
        self._sleeper: threading.Event | None = None
        self._result: torch.Tensor | None = None
        self._error: BaseException | None = None
        self.out: torch.Tensor | None = None       # receive: the caller's buffer
        self.device: str | None = None             # receive: move here after arrival
        self.landing: memoryview | None = None     # receive: bytes of `out` a small message may fill as is

    @property
    def what(self) -> str:
        return f"irecv from rank {self.peer} tag {self.tag}" if self.receiving else \
            f"isend to rank {self.peer} tag {self.tag}"

    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None = None) -> torch.Tensor | None:
        driver = self._driver
        limit = driver.default_timeout if timeout is None else timeout
        if not self._done:
            # Drive the sockets from this thread: no hand-off from the I/O thread.
            driver.drive_until(self, time.monotonic() + limit)
        if not self._done:
            raise BridgeTimeoutError(f"{self.what}: no progress after {limit:.1f}s "
                                     f"(peer rank {self.peer} is alive as far as the coordinator knows)")
        if self._error is not None:
            raise self._error
        result = self._result
        if result is None:
            return None
        out = self.out
        if out is not None and result is not out:
            if result.data_ptr() != out.data_ptr():  # not already a view of the caller's tensor
                out.copy_(result.reshape(out.shape))
            result = out
        return driver.to_device(result, self.device)

    def sleep(self, timeout: float) -> None:
        """Wait for another thread to finish this handle (at most `timeout` seconds)."""
        with self._driver.lock:
            if self._done:
                return
            if self._sleeper is None:
                self._sleeper = threading.Event()
            sleeper = self._sleeper
        sleeper.wait(timeout)

    def finish(self, result: torch.Tensor | None = None) -> None:
        """The bridge's side (lock held): the transfer is complete; `result` is the received tensor."""
        if not self._done:
            self._result = result
            self._done = True
            if self._sleeper is not None:
                self._sleeper.set()

    def fail(self, error: BaseException) -> None:
        """The bridge's side (lock held): `wait()` raises `error`."""
        if not self._done:
            self._error = error
            self._done = True
            if self._sleeper is not None:
                self._sleeper.set()
