"""NVIDIA GPUs through the stock `torch.cuda` module; collectives on NCCL."""

from __future__ import annotations

from types import ModuleType

import torch

from accelerators.base import Accelerator, ProbeResult
from accelerators.errors import AcceleratorUnavailable


class CudaAccelerator(Accelerator):
    vendor = "cuda"
    device_type = "cuda"
    dist_backend = "nccl"
    startup_seconds = 10.0
    visible_devices_env = "CUDA_VISIBLE_DEVICES"
    ray_resource = "GPU"
    env_prefixes = ("CUDA_", "NCCL_", "TORCH_NCCL_", "NVIDIA_", "PYTORCH_CUDA_")

    @classmethod
    def probe(cls) -> ProbeResult:
        if torch.version.cuda is None:
            return ProbeResult(cls.vendor, False, f"torch {torch.__version__} is built without CUDA")
        # is_available() asks the driver for a device count; it creates no CUDA context.
        if not torch.cuda.is_available():
            return ProbeResult(cls.vendor, False, "no CUDA device visible (driver missing or "
                                                  "CUDA_VISIBLE_DEVICES empty)")
        return ProbeResult(cls.vendor, True, f"torch CUDA {torch.version.cuda}, "
                                             f"{torch.cuda.device_count()} device(s)")

    def _load_device_module(self) -> ModuleType:
        found = self.probe()
        if not found.available:
            raise AcceleratorUnavailable(f"accelerator 'cuda' is unavailable: {found.reason}")
        return torch.cuda

    def supported_dtypes(self) -> tuple[torch.dtype, ...]:
        dtypes = [torch.float32, torch.float16]
        if torch.cuda.is_bf16_supported():
            dtypes.append(torch.bfloat16)
        return tuple(dtypes)

    def kernels(self) -> dict:
        from accelerators.ops import vendor

        return vendor.cuda_kernels()
