"""`hetero-strict`'s point-to-point: one ordered stream per pair of ranks, with a rendezvous
(accelerators/strict_backend.py has the contract these enforce).

Each rank runs the operations toward one peer one entry at a time, in issue order, on a
thread of its own (`PairStream`); an entry is a single send or receive, or one batch's ops
toward that peer (NCCL's group call). A send is posted to gloo only once the peer's
matching receive has announced itself in the group's store, so gloo only ever waits on
matched pairs; the n-th send from A to B matches B's n-th receive from A, whatever the tags.
The deadlock watchdog (accelerators/strict_watchdog.py) reads what a stream is running
(`snapshot`) and publishes it for the peer to see.
"""

from __future__ import annotations

import inspect
import itertools
import json
import queue
import sys
import threading
import time
import types
from typing import Protocol

import torch
import torch.distributed as dist

from accelerators.strict_device import describe
from accelerators.strict_errors import BACKEND_NAME, StrictBackendError
from accelerators.strict_stream_time import queue_ready_at, wait_for_queue

_BATCH_CODE = inspect.unwrap(dist.batch_isend_irecv).__code__
# How often a waiting entry looks at the store: from _POLL_MIN_S up to _POLL_BUSY_S for its first
# _POLL_BUSY_FOR_S (a pipeline's receive posted ahead waits a few tens of ms, and every poll it
# misses is latency NCCL does not have: at a 20 ms cap it cost the emulated fleet's middle stage
# about 2.7 % of its step), then up to _POLL_MAX_S (an idle or deadlocked pair; a store check is a
# loopback round trip, so polling fast forever would take a 2-core host's cycles).
_POLL_MIN_S, _POLL_BUSY_S, _POLL_BUSY_FOR_S, _POLL_MAX_S = 0.0005, 0.002, 1.0, 0.02
_QUEUED_SHOWN = 4  # queued ops a deadlock report lists per rank


class PointToPoint(Protocol):
    """What a stream needs of gloo: its point-to-point calls (pybind methods torch's stubs leave out)."""

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> dist.Work: ...

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> dist.Work: ...


class _Abandoned(Exception):
    """The pair failed while this entry waited for its peer."""


class Op:
    """One send or receive toward a peer, with its per-direction sequence number."""

    def __init__(self, kind: str, tensor: torch.Tensor, seq: int, tag: int):
        self.kind, self.tensor, self.seq, self.tag = kind, tensor, seq, tag
        self.future: torch.futures.Future = torch.futures.Future()
        self.error: Exception | None = None
        self.done = False
        # A send's data is there once the sender's compute queue has run what was issued before it
        # (NCCL's send is ordered on the stream): perf_counter seconds, 0 where no clock is kept.
        self.ready_at = queue_ready_at() if kind == "send" else 0.0

    def describe(self, peer: int) -> str:
        where = f"to rank {peer}" if self.kind == "send" else f"from rank {peer}"
        return f"{self.kind} #{self.seq} {where} (tag {self.tag}, {describe(self.tensor)})"


class P2PWork(dist.Work):
    """The work of one send or receive: `wait()` blocks until it completes and raises its error."""

    def __init__(self, op: Op):
        super().__init__()
        self.op = op

    def wait(self, timeout=None) -> bool:  # pylint: disable=unused-argument  # the pair's watchdog bounds it
        try:
            self.op.future.wait()
        except Exception:
            if self.op.error is not None:
                raise self.op.error from None
            raise
        return True

    def is_completed(self) -> bool:
        return self.op.future.done()

    def is_success(self) -> bool:
        return self.op.future.done() and self.op.error is None

    def get_future(self) -> torch.futures.Future:
        return self.op.future


class Entry:
    """What one rank runs toward one peer at once: a single op, or a batch's ops to that peer."""

    _ids = itertools.count()

    def __init__(self, ops: list[Op]):
        self.id = next(self._ids)
        self.ops = ops
        self.started: float | None = None


class PairStream:
    """The ops between this rank (`me`) and one peer, run one entry at a time in issue order.

    `store`: the group's state store (rendezvous keys, published snapshots); `gloo`: what moves
    the bytes once both sides are there."""

    def __init__(self, me: int, peer: int, store: dist.Store, gloo: PointToPoint):
        self.me, self.peer, self.store, self.gloo = me, peer, store, gloo
        self.queue: queue.Queue[Entry | None] = queue.Queue()
        self.active: Entry | None = None
        self.pending: list[Entry] = []  # issued, not finished (active first)
        self.next_seq = {"send": 0, "recv": 0}
        self.completed = {"send": 0, "recv": 0}
        self.error: StrictBackendError | None = None
        self.published = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"{BACKEND_NAME} {me}<->{peer}")
        self.thread.start()

    def issue(self, entry: Entry) -> None:
        with self.lock:
            if self.error is not None:
                raise self.error
            self.pending.append(entry)
        self.queue.put(entry)

    def new_op(self, kind: str, tensor: torch.Tensor, tag: int) -> Op:
        with self.lock:
            seq = self.next_seq[kind]
            self.next_seq[kind] += 1
        return Op(kind, tensor, seq, tag)

    def _run(self) -> None:
        while True:
            entry = self.queue.get()
            if entry is None:
                return
            with self.lock:
                if self.error is not None:
                    self._fail(entry, self.error)
                    continue
                entry.started = time.monotonic()
                self.active = entry
            try:
                self._rendezvous_and_move(entry)
            except _Abandoned:  # reported as a deadlock: its waiters already raised
                continue
            except Exception as exc:  # gloo or the store failed (peer gone, their timeout)
                with self.lock:
                    self.error = error = self.error or StrictBackendError(
                        f"{BACKEND_NAME}: rank {self.me} <-> rank {self.peer}: transport failed: {exc}")
                self._fail(entry, error)
                continue
            self._finished(entry)

    def _finished(self, entry: Entry) -> None:
        with self.lock:
            self.active = None
            self.pending.remove(entry)
            failed = self.error
        if failed is not None:
            return
        for op in entry.ops:
            op.future.set_result([op.tensor])
        with self.lock:
            if self.published:  # the peer must not read a finished entry as running
                self.publish(None)
                self.published = False

    def _rendezvous_and_move(self, entry: Entry) -> None:
        """Run one entry: each receive announces itself; each send waits for its receive's
        announcement, then both post to gloo (so gloo only ever waits on matched pairs).

        Keys (in the group's store): ready/S->R/n, set by R when its n-th receive from S runs;
        go/S->R/n, set by S once it saw ready and posts the n-th send."""
        store, me, peer = self.store, self.me, self.peer
        waiting = {}
        for op in entry.ops:
            if op.kind == "recv":
                store.set(f"ready/{peer}->{me}/{op.seq}", "1")
                waiting[op] = f"go/{peer}->{me}/{op.seq}"
            else:
                waiting[op] = f"ready/{me}->{peer}/{op.seq}"
        works = []
        pause, since = _POLL_MIN_S, time.monotonic()
        while waiting:
            if self.error is not None:
                raise _Abandoned()
            moved = [op for op, key in waiting.items() if store.check([key])]
            for op in moved:
                store.delete_key(waiting.pop(op))
                if op.kind == "send":
                    wait_for_queue(op.ready_at)
                    store.set(f"go/{me}->{peer}/{op.seq}", "1")
                    works.append((op, self.gloo.send([op.tensor], peer, op.seq)))
                else:
                    works.append((op, self.gloo.recv([op.tensor], peer, op.seq)))
            if waiting and not moved:  # poll: a store wait with a timeout logs a warning per expiry
                time.sleep(pause)
                pause = next_poll(pause, time.monotonic() - since)
        for op, work in works:
            work.wait()
            with self.lock:
                op.done = True
                self.completed[op.kind] += 1

    @staticmethod
    def _fail(entry: Entry, error: Exception) -> None:
        for op in entry.ops:
            if not op.future.done():
                op.error = error
                op.future.set_exception(error)

    def fail_all(self, error: StrictBackendError) -> None:
        """Fail every issued op of this pair; the pair stays failed."""
        with self.lock:
            self.error = failed = self.error or error
            entries = list(self.pending)
        for entry in entries:
            self._fail(entry, failed)

    def snapshot(self) -> dict | None:
        """The running entry's unfinished ops, if it has been running a while."""
        with self.lock:
            entry = self.active
            if entry is None or entry.started is None:
                return None
            queued = [op.describe(self.peer) for later in self.pending[1:] for op in later.ops]
            return {"entry": entry.id, "since": entry.started,
                    "completed": dict(self.completed),
                    "ops": [{"kind": op.kind, "seq": op.seq, "text": op.describe(self.peer)}
                            for op in entry.ops if not op.done],
                    "queued": queued[:_QUEUED_SHOWN] + ([f"{len(queued) - _QUEUED_SHOWN} more"]
                                                        if len(queued) > _QUEUED_SHOWN else [])}

    def publish(self, snapshot: dict | None) -> None:
        """Show the peer what this rank runs toward it (None: nothing)."""
        self.store.set(f"{self.me}->{self.peer}", json.dumps(snapshot or {}))

    def peer_state(self) -> dict:
        """What the peer last published that it runs toward this rank ({}: nothing)."""
        key = f"{self.peer}->{self.me}"
        if not self.store.check([key]):
            return {}
        return json.loads(self.store.get(key))

    def stop(self) -> None:
        """End the stream's thread once what is queued has run (or failed)."""
        self.queue.put(None)


def next_poll(pause: float, waited_s: float) -> float:
    """The pause after `pause`, for an entry that has waited `waited_s` (the constants' comment)."""
    return min(2 * pause, _POLL_BUSY_S if waited_s < _POLL_BUSY_FOR_S else _POLL_MAX_S)


def calling_batch() -> list | None:
    """The p2p_op_list of the dist.batch_isend_irecv call this op comes from, if any (called from
    the group's send/recv through its _p2p: dist.batch_isend_irecv issues a Python group's ops one by one)."""
    frame: types.FrameType | None = sys._getframe(2)  # pylint: disable=protected-access
    for _ in range(6):
        if frame is None:
            return None
        if frame.f_code is _BATCH_CODE:
            return frame.f_locals.get("p2p_op_list")
        frame = frame.f_back
    return None
