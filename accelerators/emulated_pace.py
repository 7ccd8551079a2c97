"""An emulated chip's pace: the numbers of its spec that time its work (`ChipPace`, a roofline) and
the clocks its queues keep (`VirtualClock`). Split from accelerators.emulated (one concern per module);
its names are importable from there."""

from __future__ import annotations

import threading
import time
from typing import Any, Mapping

import torch

GB = 1e9
TFLOPS = 1e12

# Which spec rate a tensor dtype runs at. The catalog lists no fp64 rate, so
# fp64 (used by gradient checks) runs at the fp32 rate.
_DTYPE_RATE_KEY = {
    torch.float32: "fp32", torch.float64: "fp32",
    torch.float16: "fp16", torch.bfloat16: "bf16",
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _DTYPE_RATE_KEY[getattr(torch, _name)] = "fp8"



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
    the host is doing. `synced_to`: the latest time the host waited for, so
    everything charged to finish by then is known done (the copy engine's
    ordering check reads it).
    """

    def __init__(self) -> None:
        self.ready_at = time.perf_counter()
        self.busy_seconds = 0.0
        self.synced_to = 0.0
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
                self.synced_to = max(self.synced_to, when)
                return
            time.sleep(remaining)

    def wait(self) -> None:
        self.wait_until(self.ready_at)


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

