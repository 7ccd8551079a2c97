"""Device staging through real Accelerators: `cpu` and `emulated` (a paced virtual device).

comm_bridge itself never imports accelerators; these tests hand one in, as a
worker does. The emulated device's clock says when the work that produced a
tensor is done, so "the bytes left before the device finished them" is a
checkable ordering, not a timing guess.
"""

import time

import pytest
import torch

from accelerators.cpu import CpuAccelerator
from accelerators.emulated import EmulatedAccelerator
from comm_bridge.staging import Stager

pytestmark = pytest.mark.timeout(60)
# A slow chip: its matmul below takes ~0.25 s of device time, about 100x what the host's
# own matmul costs, so the device is still busy when the test looks even on a loaded host.
CHIP = {"name": "emu-slow", "tflops": {"fp32": 0.0005}, "memory_gb": 0.1, "memory_bandwidth_gbps": 5}


def busy_emulated_result(accel: EmulatedAccelerator, n: int = 400) -> torch.Tensor:
    """A tensor whose producing matmul the virtual device finishes ~0.25 s from now."""
    a = accel.to_device(torch.randn(n, n))
    with accel.device_scope():
        out = a @ a  # 2 n^3 FLOPs at 5e8 FLOP/s
    assert accel.clock.ready_at > time.perf_counter(), "the emulated device should still be busy"
    return out


def test_cpu_accelerator_stages_without_copying():
    stager = Stager(CpuAccelerator())
    x = torch.randn(64, 33)
    staged = stager.to_host(x)
    staged.wait()
    assert staged.ready() and staged.tensor.data_ptr() == x.data_ptr()  # zero-copy on a host device
    view = x.t()
    staged = stager.to_host(view)
    assert staged.tensor.is_contiguous() and torch.equal(staged.tensor, view)
    buf = stager.host_buffer(torch.float16, (3, 5), "cpu")
    assert buf.shape == (3, 5) and buf.dtype == torch.float16
    assert stager.to_device(buf, "cpu") is buf


def test_emulated_d2h_waits_for_the_virtual_device():
    accel = EmulatedAccelerator(CHIP)
    stager = Stager(accel)
    y = busy_emulated_result(accel)
    finished_at = accel.clock.ready_at
    staged = stager.to_host(y)
    staged.wait()
    assert time.perf_counter() >= finished_at  # no byte is handed over before the device made it
    assert staged.ready()
    assert staged.tensor.data_ptr() != y.data_ptr()  # a real D2H copy, in host memory
    assert torch.equal(staged.tensor, y)


@pytest.mark.parametrize("vendor", ["cpu", "emulated"])
def test_endpoint_sends_through_the_accelerator(vendor, connected_endpoints):
    accel = CpuAccelerator() if vendor == "cpu" else EmulatedAccelerator(CHIP)
    a, b = connected_endpoints(token="staging", shm=False, accelerator=accel, default_timeout=30)
    if vendor == "emulated":
        y = busy_emulated_result(accel)
        finished_at = accel.clock.ready_at
    else:
        y = torch.randn(800, 800)
        finished_at = 0.0
    pending = b.irecv(0, 7, device="cpu")
    sent = a.isend(y, 1, 7)
    got = pending.wait(30)
    sent.wait(30)
    assert torch.equal(got, y)
    if vendor == "emulated":
        assert time.perf_counter() >= finished_at
        # The bridge sent the staged copy: the sender may reuse its tensor now.
        y.zero_()
        assert not torch.equal(got, y)
    # A non-contiguous device tensor arrives in logical order.
    view = torch.arange(600.0).reshape(20, 30).t()
    pending = b.irecv(0, 8)
    a.isend(view, 1, 8).wait(30)
    assert torch.equal(pending.wait(30), view)
