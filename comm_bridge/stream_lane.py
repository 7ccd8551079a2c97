"""The stream lane: one plain-TCP stream per (sender, receiver) pair (stream.py's wire).

The sender hands [header, raw payload] to the kernel in one sendmsg from the
tensor's own memory (or, for a same-host payload in shared memory, the
doorbell). The receiver parses each accepted stream: hello, then headers, then
payloads straight into their tensors; a small payload already in the
read-ahead buffer whose receive is posted with a matching CPU tensor is copied
into it at once (the small-message lane). A stream that breaks the protocol is
closed: a byte stream has no way to resync.

Accepted streams that owe their hello are kept in accept order, so in
hello-deadline order too; at most `max_unauthenticated` of them wait.
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import threading
import time

import zmq

from comm_bridge import frames as F
from comm_bridge import stream as S
from comm_bridge.buffers import as_bytes
from comm_bridge.errors import TransferMismatchError
from comm_bridge.matching import Matcher, Transfer

log = logging.getLogger(__name__)


class InboundStream(S.Inbound):
    """An accepted stream (its bytes: stream.Inbound) and where parsing them stands.
    A subclass rather than a wrapper: the express wait reads these fields per message."""

    def __init__(self, sock, hello_deadline: float):
        super().__init__(sock, hello_deadline)
        self.transfer: Transfer | None = None   # the message whose payload is being read
        self.body_got = 0        # ... and how many of its bytes are in
        self.doorbell: F.Header | None = None   # a shared-memory doorbell's header, its descriptor still to come
        self.express_poll: select.poll | None = None  # select.poll over this stream and the wake pipe (progress.py)

    def mid_message(self) -> bool:
        return self._end > self._start or self.transfer is not None or self.doorbell is not None


class StreamLane:
    """Our listener, our streams to peers, and the streams peers opened to us."""

    def __init__(self, *, rank: int, auth: bytes, host: str, advertise_host: str | None, enabled: bool,
                 max_message_bytes: int, hello_timeout: float, max_unauthenticated: int, peers: dict,
                 matcher: Matcher, shm_lane, lock: threading.RLock, counters: collections.Counter,
                 rejected: F.RejectCounter):
        self.rank = rank
        self._auth = auth
        self.max_message_bytes = max_message_bytes
        self.hello_timeout = hello_timeout
        self.max_unauthenticated = max_unauthenticated
        self._peers = peers
        self._matcher = matcher
        self._shm = shm_lane
        self._lock = lock
        self._counters = counters
        self.rejected = rejected
        self.listener = S.listen(host) if enabled else None
        self.address = (f"{S.SCHEME}{advertise_host or host}:{self.listener.getsockname()[1]}"
                        if self.listener is not None else None)
        self.outbound: dict[int, socket.socket] = {}       # dst rank -> connected socket
        self.inbound: dict[int, InboundStream] = {}        # fd -> accepted stream
        self._unauthenticated: dict[int, InboundStream] = {}  # fd -> accepted stream still owing its hello
        self.streams_joined = 0   # peers' streams that said a valid hello, over the lane's life
        self.to_close: list = []  # sockets for the driver to unregister from its poller and close

    # ------------------------------------------------------------ send side (lock held)
    def send(self, job) -> bool:
        """Hand header + payload (or a doorbell) to the kernel without blocking; True once all of it is out."""
        sock = self.outbound.get(job.dst)
        if sock is None:
            sock = S.connect(self._peers[job.dst]["stream"], self.rank, self._auth, timeout=10.0)
            self.outbound[job.dst] = sock
        if job.shm:
            return self._shm.send(job, sock)
        job.sent = S.send_some(sock, job.header_bytes, as_bytes(job.staged.tensor), job.sent)
        return job.sent >= F.HEADER_BYTES + job.nbytes

    def drop_outbound(self, dst: int) -> None:
        """Our stream to `dst` broke: close it (the next send reconnects)."""
        sock = self.outbound.pop(dst, None)
        if sock is not None:
            self.to_close.append(sock)

    # ------------------------------------------------------------ receive side (driver)
    def accept(self) -> None:
        """Take the connections waiting on our listener (none when streams are off)."""
        listener = self.listener
        while listener is not None:
            try:
                sock, _peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("rank %d: accepting a stream failed: %s", self.rank, exc)
                return
            with self._lock:
                if len(self._unauthenticated) >= self.max_unauthenticated:
                    self._make_room_for_a_hello()
                conn = InboundStream(sock, hello_deadline=time.monotonic() + self.hello_timeout)
                self.inbound[conn.fd] = conn
                self._unauthenticated[conn.fd] = conn

    def _make_room_for_a_hello(self) -> None:
        """At the cap on connections owing their hello (lock held): read what they have
        sent (a real peer says hello as soon as it connects, and leaves the count), then
        close the oldest still silent. Idle knockers push each other out, never a peer."""
        for conn in list(self._unauthenticated.values()):
            self.read(conn)
        while len(self._unauthenticated) >= self.max_unauthenticated:
            oldest = next(iter(self._unauthenticated.values()))
            self._refused("unauthenticated_cap", f"{self.max_unauthenticated} stream connections owe their "
                                                 "hello; closing the oldest")
            self._end(oldest, None)

    def expire_hellos(self) -> None:
        """Close accepted streams whose hello deadline has passed (lock held)."""
        if not self._unauthenticated:
            return
        now = time.monotonic()
        for conn in list(self._unauthenticated.values()):
            if conn.hello_deadline > now:
                break  # the rest were accepted later
            self._refused("hello_timeout", f"a stream connection said no hello within {self.hello_timeout:g}s")
            self._end(conn, None)

    def _refused(self, reason: str, detail: str) -> None:
        """Count a refused stream connection; only the first of each reason is logged as a warning
        (a flood of knocks must not flood the log)."""
        first = self.rejected.add(reason) == 1
        log.log(logging.WARNING if first else logging.DEBUG, "rank %d: %s", self.rank, detail)

    def read_ready(self, events) -> None:
        """Read the streams the poll found readable, and those holding read-ahead bytes a
        full budget left unparsed (lock held)."""
        inbound = self.inbound
        for conn in [conn for fd, conn in inbound.items() if fd in events or conn.mid_message()]:
            if inbound.get(conn.fd) is conn:
                self.read(conn)

    def read(self, conn: InboundStream, drained: bool = False) -> None:
        """Handle what one stream has: hello, then headers, and payloads straight into their
        tensors (lock held). Each round reads at most READ_ROUND_BYTES off the socket, so a
        chatty peer cannot starve the rest, and stops at the first short read."""
        budget = S.READ_ROUND_BYTES
        matcher = self._matcher
        try:
            while True:
                if conn.transfer is None:
                    if conn.doorbell is None and conn.rank is not None and not matcher.may_read(0):
                        return
                    # The next record: a doorbell's chunk descriptor, the hello, or a header.
                    raw = conn.take(F.SHM_CHUNK_BYTES if conn.doorbell is not None else
                                    S.HELLO_BYTES if conn.rank is None else F.HEADER_BYTES)
                    if raw is None:
                        if drained or budget <= 0:
                            return
                        room = conn.room()
                        got = conn.fill()
                        budget -= got
                        drained = got < room
                        continue
                    if conn.doorbell is not None:
                        header, conn.doorbell = conn.doorbell, None
                        self._shm.on_doorbell(header, raw)
                        continue
                    if conn.rank is None:
                        conn.check_hello(raw, self._auth)
                        self._unauthenticated.pop(conn.fd, None)
                        self.streams_joined += 1
                        continue
                    header = F.parse_header(raw, self._auth, self.max_message_bytes)
                    if header.kind == F.KIND_CREDIT or header.sender != conn.rank:
                        raise F.FrameError("bad_kind", f"stream from rank {conn.rank} carried kind "
                                                       f"{header.kind} from rank {header.sender}")
                    if header.kind == F.KIND_SHM:
                        conn.doorbell = header
                        continue
                    matcher.check_seq(header)
                    if header.nbytes <= conn.buffered() and self._deliver_buffered(conn, header):
                        continue
                    conn.transfer = matcher.begin(header, 1)
                    conn.body_got = 0
                transfer = conn.transfer
                nbytes = transfer.header.nbytes
                conn.body_got, read = conn.read_body(transfer.flat, conn.body_got, nbytes, budget)
                budget -= read
                if conn.body_got < nbytes:
                    return
                conn.transfer = None
                matcher.part_arrived(transfer, (transfer.header.sender, transfer.header.seq), 0)
        except EOFError:
            if conn.mid_message():
                self.rejected.add("truncated")
                self._end(conn, f"stream from rank {conn.rank} closed mid-message")
            else:
                if conn.rank is None:
                    self._refused("no_hello", "a stream connection closed without a hello")
                self._end(conn, None)
        except F.FrameError as exc:
            self.rejected.add(exc.reason)
            log.warning("rank %d: %s", self.rank, exc)
            self._end(conn, str(exc))

    def _deliver_buffered(self, conn: InboundStream, header: F.Header) -> bool:
        """The small-message lane (lock held): a payload already in the read-ahead buffer
        whose receive is posted with a matching CPU tensor goes straight into that tensor,
        skipping the bookkeeping of a transfer in progress. False: take the general path."""
        small = self._matcher.take_posted_small(header)
        if small is None:
            return False
        posted, landing = small
        conn.take_into(landing, header.nbytes)
        counters = self._counters
        counters["messages_received"] += 1
        counters["bytes_received"] += header.nbytes
        counters["small_lane_received"] += 1
        posted.finish(posted.out)
        return True

    def _end(self, conn: InboundStream, problem: str | None) -> None:
        """Close a stream; a message cut off on it fails its receive (lock held)."""
        transfer = conn.transfer
        if transfer is not None:
            self._matcher.abort((transfer.header.sender, transfer.header.seq),
                                TransferMismatchError(f"truncated message: {problem}"))
            conn.transfer = None
        self.inbound.pop(conn.fd, None)
        self._unauthenticated.pop(conn.fd, None)
        self.to_close.append(conn.sock)

    def from_rank(self, src: int) -> InboundStream | None:
        """The stream `src` opened to us, if it has one."""
        conn = None
        for candidate in self.inbound.values():
            if candidate.rank == src:
                conn = candidate
        return conn

    def is_open(self, conn: InboundStream) -> bool:
        return self.inbound.get(conn.fd) is conn

    # ------------------------------------------------------------ polling
    def interest(self, polled: dict[int, int], wants_write) -> dict[int, int]:
        """Poller flags each raw fd should have now (lock held); `polled` is what it has.
        `wants_write(dst)`: the send queue to `dst` waits for room on its stream."""
        flags: dict[int, int] = {}
        if self.listener is not None:
            flags[self.listener.fileno()] = zmq.POLLIN
        may_read = self._matcher.may_read(0)
        for fd, conn in self.inbound.items():
            if conn.rank is None or conn.mid_message() or may_read:
                flags[fd] = zmq.POLLIN
            elif polled.get(fd):
                self._counters["backpressure_pauses"] += 1  # unexpected-message budget is full
        for dst, sock in self.outbound.items():
            if wants_write(dst):
                flags[sock.fileno()] = zmq.POLLOUT
        return flags

    def take_to_close(self) -> list:
        closing, self.to_close = self.to_close, []
        return closing

    # ------------------------------------------------------------ endings
    def fail_peer(self, rank: int) -> None:
        for conn in [c for c in self.inbound.values() if c.rank == rank]:
            self.inbound.pop(conn.fd, None)
            self.to_close.append(conn.sock)
        self.drop_outbound(rank)

    def stats(self) -> dict:
        return {
            "streams_in": len(self.inbound),
            "streams_joined": self.streams_joined,   # streams_in counts those still open (a peer done closes its own)
            "streams_unauthenticated": len(self._unauthenticated),
            "stream_buffer_bytes": sum(conn.buffer_bytes() for conn in self.inbound.values()),
            "stream_bytes_received": sum(conn.received for conn in self.inbound.values()),
        }

    def close(self) -> None:
        plain = [*self.outbound.values(), *self.to_close, *(c.sock for c in self.inbound.values())]
        for sock in plain + ([self.listener] if self.listener is not None else []):
            try:
                sock.close()
            except OSError:
                pass
