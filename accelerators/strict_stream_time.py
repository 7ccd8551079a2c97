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
on NCCL's own stream beside compute and is charged nothing. torch does not pass `asyncOp`
for `all_gather_into_tensor` and `reduce_scatter_tensor` (their options default to
asynchronous), so those are not charged. Host communication is not time-dilated, so the
charge is its wall seconds (accelerators/emulated.py, "Time dilation"). It includes any wait for
a peer that calls later, as an NCCL kernel waits for its peers; the engine synchronizes after every
action, so a host is never far ahead of its chip and the wait is the peers' skew, not the hosts'.

**A send leaves after the work queued before it.** NCCL's send runs on the stream, so its
data cannot reach the peer before the sender's chip has computed it; the emulated chip's host
holds the values as soon as it issues the ops. A send therefore records when the sender's
compute queue will have run what was issued before it (`queue_ready_at`), and the pair's stream
hands it to gloo no earlier (`wait_for_queue`, on the stream's thread: the host runs on).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch.distributed as dist


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


def on_compute_stream(opts: Any, start: Callable[[], dist.Work]) -> dist.Work:
    """Run `start()` (the gloo collective); a blocking one is waited for and charged to the device."""
    from accelerators import registry

    charge = getattr(registry._current, "charge_collective", None)  # pylint: disable=protected-access  # never select one here
    if charge is None or getattr(opts, "asyncOp", True):
        return start()
    issued_at = time.perf_counter()
    work = start()
    work.wait()
    charge(time.perf_counter() - issued_at, issued_at)  # pylint: disable=not-callable  # None returned above
    return work
