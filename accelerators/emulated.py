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

Memory: every storage an op produces inside the scope is counted once, until
it is freed, against `memory_gb` (1 GB = 1e9 bytes, the catalog's unit);
going over raises `EmulatedOutOfMemory` naming the chip and its capacity.

Time dilation: the host keeps ahead of the clock only while it has the cores
for it. Several emulated chips on a small host (4 chips on 2 cores) share the
CPU, and a fast chip's short ops then wait on the host, not on the clock. With
HETERO_EMULATED_TIME_DILATION=k every device cost lasts k wall seconds per
chip second, so the host has k times the room; whoever reads wall times
divides them by k (`time_dilation`). Host-side communication (gloo, the
bridge) is not dilated, so it weighs 1/k as much in chip time.

The chip spec is a plain dict (the catalog's `ChipSpec.to_dict()`):
`name`, `tflops` {fp32|tf32|bf16|fp16|fp8: TFLOP/s}, `memory_gb`,
`memory_bandwidth_gbps` (GB/s); other keys are ignored. Without an explicit
spec the accelerator reads it as JSON from HETERO_EMULATED_CHIP.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import weakref
from typing import Any, Mapping

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from accelerators.base import ProbeResult
from accelerators.cpu import CpuAccelerator
from accelerators.errors import AcceleratorUnavailable, EmulatedOutOfMemory

CHIP_ENV = "HETERO_EMULATED_CHIP"
DILATION_ENV = "HETERO_EMULATED_TIME_DILATION"
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
        self.capacity_bytes = int(self.memory_gb * GB)
        self.bytes_per_second = self.bandwidth_gbps * GB
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


class MemoryLedger:
    """Bytes of the storages the emulated device holds, against its capacity."""

    def __init__(self, chip: ChipPace):
        self.chip = chip
        self.allocated = 0
        self.peak = 0
        self._live: dict[int, int] = {}  # storage data_ptr -> bytes
        self._lock = threading.Lock()

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._live:
            return
        with self._lock:
            if self.allocated + nbytes > self.chip.capacity_bytes:
                raise EmulatedOutOfMemory(
                    f"emulated chip {self.chip.name!r} is out of memory: tried to allocate "
                    f"{_mib(nbytes)} with {_mib(self.allocated)} of {_mib(self.chip.capacity_bytes)} "
                    f"(memory_gb={self.chip.memory_gb:g}) already in use"
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

    def __init__(self, accelerator: "EmulatedAccelerator"):
        super().__init__()
        self.pace = accelerator.pace
        self.clock = accelerator.clock
        self.ledger = accelerator.ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        issued_at = time.perf_counter()
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet is aten._local_scalar_dense:
            self.clock.wait()  # .item(): the host reads device memory
            return out
        if func.is_view or packet in _FREE_OPS:
            return out
        outputs = _tensors(out)
        inputs = _tensors(args) + _tensors(kwargs.values())
        for tensor in outputs:
            self.ledger.track(tensor)
        formula = _FLOP_FORMULAS.get(packet)
        flops = formula(*args, out_val=out, **kwargs) if formula is not None else 0
        nbytes = sum(t.nbytes for t in inputs) + sum(t.nbytes for t in outputs)
        dtype = _compute_dtype(inputs or outputs)
        self.clock.charge(self.pace.seconds(flops, nbytes, dtype), issued_at)
        return out


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
    env_prefixes = ("HETERO_EMULATED_", "OMP_", "GLOO_")
    is_emulated = True

    def __init__(self, chip: Mapping[str, Any] | None = None, time_dilation: float | None = None):
        super().__init__()
        if chip is None:
            chip = _chip_from_env()
        self.chip = dict(chip)
        self.time_dilation = _dilation_from_env() if time_dilation is None else _checked_dilation(time_dilation)
        self.pace = ChipPace(chip, self.time_dilation)
        self.clock = VirtualClock()
        self.ledger = MemoryLedger(self.pace)
        self._scope = threading.local()
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
        self._scope.active = True
        try:
            with EmulationMode(self):
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

    # Device ---------------------------------------------------------------------
    def device_name(self, index: int | None = None) -> str:
        return f"emulated {self.pace.name}"

    def synchronize(self, index: int | None = None) -> None:
        self.clock.wait()

    def properties(self, index: int | None = None) -> dict:
        return {"name": self.device_name(), "total_memory": self.pace.capacity_bytes,
                "tflops": dict(self.pace.tflops), "memory_bandwidth_gbps": self.pace.bandwidth_gbps,
                "emulated": True}

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
        """Wait for the device (a D2H copy does), then hand over a host copy."""
        self.clock.wait()
        with _disable_current_modes():  # the copy lands in host memory, not the chip's
            return tensor.detach().clone()

    def kernels(self) -> dict:
        from accelerators.ops import vendor

        return vendor.emulated_kernels(self)

    def describe(self) -> dict:
        info = super().describe()
        info["chip"] = {"name": self.pace.name, "tflops": dict(self.pace.tflops),
                        "memory_gb": self.pace.memory_gb,
                        "memory_bandwidth_gbps": self.pace.bandwidth_gbps}
        info["note"] = "emulated chip: a test and benchmark device, paced by its spec"
        if self.time_dilation != 1.0:
            info["time_dilation"] = self.time_dilation
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


def _checked_dilation(value: float, source: str = "time_dilation") -> float:
    # Below 1 the host would need to outrun the chip; NaN or inf would stop the clock.
    if not (isinstance(value, (int, float)) and 1.0 <= value < float("inf")):
        raise AcceleratorUnavailable(f"{source} must be a number >= 1 (wall seconds per chip second), got {value!r}")
    return float(value)


def _require(chip: Mapping[str, Any], key: str, kind: type) -> Any:
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
