"""Baidu Kunlun XPUs through torch_xmlir.

torch_xmlir takes over `torch.cuda`: tensors live on device type `cuda`,
`torch.cuda.is_available()` is true, and the collective library BKCL is
registered under the `nccl` backend name. That is why it must be detected by
import (find_spec) and probed *before* CUDA, never by torch.cuda.is_available().
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

from accelerators.base import Accelerator, ProbeResult
from accelerators.errors import AcceleratorUnavailable


class KunlunAccelerator(Accelerator):
    vendor = "kunlun"
    device_type = "cuda"      # what torch_xmlir presents itself as
    dist_backend = "nccl"     # BKCL under the nccl name
    startup_seconds = 15.0
    visible_devices_env = "XPU_VISIBLE_DEVICES"
    ray_resource = "kunlun_xpu"   # a custom resource: start Ray nodes with --resources '{"kunlun_xpu": 8}'
    env_prefixes = ("XPU_", "BKCL_", "XMLIR_", "XPUAPI_", "XRE_")

    @classmethod
    def probe(cls) -> ProbeResult:
        if importlib.util.find_spec("torch_xmlir") is None:
            return ProbeResult(cls.vendor, False, "torch_xmlir is not installed")
        return ProbeResult(cls.vendor, True, "torch_xmlir installed")

    def _load_device_module(self) -> ModuleType:
        found = self.probe()
        if not found.available:
            raise AcceleratorUnavailable(f"accelerator 'kunlun' is unavailable: {found.reason}")
        try:
            self.torch_xmlir = importlib.import_module("torch_xmlir")
        except Exception as exc:
            raise AcceleratorUnavailable(
                f"accelerator 'kunlun' is unavailable: importing torch_xmlir failed ({exc}); "
                "check the XPU runtime (XRE) installation"
            ) from exc
        if not torch.cuda.is_available():
            raise AcceleratorUnavailable(
                "accelerator 'kunlun' is unavailable: torch_xmlir loaded but sees no XPU "
                "(check the driver and XPU_VISIBLE_DEVICES)"
            )
        self.kunlun_ops = _optional_module("kunlun_ops")
        return torch.cuda

    def kernels(self) -> dict:
        from accelerators.ops import vendor

        return vendor.kunlun_kernels(self.kunlun_ops)


def _optional_module(name: str) -> ModuleType | None:
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)
