"""Selection: names(), probe order, HETERO_ACCELERATOR, entry points, clear errors."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest
import torch

import accelerators
from accelerators import registry
from accelerators.base import Accelerator, ProbeResult
from accelerators.cpu import CpuAccelerator
from tests.fakes.vendors import Recorder, install_ascend, install_kunlun


pytestmark = pytest.mark.usefixtures("fresh_accelerator")  # no accelerator chosen before or after


def test_names_lists_builtins_and_imports_nothing_heavy():
    code = (
        "import sys, accelerators\n"
        "print(','.join(accelerators.names()))\n"
        "heavy = [m for m in ('torch', 'torch_npu', 'torch_xmlir') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    listed, heavy = done.stdout.splitlines()[0], done.stdout.splitlines()[1:]
    assert listed.split(",")[:5] == ["cuda", "ascend", "kunlun", "cpu", "emulated"]
    assert heavy in ([], [""])


def test_probe_order_puts_masquerading_vendors_before_cuda():
    order = accelerators.probe_order()
    assert order.index("ascend") < order.index("cuda")
    assert order.index("kunlun") < order.index("cuda")
    assert order[-1] == "cpu"
    assert "emulated" not in order


def test_default_selection_on_this_machine_is_cpu_with_reasons():
    accel = accelerators.get_accelerator()
    assert isinstance(accel, CpuAccelerator)
    assert accelerators.get_accelerator() is accel  # one per process
    probes = {p.name: p for p in accelerators.probe_all()}
    assert not probes["ascend"].available and "torch_npu" in probes["ascend"].reason
    assert not probes["kunlun"].available and "torch_xmlir" in probes["kunlun"].reason
    assert probes["cpu"].available


def test_env_var_overrides_probe(monkeypatch):
    monkeypatch.setenv(registry.SELECT_ENV, "emulated")
    monkeypatch.setenv("HETERO_EMULATED_CHIP",
                       '{"name": "envchip", "tflops": {"fp32": 1}, "memory_gb": 1, '
                       '"memory_bandwidth_gbps": 10}')
    accel = accelerators.get_accelerator()
    assert accel.vendor == "emulated" and accel.pace.name == "envchip"
    assert registry.select_name() == ("emulated", f"{registry.SELECT_ENV}=emulated")


def test_asked_for_but_missing_says_what_is_missing_never_falls_back():
    with pytest.raises(accelerators.AcceleratorUnavailable, match="torch_npu is not installed"):
        accelerators.get_accelerator("ascend")
    with pytest.raises(accelerators.AcceleratorUnavailable, match="torch_xmlir"):
        accelerators.get_accelerator("kunlun")
    with pytest.raises(accelerators.AcceleratorUnavailable, match="CUDA"):
        accelerators.get_accelerator("cuda")
    assert registry._current is None  # nothing was selected instead


def test_env_var_naming_unavailable_vendor_raises(monkeypatch):
    monkeypatch.setenv(registry.SELECT_ENV, "ascend")
    with pytest.raises(accelerators.AcceleratorUnavailable, match="torch_npu"):
        accelerators.get_accelerator()


def test_unknown_name_lists_known_ones():
    with pytest.raises(accelerators.UnknownAccelerator, match="known: cuda, ascend, kunlun, cpu, emulated"):
        accelerators.get_accelerator("tpu")


def test_ascend_without_cann_names_cann(monkeypatch):
    install_ascend(monkeypatch, Recorder())
    for var in ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("accelerators.ascend.CANN_DEFAULT_PATH", "/nonexistent/Ascend")
    with pytest.raises(accelerators.AcceleratorUnavailable, match="CANN"):
        accelerators.get_accelerator("ascend")


def test_fake_ascend_is_probed_first_and_drives_npu(monkeypatch):
    recorder = Recorder()
    install_ascend(monkeypatch, recorder)
    accel = accelerators.get_accelerator()
    assert accel.vendor == "ascend"
    assert (accel.device_type, accel.dist_backend, accel.visible_devices_env) == (
        "npu", "hccl", "ASCEND_RT_VISIBLE_DEVICES")
    accel.set_device(1)
    assert accel.current_device() == 1
    assert accel.device_name() == "Ascend910B (fake)"
    assert accel.memory_allocated() == 1234 and accel.free_memory() == 1000
    assert accel.get_device_capability() == (9, 9)  # passthrough to torch.npu
    accel.manual_seed(7)
    assert ("set_device", (1,), {}) in recorder.calls
    assert ("manual_seed_all", (7,), {}) in recorder.calls
    assert accel.visible_devices([2, 3]) == {"ASCEND_RT_VISIBLE_DEVICES": "2,3"}


def test_kunlun_detected_by_import_before_cuda(monkeypatch):
    install_kunlun(monkeypatch, Recorder())
    accel = accelerators.get_accelerator()
    assert accel.vendor == "kunlun"
    # torch_xmlir presents itself as cuda and BKCL as nccl
    assert (accel.device_type, accel.dist_backend) == ("cuda", "nccl")
    assert accel.visible_devices([0, 5]) == {"XPU_VISIBLE_DEVICES": "0,5"}
    assert accel.module is torch.cuda
    assert accel.device(3) == torch.device("cuda", 3)


def test_kunlun_is_not_detected_from_torch_cuda_alone(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert registry.probe("kunlun").available is False


class _PluginAccelerator(CpuAccelerator):
    vendor = "plugchip"

    @classmethod
    def probe(cls):
        return ProbeResult(cls.vendor, True, "plugin says yes")


class _FakeEntryPoint:
    name = "plugchip"

    def load(self):
        return _PluginAccelerator


def test_entry_point_vendor_is_named_probed_before_cuda_and_selected(monkeypatch):
    def entry_points(group=None):
        assert group == registry.ENTRY_POINT_GROUP
        return [_FakeEntryPoint()]

    monkeypatch.setattr(metadata, "entry_points", entry_points)
    assert accelerators.names()[-1] == "plugchip"
    order = accelerators.probe_order()
    assert order.index("kunlun") < order.index("plugchip") < order.index("cuda")
    accel = accelerators.get_accelerator()
    assert isinstance(accel, _PluginAccelerator)
    assert isinstance(accel, Accelerator)


def test_launcher_env_forwarding():
    accel = accelerators.get_accelerator("cpu")
    env = {"OMP_NUM_THREADS": "2", "GLOO_SOCKET_IFNAME": "lo", "HOME": "/root"}
    assert accel.forwarded_env(env) == {"OMP_NUM_THREADS": "2", "GLOO_SOCKET_IFNAME": "lo"}
    assert accel.visible_devices([0]) == {}


def test_backends_table_agrees_with_the_classes():
    for name in ("cuda", "ascend", "kunlun", "cpu", "emulated"):
        listed = accelerators.backends(name)
        assert listed[0] == registry.accelerator_class(name).dist_backend
        assert "gloo" in listed
    assert accelerators.backends("kunlun") == ["nccl", "gloo"]  # BKCL under the nccl name
    assert accelerators.backends("emulated") == ["hetero-strict", "gloo"]   # the strict contract by default
    with pytest.raises(accelerators.UnknownAccelerator):
        accelerators.backends("tpu")


def test_plugin_backends_come_from_its_class(monkeypatch):
    monkeypatch.setattr(metadata, "entry_points", lambda group=None: [_FakeEntryPoint()])
    assert accelerators.backends("plugchip") == ["gloo"]
