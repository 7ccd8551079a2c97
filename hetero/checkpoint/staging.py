"""Host buffers a rank's shard is copied into at each save, kept from one save to the next.

Why: the copy that blocks training was a fresh host tensor per chunk (`clone()`, `.to("cpu")`), so
every save first-touched hundreds of MB of new pages; the page faults and zeroing cost 5-15x the
memcpy itself (llama-100m, 300 MB per rank: ~1 s against ~0.1 s into touched memory). The field's
answer (DCP's async_save with cached staging buffers, ByteCheckpoint's pinned pool) is to copy into
the same buffers every time; pinned ones for a device source, so the device->host copy runs at the
link's speed without a bounce buffer. A host source is copied by numpy's single-threaded memcpy, not
torch's `copy_`: that forks an OpenMP team for every tensor above its grain size, and on a busy host
a team waits for a descheduled thread at each of a shard's ~60 copies (llama-100m, a 4x
oversubscribed 2-core host: 0.2-0.4 s against 0.03 s for the same bytes; a memcpy is memory-bound,
one core is enough). The buffers are the shard's size (the writer streams them, no
other copy is made), so peak extra host memory stays about 1.0x the shard; they are held between
saves, which is what a host copy of the shard costs anyway at the next save.

Every copy goes through the accelerator's `copy_to_host` when the staging has one (the trainer's
does): an emulated chip charges the host link for it exactly as for `to_host`, so the emulation is
no more forgiving than a real chip. Use: `copy = staging.begin().copy`, hand `copy` to own_chunks (each call takes the next buffer, made
or remade only when its shape or dtype changed), `staging.finish()` (waits for pinned copies), then
give the chunks and the staging to `AsyncWrite(..., staging=staging)`: the writer lends it while it
streams the buffers, and `begin()` refuses to reuse them before it is done.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _disable_current_modes   # as accelerators.emulated's to_host

from accelerators.cpu import host_copy


class StagingBusy(RuntimeError):
    """begin() while a writer still streams the previous save's buffers."""


class Staging:
    def __init__(self, accelerator=None):
        # With the accelerator, every copy goes through its copy_to_host (an emulated chip charges the
        # host link as for to_host; a device source is copied asynchronously into pinned buffers and
        # finish() synchronizes). Without one, a host memcpy, or a blocking copy of a device source.
        self._accel = accelerator
        self._buffers: list[torch.Tensor] = []
        self._next = 0
        self._pinned = False
        self._lent = False

    def begin(self) -> "Staging":
        """Start a save's copies from the first buffer; refused while a writer holds the buffers."""
        if self._lent:
            raise StagingBusy("checkpoint staging buffers are still being written; wait for the writer first")
        self._next = 0
        return self

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor`'s elements in this save's next host buffer (contiguous, same shape and dtype). Outside
        any device scope's modes: the buffers are host memory even when called inside one."""
        with _disable_current_modes():
            return self._copy(tensor.detach())

    def _copy(self, source: torch.Tensor) -> torch.Tensor:
        pin = source.device.type != "cpu"      # a pageable target makes a non_blocking copy synchronous
        buffer = self._buffers[self._next] if self._next < len(self._buffers) else None
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            buffer = _host_buffer(source.shape, source.dtype, pin)
            if self._next < len(self._buffers):
                self._buffers[self._next] = buffer
            else:
                self._buffers.append(buffer)
        self._next += 1
        if self._accel is not None:
            self._accel.copy_to_host(buffer, source, non_blocking=pin)
            self._pinned |= pin
        elif pin:
            buffer.copy_(source)
        else:
            host_copy(buffer, source)
        return buffer

    def finish(self) -> None:
        """Wait for this save's pinned (asynchronous) copies, queued on the current stream (a side
        stream's, when the copy runs beside training); drop buffers this save did not use."""
        del self._buffers[self._next:]
        if self._pinned:
            self._accel.current_stream().synchronize()
        self._pinned = False

    def lend(self) -> None:
        self._lent = True

    def release(self) -> None:
        self._lent = False

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers)


def _host_buffer(shape, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """A new staging buffer; page-locked (pinned) for a device source, so its copy can be asynchronous."""
    return torch.empty(shape, dtype=dtype, pin_memory=pin)
