"""An emulated chip: real math on the host CPU, paced by a declared chip spec.

The emulated accelerator is a test and benchmark device. Its tensors are
ordinary `cpu` tensors, but while its *device scope* is active every aten op
(forward and backward: a TorchDispatchMode sees both) is charged to a virtual
device clock:

    cost  = max(flops / peak_flops(dtype), bytes / memory_bandwidth)   (roofline)
    clock = max(clock, time the op was issued) + cost

Matmul-like ops (mm, addmm, bmm, convolution, scaled-dot-product attention)
have FLOP formulas (torch.utils.flop_counter's, plus the CPU attention kernels);
every other op moves the bytes of its tensor inputs and outputs. Views and
allocation-only ops are free.

Like a real device, the host runs ahead of the clock; anything that waits for
the device blocks until wall time reaches it: `synchronize()`, an event's
`synchronize()`, `to_host()` and `Tensor.item()`. So a "slow" and a "fast"
emulated chip differ in speed by the spec's ratio, whatever the host CPU does,
as long as the host keeps ahead of the virtual clock.

Memory: what the emulated device allocates inside its scope (every storage an
op produces there, once, until it is freed) and what `to_device` or `track`
hands it is *device memory*, counted by the ledger against the usable capacity
`memory_gb - memory_reserve_gb` (1 GB = 1e9 bytes, the catalog's unit); going
over raises `EmulatedOutOfMemory`, which is also a `torch.OutOfMemoryError`
like a real vendor's. Every other tensor is host memory.

Host link: `to_device` (host -> device), `to_host` and `copy_to_host` (device ->
host, the latter into an existing host tensor) are the copy API; each charges
bytes / `host_link_gbps` (a spec without the key copies at its memory bandwidth;
the catalog always names one). A blocking `to_host` then waits for the clock;
`non_blocking=True` only queues the copy (wait on an event recorded after it, as
on a real chip). `copy_to_host` on a side stream (`new_stream()`) runs on the
chip's copy engine, its own queue beside compute, under CUDA's ordering rules
(accelerators.emulated_streams); on the default stream it is in order with
compute.

Strict mode (on by default; HETERO_EMULATED_STRICT=0 or strict=False turns it
off): the chip refuses what a real device would refuse, with a
`DeviceContractError` (HETERO_EMULATED_STRICT=warn instead prints each distinct
violation once, with its innermost callers outside torch and this package, and
carries on: a survey). The default lives here, not in the launcher's
environment, because the contract is the device's: a bare
`EmulatedAccelerator()` in a notebook refuses a host tensor in device work just
as `model.cuda()(torch.randn(...))` fails on a GPU, and every way of driving
the chip (hetero run/launch, Ray, Slurm, in-process profiles, checks and
tests) gets the same rules without each launcher having to ask for them:
- an op inside the scope that reads a host tensor (one the ledger does not
  hold and that is not a 0-dim scalar); `copy_` between host and device memory
  is a transfer, allowed and charged at the host link;
- device work (entering the scope, `to_device`, `to_host`, `synchronize`)
  before `set_device`, when more than one device index is visible.

Collectives: `dist_backend` is `hetero-strict` (accelerators/strict_backend.py:
NCCL/HCCL's rules on gloo; registered when the accelerator is built), or plain
`gloo` where the launcher's HETERO_BACKEND names it (`backend: gloo` on the island).
Under `hetero-strict` a blocking collective occupies the compute queue for its host
seconds, as NCCL's does its stream (`charge_collective`); under plain gloo it is free.

Devices: HETERO_EMULATED_VISIBLE_DEVICES (a comma-separated list, set by the
launcher like CUDA_VISIBLE_DEVICES) says how many device indices this process
sees; without it, one. Every index is the same emulated chip of this process.

Time dilation: the host keeps ahead of the clock only while it has the cores
for it. Several emulated chips on a small host (4 chips on 2 cores) share the
CPU, and a fast chip's short ops then wait on the host, not on the clock. With
HETERO_EMULATED_TIME_DILATION=k every device cost lasts k wall seconds per
chip second, so the host has k times the room; whoever reads wall times
divides them by k (`time_dilation`). Host-side communication (gloo, the
bridge) is not dilated, so it weighs 1/k as much in chip time.

The chip spec is a plain dict (the catalog's `ChipSpec.to_dict()`):
`name`, `tflops` {fp32|tf32|bf16|fp16|fp8: TFLOP/s}, `memory_gb`,
`memory_bandwidth_gbps` (GB/s), optional `host_link_gbps` (GB/s per direction)
and `memory_reserve_gb` (default 0); other keys are ignored. Without an explicit
spec the accelerator reads it as JSON from HETERO_EMULATED_CHIP.

The module is split by concern: the pace and clocks (emulated_pace), the memory
ledger (emulated_memory), the dispatch mode that charges each op
(emulated_dispatch), the queues, streams and events (emulated_streams); this one
keeps the accelerator and its environment. Every public name is importable from
here.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from typing import Any, Mapping

import torch
from torch.utils._python_dispatch import _disable_current_modes

from accelerators import strict_backend
from accelerators.base import ProbeResult
from accelerators.cpu import CpuAccelerator, host_copy
from accelerators.emulated_dispatch import EmulationMode
from accelerators.emulated_memory import EmulatedDeviceOutOfMemory, MemoryLedger
from accelerators.emulated_pace import GB, TFLOPS, ChipPace, VirtualClock
from accelerators.emulated_streams import CopyEngine, EmulatedEvent, EmulatedStream, InFlightCopy
from accelerators.errors import AcceleratorUnavailable, DeviceContractError
from accelerators.strict_backend import BACKEND_NAME as STRICT_BACKEND

# Split by concern (the pace and clocks, the memory ledger, the dispatch mode, streams and events);
# these names stay importable from here.
__all__ = ["CHIP_ENV", "DILATION_ENV", "STRICT_ENV", "BACKEND_ENV", "VISIBLE_ENV", "GB", "TFLOPS",
           "ChipPace", "VirtualClock", "MemoryLedger", "EmulatedDeviceOutOfMemory", "EmulationMode",
           "EmulatedStream", "EmulatedEvent", "CopyEngine", "InFlightCopy", "EmulatedAccelerator"]

CHIP_ENV = "HETERO_EMULATED_CHIP"
DILATION_ENV = "HETERO_EMULATED_TIME_DILATION"
STRICT_ENV = "HETERO_EMULATED_STRICT"
BACKEND_ENV = "HETERO_BACKEND"          # the island's backend, set by the launcher
VISIBLE_ENV = "HETERO_EMULATED_VISIBLE_DEVICES"


class EmulatedAccelerator(CpuAccelerator):
    """The host CPU's device, RNG and transfers, with a paced clock and a memory ledger."""

    vendor = "emulated"
    dist_backend = STRICT_BACKEND   # NCCL/HCCL's rules on gloo; an island's `backend: gloo` picks plain gloo
    env_prefixes = ("HETERO_EMULATED_", "OMP_", "GLOO_")
    visible_devices_env = VISIBLE_ENV
    is_emulated = True
    copy_engine = True      # modelled: side streams are the chip's copy engine (accelerators.emulated_streams)

    def __init__(self, chip: Mapping[str, Any] | None = None, time_dilation: float | None = None,
                 strict: bool | None = None):
        super().__init__()
        if chip is None:
            chip = _chip_from_env()
        self.chip = dict(chip)
        self.time_dilation = _dilation_from_env() if time_dilation is None else _checked_dilation(time_dilation)
        self.strict, self.strict_warns = _strict_from_env() if strict is None else (bool(strict), False)
        self._warned: set = set()
        self.pace = ChipPace(chip, self.time_dilation)
        self.clock = VirtualClock()
        self.ledger = MemoryLedger(self.pace)
        self.copies = CopyEngine()
        self._default_stream = EmulatedStream(self)
        self._scope = threading.local()
        self._device_index: int | None = None   # set by set_device
        self.dist_backend = _backend_from_env()
        if self.dist_backend == STRICT_BACKEND:
            strict_backend.register()   # so init_process_group(accel.dist_backend) finds it
        # The first op a dispatch mode sees imports torch._dynamo (~1-2 s): pay
        # that now, then start the clock and the ledger afresh.
        with EmulationMode(self):
            torch.zeros(1).add_(1)
        self.clock = VirtualClock()
        self.ledger = MemoryLedger(self.pace)
        self.copies = CopyEngine()
        self._default_stream = EmulatedStream(self)

    @classmethod
    def probe(cls) -> ProbeResult:
        if os.environ.get(CHIP_ENV):
            return ProbeResult(cls.vendor, True, f"chip spec in {CHIP_ENV}; never picked automatically")
        return ProbeResult(cls.vendor, False, f"needs a chip spec ({CHIP_ENV} or chip=...); "
                                              "never picked automatically")

    # Accounting ---------------------------------------------------------------
    @contextlib.contextmanager
    def device_scope(self):
        """Run the enclosed torch code on the emulated device (re-entrant, per thread)."""
        if getattr(self._scope, "active", False):
            yield self
            return
        self.require_device("device work")
        self._scope.active = True
        try:
            with EmulationMode(self, strict=self.strict):
                yield self
        finally:
            self._scope.active = False

    def in_scope(self) -> bool:
        return getattr(self._scope, "active", False)

    def account(self, flops: float = 0.0, nbytes: float = 0.0,
                dtype: torch.dtype = torch.float32) -> None:
        """Charge work done outside the device scope (e.g. by a custom kernel)."""
        self.clock.charge(self.pace.seconds(flops, nbytes, dtype))

    def queue_ready_at(self) -> float:
        """When the compute queue will have run everything issued so far (perf_counter seconds):
        a send issued now leaves no earlier (accelerators/strict_stream_time.py)."""
        return self.clock.ready_at

    def charge_collective(self, seconds: float, issued_at: float) -> None:
        """A blocking collective issued at `issued_at` took `seconds` on the host: on a real chip it
        runs on the compute queue after the work before it (accelerators/strict_stream_time.py)."""
        self.clock.charge(seconds, issued_at)

    def track(self, tensor: torch.Tensor) -> torch.Tensor:
        """Count a tensor made outside the scope (e.g. loaded weights) as device memory."""
        self.ledger.track(tensor)
        return tensor

    def is_device_memory(self, tensor: torch.Tensor) -> bool:
        """Whether the ledger holds `tensor`'s storage (device memory) rather than the host."""
        return self.ledger.holds(tensor)

    # Device ---------------------------------------------------------------------
    def device_count(self) -> int:
        raw = os.environ.get(VISIBLE_ENV, "").strip()
        return max(1, len([part for part in raw.split(",") if part.strip()])) if raw else 1

    def set_device(self, index: int) -> None:
        count = self.device_count()
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < count:
            raise ValueError(f"the emulated accelerator sees {count} device(s) (0..{count - 1}), "
                             f"not {index!r}" + (f" ({VISIBLE_ENV})" if count > 1 else ""))
        self._device_index = index

    def current_device(self) -> int:
        return self._device_index or 0

    def require_device(self, what: str) -> None:
        """Strict mode: refuse device work before set_device when more than one device is visible
        (a real worker would land on device 0, beside every other rank of its node)."""
        if self.strict and self._device_index is None and self.device_count() > 1:
            self.violation(f"{what} before set_device, with {self.device_count()} devices visible "
                           f"({VISIBLE_ENV}); call accelerator.set_device(local_rank) first, or every "
                           "rank of the node lands on device 0")

    def violation(self, what: str) -> None:
        """Strict mode refuses `what` (a DeviceContractError); warn mode prints it once per call site."""
        message = f"emulated chip {self.pace.name!r} (strict): {what}"
        if not self.strict_warns:
            raise DeviceContractError(message)
        site = _caller_outside()
        key = (what.split(" (", 1)[0], site)
        if key not in self._warned:
            self._warned.add(key)
            print(f"hetero: strict-mode violation at {site}: {message}", file=sys.stderr, flush=True)

    def device_name(self, index: int | None = None) -> str:
        return f"emulated {self.pace.name}"

    def synchronize(self, index: int | None = None) -> None:
        """Wait for both queues (compute and the copy engine); every copy in flight lands."""
        self.require_device("synchronize()")
        self.clock.wait()
        self.copies.clock.wait()
        self.copies.land()

    def properties(self, index: int | None = None) -> dict:
        return {"name": self.device_name(), "total_memory": self.pace.capacity_bytes,
                "tflops": dict(self.pace.tflops), "memory_bandwidth_gbps": self.pace.bandwidth_gbps,
                "host_link_gbps": self.pace.host_link_gbps, "emulated": True}

    # Streams and events (accelerators.emulated_streams: the compute queue and the copy engine) ----
    def new_stream(self, priority: int = 0) -> EmulatedStream:
        """A side stream: the chip's device->host copy engine (compute issued on it still runs on the
        one compute queue)."""
        return EmulatedStream(self, on_engine=True)

    def current_stream(self, index: int | None = None) -> EmulatedStream:
        return getattr(self._scope, "stream", None) or self._default_stream

    def default_stream(self, index: int | None = None) -> EmulatedStream:
        return self._default_stream

    @contextlib.contextmanager
    def stream(self, stream):
        """Make `stream` this thread's current stream (as torch.cuda.stream)."""
        previous = getattr(self._scope, "stream", None)
        self._scope.stream = stream
        try:
            yield stream
        finally:
            self._scope.stream = previous

    def new_event(self, enable_timing: bool = True) -> EmulatedEvent:
        return EmulatedEvent(self, enable_timing)

    # Memory -----------------------------------------------------------------------
    def memory_allocated(self, index: int | None = None) -> int:
        return self.ledger.allocated

    def memory_reserved(self, index: int | None = None) -> int:
        return self.ledger.allocated  # no caching allocator to hold memory back

    def max_memory_allocated(self, index: int | None = None) -> int:
        return self.ledger.peak

    def reset_peak_memory_stats(self, index: int | None = None) -> None:
        self.ledger.reset_peak()

    def total_memory(self, index: int | None = None) -> int:
        return self.pace.capacity_bytes

    def free_memory(self, index: int | None = None) -> int:
        return self.pace.capacity_bytes - self.ledger.allocated

    # Host transfers ---------------------------------------------------------------
    def to_host(self, tensor: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        """Device -> host copy: charged at the host link; a blocking one waits for the device.

        On a side stream it runs on the copy engine, as `copy_to_host` does. In strict mode a tensor
        already in host memory is copied free of charge (a real `.to("cpu")` of a host tensor moves
        nothing)."""
        self.require_device("to_host()")
        stream = self.current_stream()
        if not (self.strict and not self.ledger.holds(tensor)):
            self._queue_copy(stream, tensor)
        if not non_blocking:
            stream.clock().wait_until(stream.mark())
        with _disable_current_modes():  # the copy lands in host memory, not the chip's
            return tensor.detach().clone()

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        """Device -> host copy into an existing host tensor (a checkpoint's staging buffer), charged at the
        host link as `to_host`, on the queue of the current stream: the compute queue (the default
        stream; compute issued after it waits for it), or the copy engine (a side stream; compute goes on
        beside it, the rules in accelerators.emulated_streams). A blocking copy waits for itself; a
        non-blocking one lands in `dst` only once something waits for it. A host `src` in strict mode
        is a plain host copy, free and immediate (nothing crosses the link)."""
        self.require_device("copy_to_host()")
        if self.strict and not self.ledger.holds(src):
            with _disable_current_modes():
                host_copy(dst, src)
            return dst
        stream = self.current_stream()
        done = self._queue_copy(stream, src)
        if non_blocking:
            self.copies.queue(InFlightCopy(dst, src, done, stream.on_engine), poison=self.strict)
            return dst
        stream.clock().wait_until(done)
        self.copies.hazards(set(), {dst.untyped_storage().data_ptr()})   # an earlier copy into dst lands first
        with _disable_current_modes():  # the copy lands in host memory, not the chip's
            host_copy(dst, src)
        return dst

    def _queue_copy(self, stream: EmulatedStream, src: torch.Tensor) -> float:
        """Charge a copy of `src` on `stream`'s queue; when it is done. On the copy engine it starts after
        the events the stream waited for, and must follow the device work that last wrote `src`."""
        seconds = self.pace.copy_seconds(src.nbytes)
        if not stream.on_engine:
            return self.clock.charge(seconds)
        written = self.ledger.written_at.get(src.untyped_storage().data_ptr(), 0.0)
        if self.strict and written > max(stream.floor, self.clock.synced_to):
            self.violation(f"copy_to_host on a side stream reads a tensor (shape {tuple(src.shape)}) whose "
                           "last device write is not known done; make the stream wait for it first "
                           "(stream.wait_event(event recorded after the write) or stream.wait_stream)")
        stream.last_done = self.copies.clock.charge(seconds, issued_at=max(time.perf_counter(), stream.floor, written))
        return stream.last_done

    def to_device(self, tensor: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        """Host -> device copy: a new tensor in device memory (counted by the ledger, so it may
        raise out-of-memory), its bytes charged at the host link. A tensor already in device
        memory is returned as it is (like `.to(device)`)."""
        self.require_device("to_device()")
        if self.ledger.holds(tensor):
            return tensor
        with _disable_current_modes():
            copy = tensor.clone(memory_format=torch.contiguous_format)
        self.ledger.track(copy)
        self.clock.charge(self.pace.copy_seconds(copy.nbytes))
        return copy

    def kernels(self) -> dict:
        from accelerators.ops import vendor

        return vendor.emulated_kernels(self)

    def describe(self) -> dict:
        info = super().describe()
        info["chip"] = {"name": self.pace.name, "tflops": dict(self.pace.tflops),
                        "memory_gb": self.pace.memory_gb,
                        "memory_bandwidth_gbps": self.pace.bandwidth_gbps,
                        "host_link_gbps": self.pace.host_link_gbps,
                        "memory_reserve_gb": self.pace.reserve_gb}
        info["note"] = "emulated chip: a test and benchmark device, paced by its spec"
        if self.time_dilation != 1.0:
            info["time_dilation"] = self.time_dilation
        if self.strict:
            info["strict"] = True
        return info


def _chip_from_env() -> dict:
    raw = os.environ.get(CHIP_ENV)
    if not raw:
        raise AcceleratorUnavailable(
            f"accelerator 'emulated' needs a chip spec: pass chip={{...}} or set {CHIP_ENV} to the "
            "chip's JSON (name, tflops, memory_gb, memory_bandwidth_gbps)"
        )
    try:
        chip = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise AcceleratorUnavailable(f"{CHIP_ENV} is not valid JSON: {exc}") from exc
    if not isinstance(chip, dict):
        raise AcceleratorUnavailable(f"{CHIP_ENV} must be a JSON object, got {type(chip).__name__}")
    return chip


def _dilation_from_env() -> float:
    raw = os.environ.get(DILATION_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        raise AcceleratorUnavailable(f"{DILATION_ENV} must be a number >= 1, got {raw!r}") from None
    return _checked_dilation(value, source=DILATION_ENV)


def _strict_from_env() -> tuple[bool, bool]:
    """(strict, warn only) from HETERO_EMULATED_STRICT: 1 (the default when unset), 0 or warn."""
    raw = os.environ.get(STRICT_ENV, "").strip().lower()
    if raw in ("0", "false", "no", "off"):
        return False, False
    if raw in ("", "1", "true", "yes", "on"):
        return True, False
    if raw == "warn":
        return True, True
    raise AcceleratorUnavailable(f"{STRICT_ENV} must be 1, 0 or warn, got {raw!r}")


def _backend_from_env() -> str:
    """The island's backend the launcher names in HETERO_BACKEND (`backend: gloo` on an emulated
    island), else hetero-strict; a name emulated islands cannot use is left to the config's check."""
    raw = os.environ.get(BACKEND_ENV, "").strip()
    return raw if raw in (STRICT_BACKEND, "gloo") else STRICT_BACKEND


def _caller_outside(depth: int = 3) -> str:
    """file:line (function) of the innermost `depth` frames outside torch, the standard library
    and this package, innermost first: the code that did what strict mode refuses."""
    here = os.path.dirname(os.path.abspath(__file__))
    sites = []
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path.startswith(here) or f"{os.sep}torch{os.sep}" in path or "site-packages" in path \
                or path.startswith(os.path.dirname(os.__file__)):
            continue
        sites.append(f"{os.path.relpath(path)}:{frame.lineno} ({frame.name})")
        if len(sites) == depth:
            break
    return " <- ".join(sites) or "an unknown caller"


def _checked_dilation(value: float, source: str = "time_dilation") -> float:
    # Below 1 the host would need to outrun the chip; NaN or inf would stop the clock.
    if not (isinstance(value, (int, float)) and 1.0 <= value < float("inf")):
        raise AcceleratorUnavailable(f"{source} must be a number >= 1 (wall seconds per chip second), got {value!r}")
    return float(value)

