"""The data plane: point-to-point tensor channels between ranks.

One `Endpoint` per process. `isend`/`irecv` return `Handle`s; `wait()` gives the
tensor (or raises). Each peer gets exactly one channel, so its messages stay in
send order:

- Peers that have a plain-TCP stream (stream.py, the default) get one: [header,
  raw payload] back to back, sent with one sendmsg from the tensor's own memory
  and read into a read-ahead buffer (small messages: header and payload in one
  recv) or, for the rest of a big payload, straight into the posted tensor.
  For a peer on the same host, payloads of `SMALL_BYTES` and more sit in a
  shared-memory ring (shm.py) instead and the stream carries only their
  doorbells; the receiver hands ring slots back over zmq (credits).
- Endpoints without streams send over zmq PUSH/PULL sockets: [header, chunk
  descriptor, raw chunk] (frames.py), cut into `chunk_bytes` pieces dealt
  round-robin over `stripes` sockets (doorbells too, when shm is on).

Small messages take a lane of their own: an idle stream gets them in one
sendmsg from the caller's thread, and a receive posted with a CPU tensor gets
the bytes copied from the read-ahead buffer straight into it. Waiting for a
receive from a stream peer first watches only that stream (the express wait,
which spins for a moment before it sleeps in poll).

Threads: whoever holds the driving lock polls the sockets, pumps queued sends
and finishes handles: a caller blocked in `Handle.wait` (so a reply wakes the
waiting thread straight from the kernel, with no hand-off between Python
threads) or, when nobody has waited for a moment, a background I/O thread. Send
sockets are touched by the caller (fast path: an idle channel sends from the
caller's thread) or the driver, always under the endpoint lock. Matching is
MPI-like: per (source, tag), messages match receives in the order the source
sent them.

Memory is bounded: messages that arrive before their irecv are held up to
`max_unexpected_bytes`, after which the endpoint stops reading new messages
and TCP flow control (zmq high-water marks) pushes back on the senders; `isend`
blocks once `max_pending_send_bytes` are queued.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import select
import socket
import threading
import time

import numpy as np
import torch
import zmq

from comm_bridge import frames as F
from comm_bridge import stream as S
from comm_bridge.errors import BridgeError, BridgeTimeoutError, PeerFailedError, TransferMismatchError
from comm_bridge.shm import ShmReader, ShmRing, host_id, job_hex_of, ring_path, shm_dir
from comm_bridge.staging import Stager

log = logging.getLogger(__name__)

SMALL_BYTES = 64 << 10   # below this: copy into zmq, one stripe, never shared memory
MAX_CHUNK_BYTES = 64 << 20  # zmq drops a peer that sends a bigger frame
MAX_STRIPES = 16
HWM_MESSAGES = 8         # zmq high-water mark per socket, in messages
IO_GRACE_SECONDS = 0.002  # the I/O thread leaves the sockets to returning waiters this long
EXPRESS_SLICE_SECONDS = 0.001  # an express wait looks at the other sockets at least this often
EXPRESS_SPIN_SECONDS = 200e-6 # ... after spinning this long for a reply (a sleeping core wakes slowly)
EXPRESS_IDLE_SLICES = 20       # ... and gives up on express after this many empty slices


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


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor's bytes (no copy).

    numpy does the reshaping: a torch call costs several times a numpy one, and
    this runs for every message."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.dtype is torch.bfloat16:  # numpy has no bfloat16; the bytes are what count
        tensor = tensor.view(torch.int16)
    return tensor.numpy().reshape(-1).view(np.uint8)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable flat byte view of a contiguous CPU tensor's memory, for copying into it.
    It does not keep the tensor alive: use it while holding the tensor."""
    nbytes = tensor.nbytes
    if not nbytes:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


class Handle:
    """One pending send or receive. `wait()` returns the received tensor (None for sends)."""

    __slots__ = ("_endpoint", "peer", "tag", "receiving", "_done", "_sleeper", "_result", "_error",
                 "_out", "_device", "_landing")

    def __init__(self, endpoint: "Endpoint", peer: int, tag: int, receiving: bool, done: bool = False):
        self._endpoint = endpoint
        self.peer = peer
        self.tag = tag
        self.receiving = receiving
        # A flag, not an Event: the waiting thread usually drives the sockets itself and
        # sees the flag flip. Only a waiter that cannot drive sleeps, on `_sleeper`.
        self._done = done
        self._sleeper: threading.Event | None = None
        self._result: torch.Tensor | None = None
        self._error: BaseException | None = None
        self._out: torch.Tensor | None = None      # receive: the caller's buffer
        self._device: str | None = None            # receive: move here after arrival
        self._landing: memoryview | None = None    # receive: bytes of `_out` a small message may fill as is

    @property
    def what(self) -> str:
        return f"irecv from rank {self.peer} tag {self.tag}" if self.receiving else \
            f"isend to rank {self.peer} tag {self.tag}"

    def done(self) -> bool:
        return self._done

    def wait(self, timeout: float | None = None) -> torch.Tensor | None:
        limit = self._endpoint.default_timeout if timeout is None else timeout
        if not self._done:
            # Drive the sockets from this thread: no hand-off from the I/O thread.
            self._endpoint._drive_until(self, time.monotonic() + limit)
        if not self._done:
            raise BridgeTimeoutError(f"{self.what}: no progress after {limit:.1f}s "
                                     f"(peer rank {self.peer} is alive as far as the coordinator knows)")
        if self._error is not None:
            raise self._error
        result = self._result
        if result is None:
            return None
        out = self._out
        if out is not None and result is not out:
            if result.data_ptr() != out.data_ptr():  # not already a view of the caller's tensor
                out.copy_(result.reshape(out.shape))
            result = out
        return self._endpoint._stager.to_device(result, self._device)

    def _sleep(self, timeout: float) -> None:
        """Wait for another thread to finish this handle (at most `timeout` seconds)."""
        with self._endpoint._lock:
            if self._done:
                return
            if self._sleeper is None:
                self._sleeper = threading.Event()
            sleeper = self._sleeper
        sleeper.wait(timeout)

    # Called by the endpoint, under its lock.
    def _finish(self, result: torch.Tensor | None = None) -> None:
        if not self._done:
            self._result = result
            self._done = True
            if self._sleeper is not None:
                self._sleeper.set()

    def _fail(self, error: BaseException) -> None:
        if not self._done:
            self._error = error
            self._done = True
            if self._sleeper is not None:
                self._sleeper.set()


class _SendJob:
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


class _Transfer:
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
        self._auth = F.auth_tag(token)
        self._job_hex = job_hex_of(token)
        self._stager = Stager(accelerator)

        self._ctx = zmq.Context(io_threads=io_threads)
        self._pulls: list[zmq.Socket] = []
        self.endpoints: list[str] = []
        for _ in range(stripes):
            sock = self._ctx.socket(zmq.PULL)
            sock.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
            sock.setsockopt(zmq.LINGER, 0)
            # Refuse oversized messages inside zmq, before they cost memory here.
            sock.setsockopt(zmq.MAXMSGSIZE, max(4 * self.chunk_bytes, MAX_CHUNK_BYTES) + 64)
            sock.bind(f"tcp://{host}:0")
            port = sock.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1]
            self.endpoints.append(f"tcp://{advertise_host or host}:{port}")
            self._pulls.append(sock)
        # Tensors to peers on other hosts (or with shm off) travel on plain-TCP streams.
        self._listener = S.listen(host) if stream else None
        self.stream_address = (f"{S.SCHEME}{advertise_host or host}:{self._listener.getsockname()[1]}"
                               if stream else None)
        self._stream_out: dict[int, object] = {}   # dst rank -> connected socket
        self._stream_in: dict[int, S.Inbound] = {}  # fd -> accepted stream
        self._unauthenticated: dict[int, S.Inbound] = {}  # fd -> accepted stream still owing its hello,
        # in accept order, so in hello-deadline order too
        self._doomed: list = []                     # sockets for the driver to unregister and close
        self._fd_flags: dict[int, int] = {}         # raw fds registered in the poller
        # A plain socket pair, not a zmq one: the express wait (select.poll) watches it too.
        self._wake_rx, self._wake_tx = socket.socketpair()
        self._wake_rx.setblocking(False)
        self._wake_tx.setblocking(False)

        self._lock = threading.RLock()
        self._send_room = threading.Condition(self._lock)
        self._peers: dict[int, dict] = {}
        self._push: dict[tuple[int, int], zmq.Socket] = {}
        self._failed: dict[int, str] = {}
        self._next_seq: dict[int, int] = collections.defaultdict(int)
        self._sendq: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self._tracking: list[_SendJob] = []
        self._pending_send_bytes = 0
        self._credits_owed: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self._rings: dict[int, ShmRing] = {}
        self._readers: dict[int, ShmReader] = {}
        self._last_seq: dict[int, int] = {}
        self._posted: dict[tuple[int, int], collections.deque] = collections.defaultdict(collections.deque)
        self._unexpected: dict[tuple[int, int], collections.deque] = collections.defaultdict(collections.deque)
        self._unexpected_bytes = 0
        self._parked_bytes = 0   # chunks that beat their chunk 0 (which rides stripe 0)
        self._inflight: dict[tuple[int, int], _Transfer] = {}
        self._parked: dict[tuple[int, int], list] = collections.defaultdict(list)
        self._shm_current: dict[int, _Transfer] = {}
        self._counters = collections.Counter()
        self._closing = False
        # Whoever holds `_driving` polls the receive sockets and pumps sends: the
        # I/O thread, or a caller blocked in Handle.wait (`_drivers` counts those;
        # the I/O thread stands aside while any is there).
        self._driving = threading.Lock()
        self._drivers = 0
        self._driver_left = 0.0
        self._io_wanted = False
        self._no_drivers = threading.Condition(self._lock)
        self._poller = zmq.Poller()
        self._poller.register(self._wake_rx.fileno(), zmq.POLLIN)
        self._reading = [False] * len(self._pulls)
        self._thread = threading.Thread(target=self._io_loop, name=f"bridge-io-{rank}", daemon=True)
        self._thread.start()

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

    def fail_peer(self, rank: int, reason: str) -> None:
        """Declare `rank` dead: every pending call on it raises PeerFailedError."""
        error = PeerFailedError(rank, reason)
        with self._lock:
            if rank in self._failed:
                return
            self._failed[rank] = reason
            for (src, _tag), queue in self._posted.items():
                if src == rank:
                    for posted in queue:
                        posted._fail(error)
                    queue.clear()
            for key in [k for k in self._inflight if k[0] == rank]:
                transfer = self._inflight.pop(key)
                self._drop_transfer(transfer, error)
            for key in [k for k in self._parked if k[0] == rank]:
                self._release_parked(key)
            self._shm_current.pop(rank, None)
            for conn in [c for c in self._stream_in.values() if c.rank == rank]:
                self._stream_in.pop(conn.fd, None)
                self._doomed.append(conn.sock)
            out = self._stream_out.pop(rank, None)
            if out is not None:
                self._doomed.append(out)
            reader = self._readers.pop(rank, None)
            if reader is not None:
                reader.close()  # its file went when we mapped it (shm.ShmReader)
            for job in self._sendq.pop(rank, ()):
                self._pending_send_bytes -= job.nbytes
                job.handle._fail(error)
            for job in [j for j in self._tracking if j.dst == rank]:
                self._tracking.remove(job)
                job.handle._fail(error)
            self._send_room.notify_all()

    def stats(self) -> dict:
        with self._lock:
            return {
                "rank": self.rank,
                "rejected": self.rejected.as_dict(),
                "rejected_total": self.rejected.total(),
                "unexpected_bytes": self._unexpected_bytes,
                "pending_send_bytes": self._pending_send_bytes,
                "inflight": len(self._inflight),
                "parked": sum(len(v) for v in self._parked.values()),
                "parked_bytes": self._parked_bytes,
                "posted": sum(len(q) for q in self._posted.values()),
                "tracking": len(self._tracking),
                "streams_in": len(self._stream_in),
                "streams_unauthenticated": len(self._unauthenticated),
                "stream_buffer_bytes": sum(conn.buffer_bytes() for conn in self._stream_in.values()),
                "stream_bytes_received": sum(conn.received for conn in self._stream_in.values()),
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
        with self._lock:
            sock = self._stream_out.get(dst)  # open only to live peers on the stream path
            if sock is not None and nbytes <= SMALL_BYTES and staged.event is None and \
                    not self._sendq.get(dst) and not self._closing:
                # Express: an idle stream takes a small message in one sendmsg from this thread.
                header_bytes = self._next_header(dst, F.KIND_TENSOR, tag, host, step, micro_batch)
                try:
                    sent = sock.sendmsg([header_bytes, byte_view(host)])
                except OSError:  # full (BlockingIOError), or broken: the queued path reports that
                    sent = 0
                if sent == F.HEADER_BYTES + nbytes:
                    counters = self._counters
                    counters["messages_sent"] += 1
                    counters["bytes_sent"] += nbytes
                    counters["small_lane_sent"] += 1
                    return Handle(self, dst, tag, receiving=False, done=True)
                return self._queue_send(dst, tag, staged, header_bytes, sent, via_stream=True, shm=False)
            peer = self._check_peer(dst)
            deadline = time.monotonic() + self.default_timeout
            while self._pending_send_bytes and self._pending_send_bytes + nbytes > self.max_pending_send_bytes:
                if dst in self._failed:
                    raise PeerFailedError(dst, self._failed[dst])
                if not self._send_room.wait(max(0.0, deadline - time.monotonic())):
                    raise BridgeTimeoutError(f"isend to rank {dst}: send queue full for {self.default_timeout:.0f}s")
            self._check_peer(dst)
            # One channel per peer keeps its messages in order: the stream where both ends have
            # one (big payloads to a peer on this host sit in shared memory, the stream rings
            # the doorbell), else zmq.
            via_stream = bool(peer.get("stream")) and self._listener is not None
            shm = self.use_shm and peer["host_id"] == self.host_id and nbytes >= SMALL_BYTES
            header_bytes = self._next_header(dst, F.KIND_SHM if shm else F.KIND_TENSOR, tag, host, step, micro_batch)
            return self._queue_send(dst, tag, staged, header_bytes, 0, via_stream=via_stream, shm=shm)

    def _next_header(self, dst: int, kind: int, tag: int, host: torch.Tensor, step, micro_batch) -> bytes:
        """The header bytes of the next message to `dst`, taking its sequence number (lock held)."""
        seq = self._next_seq[dst]
        self._next_seq[dst] = seq + 1
        return F.pack(kind, self.rank, tag, seq, host.dtype, host.shape, host.nbytes, self._auth,
                      step=int(step), micro_batch=int(micro_batch))

    def _queue_send(self, dst: int, tag: int, staged, header_bytes: bytes, sent: int, *,
                    via_stream: bool, shm: bool) -> Handle:
        """Queue a send (lock held); push it at once if the channel is idle."""
        nbytes = staged.tensor.nbytes
        handle = Handle(self, dst, tag, receiving=False)
        nstripes = 1 if (shm or nbytes <= self.chunk_bytes) else \
            min(self.stripes, len(self._peers[dst]["endpoints"]))
        job = _SendJob(handle, dst, nbytes, header_bytes, staged, nstripes, shm, self.chunk_bytes)
        job.stream = via_stream
        job.sent = sent
        queue = self._sendq[dst]
        queue.append(job)
        self._pending_send_bytes += nbytes
        if len(queue) == 1:
            self._pump(dst)  # send from the caller's thread while the channel is idle
        if queue or job.trackers:
            self._wake()  # the rest is the driver's job
        return handle

    def irecv(self, src: int, tag: int = 0, *, out: torch.Tensor | None = None,
              device: str | None = None) -> Handle:
        src = int(src)
        tag = int(tag)
        handle = Handle(self, src, tag, receiving=True)
        if out is not None:
            handle._out = out
            if device is None and out.is_cpu and out.is_contiguous() and out.nbytes <= SMALL_BYTES:
                handle._landing = byte_view(out)
        handle._device = device
        resume = False
        with self._lock:
            queue = self._unexpected.get((src, tag))
            if queue:
                transfer = queue.popleft()
                resume = self._unexpected_bytes >= self.max_unexpected_bytes
                self._unexpected_bytes -= transfer.header.nbytes
                self._bind(transfer, handle, out)
                if transfer.done and transfer.error is None:
                    handle._finish(transfer.buffer)
            else:
                if src in self._failed:
                    raise PeerFailedError(src, self._failed[src])
                self._posted[(src, tag)].append(handle)
        if resume:
            self._wake()  # the I/O thread may have paused reading for lack of room
        return handle

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0, timeout: float | None = None, **kw) -> None:
        self.isend(tensor, dst, tag, **kw).wait(timeout)

    def recv(self, src: int, tag: int = 0, timeout: float | None = None, **kw) -> torch.Tensor:
        return self.irecv(src, tag, **kw).wait(timeout)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        with self._lock:
            self._no_drivers.notify_all()
        self._wake()
        self._thread.join(timeout=10)
        with self._driving, self._lock:  # no driver is inside a poll any more
            error = BridgeError(f"endpoint rank {self.rank} closed")
            for queue in self._posted.values():
                for posted in queue:
                    posted._fail(error)
            for queue in self._sendq.values():
                for job in queue:
                    job.handle._fail(error)
            for ring in self._rings.values():
                ring.close()
            for reader in self._readers.values():
                reader.close()
            for sock in [*self._pulls, *self._push.values()]:
                sock.close(linger=0)
            plain = [*self._stream_out.values(), *self._doomed, *(c.sock for c in self._stream_in.values()),
                     self._wake_rx, self._wake_tx]
            for sock in plain + ([self._listener] if self._listener is not None else []):
                try:
                    sock.close()
                except OSError:
                    pass
        self._ctx.term()

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ send side
    def _check_peer(self, dst: int) -> dict:
        if self._closing:
            raise BridgeError(f"endpoint rank {self.rank} is closed")
        if dst in self._failed:
            raise PeerFailedError(dst, self._failed[dst])
        peer = self._peers.get(dst)
        if peer is None:
            raise BridgeError(f"rank {dst} is not in this endpoint's address book (call add_peers first)")
        return peer

    def _socket(self, dst: int, stripe: int) -> zmq.Socket:
        sock = self._push.get((dst, stripe))
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._peers[dst]["endpoints"][stripe])
            self._push[(dst, stripe)] = sock
        return sock

    def _pump(self, dst: int) -> None:
        """Push queued sends to `dst` as far as zmq and shm credits allow (lock held)."""
        queue = self._sendq.get(dst)
        owed = self._credits_owed.get(dst)
        while owed:
            try:
                self._socket(dst, 0).send_multipart(owed[0], flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            owed.popleft()
        while queue:
            job = queue[0]
            if not job.staged.ready():
                return
            if job.stream:
                try:
                    if not self._advance_stream(job):
                        return
                except OSError as exc:  # connection refused or lost: this send fails, later ones reconnect
                    queue.popleft()
                    self._pending_send_bytes -= job.nbytes
                    sock = self._stream_out.pop(dst, None)
                    if sock is not None:
                        self._doomed.append(sock)
                    job.handle._fail(PeerFailedError(dst, f"stream connection: {exc}"))
                    self._send_room.notify_all()
                    continue
            elif not (self._advance_shm(job) if job.shm else self._advance_tcp(job)):
                return
            queue.popleft()
            if not job.trackers:
                self._sent(job)
            else:
                self._tracking.append(job)

    def _sent(self, job: _SendJob) -> None:
        self._pending_send_bytes -= job.nbytes
        self._counters["messages_sent"] += 1
        self._counters["bytes_sent"] += job.nbytes
        job.handle._finish()
        self._send_room.notify_all()

    def _advance_tcp(self, job: _SendJob) -> bool:
        data = as_bytes(job.staged.tensor)
        copy = job.nbytes < SMALL_BYTES
        while job.next_chunk < job.nchunks:
            chunk = F.Chunk(job.next_chunk, job.nchunks, self.chunk_bytes)
            parts = [job.header_bytes, F.pack_chunk(chunk), data[chunk.offset:chunk.offset + chunk.length(job.nbytes)]]
            # zmq frees a socket's messages in order, so tracking the last chunk per
            # stripe tells when the whole tensor has left our memory.
            track = not copy and chunk.index >= job.nchunks - job.nstripes
            try:
                tracker = self._socket(job.dst, chunk.index % job.nstripes).send_multipart(
                    parts, flags=zmq.NOBLOCK, copy=copy, track=track)
            except zmq.Again:
                return False
            if tracker is not None and not tracker.done:
                job.trackers.append(tracker)
            job.next_chunk += 1
        return True

    def _advance_stream(self, job: _SendJob) -> bool:
        """Hand header + payload to the kernel without blocking; True once all of it is out."""
        sock = self._stream_out.get(job.dst)
        if sock is None:
            sock = S.connect(self._peers[job.dst]["stream"], self.rank, self._auth, timeout=10.0)
            self._stream_out[job.dst] = sock
        if job.shm:
            return self._advance_shm(job, sock)
        job.sent = S.send_some(sock, job.header_bytes, as_bytes(job.staged.tensor), job.sent)
        return job.sent >= F.HEADER_BYTES + job.nbytes

    def _advance_shm(self, job: _SendJob, stream=None) -> bool:
        """Copy chunks into the ring as credits allow and ring a doorbell per chunk: on the
        peer's stream if it has one, else on zmq."""
        ring = self._rings.get(job.dst)
        if ring is None:
            ring = ShmRing(ring_path(self._job_hex, self.rank, job.dst), self.shm_slots, self.chunk_bytes)
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
                bell = job.header_bytes + desc
                job.sent = S.send_some(stream, bell, b"", job.sent)
                if job.sent < len(bell):
                    return False
                job.sent = 0
            else:
                try:
                    self._socket(job.dst, 0).send_multipart([job.header_bytes, desc], flags=zmq.NOBLOCK)
                except zmq.Again:
                    return False
            job.held_slot = None
            job.next_chunk += 1
        return True

    def _wake(self) -> None:
        """Work for whoever drives: get the I/O thread going even in its grace period."""
        with self._lock:
            self._io_wanted = True
            self._no_drivers.notify_all()
        self._kick()

    def _kick(self) -> None:
        """Interrupt the poll of whoever drives."""
        try:
            self._wake_tx.send(b"\0")
        except OSError:
            pass  # the pair is full (a wake is already queued), or we are closing

    # --------------------------------------------------------- receive side
    def _io_loop(self) -> None:
        while not self._closing:
            with self._lock:
                # Stand aside while a caller drives, and for a moment after: a caller
                # that soon waits again then takes the sockets without waking us
                # (each wake costs a GIL hand-off on the caller's critical path).
                while not self._closing and (self._drivers or (
                        not self._io_wanted and time.monotonic() - self._driver_left < IO_GRACE_SECONDS)):
                    self._no_drivers.wait(IO_GRACE_SECONDS)
                self._io_wanted = False
            with self._driving:
                if not self._closing and not self._progress_once(100):
                    break

    def _drive_until(self, handle: Handle, deadline: float) -> None:
        """Make progress from the waiting thread until `handle` is done or `deadline` passes.

        A small message then wakes the waiting thread straight from the kernel,
        with no hand-off between Python threads. One thread drives at a time;
        other waiters sleep on their handle and take over when it leaves. A
        receive from a peer with an open stream first tries the express wait."""
        if self._closing:
            handle._sleep(max(0.0, deadline - time.monotonic()))
            return
        express_src = handle.peer if handle.receiving else None
        with self._lock:
            self._drivers += 1
        driving = self._driving.acquire(blocking=False)
        if not driving:
            self._kick()  # the I/O thread (or another waiter) sits in poll: make it look up
        idle_slices = 0
        try:
            while not handle._done and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                if not driving:
                    driving = self._driving.acquire(timeout=min(remaining, 0.001))
                    if not driving:
                        handle._sleep(min(remaining, 0.001))  # another waiter drives
                        continue
                if express_src is not None:
                    outcome = self._express_once(express_src, min(remaining, EXPRESS_SLICE_SECONDS))
                    if outcome:
                        idle_slices = 0
                        continue
                    idle_slices = idle_slices + 1 if outcome is False else EXPRESS_IDLE_SLICES
                    if idle_slices >= EXPRESS_IDLE_SLICES:
                        express_src = None  # a long wait: the plain rounds serve it as well
                    if not self._progress_once(0):  # keep everything else moving
                        break
                    continue
                remaining_ms = max(1, int(remaining * 1000))
                if not self._progress_once(min(100, remaining_ms)):
                    break
            if self._closing:
                if driving:
                    self._driving.release()
                    driving = False
                handle._sleep(max(0.0, deadline - time.monotonic()))
        finally:
            if driving:
                self._driving.release()
            with self._lock:
                self._drivers -= 1
                if not self._drivers:
                    # No notify: the I/O thread looks again within IO_GRACE_SECONDS anyway,
                    # and waking it here would contend for the GIL with our caller.
                    self._driver_left = time.monotonic()

    def _express_once(self, src: int, timeout: float) -> bool | None:
        """The express wait (`_driving` held): watch only the stream from `src` and read the
        next message as soon as it lands, skipping the full round's bookkeeping. Waiting
        for a new message it spins on the socket for a moment first (a core that went to
        sleep wakes slowly); in the middle of a payload, whose bytes go straight into their
        tensor, it blocks in poll. True: something came; False: nothing did, or a wake asks
        for a full round; None: not possible now (no open stream from `src`, or other work
        is queued)."""
        with self._lock:
            if self._doomed or self._tracking or not self._may_read(0) or \
                    any(self._sendq.values()) or any(self._credits_owed.values()):
                return None
            conn = None
            for candidate in self._stream_in.values():
                if candidate.rank == src:
                    conn = candidate
            if conn is None:
                return None
            if conn.mid_message():
                before = conn.received
                self._read_stream(conn)
                if conn.received != before:
                    return True
        got = room = 0
        try:
            if conn.transfer is not None:
                if not self._express_poll(conn, timeout):
                    return False
            else:
                spin_until = time.perf_counter() + min(timeout, EXPRESS_SPIN_SECONDS)
                room = conn.room()
                while not (got := conn.fill()):  # only this (driving) thread reads the stream
                    if time.perf_counter() >= spin_until:
                        if not self._express_poll(conn, timeout):
                            return False
                        spin_until = time.perf_counter() + EXPRESS_SPIN_SECONDS
                        room = conn.room()
        except (EOFError, F.FrameError, OSError):
            got = room = 0  # the read below meets the same end and reports it
        with self._lock:
            if self._stream_in.get(conn.fd) is conn:
                self._read_stream(conn, drained=0 < got < room)
        return True

    def _express_poll(self, conn: S.Inbound, timeout: float) -> bool:
        """Block until the stream is readable (True) or `timeout` passes or a wake comes (False)."""
        if conn.express is None:
            conn.express = select.poll()
            conn.express.register(conn.fd, select.POLLIN)
            conn.express.register(self._wake_rx.fileno(), select.POLLIN)
        events = conn.express.poll(timeout * 1000)
        return bool(events) and all(fd == conn.fd for fd, _ in events)

    def _drain_wakes(self) -> None:
        try:
            while self._wake_rx.recv(4096):
                pass
        except OSError:
            pass

    def _progress_once(self, idle_ms: int) -> bool:
        """One round of I/O: poll, read, pump sends, retire tracked sends (`_driving` held).
        Returns False once the endpoint is closing."""
        poller, reading = self._poller, self._reading
        with self._lock:
            # Streams say when they can move (POLLOUT); anything else queued is polled for.
            busy = any(q and not (q[0].stream and q[0].staged.ready()) for q in self._sendq.values()) \
                or bool(self._tracking) or any(self._credits_owed.values())
            want = [self._may_read(stripe) for stripe in range(len(self._pulls))]
            doomed, self._doomed = self._doomed, []
            want_fds = self._stream_interest()
        for sock in doomed:
            fd = sock.fileno()
            if fd in self._fd_flags:
                poller.unregister(fd)
                del self._fd_flags[fd]
            sock.close()
        for fd in [fd for fd in self._fd_flags if fd not in want_fds]:
            poller.unregister(fd)
            del self._fd_flags[fd]
        for fd, flags in want_fds.items():
            if self._fd_flags.get(fd) != flags:
                poller.register(fd, flags)
                self._fd_flags[fd] = flags
        for stripe, sock in enumerate(self._pulls):
            if want[stripe] != reading[stripe]:
                if want[stripe]:
                    poller.register(sock, zmq.POLLIN)
                else:
                    poller.unregister(sock)
                    self._counters["backpressure_pauses"] += 1
                reading[stripe] = want[stripe]
        try:
            events = dict(poller.poll(1 if busy else idle_ms))
        except zmq.ZMQError:
            return False
        if self._closing:
            return False
        if self._wake_rx.fileno() in events:
            self._drain_wakes()
        for stripe, sock in enumerate(self._pulls):
            if sock in events:
                self._drain(sock, stripe)
        if self._listener is not None and self._listener.fileno() in events:
            self._accept_streams()
        with self._lock:
            # Readable streams, and those holding read-ahead bytes a full budget left unparsed.
            ready = [conn for fd, conn in self._stream_in.items() if fd in events or conn.mid_message()]
            for conn in ready:
                if self._stream_in.get(conn.fd) is conn:
                    self._read_stream(conn)
            if self._unauthenticated:
                self._expire_hellos()
        with self._lock:
            for dst in [d for d, q in self._sendq.items() if q] + [d for d, q in self._credits_owed.items() if q]:
                self._pump(dst)
            if self._tracking:
                still = []
                for job in self._tracking:
                    if all(t.done for t in job.trackers):
                        self._sent(job)
                    else:
                        still.append(job)
                self._tracking = still
        return True

    # Plain-TCP streams (driver thread only, except where noted).
    def _stream_interest(self) -> dict[int, int]:
        """Poller flags each raw fd should have now (lock held)."""
        flags = {}
        if self._listener is not None:
            flags[self._listener.fileno()] = zmq.POLLIN
        for fd, conn in self._stream_in.items():
            if conn.rank is None or conn.mid_message() or self._may_read(0):
                flags[fd] = zmq.POLLIN
            elif self._fd_flags.get(fd):
                self._counters["backpressure_pauses"] += 1  # unexpected-message budget is full
        for dst, sock in self._stream_out.items():
            queue = self._sendq.get(dst)
            if queue and queue[0].stream and not queue[0].awaits_credit:
                flags[sock.fileno()] = zmq.POLLOUT
        return flags

    def _accept_streams(self) -> None:
        while True:
            try:
                sock, _peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("rank %d: accepting a stream failed: %s", self.rank, exc)
                return
            with self._lock:
                if len(self._unauthenticated) >= self.max_unauthenticated:
                    self._make_room_for_a_hello()
                conn = S.Inbound(sock, hello_deadline=time.monotonic() + self.hello_timeout)
                self._stream_in[conn.fd] = conn
                self._unauthenticated[conn.fd] = conn

    def _make_room_for_a_hello(self) -> None:
        """At the cap on connections owing their hello (lock held): read what they have
        sent (a real peer says hello as soon as it connects, and leaves the count), then
        close the oldest still silent. Idle knockers push each other out, never a peer."""
        for conn in list(self._unauthenticated.values()):
            self._read_stream(conn)
        while len(self._unauthenticated) >= self.max_unauthenticated:
            oldest = next(iter(self._unauthenticated.values()))
            self._refused("unauthenticated_cap", f"{self.max_unauthenticated} stream connections owe their "
                                                 "hello; closing the oldest")
            self._end_stream(oldest, None)

    def _expire_hellos(self) -> None:
        """Close accepted streams whose hello deadline has passed (lock held)."""
        now = time.monotonic()
        for conn in list(self._unauthenticated.values()):
            if conn.hello_deadline > now:
                break  # the rest were accepted later
            self._refused("hello_timeout", f"a stream connection said no hello within {self.hello_timeout:g}s")
            self._end_stream(conn, None)

    def _refused(self, reason: str, detail: str) -> None:
        """Count a refused stream connection; only the first of each reason is logged as a warning
        (a flood of knocks must not flood the log)."""
        first = self.rejected.add(reason) == 1
        log.log(logging.WARNING if first else logging.DEBUG, "rank %d: %s", self.rank, detail)

    def _read_stream(self, conn: S.Inbound, drained: bool = False) -> None:
        """Handle what one stream has: hello, then headers, and payloads straight into their
        tensors (lock held). Each round reads at most READ_ROUND_BYTES off the socket, so a
        chatty peer cannot starve the rest, and stops at the first short read."""
        budget = S.READ_ROUND_BYTES
        try:
            while True:
                if conn.transfer is None:
                    if conn.bell is None and conn.rank is not None and not self._may_read(0):
                        return
                    # The next record: a doorbell's chunk descriptor, the hello, or a header.
                    raw = conn.take(F.SHM_CHUNK_BYTES if conn.bell is not None else
                                    S.HELLO_BYTES if conn.rank is None else F.HEADER_BYTES)
                    if raw is None:
                        if drained or budget <= 0:
                            return
                        room = conn.room()
                        got = conn.fill()
                        budget -= got
                        drained = got < room
                        continue
                    if conn.bell is not None:
                        header, conn.bell = conn.bell, None
                        self._on_shm_chunk(header, raw)
                        continue
                    if conn.rank is None:
                        conn.check_hello(raw, self._auth)
                        self._unauthenticated.pop(conn.fd, None)
                        continue
                    header = F.parse_header(raw, self._auth, self.max_message_bytes)
                    if header.kind == F.KIND_CREDIT or header.sender != conn.rank:
                        raise F.FrameError("bad_kind", f"stream from rank {conn.rank} carried kind "
                                                       f"{header.kind} from rank {header.sender}")
                    if header.kind == F.KIND_SHM:
                        conn.bell = header
                        continue
                    self._check_seq(header)
                    if header.nbytes <= conn.buffered() and self._deliver_buffered(conn, header):
                        continue
                    conn.transfer = self._begin(header, 1)
                    conn.body_got = 0
                transfer = conn.transfer
                done, read = conn.read_body(transfer.flat, transfer.header.nbytes, budget)
                budget -= read
                if not done:
                    return
                conn.transfer = None
                transfer.parts_seen.add(0)
                self._progress(transfer, (transfer.header.sender, transfer.header.seq))
        except EOFError:
            if conn.mid_message():
                self.rejected.add("truncated")
                self._end_stream(conn, f"stream from rank {conn.rank} closed mid-message")
            else:
                if conn.rank is None:
                    self._refused("no_hello", "a stream connection closed without a hello")
                self._end_stream(conn, None)
        except F.FrameError as exc:
            self.rejected.add(exc.reason)
            log.warning("rank %d: %s", self.rank, exc)
            self._end_stream(conn, str(exc))

    def _deliver_buffered(self, conn: S.Inbound, header: F.Header) -> bool:
        """The small-message lane (lock held): a payload already in the read-ahead buffer
        whose receive is posted with a matching CPU tensor goes straight into that tensor,
        skipping the bookkeeping of a transfer in progress. False: take the general path."""
        queue = self._posted.get((header.sender, header.tag))
        if not queue:
            return False
        posted = queue[0]
        landing = posted._landing
        if landing is None or len(landing) != header.nbytes or posted._out.dtype is not header.dtype:
            return False
        queue.popleft()
        conn.take_into(landing, header.nbytes)
        counters = self._counters
        counters["messages_received"] += 1
        counters["bytes_received"] += header.nbytes
        counters["small_lane_received"] += 1
        posted._finish(posted._out)
        return True

    def _end_stream(self, conn: S.Inbound, problem: str | None) -> None:
        """Close a stream; a message cut off on it fails its receive (lock held)."""
        transfer = conn.transfer
        if transfer is not None:
            self._inflight.pop((transfer.header.sender, transfer.header.seq), None)
            self._drop_transfer(transfer, TransferMismatchError(f"truncated message: {problem}"))
            conn.transfer = None
        self._stream_in.pop(conn.fd, None)
        self._unauthenticated.pop(conn.fd, None)
        self._doomed.append(conn.sock)

    def _may_read(self, stripe: int) -> bool:
        """Backpressure: stop reading when unmatched data fills its budget.

        Every message starts with chunk 0 on stripe 0, so only stripe 0 starts new
        transfers and it alone answers to the unexpected-message budget. The other
        stripes carry the rest of transfers already started (which must be let
        finish) or chunks that beat their chunk 0 (parked, with their own budget).
        Pausing the other stripes on the unexpected budget would deadlock."""
        if stripe == 0:
            return self._unexpected_bytes < self.max_unexpected_bytes
        return self._parked_bytes < self.max_unexpected_bytes

    def _drain(self, sock: zmq.Socket, stripe: int) -> None:
        for _ in range(64):
            if not self._may_read(stripe):
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
        elif header.kind == F.KIND_SHM:
            self._on_shm(header, parts)
        else:
            self._on_credit(header, parts)

    def _check_seq(self, header: F.Header) -> None:
        last = self._last_seq.get(header.sender, -1)
        if header.seq <= last:
            raise F.FrameError("replayed", f"rank {header.sender} seq {header.seq} after {last}")
        if header.seq != last + 1:
            self._counters["seq_gaps"] += 1
        self._last_seq[header.sender] = header.seq

    def _on_tensor(self, header: F.Header, parts) -> None:
        if len(parts) != 3:
            raise F.FrameError("truncated", f"tensor message with {len(parts)} parts, expected 3")
        chunk = F.parse_chunk(parts[1].bytes, header.nbytes, max(4 * self.chunk_bytes, MAX_CHUNK_BYTES))
        key = (header.sender, header.seq)
        length = len(parts[2].buffer)
        if length != chunk.length(header.nbytes):
            transfer = self._inflight.pop(key, None)
            if transfer is not None:  # part of the tensor already landed: fail it loudly
                self._drop_transfer(transfer, TransferMismatchError(
                    f"truncated message from rank {header.sender} seq {header.seq}: chunk {chunk.index} "
                    f"is {length} bytes, expected {chunk.length(header.nbytes)}"))
            raise F.FrameError("truncated", f"rank {header.sender} seq {header.seq} chunk {chunk.index}: "
                                            f"{length} bytes, expected {chunk.length(header.nbytes)}")
        if chunk.index == 0:
            self._check_seq(header)
            transfer = self._begin(header, chunk.count)
            self._fill(transfer, key, chunk, parts[2])
            for parked_chunk, parked_payload, _held in self._release_parked(key):
                self._fill(transfer, key, parked_chunk, parked_payload)
            return
        transfer = self._inflight.get(key)
        if transfer is not None:
            self._fill(transfer, key, chunk, parts[2])
        elif header.seq <= self._last_seq.get(header.sender, -1):
            raise F.FrameError("orphan", f"chunk {chunk.index} of a finished message (rank {header.sender} seq {header.seq})")
        else:  # arrived on another stripe before chunk 0: hold the zmq frame, copy later
            self._parked[key].append((chunk, parts[2], length))
            self._parked_bytes += length

    def _fill(self, transfer: _Transfer, key, chunk: F.Chunk, payload) -> None:
        if chunk.count != transfer.parts_total or chunk.index in transfer.parts_seen:
            self._inflight.pop(key, None)
            self._drop_transfer(transfer, TransferMismatchError(
                f"inconsistent chunks from rank {key[0]} seq {key[1]}"))
            raise F.FrameError("bad_chunk", f"chunk {chunk.index}/{chunk.count} for a {transfer.parts_total}-chunk message")
        if transfer.flat is not None and chunk.length(transfer.header.nbytes):
            transfer.flat[chunk.offset:chunk.offset + len(payload.buffer)] = np.frombuffer(payload.buffer, dtype=np.uint8)
        transfer.parts_seen.add(chunk.index)
        self._progress(transfer, key)

    def _progress(self, transfer: _Transfer, key) -> None:
        if len(transfer.parts_seen) == transfer.parts_total:
            self._inflight.pop(key, None)
            transfer.done = True
            self._counters["messages_received"] += 1
            self._counters["bytes_received"] += transfer.header.nbytes
            if transfer.handle is not None:
                if transfer.error is not None:
                    transfer.handle._fail(transfer.error)
                else:
                    transfer.handle._finish(transfer.buffer)

    def _release_parked(self, key) -> list:
        parked = self._parked.pop(key, [])
        self._parked_bytes -= sum(held for _s, _p, held in parked)
        return parked

    def _begin(self, header: F.Header, parts_total: int) -> _Transfer:
        """Match a new message to a posted irecv, or hold it as unexpected."""
        key = (header.sender, header.tag)
        posted_queue = self._posted.get(key)
        if posted_queue:
            posted = posted_queue.popleft()
            out = posted._out
            if out is not None and out.is_cpu and out.is_contiguous() and \
                    out.dtype is header.dtype and out.nbytes == header.nbytes:
                # The bytes land in the caller's tensor; a view only where the shapes differ.
                buffer = out if out.shape == header.shape else out.view(header.shape)
            else:
                buffer = self._stager.host_buffer(header.dtype, header.shape, posted._device)
            transfer = _Transfer(header, buffer, parts_total)
            self._bind(transfer, posted, out)
        else:
            transfer = _Transfer(header, torch.empty(header.shape, dtype=header.dtype), parts_total)
            self._unexpected[key].append(transfer)
            self._unexpected_bytes += header.nbytes
        self._inflight[(header.sender, header.seq)] = transfer
        return transfer

    def _bind(self, transfer: _Transfer, handle: Handle, out: torch.Tensor | None) -> None:
        header = transfer.header
        if out is not None and (out.dtype is not header.dtype or out.nbytes != header.nbytes):
            transfer.error = TransferMismatchError(
                f"rank {header.sender} sent {header.dtype}{list(header.shape)} with tag {header.tag}, "
                f"but the irecv posted {out.dtype}{list(out.shape)}")
            handle._fail(transfer.error)
        transfer.handle = handle

    def _drop_transfer(self, transfer: _Transfer, error: BaseException) -> None:
        transfer.error = error
        if transfer.handle is not None:
            transfer.handle._fail(error)
        else:
            queue = self._unexpected.get((transfer.header.sender, transfer.header.tag))
            if queue and transfer in queue:
                queue.remove(transfer)
                self._unexpected_bytes -= transfer.header.nbytes

    # Shared memory.
    def _on_shm(self, header: F.Header, parts) -> None:
        if len(parts) != 2:
            raise F.FrameError("truncated", f"shm doorbell with {len(parts)} parts")
        self._on_shm_chunk(header, parts[1].bytes)

    def _on_shm_chunk(self, header: F.Header, descriptor) -> None:
        """A doorbell (from zmq or a stream): copy its chunk out of the sender's ring."""
        reader = self._readers.get(header.sender)
        if reader is None:
            try:
                reader = ShmReader(ring_path(self._job_hex, header.sender, self.rank))
            except (OSError, ValueError) as exc:
                raise F.FrameError("bad_shm", f"rank {header.sender}: cannot map ring: {exc}") from None
            self._readers[header.sender] = reader
        chunk = F.parse_shm_chunk(descriptor, header.nbytes, reader.slots, reader.slot_bytes)
        key = (header.sender, header.seq)
        if chunk.index == 0:
            self._check_seq(header)
            transfer = self._begin(header, chunk.count)
            self._shm_current[header.sender] = transfer
        else:
            transfer = self._shm_current.get(header.sender)
            if transfer is None or transfer.header.seq != header.seq or chunk.index in transfer.parts_seen \
                    or chunk.count != transfer.parts_total:
                self._owe_credit(header.sender, chunk.slot)
                raise F.FrameError("out_of_order", f"shm chunk {chunk.index} of rank {header.sender} seq {header.seq}")
        if transfer.flat is not None:
            reader.read_into(chunk.slot, chunk.length, transfer.flat[chunk.offset:chunk.offset + chunk.length])
        self._owe_credit(header.sender, chunk.slot)
        transfer.parts_seen.add(chunk.index)
        if len(transfer.parts_seen) == transfer.parts_total:
            self._shm_current.pop(header.sender, None)
        self._progress(transfer, key)

    def _owe_credit(self, sender: int, slot: int) -> None:
        if sender not in self._peers:
            return  # cannot reach it; its ring stays short of one slot
        credit = F.Header(sender=self.rank, tag=0, seq=0, dtype=torch.uint8, shape=(0,), nbytes=0,
                          kind=F.KIND_CREDIT)
        message = [F.pack_header(credit, self._auth), F.pack_shm_chunk(F.ShmChunk(0, 1, slot, 0, 0))]
        self._credits_owed[sender].append(message)
        self._pump(sender)

    def _on_credit(self, header: F.Header, parts) -> None:
        ring = self._rings.get(header.sender)
        if len(parts) != 2 or ring is None:
            raise F.FrameError("bad_credit", f"credit from rank {header.sender} without a ring")
        chunk = F.parse_shm_chunk(parts[1].bytes, 0, ring.slots, ring.slot_bytes)
        if chunk.slot in ring.free:
            raise F.FrameError("bad_credit", f"slot {chunk.slot} is already free")
        ring.free.append(chunk.slot)
        self._pump(header.sender)

