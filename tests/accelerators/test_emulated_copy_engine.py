"""The emulated chip's device->host copy engine (accelerators.emulated_streams): a copy on a side stream
is charged on the engine's own clock while compute goes on; it is ordered after the compute that wrote
its source only through an event (strict mode refuses it otherwise, as CUDA would race); a non-blocking
copy's bytes land only once something waits for it (until then strict mode's buffer holds NaN); device
work writing its source or touching its host buffer waits for it, reading its source does not. And the
capability every accelerator declares (`copy_engine`) picks background or synchronous snapshots."""

from __future__ import annotations

import time

import pytest
import torch

import accelerators
from accelerators.cpu import CpuAccelerator
from accelerators.cuda import CudaAccelerator
from accelerators.emulated import EmulatedAccelerator
from accelerators.errors import DeviceContractError
from hetero.engine.checkpointing import background_snapshots

# 1 GFLOP/s and 1 GB/s of memory bandwidth; a 0.01 GB/s host link: a 1 MB copy is 0.1 s of the chip.
CHIP = {"name": "copy-chip", "tflops": {"fp32": 0.001}, "memory_gb": 0.1, "memory_bandwidth_gbps": 1.0,
        "host_link_gbps": 0.01}
MB = 1 << 18        # float32 elements in 1 MiB


@pytest.fixture
def chip():
    return EmulatedAccelerator(CHIP, strict=True)


def written_on_chip(chip, n=MB):
    """A device tensor written by device work (its last write is on the compute queue)."""
    source = chip.track(torch.zeros(n))
    with chip.device_scope():
        source.add_(torch.tensor(1.0))
    return source


def side_after_compute(chip):
    """A side stream ordered after everything queued on the compute queue so far."""
    side = chip.new_stream()
    side.wait_stream(chip.current_stream())
    return side


def test_a_copy_on_a_side_stream_is_charged_on_the_engine_and_compute_goes_on(chip):
    source = written_on_chip(chip)
    side = side_after_compute(chip)
    compute_busy, buffer = chip.clock.busy_seconds, torch.empty(MB)
    with chip.stream(side):
        chip.copy_to_host(buffer, source, non_blocking=True)
    assert chip.copies.clock.busy_seconds == pytest.approx(chip.pace.copy_seconds(source.nbytes))
    assert chip.clock.busy_seconds == compute_busy                    # nothing charged on the compute queue
    other = chip.track(torch.ones(64, 64))
    with chip.device_scope():
        other @ other                                               # compute beside the copy
    assert chip.clock.ready_at < chip.copies.clock.ready_at           # did not wait for the copy
    chip.synchronize()
    assert torch.equal(buffer, source)


def test_a_non_blocking_copy_lands_only_once_waited_for_and_strict_mode_poisons_the_buffer(chip):
    source = written_on_chip(chip)
    side = side_after_compute(chip)
    for wait in ("stream", "event", "device"):
        buffer = torch.zeros(MB)
        with chip.stream(side):
            chip.copy_to_host(buffer, source, non_blocking=True)
            done = side.record_event()
        assert torch.isnan(buffer).all()                            # read before the wait: garbage, not the bytes
        {"stream": side.synchronize, "event": done.synchronize, "device": chip.synchronize}[wait]()
        assert time.perf_counter() >= chip.copies.clock.ready_at and torch.equal(buffer, source), wait


def test_a_side_stream_copy_must_follow_the_write_of_its_source(chip):
    source = written_on_chip(chip)
    with chip.stream(chip.new_stream()), pytest.raises(DeviceContractError, match="not known done"):
        chip.copy_to_host(torch.empty(MB), source, non_blocking=True)
    written = chip.new_event()
    written.record()                                                # after the write, on the compute queue
    side = chip.new_stream()
    with chip.stream(side):
        written.wait(side)
        chip.copy_to_host(torch.empty(MB), source, non_blocking=True)
    assert chip.copies.clock.ready_at >= written.time + chip.pace.copy_seconds(source.nbytes)


def test_without_strict_mode_the_copy_is_ordered_after_the_write_instead():
    chip = EmulatedAccelerator(CHIP, strict=False)
    source = chip.track(torch.zeros(MB))
    chip.account(flops=5e8)                                         # 0.5 s of compute before the write
    with chip.device_scope():
        source.add_(torch.tensor(1.0))
    written_done = chip.clock.ready_at
    with chip.stream(chip.new_stream()):
        chip.copy_to_host(torch.empty(MB), source, non_blocking=True)
    assert chip.copies.clock.ready_at >= written_done + chip.pace.copy_seconds(source.nbytes)


def test_device_work_writing_the_source_waits_for_the_copy_and_reading_it_does_not(chip):
    source = written_on_chip(chip)
    expected = source.clone()
    side, buffer = side_after_compute(chip), torch.empty(MB)
    with chip.stream(side):
        chip.copy_to_host(buffer, source, non_blocking=True)
    copy_done = chip.copies.clock.ready_at
    with chip.device_scope():
        source * 2                                                  # a read: no hazard
    assert chip.clock.ready_at < copy_done and chip.copies.active()
    with chip.device_scope():
        source.add_(torch.tensor(5.0))                              # a write: follows the copy
    assert chip.clock.ready_at >= copy_done and not chip.copies.active()
    assert torch.equal(buffer, expected)                            # the bytes from before the write


def test_device_work_reading_the_host_buffer_waits_for_the_copy(chip):
    source = written_on_chip(chip)
    side, buffer = side_after_compute(chip), torch.empty(MB)
    with chip.stream(side):
        chip.copy_to_host(buffer, source, non_blocking=True)
    copy_done = chip.copies.clock.ready_at
    back = chip.track(torch.empty(MB))
    with chip.device_scope():
        back.copy_(buffer)                                          # host -> device of the staging buffer
    assert chip.clock.ready_at >= copy_done and torch.equal(back, source)


def test_a_blocking_copy_on_a_side_stream_waits_for_the_engine_only(chip):
    source = written_on_chip(chip)
    side, buffer = side_after_compute(chip), torch.empty(MB)
    chip.account(flops=2e9)                                         # 2 s of compute queued after the write
    with chip.stream(side):
        chip.copy_to_host(buffer, source)
    assert torch.equal(buffer, source) and time.perf_counter() < chip.clock.ready_at


def test_a_copy_on_the_compute_queue_stays_in_order_with_compute(chip):
    source = written_on_chip(chip)
    chip.account(flops=1e8)
    queued = chip.clock.ready_at
    buffer = torch.zeros(MB)
    chip.copy_to_host(buffer, source, non_blocking=True)
    assert chip.clock.ready_at == pytest.approx(queued + chip.pace.copy_seconds(source.nbytes))
    assert chip.copies.clock.busy_seconds == 0 and torch.isnan(buffer).all()
    chip.current_stream().synchronize()
    assert torch.equal(buffer, source)


def test_the_copy_engine_capability_picks_background_snapshots():
    assert (CpuAccelerator.copy_engine, CudaAccelerator.copy_engine, EmulatedAccelerator.copy_engine) == (
        False, True, True)
    cpu = accelerators.get_accelerator("cpu")
    assert background_snapshots(cpu) is False and background_snapshots(EmulatedAccelerator(CHIP)) is True
    assert background_snapshots(cpu, True) is True and background_snapshots(EmulatedAccelerator(CHIP), False) is False


def test_to_host_on_a_side_stream_runs_on_the_one_engine_behind_its_earlier_copies(chip):
    source = written_on_chip(chip)
    busy_side, side = side_after_compute(chip), side_after_compute(chip)
    with chip.stream(busy_side):
        chip.copy_to_host(torch.empty(MB), source, non_blocking=True)       # 0.1 s on the engine
        chip.copy_to_host(torch.empty(MB), source, non_blocking=True)
    compute_busy, engine_busy = chip.clock.busy_seconds, chip.copies.clock.busy_seconds
    with chip.stream(side):
        host = chip.to_host(source[:1024], non_blocking=True)
        done = side.record_event()
    assert chip.clock.busy_seconds == compute_busy
    assert chip.copies.clock.busy_seconds == pytest.approx(engine_busy + chip.pace.copy_seconds(4096))
    assert done.time == pytest.approx(chip.copies.clock.ready_at)             # queued behind the engine's copies
    assert torch.equal(host, source[:1024])
