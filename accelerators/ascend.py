"""Huawei Ascend NPUs through torch_npu (device type `npu`); collectives on HCCL.

torch_npu needs the CANN toolkit at runtime; importing it without CANN fails,
so the probe only looks for the package and the toolkit, and the import
happens when the accelerator is built.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from accelerators.base import Accelerator, ProbeResult
from accelerators.errors import AcceleratorUnavailable

# Where CANN's set_env.sh puts the toolkit, and its default install prefix.
CANN_ENV_VARS = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")
CANN_DEFAULT_PATH = "/usr/local/Ascend"


def cann_location() -> str | None:
    for var in CANN_ENV_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return CANN_DEFAULT_PATH if os.path.isdir(CANN_DEFAULT_PATH) else None


class AscendAccelerator(Accelerator):
    vendor = "ascend"
    device_type = "npu"
    dist_backend = "hccl"
    startup_seconds = 20.0
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"
    ray_resource = "NPU"        # Ray's built-in Ascend resource (it sets ASCEND_RT_VISIBLE_DEVICES)
    env_prefixes = ("ASCEND_", "HCCL_", "ACL_", "CANN_", "TASK_QUEUE_ENABLE", "PYTORCH_NPU_")

    @classmethod
    def probe(cls) -> ProbeResult:
        if importlib.util.find_spec("torch_npu") is None:
            return ProbeResult(cls.vendor, False, "torch_npu is not installed")
        cann = cann_location()
        if cann is None:
            return ProbeResult(cls.vendor, False, "torch_npu is installed but the CANN toolkit is "
                                                  "not found (source CANN's set_env.sh)")
        return ProbeResult(cls.vendor, True, f"torch_npu installed, CANN at {cann}")

    def _load_device_module(self) -> ModuleType:
        found = self.probe()
        if not found.available:
            raise AcceleratorUnavailable(f"accelerator 'ascend' is unavailable: {found.reason}")
        try:
            self.torch_npu = importlib.import_module("torch_npu")
        except Exception as exc:  # a broken CANN install surfaces as any error here
            raise AcceleratorUnavailable(
                f"accelerator 'ascend' is unavailable: importing torch_npu failed ({exc}); "
                "check that the CANN toolkit matches torch_npu"
            ) from exc
        npu = getattr(torch, "npu", None)
        if npu is None or not npu.is_available():
            raise AcceleratorUnavailable(
                "accelerator 'ascend' is unavailable: torch_npu loaded but sees no NPU "
                "(check the driver and ASCEND_RT_VISIBLE_DEVICES)"
            )
        return npu

    def kernels(self) -> dict:
        from accelerators.ops import vendor

        return vendor.ascend_kernels(self.torch_npu)
