"""The send side: one queue per peer, pushed onto its lane as far as the lane takes it.

One channel per peer keeps its messages in send order: the plain stream where
both ends have one (a same-host payload in shared memory rings its doorbell on
the stream), else zmq. A queue's head is pushed from the caller's thread while
the channel is idle and by the driver (progress.Progress) otherwise. Memory is
bounded: `isend` blocks once `max_pending_send_bytes` are queued. Lock held
throughout (the endpoint's).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING

import torch

from comm_bridge import frames as F
from comm_bridge.errors import BridgeTimeoutError, PeerFailedError

if TYPE_CHECKING:   # the lanes are built after the queues (see attach)
    from comm_bridge.shm_lane import ShmLane
    from comm_bridge.stream_lane import StreamLane
    from comm_bridge.zmq_lane import ZmqLane


class SendJob:
    """One message on its way out, and how far it has got."""

    __slots__ = ("handle", "dst", "header_bytes", "staged", "nbytes", "nstripes",
                 "trackers", "shm", "next_chunk", "nchunks", "held_slot", "stream", "sent", "awaits_credit")

    def __init__(self, handle, dst, nbytes, header_bytes, staged, nstripes, shm, chunk_bytes):
        self.handle = handle
        self.dst = dst
        self.header_bytes = header_bytes
        self.staged = staged
        self.nbytes = nbytes
        self.nstripes = nstripes
        self.trackers: list = []
        self.shm = shm
        self.next_chunk = 0
        self.nchunks = F.chunk_count(self.nbytes, chunk_bytes)
        self.held_slot: int | None = None  # shm: slot written but doorbell not yet sent
        self.stream = False                # travels on the peer's plain-TCP stream
        self.sent = 0                      # stream: bytes of header + payload (or doorbell) handed to the kernel
        self.awaits_credit = False         # shm: the ring is full until the receiver hands slots back


class SendQueues:
    """Per-peer send queues, sequence numbers, the pending-bytes budget and zmq send tracking."""

    def __init__(self, rank: int, auth: bytes, lock: threading.RLock, max_pending_send_bytes: int,
                 counters: collections.Counter):
        self.rank = rank
        self._auth = auth
        self.max_pending_send_bytes = int(max_pending_send_bytes)
        self._counters = counters
        self.room = threading.Condition(lock)  # notified whenever queued bytes leave
        self.pending_bytes = 0
        self._next_seq: dict[int, int] = collections.defaultdict(int)
        self.queues: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.tracking: list[SendJob] = []  # pushed into zmq without a copy, not yet released by it
        # the lanes, set by attach() before any send
        self.zmq: ZmqLane
        self.stream: StreamLane
        self.shm: ShmLane

    def attach(self, zmq_lane: ZmqLane, stream_lane: StreamLane, shm_lane: ShmLane) -> None:
        """The lanes the queues push onto (built after the queues: the shared-memory lane
        pumps a queue when a credit frees a slot)."""
        self.zmq, self.stream, self.shm = zmq_lane, stream_lane, shm_lane

    def next_header(self, dst: int, kind: int, tag: int, host: torch.Tensor, step, micro_batch) -> bytes:
        """The header bytes of the next message to `dst`, taking its sequence number."""
        seq = self._next_seq[dst]
        self._next_seq[dst] = seq + 1
        return F.pack(kind, self.rank, tag, seq, host.dtype, host.shape, host.nbytes, self._auth,
                      step=int(step), micro_batch=int(micro_batch))

    def idle(self, dst: int) -> bool:
        return not self.queues.get(dst)

    def wait_for_room(self, dst: int, nbytes: int, failed: dict, timeout: float) -> None:
        """Block until `nbytes` more fit in the pending-send budget (a message alone always fits)."""
        deadline = time.monotonic() + timeout
        while self.pending_bytes and self.pending_bytes + nbytes > self.max_pending_send_bytes:
            if dst in failed:
                raise PeerFailedError(dst, failed[dst])
            remaining = deadline - time.monotonic()
            if not self.room.wait(max(0.0, remaining)):
                raise BridgeTimeoutError(f"isend to rank {dst}: send queue full for {timeout:.0f}s")

    def enqueue(self, job: SendJob) -> bool:
        """Queue a send; push it at once if the channel is idle. True: the driver has work left."""
        queue = self.queues[job.dst]
        queue.append(job)
        self.pending_bytes += job.nbytes
        if len(queue) == 1:
            self.pump(job.dst)  # send from the caller's thread while the channel is idle
        return bool(queue or job.trackers)

    def pump(self, dst: int) -> None:
        """Push queued sends (and owed shared-memory credits) to `dst` as far as its lane allows."""
        queue = self.queues.get(dst)
        self.shm.send_credits(dst)
        while queue:
            job = queue[0]
            if not job.staged.ready():
                return
            if job.stream:
                try:
                    if not self.stream.send(job):
                        return
                except OSError as exc:  # connection refused or lost: this send fails, later ones reconnect
                    queue.popleft()
                    self.pending_bytes -= job.nbytes
                    self.stream.drop_outbound(dst)
                    job.handle.fail(PeerFailedError(dst, f"stream connection: {exc}"))
                    self.room.notify_all()
                    continue
            elif not (self.shm.send(job) if job.shm else self.zmq.send_chunks(job)):
                return
            queue.popleft()
            if not job.trackers:
                self.sent(job)
            else:
                self.tracking.append(job)

    def sent(self, job: SendJob) -> None:
        """A message has left our memory: its send is done."""
        self.pending_bytes -= job.nbytes
        self._counters["messages_sent"] += 1
        self._counters["bytes_sent"] += job.nbytes
        job.handle.finish()
        self.room.notify_all()

    def sent_small(self, nbytes: int) -> None:
        """Count a message the caller's thread sent whole (the small-message lane)."""
        counters = self._counters
        counters["messages_sent"] += 1
        counters["bytes_sent"] += nbytes
        counters["small_lane_sent"] += 1

    def busy_dsts(self) -> list[int]:
        """Peers with queued sends or owed credits."""
        return [d for d, q in self.queues.items() if q] + self.shm.owing()

    def needs_polling(self) -> bool:
        """Work the poll cannot wake us for (streams say when they can move, with POLLOUT)."""
        return any(q and not (q[0].stream and q[0].staged.ready()) for q in self.queues.values()) \
            or bool(self.tracking) or bool(self.shm.owing())

    def anything_queued(self) -> bool:
        return any(self.queues.values()) or bool(self.tracking) or bool(self.shm.owing())

    def wants_write(self, dst: int) -> bool:
        """True if the stream to `dst` should be polled for room to write."""
        queue = self.queues.get(dst)
        return bool(queue and queue[0].stream and not queue[0].awaits_credit)

    def retire_tracked(self) -> None:
        """Finish sends whose zmq copies zmq has let go of."""
        if self.tracking:
            still = []
            for job in self.tracking:
                if all(t.done for t in job.trackers):
                    self.sent(job)
                else:
                    still.append(job)
            self.tracking = still

    def fail_peer(self, rank: int, error: BaseException) -> None:
        for job in self.queues.pop(rank, ()):
            self.pending_bytes -= job.nbytes
            job.handle.fail(error)
        for job in [j for j in self.tracking if j.dst == rank]:
            self.tracking.remove(job)
            job.handle.fail(error)
        self.room.notify_all()

    def fail_queued(self, error: BaseException) -> None:
        """Fail every queued send (the endpoint is closing)."""
        for queue in self.queues.values():
            for job in queue:
                job.handle.fail(error)
