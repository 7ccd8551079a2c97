"""What a rank records while it trains: chip-time clocks and the metrics files.

`ChipClock` gives durations and stamps in the chip's time: an emulated chip may run
dilated (k wall seconds per chip second), and every stamp and duration is divided
alike. `MetricsRecorder` writes `metrics/rank<NNNNN>.jsonl` (one line per micro-batch
action, every rank) and `metrics/steps.jsonl` (one line per step, rank 0 only).
"""

from __future__ import annotations

import json
import os
import time


class ChipClock:
    def __init__(self, dilation: float = 1.0):
        self.dilation = dilation

    def now(self) -> float:
        """Monotonic seconds of chip time, for durations."""
        return time.perf_counter() / self.dilation

    def stamp(self) -> float:
        """Epoch seconds of chip time, for stamps that ranks compare with each other."""
        return time.time() / self.dilation


class MetricsRecorder:
    def __init__(self, run_dir: str | None, rank: int, clock: ChipClock):
        self.clock = clock
        self.timing = _open_jsonl(run_dir, f"metrics/rank{rank:05d}.jsonl")
        self.steps = _open_jsonl(run_dir, "metrics/steps.jsonl") if rank == 0 else None

    def action(self, step, mb, kind, compute, waited, posted, received, sent_at, link) -> None:
        """One line per micro-batch action; the stamps (chip time, alike on every rank) let a reader
        pair a send with its receive."""
        if self.timing:
            self.timing.write(json.dumps({
                "step": step + 1, "mb": mb, "phase": "forward" if kind == "F" else "backward",
                "compute_s": compute, "p2p_wait_s": waited, "posted_at": posted, "received_at": received,
                "sent_at": sent_at, "recv_link": link.kind if link else None}) + "\n")

    def step(self, record: dict) -> None:
        """One step's record (rank 0's file; other ranks write nothing)."""
        if self.steps:
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
