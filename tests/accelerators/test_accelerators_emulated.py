"""The emulated chip, run for real: virtual clock, waits, events, memory, spec handling.

Only the virtual clock's values and lower bounds on waiting are asserted; no
upper bounds on wall time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import accelerators
from accelerators.emulated import EmulatedAccelerator

# Round numbers make expected costs exact: 1 GFLOP/s fp32, 0.5 GFLOP/s bf16, 1 GB/s.
CHIP = {"name": "unit-chip", "tflops": {"fp32": 0.001, "bf16": 0.0005}, "memory_gb": 0.01,
        "memory_bandwidth_gbps": 1.0, "vendor": "ignored extra key"}


@pytest.fixture
def chip():
    accelerators.reset_accelerator()
    accel = accelerators.get_accelerator("emulated", chip=CHIP)
    yield accel
    accelerators.reset_accelerator()


def test_identity_and_spec(chip):
    assert isinstance(chip, EmulatedAccelerator) and chip.is_emulated
    assert (chip.vendor, chip.device_type, chip.dist_backend) == ("emulated", "cpu", "hetero-strict")
    assert chip.device() == torch.device("cpu")
    assert chip.device_name() == "emulated unit-chip"
    assert chip.total_memory() == 10_000_000
    assert chip.describe()["chip"]["name"] == "unit-chip"


def on_chip(accel, *tensors):
    """The tensors as device memory of `accel` (like loaded weights: counted, not copied or charged)."""
    found = tuple(accel.track(t) for t in tensors)
    return found if len(found) > 1 else found[0]


def test_matmul_is_charged_flops_over_peak(chip):
    a, b = on_chip(chip, torch.randn(64, 32), torch.randn(32, 16))
    with chip.device_scope():
        a @ b
    flops = 2 * 64 * 32 * 16
    assert chip.clock.busy_seconds == pytest.approx(flops / 1e9)


def test_dtype_picks_the_spec_rate(chip):
    a = on_chip(chip, torch.randn(64, 64, dtype=torch.bfloat16))
    with chip.device_scope():
        a @ a
    assert chip.clock.busy_seconds == pytest.approx(2 * 64 ** 3 / 0.5e9)


def test_elementwise_is_charged_bytes_over_bandwidth(chip):
    x = on_chip(chip, torch.randn(1000))
    with chip.device_scope():
        x + x
        x.view(10, 100)  # a view moves nothing
    assert chip.clock.busy_seconds == pytest.approx(3 * 4000 / 1e9)


def test_an_in_place_op_that_returns_nothing_is_charged_what_it_writes(chip):
    """The foreach and fused optimizer ops write their arguments and return nothing: the chip
    charges the tensors their schema says they write, as it charges an op's outputs."""
    xs = [on_chip(chip, torch.randn(1000)) for _ in range(2)]
    with chip.device_scope():
        torch._foreach_add_(xs, 1.0)
    assert chip.clock.busy_seconds == pytest.approx(2 * 2 * 4000 / 1e9)   # each read and written


def test_adamw_is_one_fused_pass(chip):
    """The emulated chip runs AdamW as the vendors do, one kernel: it reads the parameter, the
    gradient and both moments and writes them (the schema marks the gradients written too, for a
    grad scale): 32 bytes per fp32 parameter, where the reference's eight ops moved about 90."""
    from accelerators import ops

    p, g, m, v = (on_chip(chip, torch.randn(10_000)) for _ in range(4))
    ops.adamw_step(p, g, m, v, step=1, lr=1e-3, weight_decay=0.1)
    assert chip.clock.busy_seconds == pytest.approx(32 * 10_000 / 1e9, rel=0.01)


def test_backward_is_charged_too(chip):
    x, w = on_chip(chip, torch.randn(8, 16), torch.randn(16, 4, requires_grad=True))
    with chip.device_scope():
        y = x @ w
        forward = chip.clock.busy_seconds
        y.backward(torch.ones_like(y))
    backward = chip.clock.busy_seconds - forward
    # grad_w = x^T @ grad_y costs as much as the forward matmul, plus small elementwise ops
    assert backward >= 2 * 8 * 16 * 4 / 1e9


def test_attention_flops_are_counted(chip):
    q = on_chip(chip, torch.randn(1, 2, 16, 8))
    with chip.device_scope():
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    # two (16x8)@(8x16)-sized matmuls per head
    assert chip.clock.busy_seconds >= 2 * (2 * 16 * 16 * 8) * 2 / 1e9


def test_synchronize_waits_for_the_virtual_clock(chip):
    chip.account(flops=0.05e9)  # 50 ms of device work
    start = time.perf_counter()
    chip.synchronize()
    assert time.perf_counter() - start >= 0.045  # lower bound only
    assert time.perf_counter() >= chip.clock.ready_at


def test_events_measure_virtual_time_and_wait(chip):
    start, end = chip.new_event(), chip.new_event()
    start.record()
    chip.account(flops=0.03e9)
    end.record()
    assert end.elapsed_time(start) < 0 < start.elapsed_time(end)
    assert start.elapsed_time(end) == pytest.approx(30.0, abs=1.0)
    end.synchronize()
    assert time.perf_counter() >= end.time and end.query()


def test_a_blocking_collective_queues_after_the_work_before_it(chip):
    """Charged from its issue, after the 40 ms already queued: 40 + 20 ms on one queue, as NCCL's stream."""
    start = chip.new_event()
    start.record()
    chip.account(flops=0.04e9)
    chip.charge_collective(0.02, time.perf_counter())
    end = chip.new_event()
    end.record()
    assert start.elapsed_time(end) == pytest.approx(60.0, abs=2.0)


def test_device_to_host_copies_wait(chip):
    x = on_chip(chip, torch.full((4,), 2.0))
    chip.account(flops=0.02e9)
    host = chip.to_host(x)
    assert time.perf_counter() >= chip.clock.ready_at
    assert torch.equal(host, x) and host.data_ptr() != x.data_ptr()
    chip.account(flops=0.02e9)
    with chip.device_scope():
        value = x.sum().item()  # .item() reads device memory
    assert time.perf_counter() >= chip.clock.ready_at and value == 8.0


def test_memory_is_accounted_and_freed(chip):
    assert chip.memory_allocated() == 0
    with chip.device_scope():
        x = torch.zeros(1000)
        view = x.view(10, 100)  # shares storage: not counted twice
        y = x + 1
    assert chip.memory_allocated() == 8000
    assert chip.max_memory_allocated() == 8000
    del x, view
    assert chip.memory_allocated() == 4000
    del y
    assert chip.memory_allocated() == 0 and chip.max_memory_allocated() == 8000
    chip.reset_peak_memory_stats()
    assert chip.max_memory_allocated() == 0
    assert chip.free_memory() == chip.total_memory()


def test_out_of_memory_names_chip_and_capacity(chip):
    with pytest.raises(accelerators.EmulatedOutOfMemory, match=r"unit-chip.*memory_gb=0.01"):
        with chip.device_scope():
            torch.zeros(3_000_000)  # 12 MB > 10 MB
    assert chip.memory_allocated() == 0


def test_explicit_tracking_of_outside_tensors(chip):
    weights = chip.track(torch.zeros(500))
    assert chip.memory_allocated() == 2000
    del weights
    assert chip.memory_allocated() == 0


def test_ops_are_charged_without_an_explicit_scope(chip):
    x, w = on_chip(chip, torch.randn(4, 64), torch.ones(64))
    y = accelerators.ops.rms_norm(x, w, 1e-6)
    assert chip.clock.busy_seconds > 0
    assert accelerators.ops.kernel_sources()["rms_norm"] == "emulated"
    torch.testing.assert_close(y, accelerators.ops.reference.rms_norm(x, w, 1e-6))


def test_streams_are_one_queue(chip):
    stream = chip.new_stream()
    with chip.stream(stream):
        chip.account(flops=0.01e9)
        event = stream.record_event()
    stream.synchronize()
    assert stream.query() and event.query()


def test_rng(chip):
    chip.manual_seed(5)
    a = torch.rand(2)
    chip.manual_seed(5)
    assert torch.equal(torch.rand(2), a)


def test_chip_from_env(monkeypatch):
    monkeypatch.setenv("HETERO_EMULATED_CHIP", json.dumps(CHIP))
    assert EmulatedAccelerator().pace.name == "unit-chip"


def test_missing_chip_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("HETERO_EMULATED_CHIP", raising=False)
    with pytest.raises(accelerators.AcceleratorUnavailable, match="HETERO_EMULATED_CHIP"):
        EmulatedAccelerator()


@pytest.mark.parametrize("change, message", [
    ({"tflops": {}}, "tflops"),
    ({"memory_gb": 0}, "memory_gb"),
    ({"memory_bandwidth_gbps": "fast"}, "memory_bandwidth_gbps"),
])
def test_bad_chip_spec_names_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        EmulatedAccelerator({**CHIP, **change})


def test_time_dilation_stretches_every_charge():
    plain = EmulatedAccelerator(CHIP)
    stretched = EmulatedAccelerator(CHIP, time_dilation=3.0)
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    for accel in (plain, stretched):
        on_chip(accel, a, b)
        with accel.device_scope():
            (a @ b).relu()
    assert plain.clock.busy_seconds > 0
    assert stretched.clock.busy_seconds == pytest.approx(3.0 * plain.clock.busy_seconds)
    assert (plain.time_dilation, stretched.time_dilation) == (1.0, 3.0)
    assert stretched.describe()["time_dilation"] == 3.0 and "time_dilation" not in plain.describe()


def test_dilated_events_measure_the_chip_s_time():
    stretched = EmulatedAccelerator(CHIP, time_dilation=3.0)
    a = on_chip(stretched, torch.randn(256, 256))
    stretched.account(flops=3e8)        # 0.9 s of queued work: the host's gap before the matmul is hidden
    start = stretched.new_event()
    start.record()
    with stretched.device_scope():
        a @ a                                   # 33.6 ms of the chip's time, 101 ms of wall time
    end = stretched.new_event()
    end.record()
    assert end.time - start.time == pytest.approx(3.0 * 2 * 256 ** 3 / 1e9)
    assert start.elapsed_time(end) == pytest.approx(2 * 256 ** 3 / 1e6)


def test_time_dilation_from_env(monkeypatch):
    monkeypatch.setenv("HETERO_EMULATED_TIME_DILATION", "2.5")
    assert EmulatedAccelerator(CHIP).pace.seconds(1e9, 0, torch.float32) == pytest.approx(2.5)


@pytest.mark.parametrize("raw", ["fast", "0.5", "0", "-2", "inf", "nan"])
def test_bad_time_dilation_is_a_clear_error(monkeypatch, raw):
    monkeypatch.setenv("HETERO_EMULATED_TIME_DILATION", raw)
    with pytest.raises(accelerators.AcceleratorUnavailable, match="HETERO_EMULATED_TIME_DILATION.*>= 1"):
        EmulatedAccelerator(CHIP)


def test_dist_backend_is_hetero_strict_unless_the_launcher_names_gloo(monkeypatch):
    monkeypatch.delenv("HETERO_BACKEND", raising=False)
    assert EmulatedAccelerator(CHIP).dist_backend == "hetero-strict"
    monkeypatch.setenv("HETERO_BACKEND", "gloo")                 # the island says backend: gloo
    assert EmulatedAccelerator(CHIP).dist_backend == "gloo"


def test_the_chip_s_backend_is_ready_for_init_process_group_even_if_accelerators_came_first():
    script = ("import json, sys\n"
              "import accelerators\n"
              "assert 'torch' not in sys.modules\n"
              "accel = accelerators.get_accelerator('emulated', chip=json.loads(sys.argv[1]))\n"
              "import torch.distributed as dist\n"
              "dist.init_process_group(accel.dist_backend, store=dist.HashStore(), rank=0, world_size=1)\n"
              "print(dist.get_backend())\n"
              "dist.destroy_process_group()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HETERO_BACKEND", "HETERO_EMULATED_STRICT")}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(CHIP)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hetero-strict"
