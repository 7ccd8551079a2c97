"""`hetero-strict`'s device time of a blocking collective: it occupies the compute stream.

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
charge is its wall seconds (accelerators/emulated.py, "Time dilation").
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch.distributed as dist


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
