"""The cpu accelerator's surface, run for real."""

from __future__ import annotations

import pytest
import torch

import accelerators
from accelerators.cpu import CpuAccelerator


@pytest.fixture
def cpu():
    accelerators.reset_accelerator()
    yield accelerators.get_accelerator("cpu")
    accelerators.reset_accelerator()


def test_identity(cpu):
    assert (cpu.vendor, cpu.device_type, cpu.dist_backend) == ("cpu", "cpu", "gloo")
    assert cpu.visible_devices_env is None and not cpu.is_emulated


def test_device(cpu):
    assert cpu.device_count() == 1
    assert cpu.device() == torch.device("cpu")
    assert isinstance(cpu.device_name(), str) and cpu.device_name()
    cpu.set_device(0)
    with pytest.raises(ValueError, match="one device"):
        cpu.set_device(1)
    cpu.synchronize()
    props = cpu.properties()
    assert props["total_memory"] > 0 and props["cpu_count"] >= 1


def test_streams_and_events(cpu):
    stream = cpu.new_stream()
    with cpu.stream(stream):
        start, end = cpu.new_event(), cpu.new_event()
        start.record()
        torch.ones(100).sum()
        end.record()
    end.synchronize()
    assert end.query()
    assert start.elapsed_time(end) >= 0.0
    with pytest.raises(RuntimeError, match="recorded"):
        cpu.new_event().elapsed_time(end)


def test_memory_reports_host(cpu):
    assert cpu.memory_allocated() == 0 and cpu.max_memory_allocated() == 0
    assert 0 < cpu.free_memory() <= cpu.total_memory()
    cpu.reset_peak_memory_stats()
    cpu.empty_cache()


def test_rng_seed_state_and_fork(cpu):
    cpu.manual_seed(123)
    first = torch.rand(3)
    cpu.manual_seed(123)
    assert torch.equal(torch.rand(3), first)
    state = cpu.get_rng_state()
    a = torch.rand(3)
    cpu.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
    before = cpu.get_rng_state()
    with cpu.fork_rng():
        torch.rand(10)
    assert torch.equal(cpu.get_rng_state(), before)


def test_host_memory_helpers(cpu):
    t = torch.arange(4.0)
    assert cpu.pin_memory(t) is t
    host = cpu.to_host(t)
    assert torch.equal(host, t)
    assert cpu.supports_dtype(torch.float32) and cpu.supports_dtype(torch.bfloat16)
    assert not cpu.supports_dtype(torch.int8)


def test_passthrough_to_device_module(cpu):
    assert cpu.is_available() is True
    assert cpu.get_capabilities is torch.cpu.get_capabilities  # not wrapped: forwarded
    with pytest.raises(AttributeError, match="device module"):
        _ = cpu.no_such_thing


def test_describe(cpu):
    info = cpu.describe()
    assert info["vendor"] == "cpu" and info["device_count"] == 1 and info["emulated"] is False
    assert isinstance(accelerators.current_accelerator(), CpuAccelerator)
