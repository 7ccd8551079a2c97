"""Plain-TCP byte streams between two endpoints: the bridge's path for tensors between hosts.

zmq costs a tensor two extra thread hops per message and one extra copy on the
receiver (kernel -> zmq message -> tensor). On a stream the sender hands the
tensor's own memory to the kernel (sendmsg, header and payload in one call) and
the receiver reads straight into the posted tensor (recv_into), from whichever
thread drives the endpoint. One stream per (sender, receiver) pair keeps
messages in send order.

Wire: a connection opens with a hello (magic, sender rank, job tag); after that
it carries [header (frames.py), raw payload] back to back. A connection whose
hello or header is refused is closed: a byte stream has no way to resync.
"""

from __future__ import annotations

import hmac
import socket
import struct

from comm_bridge import frames as F

_HELLO = struct.Struct(f"<4sI{F.AUTH_BYTES}s")
HELLO_MAGIC = b"HBST"
HELLO_BYTES = _HELLO.size
SCHEME = "stream+tcp://"
READ_ROUND_BYTES = 16 << 20  # per connection per poll round, so one big sender cannot starve others


def parse_address(address: str) -> tuple[str, int]:
    host, port = address[len(SCHEME):].rsplit(":", 1)
    return host, int(port)


def listen(host: str) -> socket.socket:
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
    """The receiving end of one accepted stream: hello, then header/payload pairs."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.fd = sock.fileno()
        self.rank: int | None = None          # set once the hello checks out
        self._hello = bytearray(HELLO_BYTES)
        self._head = bytearray(F.HEADER_BYTES)
        self.got = 0                          # bytes of the hello or header read so far
        self.transfer = None                  # the message whose payload is being read
        self.body_got = 0

    def read_hello(self, auth: bytes) -> bool | None:
        """True once authenticated, None while incomplete; raises FrameError if refused or EOF."""
        got = self._recv_into(memoryview(self._hello)[self.got:])
        if got is None:
            return None
        self.got += got
        if self.got < HELLO_BYTES:
            return None
        magic, rank, their_auth = _HELLO.unpack(self._hello)
        if magic != HELLO_MAGIC:
            raise F.FrameError("bad_magic", f"stream hello magic {magic!r}")
        if not hmac.compare_digest(their_auth, auth):
            raise F.FrameError("unauthenticated", f"stream from claimed rank {rank}: job tag does not match")
        self.rank = rank
        self.got = 0
        return True

    def read_header(self) -> bytes | None:
        """The next complete header's bytes, or None while it is still arriving."""
        got = self._recv_into(memoryview(self._head)[self.got:])
        if got is None:
            return None
        self.got += got
        if self.got < F.HEADER_BYTES:
            return None
        self.got = 0
        return bytes(self._head)

    def read_body(self, flat, nbytes: int) -> bool:
        """Read payload bytes straight into `flat`; True once all `nbytes` are in."""
        target = memoryview(flat)
        budget = READ_ROUND_BYTES
        while self.body_got < nbytes and budget > 0:
            got = self._recv_into(target[self.body_got:nbytes])
            if got is None:
                return False
            self.body_got += got
            budget -= got
        return self.body_got >= nbytes

    def _recv_into(self, view) -> int | None:
        """Bytes read, or None if none are ready; EOF or a reset raises FrameError."""
        try:
            got = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise F.FrameError("truncated", f"stream from rank {self.rank}: {exc}") from None
        if got == 0:
            raise EOFError
        return got

    def mid_message(self) -> bool:
        return self.got > 0 or self.transfer is not None

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
