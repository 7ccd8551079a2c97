"""The `Accelerator` interface: everything the runtime asks of a chip, in one place.

One `Accelerator` drives one vendor in one process (see docs/architecture.md: every
process belongs to exactly one island). The base class implements the surface
on top of a *torch device module* (`torch.cuda`, `torch.npu`, ...), because the
vendors' PyTorch plug-ins mirror the `torch.cuda` API; a vendor subclass only
declares its identity, how to find its device module, and how to probe for it.
The host-only vendors (`cpu`, `emulated`) override what a device module cannot
give them.

Anything this class does not wrap is reached through `__getattr__`, which
forwards to the device module (e.g. `accel.get_device_capability()`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable, Mapping

import torch

# Dtypes every vendor here computes in; a subclass narrows or widens the list.
COMMON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ProbeResult:
    """What a probe found, without initialising any device."""

    name: str
    available: bool
    reason: str  # why (not) available, in words a user can act on

    def to_dict(self) -> dict:
        return {"name": self.name, "available": self.available, "reason": self.reason}


class Accelerator:
    """One chip vendor as the runtime sees it. Subclasses fill in the identity."""

    # Identity ---------------------------------------------------------------
    vendor: str = ""                    # registry name: cuda, ascend, kunlun, cpu, emulated
    device_type: str = ""               # torch device type of its tensors
    dist_backend: str = ""              # torch.distributed backend inside an island
    visible_devices_env: str | None = None  # env var that restricts visible devices
    ray_resource: str | None = None     # Ray's resource name for one chip (None: a CPU, as for cpu/emulated)
    env_prefixes: tuple[str, ...] = ()  # env vars the launcher forwards to workers
    is_emulated: bool = False
    time_dilation: float = 1.0          # wall seconds per device second (emulated chips may stretch time)
    startup_seconds: float = 20.0       # typical runtime start-up, for estimating preflight checks
    # Device->host copies run on DMA copy engines, on a side stream, beside compute (GPUs, NPUs): a copy
    # handed to a side stream is hidden behind the compute. False where the "device" is the host (cpu):
    # a copy there is a memcpy that takes cores from the compute. Checkpoints snapshot in the background
    # only where this is True (hetero.engine.checkpointing).
    copy_engine: bool = True

    def __init__(self) -> None:
        self._module = self._load_device_module()

    # A subclass returns its torch device module, raising AcceleratorUnavailable
    # with a message naming what is missing.
    def _load_device_module(self) -> ModuleType:
        raise NotImplementedError

    @classmethod
    def probe(cls) -> ProbeResult:
        """Is this vendor usable here? Must not initialise a device."""
        raise NotImplementedError

    @property
    def module(self) -> ModuleType:
        """The torch device module behind this accelerator."""
        return self._module

    # Device -----------------------------------------------------------------
    def is_available(self) -> bool:
        return bool(self._module.is_available())

    def device_count(self) -> int:
        return int(self._module.device_count())

    def set_device(self, index: int) -> None:
        self._module.set_device(index)

    def current_device(self) -> int:
        return int(self._module.current_device())

    def device(self, index: int | None = None) -> torch.device:
        """The torch.device for device `index` (default: the current one)."""
        return torch.device(self.device_type, self.current_device() if index is None else index)

    def device_name(self, index: int | None = None) -> str:
        return str(self._module.get_device_name(self._index(index)))

    def synchronize(self, index: int | None = None) -> None:
        self._module.synchronize(self._index(index))

    def properties(self, index: int | None = None) -> dict:
        """The device's properties as plain data (name, total_memory, ...)."""
        props = self._module.get_device_properties(self._index(index))
        return _plain_attributes(props)

    def _index(self, index: int | None) -> int:
        return self.current_device() if index is None else index

    # Streams and events -----------------------------------------------------
    def new_stream(self, priority: int = 0):
        return self._module.Stream(priority=priority)

    def current_stream(self, index: int | None = None):
        return self._module.current_stream(self._index(index))

    def default_stream(self, index: int | None = None):
        return self._module.default_stream(self._index(index))

    def stream(self, stream) -> contextlib.AbstractContextManager:
        """Context manager that makes `stream` current."""
        return self._module.stream(stream)

    def new_event(self, enable_timing: bool = True):
        return self._module.Event(enable_timing=enable_timing)

    # Memory -----------------------------------------------------------------
    def memory_allocated(self, index: int | None = None) -> int:
        return int(self._module.memory_allocated(self._index(index)))

    def memory_reserved(self, index: int | None = None) -> int:
        return int(self._module.memory_reserved(self._index(index)))

    def max_memory_allocated(self, index: int | None = None) -> int:
        """Peak bytes held by tensors on the device since the last reset_peak_memory_stats()."""
        return int(self._module.max_memory_allocated(self._index(index)))

    def reset_peak_memory_stats(self, index: int | None = None) -> None:
        """Start a new peak window: max_memory_allocated() drops to what is allocated now."""
        self._module.reset_peak_memory_stats(self._index(index))

    @property
    def measures_memory(self) -> bool:
        """Whether max_memory_allocated() measures this device (its module has the peak counters);
        metrics record "not measured" rather than a zero where it does not."""
        return all(hasattr(self._module, name) for name in ("max_memory_allocated", "reset_peak_memory_stats"))

    def total_memory(self, index: int | None = None) -> int:
        return int(self._module.get_device_properties(self._index(index)).total_memory)

    def free_memory(self, index: int | None = None) -> int:
        free, _total = self._module.mem_get_info(self._index(index))
        return int(free)

    def empty_cache(self) -> None:
        self._module.empty_cache()

    # RNG --------------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        """Seed the host generator and every device generator of this vendor."""
        torch.manual_seed(seed)
        self._module.manual_seed_all(seed)

    def get_rng_state(self, index: int | None = None) -> torch.Tensor:
        return self._module.get_rng_state(self._index(index))

    def set_rng_state(self, state: torch.Tensor, index: int | None = None) -> None:
        self._module.set_rng_state(state, self._index(index))

    def fork_rng(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        """Restore host and current-device RNG state on exit (for recompute)."""
        return torch.random.fork_rng(
            devices=[self.current_device()], enabled=enabled, device_type=self.device_type
        )

    # Host memory ------------------------------------------------------------
    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        """Page-locked copy of a host tensor, for fast asynchronous transfers."""
        return tensor.pin_memory()

    def to_host(self, tensor: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        """Device-to-host copy (the hook `comm_bridge` stages tensors through)."""
        return tensor.to("cpu", non_blocking=non_blocking)

    def to_device(self, tensor: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        """Host-to-device copy onto the current device (the one copy API into device memory)."""
        return tensor.to(self.device(), non_blocking=non_blocking)

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        """Device-to-host copy of `src` into the existing host tensor `dst` (same shape and dtype): a
        checkpoint's staging buffer, reused save after save instead of fresh pages each time. With
        `non_blocking` and a pinned `dst` the copy is queued on the current stream (torch's documented
        asynchronous D2H copy): `dst` holds the bytes only once an event recorded after it, or the
        stream, is synchronized. Returns `dst`."""
        dst.copy_(src, non_blocking=non_blocking)
        return dst

    # Dtypes -----------------------------------------------------------------
    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return COMMON_DTYPES

    def supports_dtype(self, dtype: torch.dtype) -> bool:
        return dtype in self.supported_dtypes()

    # What the launcher needs ------------------------------------------------
    def visible_devices(self, indices: Iterable[int]) -> dict[str, str]:
        """Environment that restricts a worker to `indices` (empty if not applicable)."""
        if not self.visible_devices_env:
            return {}
        return {self.visible_devices_env: ",".join(str(int(i)) for i in indices)}

    def forwarded_env(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The variables of `environ` (default os.environ) a worker must inherit."""
        source = os.environ if environ is None else environ
        return {k: v for k, v in source.items() if k.startswith(self.env_prefixes)}

    # Fused ops --------------------------------------------------------------
    def kernels(self) -> dict[str, Any]:
        """Vendor kernels for `accelerators.ops`, by op name. Missing ones use the reference."""
        return {}

    # Reporting --------------------------------------------------------------
    def describe(self) -> dict:
        """Identity and devices as plain data, for `hetero env` and logs."""
        info: dict[str, Any] = {
            "vendor": self.vendor,
            "device_type": self.device_type,
            "dist_backend": self.dist_backend,
            "visible_devices_env": self.visible_devices_env,
            "emulated": self.is_emulated,
        }
        try:
            count = self.device_count()
            info["device_count"] = count
            info["devices"] = [self.device_name(i) for i in range(count)]
        except Exception as exc:  # reporting must not fail on a half-working runtime
            info["device_error"] = f"{type(exc).__name__}: {exc}"
        return info

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found normally: forward to the device module.
        if name.startswith("__") or name == "_module":
            raise AttributeError(name)
        module = self.__dict__.get("_module")
        if module is None:
            raise AttributeError(name)
        try:
            return getattr(module, name)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}, nor has its device module"
                f" {getattr(module, '__name__', module)!r}"
            ) from None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} vendor={self.vendor} device_type={self.device_type}>"


class HostEvent:
    """Event for host-only vendors: ops are synchronous, so an event is a timestamp."""

    def __init__(self, enable_timing: bool = True) -> None:
        self._time: float | None = None

    def record(self, stream=None) -> None:
        import time

        self._time = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None

    def wait(self, stream=None) -> None:
        return None

    def elapsed_time(self, end: "HostEvent") -> float:
        """Milliseconds from this event to `end`, like torch.cuda.Event."""
        if self._time is None or end._time is None:
            raise RuntimeError("both events must be recorded before elapsed_time")
        return (end._time - self._time) * 1000.0


def _plain_attributes(obj: Any) -> dict:
    """Public attributes of a properties object that are plain values."""
    out = {}
    for key in dir(obj):
        if key.startswith("_"):
            continue
        try:
            value = getattr(obj, key)
        except Exception:
            continue
        if isinstance(value, (str, int, float, bool)):
            out[key] = value
    return out
