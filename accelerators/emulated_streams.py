"""The emulated chip's queues: its compute queue, its device->host copy engine, their streams and
events, and the copies in flight. Split from accelerators.emulated (one concern per module); its
names are importable from there.

Why a copy engine: a real GPU/NPU copies device->host with DMA engines, on a side stream, while its
compute queue keeps running. The emulated chip models that much and no more, so that it is never the
more forgiving of the two:

- The default (current) stream is the compute queue: every op in the device scope, and a copy issued
  on it, is charged on the chip's compute clock, in order. A stream from `new_stream()` is the copy
  engine: a copy issued on it is charged on the engine's own clock (its host-link time) and compute
  goes on beside it. Compute issued while a side stream is current still runs on the one compute
  queue.
- A copy on the engine starts no earlier than the events its stream waited for (`wait_event`,
  `wait_stream`). It must be ordered after the compute that wrote its source, as CUDA needs an event
  for it: a source whose last device write is not known done (by such a wait or by a host
  synchronization) is a contract violation in strict mode, and is ordered after that write otherwise.
- A non-blocking copy's bytes land in the host buffer only when something waits for the copy: a
  synchronize of the device or of its stream, an event recorded after it on its stream (synchronize,
  or a query that finds it done), or another stream waiting for such an event. Strict mode fills the
  buffer with 0xFF bytes (NaN) when the copy is issued, so a read before the wait sees garbage, as it
  could on a chip, not silently the right bytes.
- Device work in the scope that writes a copy's source, or touches its host buffer, while the copy is
  in flight is ordered after it (the compute queue waits for it; its bytes land first). Reading the
  source is no hazard and does not wait.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import torch
from torch.utils._python_dispatch import _disable_current_modes

from accelerators.cpu import host_copy
from accelerators.emulated_pace import VirtualClock

if TYPE_CHECKING:
    from accelerators.emulated import EmulatedAccelerator


class InFlightCopy:
    """A non-blocking device->host copy whose bytes have not landed in `dst` yet."""

    __slots__ = ("dst", "src", "done_at", "on_engine", "dst_key", "src_key")

    def __init__(self, dst: torch.Tensor, src: torch.Tensor, done_at: float, on_engine: bool):
        self.dst, self.src, self.done_at, self.on_engine = dst, src, done_at, on_engine
        self.dst_key = dst.untyped_storage().data_ptr()
        self.src_key = src.untyped_storage().data_ptr()


class CopyEngine:
    """The chip's device->host copy engine (its own clock) and the non-blocking copies of either queue
    still in flight, landed (their bytes copied) in issue order once something waits for them."""

    def __init__(self) -> None:
        self.clock = VirtualClock()
        self._copies: list[InFlightCopy] = []
        self._lock = threading.RLock()

    def active(self) -> bool:
        return bool(self._copies)

    def queue(self, copy: InFlightCopy, poison: bool) -> None:
        if poison:
            _poison(copy.dst)
        with self._lock:
            self._copies.append(copy)

    def land(self, on_engine: bool | None = None, until: float = float("inf")) -> None:
        """Land the copies of a queue (both when None) done by `until`, and every copy issued before them."""
        with self._lock:
            last = max((i for i, c in enumerate(self._copies)
                        if (on_engine is None or c.on_engine == on_engine) and c.done_at <= until), default=-1)
            self._land_prefix(last)

    def hazards(self, written: set[int], touched: set[int]) -> float | None:
        """Copies in flight that device work writing storages `written` and touching `touched` must follow:
        lands them (and every copy issued before them); the time the last one is done, None for none."""
        with self._lock:
            last = max((i for i, c in enumerate(self._copies)
                        if c.src_key in written or c.dst_key in touched), default=-1)
            if last < 0:
                return None
            done = max(c.done_at for c in self._copies[:last + 1])
            self._land_prefix(last)
            return done

    def _land_prefix(self, last: int) -> None:
        landing, self._copies = self._copies[:last + 1], self._copies[last + 1:]
        with _disable_current_modes():
            for copy in landing:
                host_copy(copy.dst, copy.src)


class EmulatedStream:
    """A queue of the emulated chip: the compute queue (the default stream) or the copy engine (every
    stream from `new_stream()`). `floor` is the latest event an engine stream waited for: its copies
    start no earlier."""

    def __init__(self, accelerator: "EmulatedAccelerator", on_engine: bool = False):
        self._accelerator = accelerator
        self.on_engine = on_engine
        self.floor = 0.0
        self.last_done = 0.0        # an engine stream: when its last copy is done (the engine is shared)

    def clock(self) -> VirtualClock:
        return self._accelerator.copies.clock if self.on_engine else self._accelerator.clock

    def mark(self) -> float:
        """When everything issued on this stream so far is done (an event recorded now)."""
        if self.on_engine:
            return max(self.last_done, time.perf_counter())
        return self._accelerator.clock.mark()

    def synchronize(self) -> None:
        self._accelerator.require_device("synchronize()")
        until = self.mark()
        self.clock().wait_until(until)
        self._accelerator.copies.land(self.on_engine, until)

    def query(self) -> bool:
        until = self.mark()
        done = time.perf_counter() >= until
        if done:
            self._accelerator.copies.land(self.on_engine, until)
        return done

    def wait_stream(self, stream: "EmulatedStream") -> None:
        self.wait_event(stream.record_event())

    def wait_event(self, event: "EmulatedEvent") -> None:
        """Work issued on this stream from now on follows `event` (no host wait)."""
        if event.time is None:
            return
        if self.on_engine:
            self.floor = max(self.floor, event.time)
            return
        self._accelerator.clock.charge(0.0, issued_at=event.time)     # the compute queue waits for it
        self._accelerator.copies.land(event.on_engine, event.time)

    def record_event(self, event: "EmulatedEvent | None" = None) -> "EmulatedEvent":
        event = event or EmulatedEvent(self._accelerator)
        event.record(self)
        return event


class EmulatedEvent:
    """Records the clock of the queue it is recorded on; waits for and measures virtual time."""

    def __init__(self, accelerator: "EmulatedAccelerator", enable_timing: bool = True):
        self._accelerator = accelerator
        self._dilation = accelerator.time_dilation
        self.time: float | None = None
        self.on_engine = False

    def record(self, stream: EmulatedStream | None = None) -> None:
        stream = stream or self._accelerator.current_stream()
        self.on_engine = stream.on_engine
        self.time = stream.mark()

    def query(self) -> bool:
        if self.time is None:
            return True
        done = time.perf_counter() >= self.time
        if done:
            self._accelerator.copies.land(self.on_engine, self.time)
        return done

    def synchronize(self) -> None:
        if self.time is not None:
            clock = self._accelerator.copies.clock if self.on_engine else self._accelerator.clock
            clock.wait_until(self.time)
            self._accelerator.copies.land(self.on_engine, self.time)

    def wait(self, stream: EmulatedStream | None = None) -> None:
        (stream or self._accelerator.current_stream()).wait_event(self)

    def elapsed_time(self, end: "EmulatedEvent") -> float:
        """Milliseconds of the chip's time from this event to `end`."""
        if self.time is None or end.time is None:
            raise RuntimeError("both events must be recorded before elapsed_time")
        return (end.time - self.time) * 1000.0 / self._dilation


def _poison(tensor: torch.Tensor) -> None:
    """0xFF in every byte (NaN in every float format) of a host buffer a copy has not landed in yet."""
    with _disable_current_modes():
        if tensor.is_contiguous():
            tensor.reshape(-1).view(torch.uint8).fill_(0xFF)
        elif tensor.is_floating_point():
            tensor.fill_(float("nan"))
