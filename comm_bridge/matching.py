"""Message matching: which receive a message lands in, and how much unmatched data is held.

MPI-like: per (source, tag), messages match receives in the order the source sent
them. A message whose receive is not posted yet is held as unexpected, up to
`max_unexpected_bytes`; past that the lanes stop reading new messages (`may_read`)
and TCP flow control pushes back on the senders. Every message carries a per-sender
sequence number: a replayed one is refused, a gap is counted.

No sockets here: the lanes hand in parsed headers and byte ranges, so this is
tested on its own (tests/comm_bridge/test_matching.py). The caller holds the
endpoint lock.
"""

from __future__ import annotations

import collections

import torch

from comm_bridge import frames as F
from comm_bridge.buffers import as_bytes
from comm_bridge.errors import TransferMismatchError
from comm_bridge.handle import Handle

Key = tuple[int, int]  # (sender, seq) for a message in flight; (source, tag) for matching


class Transfer:
    """A message being received: its header, destination bytes and progress."""

    __slots__ = ("header", "buffer", "flat", "handle", "parts_total", "parts_seen", "done", "error")

    def __init__(self, header: F.Header, buffer: torch.Tensor | None, parts_total: int):
        self.header = header
        self.buffer = buffer
        self.flat = as_bytes(buffer) if buffer is not None else None
        self.handle: Handle | None = None
        self.parts_total = parts_total
        self.parts_seen: set[int] = set()
        self.done = False
        self.error: BaseException | None = None


class Matcher:
    """Posted receives, unexpected messages, transfers in flight and their budgets."""

    def __init__(self, stager, max_unexpected_bytes: int, counters: collections.Counter):
        self._stager = stager
        self.max_unexpected_bytes = int(max_unexpected_bytes)
        self._counters = counters
        self._last_seq: dict[int, int] = {}
        self._posted: dict[Key, collections.deque] = collections.defaultdict(collections.deque)
        self._unexpected: dict[Key, collections.deque] = collections.defaultdict(collections.deque)
        self.unexpected_bytes = 0
        self.parked_bytes = 0   # chunks that beat their chunk 0 (which rides stripe 0)
        self._inflight: dict[Key, Transfer] = {}
        self._parked: dict[Key, list] = collections.defaultdict(list)

    # ------------------------------------------------------------ receives
    def claim_unexpected(self, handle: Handle) -> tuple[bool, bool]:
        """Give a new receive the oldest held message from its (source, tag), if any.
        Returns (claimed, the unexpected budget was full until now: reading may resume)."""
        queue = self._unexpected.get((handle.peer, handle.tag))
        if not queue:
            return False, False
        transfer = queue.popleft()
        resume = self.unexpected_bytes >= self.max_unexpected_bytes
        self.unexpected_bytes -= transfer.header.nbytes
        self.bind(transfer, handle, handle.out)
        if transfer.done and transfer.error is None:
            handle.finish(transfer.buffer)
        return True, resume

    def post(self, handle: Handle) -> None:
        """Queue a receive for the next message from its (source, tag)."""
        self._posted[(handle.peer, handle.tag)].append(handle)

    def take_posted_small(self, header: F.Header) -> tuple[Handle, memoryview] | None:
        """The small-message lane: the receive posted for `header`, taken off its queue, and its
        landing, if it has a CPU landing of exactly the message's bytes and dtype; else None (take
        `begin`)."""
        queue = self._posted.get((header.sender, header.tag))
        if not queue:
            return None
        posted = queue[0]
        landing = posted.landing
        if landing is None or len(landing) != header.nbytes or posted.out.dtype is not header.dtype:
            return None
        return queue.popleft(), landing

    # ------------------------------------------------------------ messages
    def check_seq(self, header: F.Header) -> None:
        """Refuse a replayed sequence number; count a gap."""
        last = self._last_seq.get(header.sender, -1)
        if header.seq <= last:
            raise F.FrameError("replayed", f"rank {header.sender} seq {header.seq} after {last}")
        if header.seq != last + 1:
            self._counters["seq_gaps"] += 1
        self._last_seq[header.sender] = header.seq

    def is_finished(self, sender: int, seq: int) -> bool:
        """True if message `seq` from `sender` has started (so a late chunk of it is an orphan)."""
        return seq <= self._last_seq.get(sender, -1)

    def begin(self, header: F.Header, parts_total: int) -> Transfer:
        """Match a new message to a posted irecv, or hold it as unexpected."""
        key = (header.sender, header.tag)
        posted_queue = self._posted.get(key)
        if posted_queue:
            posted = posted_queue.popleft()
            out = posted.out
            if out is not None and out.is_cpu and out.is_contiguous() and \
                    out.dtype is header.dtype and out.nbytes == header.nbytes:
                # The bytes land in the caller's tensor; a view only where the shapes differ.
                buffer = out if out.shape == header.shape else out.view(header.shape)
            else:
                buffer = self._stager.host_buffer(header.dtype, header.shape, posted.device)
            transfer = Transfer(header, buffer, parts_total)
            self.bind(transfer, posted, out)
        else:
            transfer = Transfer(header, torch.empty(header.shape, dtype=header.dtype), parts_total)
            self._unexpected[key].append(transfer)
            self.unexpected_bytes += header.nbytes
        self._inflight[(header.sender, header.seq)] = transfer
        return transfer

    def in_flight(self, key: Key) -> Transfer | None:
        return self._inflight.get(key)

    def bind(self, transfer: Transfer, handle: Handle, out: torch.Tensor | None) -> None:
        """Attach a receive to a message; a dtype or size that does not fit fails it now."""
        header = transfer.header
        if out is not None and (out.dtype is not header.dtype or out.nbytes != header.nbytes):
            transfer.error = TransferMismatchError(
                f"rank {header.sender} sent {header.dtype}{list(header.shape)} with tag {header.tag}, "
                f"but the irecv posted {out.dtype}{list(out.shape)}")
            handle.fail(transfer.error)
        transfer.handle = handle

    def part_arrived(self, transfer: Transfer, key: Key, index: int) -> bool:
        """Record part `index` of a message; once all are in, finish its receive. True when complete."""
        transfer.parts_seen.add(index)
        if len(transfer.parts_seen) != transfer.parts_total:
            return False
        self._inflight.pop(key, None)
        transfer.done = True
        self._counters["messages_received"] += 1
        self._counters["bytes_received"] += transfer.header.nbytes
        if transfer.handle is not None:
            if transfer.error is not None:
                transfer.handle.fail(transfer.error)
            else:
                transfer.handle.finish(transfer.buffer)
        return True

    def abort(self, key: Key, error: BaseException) -> None:
        """Fail the message in flight under `key` (sender, seq), if there is one."""
        transfer = self._inflight.pop(key, None)
        if transfer is not None:
            self.drop(transfer, error)

    def drop(self, transfer: Transfer, error: BaseException) -> None:
        """A message that will never complete: fail its receive, or stop holding it."""
        transfer.error = error
        if transfer.handle is not None:
            transfer.handle.fail(error)
        else:
            queue = self._unexpected.get((transfer.header.sender, transfer.header.tag))
            if queue and transfer in queue:
                queue.remove(transfer)
                self.unexpected_bytes -= transfer.header.nbytes

    # ------------------------------------------------------------ budgets
    def may_read(self, stripe: int) -> bool:
        """Backpressure: stop reading when unmatched data fills its budget.

        Every message starts with chunk 0 on stripe 0 (the streams count as stripe 0),
        so only stripe 0 starts new transfers and it alone answers to the
        unexpected-message budget. The other stripes carry the rest of transfers
        already started (which must be let finish) or chunks that beat their chunk 0
        (parked, with their own budget). Pausing the other stripes on the unexpected
        budget would deadlock."""
        if stripe == 0:
            return self.unexpected_bytes < self.max_unexpected_bytes
        return self.parked_bytes < self.max_unexpected_bytes

    def park(self, key: Key, chunk, payload, length: int) -> None:
        """Hold a chunk that arrived before its message's chunk 0 (no copy yet)."""
        self._parked[key].append((chunk, payload, length))
        self.parked_bytes += length

    def release_parked(self, key: Key) -> list:
        """The chunks parked for `key`, no longer counted against the budget."""
        parked = self._parked.pop(key, [])
        self.parked_bytes -= sum(held for _s, _p, held in parked)
        return parked

    # ------------------------------------------------------------ endings
    def fail_peer(self, rank: int, error: BaseException) -> None:
        """Fail every receive posted for `rank` and every message of its in flight."""
        for (src, _tag), queue in self._posted.items():
            if src == rank:
                for posted in queue:
                    posted.fail(error)
                queue.clear()
        for key in [k for k in self._inflight if k[0] == rank]:
            self.abort(key, error)
        for key in [k for k in self._parked if k[0] == rank]:
            self.release_parked(key)

    def fail_posted(self, error: BaseException) -> None:
        """Fail every posted receive (the endpoint is closing)."""
        for queue in self._posted.values():
            for posted in queue:
                posted.fail(error)

    def stats(self) -> dict:
        return {
            "unexpected_bytes": self.unexpected_bytes,
            "inflight": len(self._inflight),
            "parked": sum(len(v) for v in self._parked.values()),
            "parked_bytes": self.parked_bytes,
            "posted": sum(len(q) for q in self._posted.values()),
        }
