"""Measured peak memory: each rank's peak in its own slot of the loss sum, rank 0's per-stage
maximum, the windows a step's peak covers, and every vendor's peak counters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import accelerators
from accelerators.base import Accelerator
from accelerators.cpu import CpuAccelerator
from accelerators.emulated import EmulatedAccelerator
from tests.fakes.vendors import Recorder, install_ascend, install_kunlun
from hetero.engine.metrics import GB, NOT_MEASURED, PeakMemory, stage_maxima
from partitioner.plan import RankPlan

CHIP = {"name": "peak-chip", "tflops": {"fp32": 100.0}, "memory_gb": 1.0, "memory_bandwidth_gbps": 1000.0,
        "host_link_gbps": 100.0}


class Ledger:
    """An accelerator whose counters the test drives: `use(n)` allocates n bytes for a moment."""

    measures_memory = True

    def __init__(self, held: int = 0):
        self.held, self.peak, self.resets = held, held, 0

    def use(self, nbytes: int) -> None:
        self.peak = max(self.peak, self.held + nbytes)

    def max_memory_allocated(self) -> int:
        return self.peak

    def reset_peak_memory_stats(self) -> None:
        self.resets += 1
        self.peak = self.held


class Plan:
    """The two fields PeakMemory reads: ranks (rank -> stage) and stages."""

    def __init__(self, stage_of_rank: list[int]):
        self.ranks = tuple(RankPlan(r, "i", r, 0, 0, s, 0, 0) for r, s in enumerate(stage_of_rank))
        self.stages = tuple(range(max(stage_of_rank) + 1))
        self.world_size = len(stage_of_rank)


pytestmark = pytest.mark.usefixtures("fresh_accelerator")  # no accelerator chosen before or after


# -- the per-stage maximum from slot vectors ---------------------------------------------------
def test_stage_maxima_takes_each_stage_s_largest_slot():
    # hetero-DP: pipeline 0 has stages 0 (ranks 0, 1: TP2) and 1 (rank 2); pipeline 1 is stage 2 (rank 3)
    stage_of = torch.tensor([0, 0, 1, 2])
    slots = torch.tensor([0.25, 0.5, 0.125, 0.75], dtype=torch.float64)
    assert stage_maxima(slots, stage_of, 3) == [0.5, 0.125, 0.75]


def test_a_stage_that_cannot_measure_is_none_and_zero_is_a_measurement():
    stage_of = torch.tensor([0, 1, 1, 2])
    slots = torch.tensor([NOT_MEASURED, 0.0, 0.3, NOT_MEASURED], dtype=torch.float64)
    assert stage_maxima(slots, stage_of, 3) == [None, 0.3, None]
    with pytest.raises(ValueError, match="3 peak-memory slots for 4 ranks"):
        stage_maxima(slots[:3], stage_of, 3)


def test_summed_slots_of_every_rank_give_the_per_stage_maximum():
    """What the fleet sum does: every rank's vector added up (in float32 too, where a device lacks
    float64), rank 0 reads the maxima. Plan ranks listed out of order on purpose."""
    plan = Plan([1, 0, 0, 1, 2])
    plan.ranks = tuple(reversed(plan.ranks))
    peaks = [300_000_000, 120_000_000, 80_000_000, 310_000_000, 5_000_000]   # bytes, by rank
    vectors = []
    for rank, nbytes in enumerate(peaks):
        meter = PeakMemory(Ledger(held=nbytes), plan, rank)
        meter.step_started()
        vector = meter.slots()
        assert int((vector != 0).sum()) == 1 and float(vector[rank]) == nbytes / GB
        vectors.append(vector)
    total = torch.stack(vectors).sum(0)
    assert meter.per_stage(total) == [0.12, 0.31, 0.005]
    assert meter.per_stage(total.to(torch.float32)) == pytest.approx([0.12, 0.31, 0.005], rel=1e-6)


# -- the windows ---------------------------------------------------------------------------------
def test_a_step_s_peak_covers_its_compute_and_the_previous_update_not_checkpoints():
    ledger = Ledger(held=100)
    meter = PeakMemory(ledger, Plan([0]), 0)

    meter.step_started()
    ledger.use(50)                    # step 1: forward/backward
    assert float(meter.slots()[0]) * GB == 150
    ledger.use(80)                    # step 1: optimizer update, after the sum
    meter.update_done()
    ledger.use(500)                   # checkpoint write between steps: outside every window

    meter.step_started()
    ledger.use(20)                    # step 2: compute below step 1's update
    assert float(meter.slots()[0]) * GB == 180     # the update carried into step 2's sum
    ledger.use(10)
    meter.update_done()
    meter.step_started()
    ledger.use(60)
    assert float(meter.slots()[0]) * GB == 160     # step 3: its own compute
    assert ledger.resets >= 5


def test_counters_that_fail_are_not_measured():
    class Stubbed(Ledger):
        def max_memory_allocated(self):
            raise RuntimeError("memory stats are not supported on this device")

    meter = PeakMemory(Stubbed(), Plan([0, 1]), 1)
    assert not meter.measures
    meter.step_started()
    assert meter.slots().tolist() == [0.0, NOT_MEASURED]
    assert not PeakMemory(object(), Plan([0]), 0).measures   # no counters at all


# -- vendors' counters ------------------------------------------------------------------------------
def recording_counters(recorder: Recorder, peak) -> dict:
    return {"max_memory_allocated": lambda index=None: recorder.add("max_memory_allocated", (index,), {}) or peak,
            "reset_peak_memory_stats": lambda index=None: recorder.add("reset_peak_memory_stats", (index,), {})}


def test_base_counters_name_the_current_device_and_return_whole_bytes():
    recorder = Recorder()
    module = type("Module", (), {"current_device": staticmethod(lambda: 3),
                                 **{k: staticmethod(v) for k, v in recording_counters(recorder, np.int64(4096)).items()}})

    class Vendor(Accelerator):          # what cuda.py adds to the base is identity only
        def _load_device_module(self):
            return module

    accel = Vendor()
    assert accel.measures_memory
    accel.reset_peak_memory_stats()
    peak = accel.max_memory_allocated()
    assert peak == 4096 and type(peak) is int
    assert accel.max_memory_allocated(1) == 4096
    assert recorder.calls == [("reset_peak_memory_stats", (3,), {}), ("max_memory_allocated", (3,), {}),
                              ("max_memory_allocated", (1,), {})]


def test_ascend_counters_go_to_torch_npu_on_the_selected_device(monkeypatch):
    recorder = Recorder()
    install_ascend(monkeypatch, recorder)
    for name, function in recording_counters(recorder, 7.0e9).items():   # a float from the vendor
        monkeypatch.setattr(torch.npu, name, function, raising=False)
    accel = accelerators.get_accelerator()
    assert accel.vendor == "ascend" and accel.measures_memory
    accel.set_device(1)
    meter = PeakMemory(accel, Plan([0, 1]), 1)
    meter.step_started()
    assert meter.slots().tolist() == [0.0, 7.0]
    assert ("reset_peak_memory_stats", (1,), {}) in recorder.calls
    assert ("max_memory_allocated", (1,), {}) in recorder.calls


def test_a_vendor_module_without_peak_counters_is_not_measured(monkeypatch):
    install_ascend(monkeypatch, Recorder())         # the fake torch.npu has no reset_peak_memory_stats
    accel = accelerators.get_accelerator()
    assert not accel.measures_memory
    assert PeakMemory(accel, Plan([0]), 0).slots().tolist() == [NOT_MEASURED]


def test_kunlun_counters_go_through_torch_cuda(monkeypatch):
    recorder = Recorder()
    install_kunlun(monkeypatch, recorder)
    for name, function in recording_counters(recorder, 2_000_000_000).items():
        monkeypatch.setattr(torch.cuda, name, function)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    accel = accelerators.get_accelerator()
    assert accel.vendor == "kunlun" and accel.measures_memory
    meter = PeakMemory(accel, Plan([0]), 0)
    meter.step_started()
    assert meter.slots().tolist() == [2.0]
    assert recorder.named("max_memory_allocated")[-1] == ((2,), {})


def test_the_host_does_not_measure_and_the_emulated_chip_does():
    assert not CpuAccelerator().measures_memory
    chip = EmulatedAccelerator(CHIP, strict=False)
    chip.set_device(0)
    meter = PeakMemory(chip, Plan([0]), 0)
    assert chip.measures_memory and meter.measures
    meter.step_started()
    with chip.device_scope():
        block = torch.zeros(250_000)                 # 1 MB of device memory
    del block
    assert float(meter.slots()[0]) >= 1e-3
