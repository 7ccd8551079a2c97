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
host, the latter into an existing host tensor) are the copy API; each charges bytes / `host_link_gbps` to the clock (a spec without
the key copies at its memory bandwidth; the catalog always names one). A
blocking `to_host` then waits for the clock; `non_blocking=True` only queues
the copy (wait on an event recorded after it, as on a real chip).

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
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
import weakref
from typing import Any, Mapping

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from accelerators import strict_backend
from accelerators.base import ProbeResult
from accelerators.cpu import CpuAccelerator, host_copy
from accelerators.errors import AcceleratorUnavailable, DeviceContractError, EmulatedOutOfMemory
from accelerators.strict_backend import BACKEND_NAME as STRICT_BACKEND

CHIP_ENV = "HETERO_EMULATED_CHIP"
DILATION_ENV = "HETERO_EMULATED_TIME_DILATION"
STRICT_ENV = "HETERO_EMULATED_STRICT"
BACKEND_ENV = "HETERO_BACKEND"          # the island's backend, set by the launcher
VISIBLE_ENV = "HETERO_EMULATED_VISIBLE_DEVICES"
GB = 1e9
TFLOPS = 1e12

aten = torch.ops.aten

# Which spec rate a tensor dtype runs at. The catalog lists no fp64 rate, so
# fp64 (used by gradient checks) runs at the fp32 rate.
_DTYPE_RATE_KEY = {
    torch.float32: "fp32", torch.float64: "fp32",
    torch.float16: "fp16", torch.bfloat16: "bf16",
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _DTYPE_RATE_KEY[getattr(torch, _name)] = "fp8"

# Ops that allocate or reinterpret but move no data.
_FREE_OPS = {
    aten.detach, aten._unsafe_view, aten.empty, aten.empty_strided, aten.new_empty,
    aten.new_empty_strided, aten.empty_like, aten.lift_fresh, aten._local_scalar_dense,
}
# Free ops whose output is a fresh allocation on the device (lift_fresh: torch.tensor(data)
# inside the scope, the constant becoming a device tensor).
_ALLOCATING_OPS = {
    aten.empty, aten.empty_strided, aten.new_empty, aten.new_empty_strided, aten.empty_like,
    aten.lift_fresh,
}


def _cpu_attention_flops(query, key, value, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


# FLOP formulas by op packet: torch's (shape-wrapped, called as f(*args, out_val=out, **kw))
# plus the CPU flash-attention kernels torch's table does not list.
_FLOP_FORMULAS: dict[Any, Any] = dict(flop_counter.flop_registry)
for _packet, _formula in (
    ("_scaled_dot_product_flash_attention_for_cpu", _cpu_attention_flops),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_attention_backward_flops),
):
    if hasattr(aten, _packet):
        _FLOP_FORMULAS[getattr(aten, _packet)] = _formula


class ChipPace:
    """The numbers of a chip spec that pace the emulation; `dilation` wall
    seconds pass per second of the chip's time."""

    def __init__(self, chip: Mapping[str, Any], dilation: float = 1.0):
        self.name = _require(chip, "name", str)
        self.dilation = float(dilation)
        tflops = _require(chip, "tflops", Mapping)
        if not tflops or any(not isinstance(v, (int, float)) or v <= 0 for v in tflops.values()):
            raise ValueError(f"emulated chip {self.name!r}: 'tflops' must map dtypes to positive "
                             f"TFLOP/s, got {dict(tflops)!r}")
        self.tflops = {str(k): float(v) for k, v in tflops.items()}
        self.memory_gb = _positive(chip, "memory_gb", self.name)
        self.bandwidth_gbps = _positive(chip, "memory_bandwidth_gbps", self.name)
        self.host_link_gbps = (_positive(chip, "host_link_gbps", self.name) if "host_link_gbps" in chip
                               else self.bandwidth_gbps)
        self.reserve_gb = float(_require(chip, "memory_reserve_gb", (int, float))) \
            if "memory_reserve_gb" in chip else 0.0
        if not 0.0 <= self.reserve_gb < self.memory_gb:
            raise ValueError(f"emulated chip {self.name!r}: 'memory_reserve_gb' must be in "
                             f"[0, memory_gb={self.memory_gb:g}), got {self.reserve_gb:g}")
        self.capacity_bytes = int((self.memory_gb - self.reserve_gb) * GB)   # usable device memory
        self.bytes_per_second = self.bandwidth_gbps * GB
        self.host_link_bytes_per_second = self.host_link_gbps * GB
        fallback = self.tflops.get("fp32", min(self.tflops.values()))
        self._flops_per_second = {
            dtype: TFLOPS * self.tflops.get(key, fallback) for dtype, key in _DTYPE_RATE_KEY.items()
        }
        self._default_flops_per_second = TFLOPS * fallback

    def flops_per_second(self, dtype: torch.dtype) -> float:
        """Peak rate for `dtype`; a dtype the spec does not list runs at its fp32 rate."""
        return self._flops_per_second.get(dtype, self._default_flops_per_second)

    def seconds(self, flops: float, nbytes: float, dtype: torch.dtype) -> float:
        """Roofline time of one op on this chip, in wall seconds."""
        return self.dilation * max(flops / self.flops_per_second(dtype), nbytes / self.bytes_per_second)

    def copy_seconds(self, nbytes: float) -> float:
        """Time of a host <-> device copy of `nbytes` over the host link, in wall seconds."""
        return self.dilation * nbytes / self.host_link_bytes_per_second


class VirtualClock:
    """When the emulated device will have finished everything issued so far.

    Times are `time.perf_counter()` seconds (wall, dilation included).
    `busy_seconds` is the sum of all costs charged: deterministic, whatever
    the host is doing.
    """

    def __init__(self) -> None:
        self.ready_at = time.perf_counter()
        self.busy_seconds = 0.0
        self._lock = threading.Lock()

    def charge(self, seconds: float, issued_at: float | None = None) -> float:
        """Queue `seconds` of device work issued at `issued_at` (default now)."""
        issued_at = time.perf_counter() if issued_at is None else issued_at
        with self._lock:
            self.ready_at = max(self.ready_at, issued_at) + seconds
            self.busy_seconds += seconds
            return self.ready_at

    def mark(self) -> float:
        """The clock value an event recorded now would carry."""
        return max(self.ready_at, time.perf_counter())

    def wait_until(self, when: float) -> None:
        """Block the host until wall time reaches `when`."""
        while True:
            remaining = when - time.perf_counter()
            if remaining <= 0:
                return
            time.sleep(remaining)

    def wait(self) -> None:
        self.wait_until(self.ready_at)


class EmulatedDeviceOutOfMemory(torch.OutOfMemoryError, EmulatedOutOfMemory):
    """What the ledger raises: a `torch.OutOfMemoryError` (what real vendors raise) that is
    also the layer's torch-free `EmulatedOutOfMemory`, with its byte counts."""

    def __init__(self, message: str, **numbers: Any):
        EmulatedOutOfMemory.__init__(self, message, **numbers)


class MemoryLedger:
    """Bytes of the storages the emulated device holds, against its capacity."""

    def __init__(self, chip: ChipPace):
        self.chip = chip
        self.allocated = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # storage data_ptr -> bytes
        self._lock = threading.Lock()

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor`'s storage is device memory (a view of device memory is too)."""
        return tensor.untyped_storage().data_ptr() in self._live

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._live:
            return
        with self._lock:
            if self.allocated + nbytes > self.chip.capacity_bytes:
                reserve = f" - memory_reserve_gb={self.chip.reserve_gb:g}" if self.chip.reserve_gb else ""
                raise EmulatedDeviceOutOfMemory(
                    f"emulated chip {self.chip.name!r} is out of memory: tried to allocate "
                    f"{_mib(nbytes)} with {_mib(self.allocated)} of {_mib(self.chip.capacity_bytes)} "
                    f"(memory_gb={self.chip.memory_gb:g}{reserve}) already in use",
                    chip=self.chip.name, requested=nbytes, in_use=self.allocated,
                    capacity=self.chip.capacity_bytes,
                )
            self._live[key] = nbytes
            self.allocated += nbytes
            self.peak = max(self.peak, self.allocated)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        with self._lock:
            self.allocated -= self._live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.allocated


class EmulationMode(TorchDispatchMode):
    """Charges every aten op to the virtual clock and its outputs to the ledger."""

    def __init__(self, accelerator: "EmulatedAccelerator", strict: bool = False):
        super().__init__()
        self.accelerator = accelerator
        self.pace = accelerator.pace
        self.clock = accelerator.clock
        self.ledger = accelerator.ledger
        self.strict = strict

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        issued_at = time.perf_counter()
        packet = func.overloadpacket
        free = func.is_view or packet in _FREE_OPS
        inputs = _tensors(args) + _tensors(kwargs.values())
        transfer = self._check_inputs(func, args, inputs) if self.strict and not free else None
        out = func(*args, **kwargs)
        if packet is aten._local_scalar_dense:
            self.clock.wait()  # .item(): the host reads device memory
            return out
        if free:
            if packet in _ALLOCATING_OPS:
                for tensor in _tensors(out):
                    self.ledger.track(tensor)
            return out
        outputs = _tensors(out)
        for tensor in outputs:
            self.ledger.track(tensor)
        if transfer is not None:   # copy_ between host and device memory: the host link's time
            self.clock.charge(self.pace.copy_seconds(transfer.nbytes), issued_at)
            return out
        formula = _FLOP_FORMULAS.get(packet)
        flops = formula(*args, out_val=out, **kwargs) if formula is not None else 0
        nbytes = sum(t.nbytes for t in inputs) + sum(t.nbytes for t in outputs)
        dtype = _compute_dtype(inputs or outputs)
        self.clock.charge(self.pace.seconds(flops, nbytes, dtype), issued_at)
        return out

    def _check_inputs(self, func, args, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        """Strict mode: refuse a device op that reads host memory. A copy_ between host and
        device memory is a transfer: returns the tensor whose bytes cross the host link."""
        host = [t for t in inputs if self._is_host(t)]
        if not host:
            return None
        if func.overloadpacket is aten.copy_ and len(host) == 1:
            dst, src = args[0], args[1]
            if self.ledger.holds(dst) or self.ledger.holds(src):
                return src
        tensor = host[0]
        self.accelerator.violation(
            f"{func} reads a host tensor (shape {tuple(tensor.shape)}, {tensor.dtype}) that is not in "
            f"device memory; move it with the accelerator's copy API first (accelerator.to_device(tensor))")
        return None

    def _is_host(self, tensor: torch.Tensor) -> bool:
        return tensor.dim() > 0 and tensor.numel() > 0 and not self.ledger.holds(tensor)


class EmulatedStream:
    """The emulated device has one in-order queue; every stream is that queue."""

    def __init__(self, accelerator: "EmulatedAccelerator"):
        self._accelerator = accelerator

    def synchronize(self) -> None:
        self._accelerator.synchronize()

    def query(self) -> bool:
        return time.perf_counter() >= self._accelerator.clock.ready_at

    def wait_stream(self, stream) -> None:
        return None  # one queue: already ordered

    def wait_event(self, event) -> None:
        return None

    def record_event(self, event: "EmulatedEvent | None" = None) -> "EmulatedEvent":
        event = event or EmulatedEvent(self._accelerator)
        event.record()
        return event


class EmulatedEvent:
    """Records the virtual clock; waits for and measures virtual time."""

    def __init__(self, accelerator: "EmulatedAccelerator", enable_timing: bool = True):
        self._clock = accelerator.clock
        self._dilation = accelerator.time_dilation
        self.time: float | None = None

    def record(self, stream=None) -> None:
        self.time = self._clock.mark()

    def query(self) -> bool:
        return self.time is None or time.perf_counter() >= self.time

    def synchronize(self) -> None:
        if self.time is not None:
            self._clock.wait_until(self.time)

    def wait(self, stream=None) -> None:
        return None  # one queue: already ordered

    def elapsed_time(self, end: "EmulatedEvent") -> float:
        """Milliseconds of the chip's time from this event to `end`."""
        if self.time is None or end.time is None:
            raise RuntimeError("both events must be recorded before elapsed_time")
        return (end.time - self.time) * 1000.0 / self._dilation


class EmulatedAccelerator(CpuAccelerator):
    """The host CPU's device, RNG and transfers, with a paced clock and a memory ledger."""

    vendor = "emulated"
    dist_backend = STRICT_BACKEND   # NCCL/HCCL's rules on gloo; an island's `backend: gloo` picks plain gloo
    env_prefixes = ("HETERO_EMULATED_", "OMP_", "GLOO_")
    visible_devices_env = VISIBLE_ENV
    is_emulated = True

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
        self.require_device("synchronize()")
        self.clock.wait()

    def properties(self, index: int | None = None) -> dict:
        return {"name": self.device_name(), "total_memory": self.pace.capacity_bytes,
                "tflops": dict(self.pace.tflops), "memory_bandwidth_gbps": self.pace.bandwidth_gbps,
                "host_link_gbps": self.pace.host_link_gbps, "emulated": True}

    # Streams and events -----------------------------------------------------------
    def new_stream(self, priority: int = 0) -> EmulatedStream:
        return EmulatedStream(self)

    def current_stream(self, index: int | None = None) -> EmulatedStream:
        return EmulatedStream(self)

    def default_stream(self, index: int | None = None) -> EmulatedStream:
        return EmulatedStream(self)

    def stream(self, stream) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext(stream)

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

        In strict mode a tensor already in host memory is copied free of charge (a real
        `.to("cpu")` of a host tensor moves nothing)."""
        self.require_device("to_host()")
        if not (self.strict and not self.ledger.holds(tensor)):
            self.clock.charge(self.pace.copy_seconds(tensor.nbytes))
        if not non_blocking:
            self.clock.wait()
        with _disable_current_modes():  # the copy lands in host memory, not the chip's
            return tensor.detach().clone()

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        """Device -> host copy into an existing host tensor (a checkpoint's staging buffer): charged at
        the host link exactly as `to_host` (a host `src` in strict mode is free), on the chip's one
        queue, so compute issued after it waits for it (a real chip's copy engine could overlap
        the two: the emulation is never the more forgiving); a blocking one waits for the device."""
        self.require_device("copy_to_host()")
        if not (self.strict and not self.ledger.holds(src)):
            self.clock.charge(self.pace.copy_seconds(src.nbytes))
        if not non_blocking:
            self.clock.wait()
        with _disable_current_modes():  # the copy lands in host memory, not the chip's
            host_copy(dst, src)
        return dst

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


def _require(chip: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in chip:
        raise ValueError(f"emulated chip spec is missing {key!r} (has {sorted(chip)})")
    if not isinstance(chip[key], kind) or isinstance(chip[key], bool):
        wanted = "a number" if kind == (int, float) else f"a {getattr(kind, '__name__', kind)}"
        raise ValueError(f"emulated chip spec: {key!r} must be {wanted}, "
                         f"got {type(chip[key]).__name__}")
    return chip[key]


def _positive(chip: Mapping[str, Any], key: str, name: str) -> float:
    value = _require(chip, key, (int, float))
    if value <= 0:
        raise ValueError(f"emulated chip {name!r}: {key!r} must be positive, got {value}")
    return float(value)


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in an op's output or argument list (one level of nesting)."""
    if isinstance(value, torch.Tensor):
        return [value]
    found = []
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str):
        for item in value:
            if isinstance(item, torch.Tensor):
                found.append(item)
            elif isinstance(item, (list, tuple)):
                found.extend(t for t in item if isinstance(t, torch.Tensor))
    return found


def _compute_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    for tensor in tensors:
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
