"""The shared-memory lane: same-host payloads of SMALL_BYTES and more (shm.py's rings).

The sender copies each chunk into a free slot of its ring to that receiver and
rings a doorbell ([header, chunk descriptor]) on the peer's stream, or on zmq
where there is none. The receiver copies the slot out and hands it back with a
credit over zmq; a sender whose ring is full waits for credits. Lock held
throughout (the endpoint's).
"""

from __future__ import annotations

import collections
from typing import Callable

import torch

from comm_bridge import frames as F
from comm_bridge import stream as S
from comm_bridge.buffers import as_bytes
from comm_bridge.matching import Matcher, Transfer
from comm_bridge.shm import ShmReader, ShmRing, ring_path


class ShmLane:
    """Our rings to same-host peers, their rings mapped for reading, and the credits we owe."""

    def __init__(self, *, rank: int, auth: bytes, job_hex: str, slots: int, chunk_bytes: int,
                 peers: dict, matcher: Matcher, zmq_lane, pump: Callable[[int], None]):
        self.rank = rank
        self._auth = auth
        self.job_hex = job_hex
        self.slots = slots
        self.chunk_bytes = chunk_bytes
        self._peers = peers
        self._matcher = matcher
        self._zmq = zmq_lane
        self._pump = pump  # sending.SendQueues.pump: a credit may let a queued send to that peer move
        self._rings: dict[int, ShmRing] = {}
        self._readers: dict[int, ShmReader] = {}
        self._current: dict[int, Transfer] = {}  # sender -> the message its doorbells are filling
        self._credits_owed: dict[int, collections.deque] = collections.defaultdict(collections.deque)

    # ------------------------------------------------------------ send side
    def send(self, job, stream=None) -> bool:
        """Copy chunks into the ring as credits allow and ring a doorbell per chunk: on the
        peer's stream if it has one, else on zmq. True once every chunk is rung."""
        ring = self._rings.get(job.dst)
        if ring is None:
            ring = ShmRing(ring_path(self.job_hex, self.rank, job.dst), self.slots, self.chunk_bytes)
            self._rings[job.dst] = ring
        data = as_bytes(job.staged.tensor)
        while job.next_chunk < job.nchunks:
            offset = job.next_chunk * self.chunk_bytes
            length = min(self.chunk_bytes, job.nbytes - offset)
            if job.held_slot is None:
                job.awaits_credit = not ring.free
                if job.awaits_credit:
                    return False  # wait for the receiver's credit
                job.held_slot = ring.free.pop()
                ring.write(job.held_slot, data[offset:offset + length])
            desc = F.pack_shm_chunk(F.ShmChunk(job.next_chunk, job.nchunks, job.held_slot, offset, length))
            if stream is not None:
                doorbell = job.header_bytes + desc
                job.sent = S.send_some(stream, doorbell, b"", job.sent)
                if job.sent < len(doorbell):
                    return False
                job.sent = 0
            elif not self._zmq.try_send(job.dst, [job.header_bytes, desc]):
                return False
            job.held_slot = None
            job.next_chunk += 1
        return True

    def on_credit(self, header: F.Header, descriptor) -> None:
        """The receiver is done with a slot of our ring to it."""
        ring = self._rings.get(header.sender)
        if ring is None:
            raise F.FrameError("bad_credit", f"credit from rank {header.sender} without a ring")
        chunk = F.parse_shm_chunk(descriptor, 0, ring.slots, ring.slot_bytes)
        if chunk.slot in ring.free:
            raise F.FrameError("bad_credit", f"slot {chunk.slot} is already free")
        ring.free.append(chunk.slot)
        self._pump(header.sender)

    # ------------------------------------------------------------ receive side
    def on_doorbell(self, header: F.Header, descriptor) -> None:
        """A doorbell (from zmq or a stream): copy its chunk out of the sender's ring."""
        matcher = self._matcher
        reader = self._readers.get(header.sender)
        if reader is None:
            try:
                reader = ShmReader(ring_path(self.job_hex, header.sender, self.rank))
            except (OSError, ValueError) as exc:
                raise F.FrameError("bad_shm", f"rank {header.sender}: cannot map ring: {exc}") from None
            self._readers[header.sender] = reader
        chunk = F.parse_shm_chunk(descriptor, header.nbytes, reader.slots, reader.slot_bytes)
        transfer: Transfer | None
        if chunk.index == 0:
            matcher.check_seq(header)
            transfer = matcher.begin(header, chunk.count)
            self._current[header.sender] = transfer
        else:
            transfer = self._current.get(header.sender)
            if transfer is None or transfer.header.seq != header.seq or chunk.index in transfer.parts_seen \
                    or chunk.count != transfer.parts_total:
                self._owe_credit(header.sender, chunk.slot)
                raise F.FrameError("out_of_order", f"shm chunk {chunk.index} of rank {header.sender} seq {header.seq}")
        if transfer.flat is not None:
            reader.read_into(chunk.slot, chunk.length, transfer.flat[chunk.offset:chunk.offset + chunk.length])
        self._owe_credit(header.sender, chunk.slot)
        if matcher.part_arrived(transfer, (header.sender, header.seq), chunk.index):
            self._current.pop(header.sender, None)

    def _owe_credit(self, sender: int, slot: int) -> None:
        """Owe `sender` its slot back. A sender not yet in our address book (its doorbells can
        beat our add_peers) is owed it until it is: the credit goes then (send_credits)."""
        credit = F.Header(sender=self.rank, tag=0, seq=0, dtype=torch.uint8, shape=(0,), nbytes=0,
                          kind=F.KIND_CREDIT)
        message = [F.pack_header(credit, self._auth), F.pack_shm_chunk(F.ShmChunk(0, 1, slot, 0, 0))]
        self._credits_owed[sender].append(message)
        self._pump(sender)

    def send_credits(self, dst: int) -> None:
        """Hand back the slots we owe `dst`, as far as zmq takes them (none before `dst` is in
        our address book: its zmq address is not known yet)."""
        if dst not in self._peers:
            return
        owed = self._credits_owed.get(dst)
        while owed and self._zmq.try_send(dst, owed[0]):
            owed.popleft()

    def owing(self) -> list[int]:
        """Peers in our address book we still owe credits."""
        return [d for d, q in self._credits_owed.items() if q and d in self._peers]

    def credits_owed(self) -> int:
        """Slots we hold for their senders, reachable or not yet."""
        return sum(len(q) for q in self._credits_owed.values())

    # ------------------------------------------------------------ endings
    def fail_peer(self, rank: int) -> None:
        self._current.pop(rank, None)
        self._credits_owed.pop(rank, None)  # its ring died with it
        reader = self._readers.pop(rank, None)
        if reader is not None:
            reader.close()  # its file went when we mapped it (shm.ShmReader)

    def close(self) -> None:
        for ring in self._rings.values():
            ring.close()
        for reader in self._readers.values():
            reader.close()
