"""Device <-> host staging for the bridge, through a duck-typed Accelerator.

The bridge moves host bytes. A device tensor is copied to host on a side stream
(so the copy overlaps the compute queued on the main stream) and the sender
waits on an event before its bytes hit the socket; on the receiver the host
tensor goes back to the device the same way. A tensor counts as the
accelerator's when its device type is the accelerator's `device_type`: that
includes host-memory vendors (`cpu`, and `emulated`, whose D2H copy must wait
for its virtual device to finish the work that produced the tensor). With no
accelerator, a plain CPU tensor only gets made contiguous.
"""

from __future__ import annotations

import torch


class Staged:
    """A host tensor plus an optional event that says when its bytes are valid."""

    __slots__ = ("tensor", "event")

    def __init__(self, tensor: torch.Tensor, event=None):
        self.tensor = tensor
        self.event = event

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class Stager:
    """One per endpoint: owns the side stream and pinned bounce buffers."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self._stream = None

    def _side_stream(self):
        if self._stream is None and self.accelerator is not None:
            try:
                self._stream = self.accelerator.new_stream()
            except Exception:  # a vendor without streams: stage on the current one
                self._stream = None
        return self._stream

    def to_host(self, tensor: torch.Tensor) -> Staged:
        accel = self.accelerator
        if accel is None and tensor.is_cpu:  # the common case, kept cheap: it runs per message
            return Staged(tensor if tensor.is_contiguous() else tensor.contiguous())
        if accel is None or tensor.device.type != getattr(accel, "device_type", None):
            if tensor.device.type == "cpu":
                # The wire needs one flat run of bytes; non-contiguous views get copied.
                return Staged(tensor if tensor.is_contiguous() else tensor.contiguous())
            return Staged(tensor.to("cpu").contiguous())
        stream = self._side_stream()
        if stream is None:
            return Staged(accel.to_host(tensor.contiguous()))
        # The side stream must see everything the compute stream queued for `tensor`.
        stream.wait_stream(accel.current_stream())
        with accel.stream(stream):
            host = accel.to_host(tensor.contiguous(), non_blocking=True)
            event = accel.new_event(enable_timing=False)
            event.record(stream)
        return Staged(host if host.is_contiguous() else host.contiguous(), event)

    def host_buffer(self, dtype: torch.dtype, shape, device: str | None) -> torch.Tensor:
        """A receive buffer; pinned when the bytes are headed to a device that has pinning."""
        buf = torch.empty(tuple(shape), dtype=dtype)
        if device is not None and torch.device(device).type != "cpu" and self.accelerator is not None:
            try:
                buf = self.accelerator.pin_memory(buf)
            except Exception:
                pass  # pinning is an optimisation, never a requirement
        return buf

    def to_device(self, tensor: torch.Tensor, device: str | None) -> torch.Tensor:
        if device is None or torch.device(device).type == "cpu":
            return tensor
        accel = self.accelerator
        if accel is None:
            return tensor.to(device)
        stream = self._side_stream()
        if stream is None:
            return tensor.to(device)
        with accel.stream(stream):
            out = tensor.to(device, non_blocking=True)
        # Later kernels on the compute stream must not read `out` before the copy lands.
        accel.current_stream().wait_stream(stream)
        return out
