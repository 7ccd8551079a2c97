"""`hetero-strict` on a chip with a device clock: collectives and sends keep NCCL's stream order.

**A blocking collective occupies the compute stream.**

NCCL and HCCL enqueue a collective on the caller's stream: it starts after the work queued
before it and the work queued after it starts after it, so a blocking collective in the
middle of a layer (tensor parallelism's all-reduces) adds its time to the step. gloo runs it
on the host at once, on data the emulated chip's host has already computed, so without this
the collective would hide under the device time still queued before it: TP would look free.

For a blocking collective (torch says so in the options' `asyncOp`) on an accelerator that
keeps a device clock (`charge_collective`: the emulated chip), the collective is waited for
here and its host seconds are charged to the compute queue from when it was issued. An
asynchronous one (`async_op=True`: the engine's DP reduction overlapping the backward) runs
on NCCL's own stream beside compute and is charged nothing. Host communication is not
time-dilated, so the charge is its wall seconds (accelerators/emulated.py, "Time dilation"). It
includes any wait for a peer that calls later, as an NCCL kernel waits for its peers. The
charge is exact where the hosts of a group run equally far ahead of their chips (the ranks of
one island do the same work on the same chip: TP's all-reduces, an island's bucket exchange); a
host that waited for its chip first would stay exact otherwise, but leave the chip idle while
it issues the next op after every collective, a gap a real host, running ahead, never shows.

**gloo's host work is not the chip's.** gloo copies inputs into its buffers and results back
into the caller's tensors (as the work completes, in whichever thread waits). Under the
emulated chip's dispatch mode those copies would be charged at the chip's memory bandwidth,
work NCCL's kernels never do (for a 1.5 MB bucket's reduce-scatter on emu-slow, about 20 ms).
Every collective is issued and waited for outside the dispatch modes (`HostWork`). The one
copy the memory model counts, the full vector gloo stages for ZeRO-1's reduce-scatter and
all-gather, is counted explicitly (`staging`).

**A send leaves after the work queued before it.** NCCL's send runs on the stream, so its
data cannot reach the peer before the sender's chip has computed it; the emulated chip's host
holds the values as soon as it issues the ops. A send therefore records when the sender's
compute queue will have run what was issued before it (`queue_ready_at`), and the pair's stream
hands it to gloo no earlier (`wait_for_queue`, on the stream's thread: the host runs on).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import _disable_current_modes


def queue_ready_at() -> float:
    """When the current accelerator's compute queue will have run what was issued so far
    (perf_counter seconds), 0 where it keeps no clock (real chips order sends themselves)."""
    from accelerators import registry

    ready = getattr(registry._current, "queue_ready_at", None)  # pylint: disable=protected-access  # never select one here
    return float(ready()) if ready is not None else 0.0


def wait_for_queue(ready_at: float) -> None:
    """Sleep until perf_counter reaches `ready_at` (a send's data is computed by then)."""
    while (remaining := ready_at - time.perf_counter()) > 0:
        time.sleep(remaining)


def on_compute_stream(opts: Any, start: Callable[[], dist.Work], staged_bytes: int = 0) -> dist.Work:
    """Run `start()` (the gloo collective); a blocking one is waited for and charged to the device.
    `staged_bytes`: the full vector gloo stages once more (see `staging`), counted until it is done."""
    from accelerators import registry

    charge = getattr(registry._current, "charge_collective", None)  # pylint: disable=protected-access  # never select one here
    blocking = charge is not None and not getattr(opts, "asyncOp", True)
    stage = staging(staged_bytes)
    issued_at = time.perf_counter()
    with _disable_current_modes():
        work = start()
    if not blocking or charge is None:    # (charge is set when blocking; said again for the type checker)
        return HostWork(work, stage)
    with _disable_current_modes():
        work.wait()
    charge(time.perf_counter() - issued_at, issued_at)  # pylint: disable=not-callable  # None returned above
    return HostWork(work)   # torch waits for it again


def staging(nbytes: int) -> torch.Tensor | None:
    """gloo stages a full vector once more for reduce_scatter_tensor (its input) and
    all_gather_into_tensor (its output). Outside the dispatch modes the emulated chip no longer
    sees that copy, so it is counted here, as device memory held until the collective is done:
    the memory model's ZeRO-1 staging (partitioner/costs.py, optimizer_phases) expects it. NCCL
    and HCCL work in place; on a chip that counts no memory this is nothing."""
    from accelerators import registry

    track = getattr(registry._current, "track", None)  # pylint: disable=protected-access  # never select one here
    if track is None or nbytes <= 0:
        return None
    return track(torch.empty(nbytes, dtype=torch.uint8))  # pylint: disable=not-callable  # None returned above


class HostWork(dist.Work):
    """A gloo collective's work, waited for outside any dispatch mode (gloo copies its results into
    the caller's tensors as the wait completes: host work, not the chip's)."""

    def __init__(self, work: dist.Work, staged: torch.Tensor | None = None):
        super().__init__()
        self.work = work
        self.staged = staged      # gloo's staging copy, counted until the work is done (`staging`)

    def wait(self, timeout=None) -> bool:
        with _disable_current_modes():
            done = self.work.wait() if timeout is None else self.work.wait(timeout)
        self.staged = None
        return done

    def is_completed(self) -> bool:
        return self.work.is_completed()

    def is_success(self) -> bool:
        return self.work.is_success()

    def get_future(self) -> torch.futures.Future:
        return self.work.get_future()
