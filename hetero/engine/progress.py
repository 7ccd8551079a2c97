"""Progress stamps: what this worker's training loop is doing right now, and since when.

The coordinator heartbeat runs in its own thread and keeps beating while the loop is
stuck, so it cannot tell a hung rank from a busy one. The loop itself therefore stamps
its progress here (the step, the micro-batch, the phase: forward, backward, bridge
send/receive, island collective, bridge all-reduce, optimizer, checkpoint), and a
reporter thread (hetero.launch.progress_report) sends the newest stamp to the head,
whose watchdog (hetero.launch.watchdog) declares the job hung when no rank's stamp
has moved for --hang-timeout. A stamp is a few assignments: no lock (the reporter only
reads; a torn read is corrected by the next report), no I/O.

Imports nothing heavy: the schedule, the comms and the worker bootstrap all use it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

# Test hook: "RANK:STEP:MARKER": global rank RANK stops moving when step STEP (0-based) begins,
# once (while the file MARKER does not exist; it makes it), as a loop stuck in C code would; its
# threads (heartbeat, progress report) go on.
HANG_HOOK = "HETERO_TEST_HANG_AT"
START = "start"          # before the training loop's first stamp (building, loading): never called hung
DONE = "done"            # the loop has finished (waiting for the others to finish too)
PHASES = (START, "forward", "backward", "bridge send", "bridge receive", "island collective",
          "bridge all-reduce", "optimizer", "checkpoint", DONE)


class Stamp:
    """The newest progress of this process: read by the reporter thread."""

    __slots__ = ("step", "micro_batch", "phase", "since", "moves")

    def __init__(self):
        self.step = -1            # the step being trained (0-based), -1 before the first
        self.micro_batch = -1     # the micro-batch of the current action, -1 outside one
        self.phase = START
        self.since = time.time()  # epoch seconds when `phase` began
        self.moves = 0            # how many stamps so far: any change means progress

    def snapshot(self) -> dict:
        return {"step": self.step, "micro_batch": self.micro_batch, "phase": self.phase,
                "since": self.since, "moves": self.moves}


STAMP = Stamp()
FINISHED = threading.Event()   # set with the `done` stamp: the reporter sends it at once (the process may exit soon)


def stamp(phase: str, micro_batch: int | None = None) -> None:
    """Enter `phase` (one of PHASES), for `micro_batch` when given."""
    if micro_batch is not None:
        STAMP.micro_batch = micro_batch
    STAMP.phase, STAMP.since = phase, time.time()
    STAMP.moves += 1
    if phase == DONE:
        FINISHED.set()


def step(number: int) -> None:
    """Step `number` (0-based) begins."""
    STAMP.step, STAMP.micro_batch = number, -1
    STAMP.moves += 1
    if _HANG_AT is not None and _HANG_AT[:2] == (os.environ.get("HETERO_GLOBAL_RANK"), str(number)):
        _hang_here(_HANG_AT[2])


def _hang_here(marker: str) -> None:
    if os.path.exists(marker):
        return
    with open(marker, "w", encoding="utf-8"):
        pass
    while True:
        time.sleep(1.0)


_HANG_AT = tuple(os.environ[HANG_HOOK].split(":", 2)) if os.environ.get(HANG_HOOK) else None


@contextlib.contextmanager
def during(phase: str):
    """Stamp `phase` for the block, then go back to the phase it interrupted (a bridge receive
    inside a forward: the forward goes on after it)."""
    before = STAMP.phase
    stamp(phase)
    try:
        yield
    finally:
        stamp(before)
