"""What a rank records while it trains: chip-time clocks and the metrics files.

`ChipClock` gives durations and stamps in the chip's time: an emulated chip may run
dilated (k wall seconds per chip second), and every stamp and duration is divided
alike. `PeakMemory` measures each step's peak device memory and gathers it per stage.
`MetricsRecorder` writes `metrics/rank<NNNNN>.jsonl` (one line per micro-batch
action, every rank) and `metrics/steps.jsonl` (one line per step, rank 0 only).
"""

from __future__ import annotations

import json
import os
import time

import torch

GB = 1e9                 # the plan's unit (partitioner.plan.StagePlan.memory_gb)
NOT_MEASURED = -1.0      # a slot from a rank whose accelerator keeps no device-memory counters


class ChipClock:
    def __init__(self, dilation: float = 1.0):
        self.dilation = dilation

    def now(self) -> float:
        """Monotonic seconds of chip time, for durations."""
        return time.perf_counter() / self.dilation

    def stamp(self) -> float:
        """Epoch seconds of chip time, for stamps that ranks compare with each other."""
        return time.time() / self.dilation


class PeakMemory:
    """One rank's peak device memory per step, and the fleet's per stage.

    A step's window runs from its start to its loss sum (compute, 1F1B, gradient
    reductions), and also covers the previous step's update (clip, optimizer, freeing
    the gradients): the update runs after the sum, so its peak is carried to the next
    one. Checkpoint writes, between the update and the next step, fall outside.

    Gathering costs no extra collective: the trainer's fleet-wide loss sum carries a
    world-size vector in which each rank writes its peak (GB) into its own slot, so the
    sum is every rank's peak, and rank 0 takes each stage's maximum (`stage_maxima`).
    At 8,192 ranks that adds 64 KB (float64) to a sum that already crosses the fleet,
    and one vectorised scatter on rank 0; a separate max would add a collective round.
    Ranks whose accelerator keeps no counters (the plain host: `measures_memory` is
    False) write NOT_MEASURED, and a stage with no measured rank reports None.
    """

    def __init__(self, accelerator, plan, rank: int):
        self.accel = accelerator
        self.rank = rank
        self.world = plan.world_size
        self.stages = len(plan.stages)
        self.stage_of = torch.tensor([r.stage for r in sorted(plan.ranks, key=lambda r: r.rank)])
        self.measures = _measures(accelerator)
        self._update_peak = 0       # bytes: the previous step's update, carried to this step's sum

    def step_started(self) -> None:
        if self.measures:
            self.accel.reset_peak_memory_stats()

    def slots(self) -> torch.Tensor:
        """A float64 world-size vector, zero but for this rank's peak of the step so far (GB), for the
        fleet-wide sum; the update's window starts here."""
        vector = torch.zeros(self.world, dtype=torch.float64)
        if not self.measures:
            vector[self.rank] = NOT_MEASURED
            return vector
        vector[self.rank] = max(int(self.accel.max_memory_allocated()), self._update_peak) / GB
        self.accel.reset_peak_memory_stats()
        return vector

    def update_done(self) -> None:
        """After the optimizer step and before any checkpoint write: the update's peak."""
        if self.measures:
            self._update_peak = int(self.accel.max_memory_allocated())

    def per_stage(self, summed: torch.Tensor) -> list[float | None]:
        return stage_maxima(summed, self.stage_of, self.stages)


def _measures(accelerator) -> bool:
    """Whether the accelerator's peak counters work here: it says it has them, and they answer (a
    vendor build may stub them; a metric must not stop training)."""
    if not getattr(accelerator, "measures_memory", False):
        return False
    try:
        accelerator.reset_peak_memory_stats()
        accelerator.max_memory_allocated()
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


def stage_maxima(slots: torch.Tensor, stage_of: torch.Tensor, stages: int) -> list[float | None]:
    """Per stage, the largest slot of its ranks (slot r is rank r's; `stage_of[r]` its stage);
    None for a stage none of whose ranks measured."""
    if slots.numel() != stage_of.numel():
        raise ValueError(f"{slots.numel()} peak-memory slots for {stage_of.numel()} ranks")
    best = torch.full((stages,), NOT_MEASURED, dtype=torch.float64)
    best = best.scatter_reduce(0, stage_of, slots.to(torch.float64), reduce="amax")
    return [round(float(v), 9) if v >= 0 else None for v in best]


class MetricsRecorder:
    def __init__(self, run_dir: str | None, rank: int, clock: ChipClock, peaks: PeakMemory | None = None):
        self.clock = clock
        self.peaks = peaks
        self.timing = _open_jsonl(run_dir, f"metrics/rank{rank:05d}.jsonl")
        self.steps = _open_jsonl(run_dir, "metrics/steps.jsonl") if rank == 0 else None

    def action(self, step, mb, kind, compute, waited, posted, received, sent_at, link, chunk=None) -> None:
        """One line per micro-batch action; the stamps (chip time, alike on every rank) let a reader
        pair a send with its receive. `chunk`: the model chunk it ran (interleaved 1F1B only)."""
        if self.timing:
            self.timing.write(json.dumps({
                "step": step + 1, "mb": mb, "phase": "forward" if kind == "F" else "backward",
                "compute_s": compute, "p2p_wait_s": waited, "posted_at": posted, "received_at": received,
                "sent_at": sent_at, "recv_link": link.kind if link else None,
                **({} if chunk is None else {"chunk": chunk})}) + "\n")

    def step(self, record: dict, peak_slots: torch.Tensor | None = None) -> None:
        """One step's record (rank 0's file; other ranks write nothing). `peak_slots`: the fleet-wide
        sum of PeakMemory.slots(), recorded as `peak_memory_gb` (one entry per plan stage)."""
        if self.steps:
            if self.peaks is not None and peak_slots is not None:
                record["peak_memory_gb"] = self.peaks.per_stage(peak_slots)
            if self.clock.dilation != 1.0:
                record["time_dilation"] = self.clock.dilation
            self.steps.write(json.dumps(record) + "\n")
            self.steps.flush()

    def close(self) -> None:
        for handle in (self.timing, self.steps):
            if handle:
                handle.close()


def _open_jsonl(run_dir: str | None, relative: str):
    if not run_dir:
        return None
    path = os.path.join(run_dir, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "a", encoding="utf-8")
