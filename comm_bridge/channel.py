"""The data plane: point-to-point tensor channels between ranks.

One `Endpoint` per process. `isend`/`irecv` return `Handle`s; `wait()` gives the
tensor (or raises). Each peer gets exactly one channel, so its messages stay in
send order:

- Peers that have a plain-TCP stream (the default) get one (stream_lane.py):
  [header, raw payload] back to back, sent with one sendmsg from the tensor's
  own memory. For a peer on the same host, payloads of `SMALL_BYTES` and more
  sit in a shared-memory ring instead (shm_lane.py) and the stream carries only
  their doorbells; the receiver hands ring slots back over zmq (credits).
- Endpoints without streams send over zmq PUSH/PULL sockets (zmq_lane.py):
  chunks dealt round-robin over `stripes` sockets (doorbells too, when shm is on).

Small messages take a lane of their own: an idle stream gets them in one
sendmsg from the caller's thread, and a receive posted with a CPU tensor gets
the bytes copied from the read-ahead buffer straight into it.

This module is the facade: it checks options, wires the parts together and
keeps the peer list. Matching and budgets are matching.py's, the send queues
sending.py's, and who drives the sockets progress.py's. Matching is MPI-like:
per (source, tag), messages match receives in the order the source sent them.

Memory is bounded: messages that arrive before their irecv are held up to
`max_unexpected_bytes`, after which the endpoint stops reading new messages
and TCP flow control (zmq high-water marks) pushes back on the senders; `isend`
blocks once `max_pending_send_bytes` are queued.
"""

from __future__ import annotations

import collections
import threading

import torch

from comm_bridge import frames as F
from comm_bridge import stream as S
from comm_bridge.buffers import as_bytes, byte_view
from comm_bridge.errors import BridgeError, PeerFailedError
from comm_bridge.handle import Handle
from comm_bridge.matching import Matcher
from comm_bridge.progress import Progress
from comm_bridge.sending import SendJob, SendQueues
from comm_bridge.shm import host_id, job_hex_of, shm_dir
from comm_bridge.shm_lane import ShmLane
from comm_bridge.staging import Stager
from comm_bridge.stream_lane import StreamLane
from comm_bridge.zmq_lane import MAX_CHUNK_BYTES, SMALL_BYTES, ZmqLane

__all__ = ["Endpoint", "Handle", "transport_options", "as_bytes", "byte_view", "SMALL_BYTES",
           "MAX_CHUNK_BYTES", "MAX_STRIPES"]

MAX_STRIPES = 16


def transport_options(transport: str) -> dict:
    """Endpoint options for a cluster file's network.bridge.transport. zmq keeps every
    message on the zmq data plane (no shared memory, no extra direct-stream ports, say
    where only the zmq ports are open); auto and shm put same-host peers on shared
    memory and the others on a direct TCP stream."""
    if transport == "zmq":
        return {"shm": False, "stream": False}
    if transport in ("auto", "shm"):
        return {"shm": True, "stream": True}
    raise ValueError(f"network.bridge.transport must be zmq, shm or auto, got {transport!r}")


def _check_options(host: str, bind_all: bool, hello_timeout: float, max_unauthenticated: int,
                   stripes: int, chunk_bytes: int) -> None:
    if S.is_wildcard(host) and not bind_all:
        raise ValueError(f"bridge endpoint host {host!r} listens on every interface; give the node's own "
                         f"address (or bind_all=True)")
    if not hello_timeout > 0:
        raise ValueError(f"hello_timeout must be > 0 seconds, got {hello_timeout}")
    if max_unauthenticated < 1:
        raise ValueError(f"max_unauthenticated must be >= 1, got {max_unauthenticated}")
    if not 1 <= stripes <= MAX_STRIPES:
        raise ValueError(f"stripes must be 1..{MAX_STRIPES}, got {stripes}")
    if not 4096 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_bytes must be 4096..{MAX_CHUNK_BYTES}, got {chunk_bytes}")


class Endpoint:
    """This process's end of the bridge. Thread-safe; close() when done.

    Every socket listens on `host`, the node's own address (a wildcard needs
    `bind_all=True`). An inbound stream connection must say its hello within
    `hello_timeout` seconds, and at most `max_unauthenticated` may be waiting to
    (beyond that, the oldest silent one is closed); refusals are counted in
    `rejected` by reason."""

    def __init__(self, rank: int, token: str | bytes | None = None, *, host: str = "127.0.0.1",
                 advertise_host: str | None = None, stripes: int = 2, chunk_bytes: int = 4 << 20,
                 shm: bool = True, shm_slots: int = 8, max_message_bytes: int = 16 << 30,
                 max_unexpected_bytes: int = 256 << 20, max_pending_send_bytes: int = 1 << 30,
                 default_timeout: float = 300.0, accelerator=None, io_threads: int = 2,
                 stream: bool = True, hello_timeout: float = S.HELLO_TIMEOUT_SECONDS,
                 max_unauthenticated: int = S.MAX_UNAUTHENTICATED, bind_all: bool = False):
        _check_options(host, bind_all, hello_timeout, max_unauthenticated, stripes, chunk_bytes)
        self.rank = int(rank)
        self.stripes = stripes
        self.chunk_bytes = int(chunk_bytes)
        self.max_message_bytes = int(max_message_bytes)
        self.max_unexpected_bytes = int(max_unexpected_bytes)
        self.max_pending_send_bytes = int(max_pending_send_bytes)
        self.default_timeout = float(default_timeout)
        self.hello_timeout = float(hello_timeout)
        self.max_unauthenticated = int(max_unauthenticated)
        self.use_shm = bool(shm) and shm_dir() is not None
        self.shm_slots = shm_slots
        self.host_id = host_id()
        self.rejected = F.RejectCounter()
        auth = F.auth_tag(token)
        self.job_hex = job_hex_of(token)  # names this job's shared-memory rings
        self._stager = Stager(accelerator)
        self._lock = threading.RLock()
        self._peers: dict[int, dict] = {}  # rank -> {endpoints, stream, host_id}
        self._failed: dict[int, str] = {}  # rank -> why it was declared dead
        self._counters: collections.Counter = collections.Counter()
        self._matcher = Matcher(self._stager, self.max_unexpected_bytes, self._counters)
        self._zmq = ZmqLane(rank=self.rank, auth=auth, host=host, advertise_host=advertise_host, stripes=stripes,
                            chunk_bytes=self.chunk_bytes, max_message_bytes=self.max_message_bytes,
                            io_threads=io_threads, peers=self._peers, matcher=self._matcher, lock=self._lock,
                            rejected=self.rejected)
        self._sends = SendQueues(self.rank, auth, self._lock, self.max_pending_send_bytes, self._counters)
        self._shm = ShmLane(rank=self.rank, auth=auth, job_hex=self.job_hex, slots=shm_slots,
                            chunk_bytes=self.chunk_bytes, peers=self._peers, matcher=self._matcher,
                            zmq_lane=self._zmq, pump=self._sends.pump)
        self._zmq.shm = self._shm
        # Tensors to peers on other hosts (or with shm off) travel on plain-TCP streams.
        self._streams = StreamLane(rank=self.rank, auth=auth, host=host, advertise_host=advertise_host,
                                   enabled=stream, max_message_bytes=self.max_message_bytes,
                                   hello_timeout=self.hello_timeout, max_unauthenticated=self.max_unauthenticated,
                                   peers=self._peers, matcher=self._matcher, shm_lane=self._shm, lock=self._lock,
                                   counters=self._counters, rejected=self.rejected)
        self._sends.attach(self._zmq, self._streams, self._shm)
        self.endpoints = self._zmq.endpoints
        self.stream_address = self._streams.address
        self._progress = Progress(rank=self.rank, lock=self._lock, default_timeout=self.default_timeout,
                                  stager=self._stager, matcher=self._matcher, sends=self._sends,
                                  zmq_lane=self._zmq, stream_lane=self._streams, counters=self._counters)

    # ------------------------------------------------------------------ peers
    def address(self) -> dict:
        """What peers need to reach this endpoint (goes into the address book)."""
        extra = [self.stream_address] if self.stream_address else []
        return {"rank": self.rank, "endpoints": list(self.endpoints) + extra, "host_id": self.host_id}

    def add_peers(self, book) -> None:
        """Learn peers from address-book entries ({rank, endpoints, host_id} each)."""
        entries = book.values() if isinstance(book, dict) else book
        with self._lock:
            for entry in entries:
                rank = int(entry["rank"])
                if rank != self.rank:
                    listed = [str(e) for e in entry["endpoints"]]
                    streams = [e for e in listed if e.startswith(S.SCHEME)]
                    self._peers[rank] = {"endpoints": [e for e in listed if not e.startswith(S.SCHEME)],
                                         "stream": streams[0] if streams else None,
                                         "host_id": entry.get("host_id")}
            owed = self._shm.owing()  # slots of peers whose doorbells beat this call
        if owed:
            self._progress.request_io()

    def fail_peer(self, rank: int, reason: str) -> None:
        """Declare `rank` dead: every pending call on it raises PeerFailedError."""
        error = PeerFailedError(rank, reason)
        with self._lock:
            if rank in self._failed:
                return
            self._failed[rank] = reason
            self._matcher.fail_peer(rank, error)
            self._shm.fail_peer(rank)
            self._streams.fail_peer(rank)
            self._sends.fail_peer(rank, error)

    def stats(self) -> dict:
        with self._lock:
            return {
                "rank": self.rank,
                "rejected": self.rejected.as_dict(),
                "rejected_total": self.rejected.total(),
                **self._matcher.stats(),
                "pending_send_bytes": self._sends.pending_bytes,
                "tracking": len(self._sends.tracking),
                "shm_credits_owed": self._shm.credits_owed(),
                **self._streams.stats(),
                **dict(self._counters),
            }

    # -------------------------------------------------------------- user API
    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0, *, step: int = 0,
              micro_batch: int = 0) -> Handle:
        dst = int(dst)
        if tensor.dtype not in F.DTYPE_CODES:
            raise TypeError(f"the bridge cannot carry dtype {tensor.dtype}")
        if tensor.dim() > F.MAX_DIMS:
            raise ValueError(f"the bridge carries at most {F.MAX_DIMS} dims, got shape {tuple(tensor.shape)}")
        staged = self._stager.to_host(tensor)
        host = staged.tensor
        nbytes = host.nbytes
        if nbytes > self.max_message_bytes:
            raise ValueError(f"{nbytes} bytes exceeds max_message_bytes={self.max_message_bytes}")
        tag = int(tag)
        sends = self._sends
        with self._lock:
            sock = self._streams.outbound.get(dst)  # open only to live peers on the stream path
            if sock is not None and nbytes <= SMALL_BYTES and staged.event is None and \
                    sends.idle(dst) and not self._progress.closing:
                # The small-message lane: an idle stream takes it in one sendmsg from this thread.
                header_bytes = sends.next_header(dst, F.KIND_TENSOR, tag, host, step, micro_batch)
                try:
                    sent = sock.sendmsg([header_bytes, byte_view(host)])
                except OSError:  # full (BlockingIOError), or broken: the queued path reports that
                    sent = 0
                if sent == F.HEADER_BYTES + nbytes:
                    sends.sent_small(nbytes)
                    return Handle(self._progress, dst, tag, receiving=False, done=True)
                return self._queue_send(dst, tag, staged, header_bytes, sent, via_stream=True, shm=False)
            peer = self._check_peer(dst)
            sends.wait_for_room(dst, nbytes, self._failed, self.default_timeout)
            self._check_peer(dst)
            # One channel per peer keeps its messages in order: the stream where both ends have
            # one (big payloads to a peer on this host sit in shared memory, the stream rings
            # the doorbell), else zmq.
            via_stream = bool(peer.get("stream")) and self._streams.listener is not None
            shm = self.use_shm and peer["host_id"] == self.host_id and nbytes >= SMALL_BYTES
            header_bytes = sends.next_header(dst, F.KIND_SHM if shm else F.KIND_TENSOR, tag, host, step,
                                             micro_batch)
            return self._queue_send(dst, tag, staged, header_bytes, 0, via_stream=via_stream, shm=shm)

    def _queue_send(self, dst: int, tag: int, staged, header_bytes: bytes, sent: int, *,
                    via_stream: bool, shm: bool) -> Handle:
        """Queue a send (lock held); it goes at once if the channel is idle."""
        nbytes = staged.tensor.nbytes
        handle = Handle(self._progress, dst, tag, receiving=False)
        nstripes = 1 if (shm or nbytes <= self.chunk_bytes) else min(self.stripes, self._zmq.stripes_to(dst))
        job = SendJob(handle, dst, nbytes, header_bytes, staged, nstripes, shm, self.chunk_bytes)
        job.stream = via_stream
        job.sent = sent
        if self._sends.enqueue(job):
            self._progress.request_io()  # the rest is the driver's job
        return handle

    def irecv(self, src: int, tag: int = 0, *, out: torch.Tensor | None = None,
              device: str | None = None) -> Handle:
        src = int(src)
        tag = int(tag)
        handle = Handle(self._progress, src, tag, receiving=True)
        if out is not None:
            handle.out = out
            if device is None and out.is_cpu and out.is_contiguous() and out.nbytes <= SMALL_BYTES:
                handle.landing = byte_view(out)
        handle.device = device
        with self._lock:
            claimed, resume = self._matcher.claim_unexpected(handle)
            if not claimed:
                if src in self._failed:
                    raise PeerFailedError(src, self._failed[src])
                self._matcher.post(handle)
        if resume:
            self._progress.request_io()  # the I/O thread may have paused reading for lack of room
        return handle

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0, timeout: float | None = None, **kw) -> None:
        self.isend(tensor, dst, tag, **kw).wait(timeout)

    def recv(self, src: int, tag: int = 0, timeout: float | None = None, **kw) -> torch.Tensor:
        tensor = self.irecv(src, tag, **kw).wait(timeout)
        if tensor is None:   # a receive always finishes with its tensor; only a send's wait gives None
            raise BridgeError(f"recv from rank {src} tag {tag}: finished without a tensor")
        return tensor

    def close(self) -> None:
        if self._progress.closing:
            return
        driving = self._progress.stop()
        with driving, self._lock:  # no driver is inside a poll any more
            error = BridgeError(f"endpoint rank {self.rank} closed")
            self._matcher.fail_posted(error)
            self._sends.fail_queued(error)
            self._shm.close()
            self._zmq.close()
            self._streams.close()
            self._progress.close()
        self._zmq.ctx.term()

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_peer(self, dst: int) -> dict:
        if self._progress.closing:
            raise BridgeError(f"endpoint rank {self.rank} is closed")
        if dst in self._failed:
            raise PeerFailedError(dst, self._failed[dst])
        peer = self._peers.get(dst)
        if peer is None:
            raise BridgeError(f"rank {dst} is not in this endpoint's address book (call add_peers first)")
        return peer
