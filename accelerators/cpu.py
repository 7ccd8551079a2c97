"""Plain host CPU: tensors on `cpu`, collectives on gloo, no device memory to manage."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any
from types import ModuleType

import numpy as np
import torch

from accelerators.base import Accelerator, HostEvent, ProbeResult


class CpuAccelerator(Accelerator):
    vendor = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    startup_seconds = 3.0
    visible_devices_env: str | None = None
    env_prefixes = ("OMP_", "MKL_", "GLOO_")
    copy_engine = False     # a "copy" is a host memcpy competing with the compute for the same cores

    @classmethod
    def probe(cls) -> ProbeResult:
        return ProbeResult(cls.vendor, True, "always available")

    def _load_device_module(self) -> ModuleType:
        return torch.cpu

    # A host has one "device"; index arguments are accepted and ignored.
    def device_count(self) -> int:
        return 1

    def set_device(self, index: int) -> None:
        if index != 0:
            raise ValueError(f"the {self.vendor} accelerator has one device (0), not {index}")

    def current_device(self) -> int:
        return 0

    def device(self, index: int | None = None) -> torch.device:
        return torch.device("cpu")

    def device_name(self, index: int | None = None) -> str:
        return _cpu_model() or platform.processor() or platform.machine() or "cpu"

    def synchronize(self, index: int | None = None) -> None:
        return None  # host ops complete before they return

    def properties(self, index: int | None = None) -> dict:
        return {"name": self.device_name(), "total_memory": self.total_memory(),
                "cpu_count": os.cpu_count() or 1}

    def new_stream(self, priority: int = 0):
        return torch.cpu.Stream()

    def current_stream(self, index: int | None = None):
        return torch.cpu.current_stream()

    def default_stream(self, index: int | None = None):
        return torch.cpu.current_stream()

    def stream(self, stream) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext(stream)

    def new_event(self, enable_timing: bool = True) -> Any:  # HostEvent; subclasses return their own kind
        return HostEvent(enable_timing)

    # Host memory is the OS's business; report it, track nothing.
    def memory_allocated(self, index: int | None = None) -> int:
        return 0

    def memory_reserved(self, index: int | None = None) -> int:
        return 0

    def max_memory_allocated(self, index: int | None = None) -> int:
        return 0

    def reset_peak_memory_stats(self, index: int | None = None) -> None:
        return None

    @property
    def measures_memory(self) -> bool:
        """The plain host keeps no allocator ledger, so its zeros are not a measurement; the
        emulated chip (a subclass) keeps one."""
        return self.is_emulated

    def total_memory(self, index: int | None = None) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def free_memory(self, index: int | None = None) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")

    def empty_cache(self) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def get_rng_state(self, index: int | None = None) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor, index: int | None = None) -> None:
        torch.set_rng_state(state)

    def fork_rng(self, enabled: bool = True) -> contextlib.AbstractContextManager:
        return torch.random.fork_rng(devices=[], enabled=enabled)

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor  # pinning needs a device driver; host memory is already host memory

    def copy_to_host(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        """A host memcpy (nothing to wait for): numpy's single-threaded copy for contiguous tensors,
        not torch's `copy_`, which forks an OpenMP team per tensor above its grain size, and on a busy
        host a team waits for a descheduled thread at each of a shard's copies (a memcpy is
        memory-bound; one core is enough)."""
        host_copy(dst, src)
        return dst

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.float64, torch.float16, torch.bfloat16)

    def describe(self) -> dict:
        info = super().describe()
        info["cpu_count"] = os.cpu_count() or 1
        return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy host tensor `src` into host tensor `dst` (same shape and dtype)."""
    if dst.is_contiguous() and src.is_contiguous() and dst.dtype == src.dtype and dst.shape == src.shape:
        np.copyto(_bytes(dst), _bytes(src.detach()))
    else:
        dst.copy_(src.detach())


def _bytes(tensor: torch.Tensor) -> np.ndarray:
    """A contiguous tensor's bytes as a numpy array (any dtype, bf16 included), no copy."""
    return tensor.reshape(-1).view(torch.uint8).numpy()
