"""Emulated chips keep a real device's memory contract: device memory apart from host memory,
copies charged at the host link, capacity net of the reserve enforced with torch's
out-of-memory error, and (strict mode) host tensors and a skipped set_device refused.

Only virtual-clock charges (busy_seconds) are asserted, never wall time.
"""

from __future__ import annotations

import pytest
import torch

import accelerators
from accelerators.emulated import STRICT_ENV, VISIBLE_ENV, EmulatedAccelerator
from accelerators.errors import DeviceContractError

pytestmark = pytest.mark.timeout(60)

# 1 GFLOP/s, 1 GB/s memory, 0.5 GB/s host link; 10 MB of memory of which 2 MB are reserved.
CHIP = {"name": "link-chip", "tflops": {"fp32": 0.001}, "memory_gb": 0.01, "memory_bandwidth_gbps": 1.0,
        "host_link_gbps": 0.5, "memory_reserve_gb": 0.002}
LINK = 0.5e9   # bytes per second


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(STRICT_ENV, raising=False)
    monkeypatch.delenv(VISIBLE_ENV, raising=False)


def chip(**options) -> EmulatedAccelerator:
    return EmulatedAccelerator(CHIP, **options)


# -- the host link -------------------------------------------------------------------------------

def test_to_device_makes_device_memory_and_charges_bytes_over_the_host_link():
    accel = chip()
    host = torch.arange(250_000, dtype=torch.float32)            # 1e6 bytes
    device = accel.to_device(host)
    assert accel.clock.busy_seconds == pytest.approx(1e6 / LINK)  # 2 ms of the chip's time
    assert accel.is_device_memory(device) and not accel.is_device_memory(host)
    assert accel.memory_allocated() == 1_000_000
    assert torch.equal(device, host) and device.data_ptr() != host.data_ptr()
    assert accel.to_device(device) is device                     # already on the device: no copy
    assert accel.clock.busy_seconds == pytest.approx(1e6 / LINK)


def test_to_host_charges_the_host_link_and_a_blocking_copy_waits():
    accel = chip()
    device = accel.to_device(torch.ones(125_000))                # 5e5 bytes
    before = accel.clock.busy_seconds
    host = accel.to_host(device)
    assert accel.clock.busy_seconds - before == pytest.approx(5e5 / LINK)
    import time
    assert time.perf_counter() >= accel.clock.ready_at
    assert torch.equal(host, device) and not accel.is_device_memory(host)


def test_a_non_blocking_copy_is_queued_and_an_event_after_it_waits_for_it():
    accel = chip()
    device = accel.to_device(torch.ones(250_000))
    copy_done = accel.clock.ready_at
    host = accel.to_host(device, non_blocking=True)
    assert accel.clock.ready_at >= copy_done + 1e6 / LINK
    event = accel.new_event()
    event.record()
    event.synchronize()
    import time
    assert time.perf_counter() >= event.time >= copy_done + 1e6 / LINK and torch.equal(host, device)


def test_a_spec_without_host_link_copies_at_its_memory_bandwidth():
    spec = {key: value for key, value in CHIP.items() if key != "host_link_gbps"}
    accel = EmulatedAccelerator(spec)
    assert accel.pace.host_link_gbps == 1.0
    accel.to_device(torch.ones(250_000))
    assert accel.clock.busy_seconds == pytest.approx(1e6 / 1e9)
    assert accel.properties()["host_link_gbps"] == 1.0 and accel.describe()["chip"]["host_link_gbps"] == 1.0


@pytest.mark.parametrize("change, message", [
    ({"host_link_gbps": 0}, "host_link_gbps"),
    ({"host_link_gbps": "pcie"}, "host_link_gbps"),
    ({"memory_reserve_gb": 0.01}, "memory_reserve_gb"),
    ({"memory_reserve_gb": -1}, "memory_reserve_gb"),
])
def test_bad_link_or_reserve_names_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        EmulatedAccelerator({**CHIP, **change})


# -- capacity ------------------------------------------------------------------------------------

def test_capacity_is_memory_less_reserve_and_oom_is_torch_s_error():
    accel = chip()
    assert accel.total_memory() == 8_000_000                     # 10 MB - 2 MB reserved
    with accel.device_scope():
        kept = torch.zeros(1_500_000)                            # 6 MB: fits
        with pytest.raises(torch.OutOfMemoryError) as raised:
            torch.zeros(750_000)                                 # 3 MB more: 9 MB > 8 MB
    error = raised.value
    assert isinstance(error, RuntimeError) and isinstance(error, accelerators.EmulatedOutOfMemory)
    assert (error.chip, error.requested, error.in_use, error.capacity) == ("link-chip", 3_000_000, 6_000_000,
                                                                           8_000_000)
    assert "memory_reserve_gb=0.002" in str(error) and "link-chip" in str(error)
    assert accel.memory_allocated() == kept.nbytes


def test_a_copy_past_capacity_is_out_of_memory_too():
    accel = chip()
    with pytest.raises(torch.OutOfMemoryError):
        accel.to_device(torch.zeros(2_250_000))                  # 9 MB > 8 MB
    assert accel.memory_allocated() == 0


def test_empty_allocations_in_the_scope_are_device_memory():
    accel = chip()
    with accel.device_scope():
        buffer = torch.empty(1000)
    assert accel.is_device_memory(buffer) and accel.memory_allocated() == 4000
    assert accel.clock.busy_seconds == 0                         # allocating moves no bytes


# -- strict mode: host tensors -------------------------------------------------------------------

def test_strict_mode_is_on_by_default_and_reads_the_environment(monkeypatch):
    assert chip().strict and not chip().strict_warns             # HETERO_EMULATED_STRICT unset
    host = torch.ones(4, 4)
    with chip().device_scope(), pytest.raises(DeviceContractError, match="reads a host tensor"):
        host + 1
    monkeypatch.setenv(STRICT_ENV, "0")
    assert not chip().strict
    with chip().device_scope():
        host + 1                                                 # host tensors pass when not strict
    assert not chip(strict=False).strict
    monkeypatch.setenv(STRICT_ENV, "1")
    assert chip().strict and not chip().strict_warns
    monkeypatch.setenv(STRICT_ENV, "warn")
    assert chip().strict and chip().strict_warns
    monkeypatch.setenv(STRICT_ENV, "maybe")
    with pytest.raises(accelerators.AcceleratorUnavailable, match=f"{STRICT_ENV} must be 1, 0 or warn"):
        chip()


def test_strict_refuses_a_host_tensor_in_a_device_op():
    accel = chip(strict=True)
    weight = accel.to_device(torch.randn(32, 16))
    host = torch.randn(64, 32)
    with accel.device_scope():
        with pytest.raises(DeviceContractError, match=r"aten\.mm\.default reads a host tensor \(shape \(64, 32\)"
                                                      r".*accelerator\.to_device"):
            host @ weight


def test_strict_accepts_the_same_data_moved_by_to_device_and_charges_the_link():
    accel = chip(strict=True)
    weight = accel.to_device(torch.randn(32, 16))
    host = torch.randn(64, 32)
    before = accel.clock.busy_seconds
    moved = accel.to_device(host)
    assert accel.clock.busy_seconds - before == pytest.approx(host.nbytes / LINK)   # 8192 B: 16.4 us
    before = accel.clock.busy_seconds
    with accel.device_scope():
        out = moved @ weight
        scaled = out * torch.tensor(2.0)                         # a 0-dim host scalar is allowed
    assert accel.clock.busy_seconds - before >= 2 * 64 * 32 * 16 / 1e9
    torch.testing.assert_close(scaled, 2 * (host @ weight))


def test_strict_copy_between_host_and_device_memory_is_a_charged_transfer():
    accel = chip(strict=True)
    host, other_host = torch.randn(1000), torch.zeros(1000)
    with accel.device_scope():
        device = torch.empty(1000)
        before = accel.clock.busy_seconds
        device.copy_(host)                                       # H2D by copy_: allowed
        assert accel.clock.busy_seconds - before == pytest.approx(4000 / LINK)
        with pytest.raises(DeviceContractError, match=r"aten\.copy_"):
            other_host.copy_(host)                               # host to host is no device op
    assert torch.equal(device, host)


def test_warn_mode_reports_each_site_once_and_carries_on(capsys):
    accel = chip(strict=True)
    accel.strict_warns = True
    host = torch.ones(3, 4)
    with accel.device_scope():
        for _ in range(3):
            out = host + 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strict-mode violation at tests/accelerators/test_emulated_memory.py:" in err[0]
    assert "aten.add.Tensor reads a host tensor" in err[0] and torch.equal(out, host + 1)


# -- strict mode: set_device ---------------------------------------------------------------------

def test_visible_devices_come_from_the_launcher_variable(monkeypatch):
    accel = chip()
    assert accel.device_count() == 1 and accel.visible_devices([2, 3]) == {VISIBLE_ENV: "2,3"}
    monkeypatch.setenv(VISIBLE_ENV, "2,3")
    assert accel.device_count() == 2
    accel.set_device(1)
    assert accel.current_device() == 1
    with pytest.raises(ValueError, match=r"sees 2 device\(s\).*not 2"):
        accel.set_device(2)


def test_strict_catches_device_work_before_set_device(monkeypatch):
    monkeypatch.setenv(VISIBLE_ENV, "0,1")
    accel = chip(strict=True)
    for work in (lambda: accel.device_scope().__enter__(), lambda: accel.to_device(torch.ones(2)),
                 accel.synchronize):
        with pytest.raises(DeviceContractError, match=r"before set_device, with 2 devices visible"):
            work()
    accel.set_device(1)
    with accel.device_scope():
        accel.to_device(torch.ones(2)) + 1
    accel.synchronize()


def test_one_visible_device_or_no_strict_needs_no_set_device(monkeypatch):
    with chip(strict=True).device_scope():
        torch.zeros(2)
    monkeypatch.setenv(VISIBLE_ENV, "0,1")
    with chip(strict=False).device_scope():
        torch.zeros(2)
