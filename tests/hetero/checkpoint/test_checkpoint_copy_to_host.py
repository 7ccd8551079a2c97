"""A checkpoint's device->host copy goes through the accelerator's copy_to_host into the reused
staging buffers: the emulated chip charges its host link for it exactly as for `to_host` (on the queue
of the current stream: its compute queue, or its copy engine for a side stream's copy), a blocking copy waits for the device and a
non-blocking one does not; a device source is copied asynchronously into pinned buffers and the
save synchronizes once (a recording fake of a CUDA-like accelerator); and the trainer's saves are
charged for every byte of the shard they write."""

import dataclasses
import os
import time
from types import SimpleNamespace

import pytest
import torch

import accelerators
from accelerators.base import Accelerator
from hetero.checkpoint import staging as staging_module
from hetero.config import load_job
from hetero.config.train import CheckpointConfig
from hetero.engine import checkpoint as ckpt
from hetero.engine.solo import train_solo
from tests.conftest import FIXTURES

CONFIG = os.path.join(FIXTURES, "engine", "two-islands.yaml")
# 1 GB/s on the host link: a 4 MB copy is 4 ms of the chip's time; compute is fast.
SLOW_LINK = {"name": "link-chip", "tflops": {"fp32": 0.001}, "memory_gb": 1.0, "memory_bandwidth_gbps": 1.0}
TRAINING = {"name": "train-chip", "tflops": {"fp32": 100.0}, "memory_gb": 1.0, "memory_bandwidth_gbps": 1000.0,
            "host_link_gbps": 0.5}


@pytest.fixture
def chip():
    accelerators.reset_accelerator()
    yield accelerators.get_accelerator("emulated", chip=SLOW_LINK, strict=True)
    accelerators.reset_accelerator()


def test_copy_to_host_is_charged_as_to_host_and_a_blocking_one_waits(chip):
    device = chip.to_device(torch.arange(1 << 20, dtype=torch.float32))    # 4 MB of device memory
    before = chip.clock.busy_seconds
    chip.to_host(device)
    by_to_host = chip.clock.busy_seconds - before
    buffer = torch.empty_like(device)
    before = chip.clock.busy_seconds
    assert chip.copy_to_host(buffer, device) is buffer
    assert chip.clock.busy_seconds - before == pytest.approx(by_to_host) == pytest.approx(4 * (1 << 20) / 1e9)
    assert time.perf_counter() >= chip.clock.ready_at and torch.equal(buffer, device)
    assert not chip.is_device_memory(buffer)


def test_a_non_blocking_copy_only_queues_and_a_host_source_is_free_in_strict_mode(chip):
    device = chip.to_device(torch.ones(1024))
    chip.account(flops=1e9)                       # one second of device work ahead of the copy
    chip.copy_to_host(torch.empty(1024), device, non_blocking=True)
    assert time.perf_counter() < chip.clock.ready_at          # the host did not wait for the chip
    chip.synchronize()
    before = chip.clock.busy_seconds
    chip.copy_to_host(torch.empty(1024), torch.ones(1024))
    assert chip.clock.busy_seconds == before


def test_staging_copies_through_the_chip_and_is_charged_like_to_host(chip):
    tensors = [chip.to_device(torch.randn(256, 64)), chip.to_device(torch.randn(1000))]
    staging = ckpt.Staging(chip)
    before = chip.clock.busy_seconds
    copies = [staging.begin().copy(tensors[0]), staging.copy(tensors[1])]
    staging.finish()
    expected = sum(chip.pace.copy_seconds(t.nbytes) for t in tensors)
    assert chip.clock.busy_seconds - before == pytest.approx(expected)
    assert all(torch.equal(c, t) and not chip.is_device_memory(c) for c, t in zip(copies, tensors))


class RecordingDevice(Accelerator):
    """A CUDA-like accelerator (its tensors on a non-host device) that records the copy API's calls."""

    vendor, device_type = "recording", "meta"

    def __init__(self):
        super().__init__()
        self.calls = []

    def _load_device_module(self):
        return None

    def copy_to_host(self, dst, src, non_blocking=False):
        self.calls.append(("copy_to_host", tuple(dst.shape), src.device.type, non_blocking))
        return dst

    def current_stream(self, index=None):
        return SimpleNamespace(synchronize=lambda: self.calls.append(("synchronize",)))


def test_a_device_source_is_copied_asynchronously_into_pinned_buffers_then_synchronized(monkeypatch):
    made = []

    def host_buffer(shape, dtype, pin):
        made.append(pin)
        return torch.empty(shape, dtype=dtype)          # this host has no CUDA to pin with

    monkeypatch.setattr(staging_module, "_host_buffer", host_buffer)
    device = RecordingDevice()
    staging = ckpt.Staging(device)
    staging.begin().copy(torch.empty(3, 4, device="meta"))
    staging.copy(torch.empty(5, device="meta"))
    assert device.calls == [("copy_to_host", (3, 4), "meta", True), ("copy_to_host", (5,), "meta", True)]
    staging.finish()
    assert device.calls[-1] == ("synchronize",) and made == [True, True]
    staging.begin().copy(torch.empty(3, 4, device="meta"))          # the same buffer again: nothing new
    staging.finish()
    assert made == [True, True] and device.calls[-1] == ("synchronize",)


def test_the_base_copy_to_host_queues_a_non_blocking_copy_into_the_given_buffer():
    class Dst:
        def __init__(self):
            self.calls = []

        def copy_(self, src, non_blocking=False):
            self.calls.append((src, non_blocking))

    dst, src = Dst(), object()
    assert Accelerator.copy_to_host(RecordingDevice(), dst, src, non_blocking=True) is dst
    assert dst.calls == [(src, True)]


def test_the_trainer_s_saves_are_charged_for_every_byte_they_write(tmp_path):
    accelerators.reset_accelerator()
    chip = accelerators.get_accelerator("emulated", chip=TRAINING, strict=True)
    try:
        job = load_job(model=CONFIG, train=CONFIG)
        train = dataclasses.replace(job.train, checkpoint=CheckpointConfig(str(tmp_path / "ckpt"), 1))
        charged, original = [], chip.copy_to_host

        def busy():         # both queues: the compute queue's and the copy engine's (a side stream's copies)
            return chip.clock.busy_seconds + chip.copies.clock.busy_seconds

        def spy(dst, src, non_blocking=False):
            before = busy()
            out = original(dst, src, non_blocking)
            charged.append((src.nbytes, busy() - before))
            return out

        chip.copy_to_host = spy
        train_solo(chip, job.model, train, str(tmp_path / "run"), steps=2)
    finally:
        accelerators.reset_accelerator()
    path = os.path.join(ckpt.latest(str(tmp_path / "ckpt")), ckpt.data_file(0))
    with open(path, "rb") as handle:
        header = 8 + int.from_bytes(handle.read(8), "little")
    copied = sum(nbytes for nbytes, _ in charged)
    assert copied == 2 * (os.path.getsize(path) - header)          # two saves, every byte of each
    assert sum(seconds for _, seconds in charged) >= chip.pace.copy_seconds(copied) * 0.999
