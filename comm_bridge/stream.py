"""Plain-TCP byte streams between two endpoints: the bridge's main data path.

zmq costs a tensor two extra thread hops per message and one extra copy on the
receiver (kernel -> zmq message -> tensor). On a stream the sender hands the
tensor's own memory to the kernel (sendmsg, header and payload in one call);
the receiver reads small messages into a read-ahead buffer and big payloads
straight into the posted tensor (recv_into), from whichever thread drives the
endpoint. One stream per (sender, receiver) pair keeps messages in send order.

Wire: a connection opens with a hello (magic, sender rank, job tag); after that
it carries [header (frames.py), raw payload] back to back, or, for a payload in
shared memory, [header, chunk descriptor] doorbells. A connection whose hello
or header is refused is closed: a byte stream has no way to resync.

Until its hello checks out, an accepted connection costs only a hello-sized
buffer, must say hello within a deadline (HELLO_TIMEOUT_SECONDS by default),
and counts against a per-listener cap on unauthenticated connections
(MAX_UNAUTHENTICATED by default); the endpoint enforces both. Only an
authenticated stream gets the full read-ahead buffer.
"""

from __future__ import annotations

import hmac
import socket
import struct

import numpy as np

from comm_bridge import frames as F

_HELLO = struct.Struct(f"<4sI{F.AUTH_BYTES}s")
HELLO_MAGIC = b"HBST"
HELLO_BYTES = _HELLO.size
SCHEME = "stream+tcp://"
READ_ROUND_BYTES = 16 << 20  # per connection per poll round, so one big sender cannot starve others
READ_AHEAD_BYTES = 256 << 10  # per authenticated inbound stream
HELLO_TIMEOUT_SECONDS = 5.0   # an accepted connection that has not said hello by then is closed
MAX_UNAUTHENTICATED = 64      # per listener: beyond this many owing a hello, the oldest silent one is closed


def parse_address(address: str) -> tuple[str, int]:
    host, port = address[len(SCHEME):].rsplit(":", 1)
    return host, int(port)


def is_wildcard(host: str) -> bool:
    """True for an address that means every interface (IPv4 or IPv6)."""
    return host.strip("[]") in ("", "*", "0.0.0.0", "::", "0:0:0:0:0:0:0:0")


def listen(host: str) -> socket.socket:
    """A non-blocking listener on `host` (the node's own address), on a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def connect(address: str, rank: int, auth: bytes, timeout: float) -> socket.socket:
    """Open the stream to a peer and introduce ourselves; the socket comes back non-blocking."""
    sock = socket.create_connection(parse_address(address), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(_HELLO.pack(HELLO_MAGIC, rank, auth))
    sock.setblocking(False)
    return sock


class Inbound:
    """The receiving end of one accepted stream: hello, then header/payload pairs.

    Reads go into a read-ahead buffer, so a small message (header and payload)
    usually arrives in one recv, and several queued ones in one too; only the
    rest of a payload bigger than what the buffer holds is read straight into
    its tensor. Bytes only: what they mean (which message, how far its payload
    got) is the stream lane's (stream_lane.InboundStream). Driver thread only."""

    def __init__(self, sock: socket.socket, hello_deadline: float = float("inf")):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.fd = sock.fileno()
        self.rank: int | None = None          # set once the hello checks out
        self.hello_deadline = hello_deadline  # time.monotonic() by which the hello must have come
        self._buf = bytearray()               # buffered bytes are _buf[_start:_end]
        self._view = memoryview(self._buf)
        self._start = self._end = 0
        self._set_buffer(HELLO_BYTES)         # just the hello until it checks out: an idle knock costs little
        self.received = 0                     # bytes read off the socket, ever

    def _set_buffer(self, size: int) -> None:
        """Make the read-ahead buffer `size` bytes, keeping what it holds at its front."""
        old = self._view[self._start:self._end]
        buf = bytearray(size)
        buf[:len(old)] = old
        self._buf = buf
        self._view = memoryview(buf)
        self._array = np.frombuffer(buf, dtype=np.uint8)
        self._start, self._end = 0, len(old)

    def buffer_bytes(self) -> int:
        """What this connection's read-ahead buffer costs."""
        return len(self._buf)

    def fill(self) -> int:
        """One recv into the read-ahead buffer: bytes read, 0 if none are ready. EOF raises
        EOFError, a reset FrameError. A short read means the socket is drained for now."""
        if self._start == self._end:
            self._start = self._end = 0
        elif self._start > len(self._buf) // 2:  # keep room for the next header behind the leftovers
            size = self._end - self._start
            self._buf[:size] = self._view[self._start:self._end]
            self._start, self._end = 0, size
        got = self._recv_into(self._view[self._end:])
        if got:
            self._end += got
        return got

    def buffered(self) -> int:
        return self._end - self._start

    def take_into(self, dest: memoryview, nbytes: int) -> None:
        """Copy the next `nbytes` buffered bytes into `dest` (a flat byte view), consuming them."""
        dest[:nbytes] = self._view[self._start:self._start + nbytes]
        self._start += nbytes

    def room(self) -> int:
        return len(self._buf) - self._end

    def take(self, nbytes: int) -> memoryview | None:
        """The next `nbytes` buffered bytes, consumed (a view: parse it before the next fill);
        None if fewer are buffered."""
        start = self._start
        if self._end - start < nbytes:
            return None
        self._start = start + nbytes
        return self._view[start:start + nbytes]

    def check_hello(self, raw: bytes | memoryview, auth: bytes) -> None:
        """Accept the stream's hello (and give it the full read-ahead buffer) or raise FrameError."""
        magic, rank, their_auth = _HELLO.unpack(raw)
        if magic != HELLO_MAGIC:
            raise F.FrameError("bad_magic", f"stream hello magic {magic!r}")
        if not hmac.compare_digest(their_auth, auth):
            raise F.FrameError("unauthenticated", f"stream from claimed rank {rank}: job tag does not match")
        self.rank = rank
        self._set_buffer(READ_AHEAD_BYTES)

    def read_body(self, flat, got: int, nbytes: int, budget: int) -> tuple[int, int]:
        """Move payload bytes into `flat`, whose first `got` of `nbytes` are in: buffered ones
        first, then straight from the socket. Returns (bytes of the payload in now, bytes
        read off the socket)."""
        buffered = min(self._end - self._start, nbytes - got)
        if buffered:
            flat[got:got + buffered] = self._array[self._start:self._start + buffered]
            self._start += buffered
            got += buffered
        read = 0
        if got < nbytes:
            target = memoryview(flat)
            while got < nbytes and read < budget:
                more = self._recv_into(target[got:nbytes])
                if not more:
                    break
                got += more
                read += more
        return got, read

    def _recv_into(self, view) -> int:
        """Bytes read, 0 if none are ready; EOF or a reset raises."""
        try:
            got = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise F.FrameError("truncated", f"stream from rank {self.rank}: {exc}") from None
        if got == 0:
            raise EOFError
        self.received += got
        return got

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def send_some(sock: socket.socket, header_bytes: bytes, payload, sent: int) -> int:
    """Push [header, payload] from offset `sent` without blocking; returns the new offset."""
    head = len(header_bytes)
    total = head + len(payload)
    while sent < total:
        if sent < head:
            parts = [memoryview(header_bytes)[sent:]]
            if len(payload):
                parts.append(payload)
        else:
            parts = [payload[sent - head:]]
        try:
            sent += sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            break
    return sent
