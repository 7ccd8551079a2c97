"""The zmq lane: PUSH/PULL sockets for endpoints without plain streams (transport: zmq).

A message is [header, chunk descriptor, raw chunk] (frames.py), cut into
`chunk_bytes` pieces dealt round-robin over `stripes` sockets; chunk 0 always
rides stripe 0. Chunks that beat their chunk 0 are parked (matching.py) and
copied once it comes. Shared-memory doorbells and credits travel here too, as
two-part messages on stripe 0, and are handed to the shared-memory lane.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import zmq

from comm_bridge import frames as F
from comm_bridge.buffers import as_bytes
from comm_bridge.errors import TransferMismatchError
from comm_bridge.matching import Matcher, Transfer
from comm_bridge.shm_lane import ShmLane

log = logging.getLogger(__name__)

SMALL_BYTES = 64 << 10   # below this: copy into zmq, one stripe, never shared memory
MAX_CHUNK_BYTES = 64 << 20  # zmq drops a peer that sends a bigger frame
HWM_MESSAGES = 8         # zmq high-water mark per socket, in messages
DRAIN_BATCH = 64         # messages read off one socket per round


class ZmqLane:
    """This endpoint's PULL sockets (one per stripe) and its PUSH sockets to each peer."""

    def __init__(self, *, rank: int, auth: bytes, host: str, advertise_host: str | None, stripes: int,
                 chunk_bytes: int, max_message_bytes: int, io_threads: int, peers: dict,
                 matcher: Matcher, lock: threading.RLock, rejected: F.RejectCounter):
        self.rank = rank
        self._auth = auth
        self.chunk_bytes = chunk_bytes
        self.max_message_bytes = max_message_bytes
        self._max_chunk = max(4 * chunk_bytes, MAX_CHUNK_BYTES)
        self._peers = peers
        self._matcher = matcher
        self._lock = lock
        self.rejected = rejected
        self.shm: ShmLane  # the shared-memory lane, which takes doorbells and credits (set by the endpoint)
        self.ctx = zmq.Context(io_threads=io_threads)
        self.pulls: list[zmq.Socket] = []
        self.endpoints: list[str] = []
        for _ in range(stripes):
            sock = self.ctx.socket(zmq.PULL)
            sock.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
            sock.setsockopt(zmq.LINGER, 0)
            # Refuse oversized messages inside zmq, before they cost memory here.
            sock.setsockopt(zmq.MAXMSGSIZE, self._max_chunk + 64)
            sock.bind(f"tcp://{host}:0")
            port = sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
            self.endpoints.append(f"tcp://{advertise_host or host}:{port}")
            self.pulls.append(sock)
        self._push: dict[tuple[int, int], zmq.Socket] = {}

    # ------------------------------------------------------------ send side (lock held)
    def stripes_to(self, dst: int) -> int:
        return len(self._peers[dst]["endpoints"])

    def socket(self, dst: int, stripe: int) -> zmq.Socket:
        """The PUSH socket to `dst`'s stripe, connected on first use."""
        sock = self._push.get((dst, stripe))
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._peers[dst]["endpoints"][stripe])
            self._push[(dst, stripe)] = sock
        return sock

    def try_send(self, dst: int, parts: list) -> bool:
        """Send a small control message (doorbell, credit) on stripe 0; False if zmq is full."""
        try:
            self.socket(dst, 0).send_multipart(parts, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def send_chunks(self, job) -> bool:
        """Push a message's chunks without blocking; True once all are in zmq's hands."""
        data = as_bytes(job.staged.tensor)
        copy = job.nbytes < SMALL_BYTES
        while job.next_chunk < job.nchunks:
            chunk = F.Chunk(job.next_chunk, job.nchunks, self.chunk_bytes)
            parts = [job.header_bytes, F.pack_chunk(chunk), data[chunk.offset:chunk.offset + chunk.length(job.nbytes)]]
            # zmq frees a socket's messages in order, so tracking the last chunk per
            # stripe tells when the whole tensor has left our memory.
            track = not copy and chunk.index >= job.nchunks - job.nstripes
            try:
                tracker = self.socket(job.dst, chunk.index % job.nstripes).send_multipart(
                    parts, flags=zmq.NOBLOCK, copy=copy, track=track)
            except zmq.Again:
                return False
            if tracker is not None and not tracker.done:
                job.trackers.append(tracker)
            job.next_chunk += 1
        return True

    # ------------------------------------------------------------ receive side (driver)
    def drain(self, stripe: int) -> None:
        """Read what stripe `stripe` holds, up to a batch, while the budget allows."""
        sock = self.pulls[stripe]
        may_read = self._matcher.may_read
        for _ in range(DRAIN_BATCH):
            if not may_read(stripe):
                return
            try:
                parts = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            with self._lock:
                try:
                    self._on_message(parts)
                except F.FrameError as exc:
                    self.rejected.add(exc.reason)
                    log.warning("rank %d: %s", self.rank, exc)
                except Exception as exc:  # never let one bad frame kill the receiver
                    self.rejected.add("internal")
                    log.exception("rank %d: frame handling failed: %s", self.rank, exc)

    def _on_message(self, parts) -> None:
        header = F.parse_header(parts[0].bytes, self._auth, self.max_message_bytes)
        if header.kind == F.KIND_TENSOR:
            self._on_tensor(header, parts)
            return
        if header.kind == F.KIND_SHM:
            if len(parts) != 2:
                raise F.FrameError("truncated", f"shm doorbell with {len(parts)} parts")
            self.shm.on_doorbell(header, parts[1].bytes)
        elif len(parts) != 2:
            raise F.FrameError("bad_credit", f"credit from rank {header.sender} with {len(parts)} parts")
        else:
            self.shm.on_credit(header, parts[1].bytes)

    def _on_tensor(self, header: F.Header, parts) -> None:
        if len(parts) != 3:
            raise F.FrameError("truncated", f"tensor message with {len(parts)} parts, expected 3")
        matcher = self._matcher
        chunk = F.parse_chunk(parts[1].bytes, header.nbytes, self._max_chunk)
        key = (header.sender, header.seq)
        length = len(parts[2].buffer)
        if length != chunk.length(header.nbytes):
            # Part of the tensor may have landed already: fail it loudly.
            matcher.abort(key, TransferMismatchError(
                f"truncated message from rank {header.sender} seq {header.seq}: chunk {chunk.index} "
                f"is {length} bytes, expected {chunk.length(header.nbytes)}"))
            raise F.FrameError("truncated", f"rank {header.sender} seq {header.seq} chunk {chunk.index}: "
                                            f"{length} bytes, expected {chunk.length(header.nbytes)}")
        if chunk.index == 0:
            matcher.check_seq(header)
            transfer = matcher.begin(header, chunk.count)
            self._fill(transfer, key, chunk, parts[2])
            for parked_chunk, parked_payload, _held in matcher.release_parked(key):
                self._fill(transfer, key, parked_chunk, parked_payload)
            return
        flying = matcher.in_flight(key)
        if flying is not None:
            self._fill(flying, key, chunk, parts[2])
        elif matcher.is_finished(header.sender, header.seq):
            raise F.FrameError("orphan", f"chunk {chunk.index} of a finished message (rank {header.sender} seq {header.seq})")
        else:  # arrived on another stripe before chunk 0: hold the zmq frame, copy later
            matcher.park(key, chunk, parts[2], length)

    def _fill(self, transfer: Transfer, key, chunk: F.Chunk, payload) -> None:
        if chunk.count != transfer.parts_total or chunk.index in transfer.parts_seen:
            self._matcher.abort(key, TransferMismatchError(f"inconsistent chunks from rank {key[0]} seq {key[1]}"))
            raise F.FrameError("bad_chunk", f"chunk {chunk.index}/{chunk.count} for a {transfer.parts_total}-chunk message")
        if transfer.flat is not None and chunk.length(transfer.header.nbytes):
            transfer.flat[chunk.offset:chunk.offset + len(payload.buffer)] = np.frombuffer(payload.buffer, dtype=np.uint8)
        self._matcher.part_arrived(transfer, key, chunk.index)

    def close(self) -> None:
        for sock in [*self.pulls, *self._push.values()]:
            sock.close(linger=0)
