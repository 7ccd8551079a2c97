"""The progress loop: who polls the sockets, pumps queued sends and finishes handles.

Whoever holds the driving lock does: a caller blocked in `Handle.wait` (so a
reply wakes the waiting thread straight from the kernel, with no hand-off
between Python threads) or, when nobody has waited for a moment, a background
I/O thread. Waiting for a receive from a stream peer first watches only that
stream (the express wait, which spins for a moment before it sleeps in poll).
This is the handles' `Driver` (handle.py).
"""

from __future__ import annotations

import select
import socket
import threading
import time

import zmq

from comm_bridge import frames as F
from comm_bridge.handle import Handle
from comm_bridge.stream_lane import InboundStream

IO_GRACE_SECONDS = 0.002  # the I/O thread leaves the sockets to returning waiters this long
EXPRESS_SLICE_SECONDS = 0.001  # an express wait looks at the other sockets at least this often
EXPRESS_SPIN_SECONDS = 200e-6 # ... after spinning this long for a reply (a sleeping core wakes slowly)
EXPRESS_IDLE_SLICES = 20       # ... and gives up on express after this many empty slices


class Progress:
    """Drives one endpoint's lanes: the I/O thread, waiting callers, the express wait."""

    def __init__(self, *, rank: int, lock: threading.RLock, default_timeout: float, stager, matcher,
                 sends, zmq_lane, stream_lane, counters):
        self.lock = lock
        self.default_timeout = default_timeout
        self.closing = False
        self._stager = stager
        self._matcher = matcher
        self._sends = sends
        self._zmq = zmq_lane
        self._streams = stream_lane
        self._counters = counters
        # A plain socket pair, not a zmq one: the express wait (select.poll) watches it too.
        self._wake_rx, self._wake_tx = socket.socketpair()
        self._wake_rx.setblocking(False)
        self._wake_tx.setblocking(False)
        # Whoever holds `_driving` polls the receive sockets and pumps sends: the
        # I/O thread, or a caller blocked in Handle.wait (`_waiters_driving` counts
        # those; the I/O thread stands aside while any is there).
        self._driving = threading.Lock()
        self._waiters_driving = 0
        self._waiter_left = 0.0
        self._io_wanted = False
        self._no_waiters = threading.Condition(lock)
        self._poller = zmq.Poller()
        self._poller.register(self._wake_rx.fileno(), zmq.POLLIN)
        self._polled: dict[int, int] = {}  # raw fds registered in the poller, and their flags
        self._reading = [False] * len(zmq_lane.pulls)
        self._thread = threading.Thread(target=self._io_loop, name=f"bridge-io-{rank}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the Driver interface
    def to_device(self, tensor, device):
        return self._stager.to_device(tensor, device)

    def request_io(self) -> None:
        """Work for whoever drives: get the I/O thread going even in its grace period."""
        with self.lock:
            self._io_wanted = True
            self._no_waiters.notify_all()
        self.interrupt_poll()

    def interrupt_poll(self) -> None:
        """Make whoever drives look up from its poll."""
        try:
            self._wake_tx.send(b"\0")
        except OSError:
            pass  # the pair is full (a wake is already queued), or we are closing

    def drive_until(self, handle: Handle, deadline: float) -> None:
        """Make progress from the waiting thread until `handle` is done or `deadline` passes.

        One thread drives at a time; other waiters sleep on their handle and take
        over when it leaves. A receive from a peer with an open stream first tries
        the express wait."""
        if self.closing:
            handle.sleep(max(0.0, deadline - time.monotonic()))
            return
        express_src = handle.peer if handle.receiving else None
        with self.lock:
            self._waiters_driving += 1
        driving = self._driving.acquire(blocking=False)
        if not driving:
            self.interrupt_poll()  # the I/O thread (or another waiter) sits in poll: make it look up
        idle_slices = 0
        try:
            while not handle.done() and not self.closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                if not driving:
                    driving = self._driving.acquire(timeout=min(remaining, 0.001))
                    if not driving:
                        handle.sleep(min(remaining, 0.001))  # another waiter drives
                        continue
                if express_src is not None:
                    outcome = self._express_once(express_src, min(remaining, EXPRESS_SLICE_SECONDS))
                    if outcome:
                        idle_slices = 0
                        continue
                    idle_slices = idle_slices + 1 if outcome is False else EXPRESS_IDLE_SLICES
                    if idle_slices >= EXPRESS_IDLE_SLICES:
                        express_src = None  # a long wait: the plain rounds serve it as well
                    if not self.run_round(0):  # keep everything else moving
                        break
                    continue
                remaining_ms = max(1, int(remaining * 1000))
                if not self.run_round(min(100, remaining_ms)):
                    break
            if self.closing:
                if driving:
                    self._driving.release()
                    driving = False
                handle.sleep(max(0.0, deadline - time.monotonic()))
        finally:
            if driving:
                self._driving.release()
            with self.lock:
                self._waiters_driving -= 1
                if not self._waiters_driving:
                    # No notify: the I/O thread looks again within IO_GRACE_SECONDS anyway,
                    # and waking it here would contend for the GIL with our caller.
                    self._waiter_left = time.monotonic()

    # ------------------------------------------------------------ the I/O thread
    def _io_loop(self) -> None:
        while not self.closing:
            with self.lock:
                # Stand aside while a caller drives, and for a moment after: a caller
                # that soon waits again then takes the sockets without waking us
                # (each wake costs a GIL hand-off on the caller's critical path).
                while not self.closing and (self._waiters_driving or (
                        not self._io_wanted and time.monotonic() - self._waiter_left < IO_GRACE_SECONDS)):
                    self._no_waiters.wait(IO_GRACE_SECONDS)
                self._io_wanted = False
            with self._driving:
                if not self.closing and not self.run_round(100):
                    break

    # ------------------------------------------------------------ the express wait
    def _express_once(self, src: int, timeout: float) -> bool | None:
        """The express wait (`_driving` held): watch only the stream from `src` and read the
        next message as soon as it lands, skipping the full round's bookkeeping. Waiting
        for a new message it spins on the socket for a moment first (a core that went to
        sleep wakes slowly); in the middle of a payload, whose bytes go straight into their
        tensor, it blocks in poll. True: something came; False: nothing did, or a wake asks
        for a full round; None: not possible now (no open stream from `src`, or other work
        is queued)."""
        streams = self._streams
        with self.lock:
            if streams.to_close or self._sends.anything_queued() or not self._matcher.may_read(0):
                return None
            conn = streams.from_rank(src)
            if conn is None:
                return None
            if conn.mid_message():
                before = conn.received
                streams.read(conn)
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
        with self.lock:
            if streams.is_open(conn):
                streams.read(conn, drained=0 < got < room)
        return True

    def _express_poll(self, conn: InboundStream, timeout: float) -> bool:
        """Block until the stream is readable (True) or `timeout` passes or a wake comes (False)."""
        if conn.express_poll is None:
            conn.express_poll = select.poll()
            conn.express_poll.register(conn.fd, select.POLLIN)
            conn.express_poll.register(self._wake_rx.fileno(), select.POLLIN)
        events = conn.express_poll.poll(timeout * 1000)
        return bool(events) and all(fd == conn.fd for fd, _ in events)

    # ------------------------------------------------------------ one round
    def run_round(self, idle_ms: int) -> bool:
        """One round of I/O: poll, read, pump sends, retire tracked sends (`_driving` held).
        Returns False once the endpoint is closing."""
        sends, streams = self._sends, self._streams
        with self.lock:
            busy = sends.needs_polling()
            want = [self._matcher.may_read(stripe) for stripe in range(len(self._zmq.pulls))]
            closing_socks = streams.take_to_close()
            want_fds = streams.interest(self._polled, sends.wants_write)
        self._update_poller(closing_socks, want_fds, want)
        try:
            events = dict(self._poller.poll(1 if busy else idle_ms))
        except zmq.ZMQError:
            return False
        if self.closing:
            return False
        if self._wake_rx.fileno() in events:
            self._drain_wakes()
        for stripe, sock in enumerate(self._zmq.pulls):
            if sock in events:
                self._zmq.drain(stripe)
        if streams.listener is not None and streams.listener.fileno() in events:
            streams.accept()
        with self.lock:
            streams.read_ready(events)
            streams.expire_hellos()
        with self.lock:
            for dst in sends.busy_dsts():
                sends.pump(dst)
            sends.retire_tracked()
        return True

    def _update_poller(self, closing_socks: list, want_fds: dict[int, int], want_stripes: list[bool]) -> None:
        """Close sockets that are done with, and poll for what each fd and stripe should be."""
        poller, polled, reading = self._poller, self._polled, self._reading
        for sock in closing_socks:
            fd = sock.fileno()
            if fd in polled:
                poller.unregister(fd)
                del polled[fd]
            sock.close()
        for fd in [fd for fd in polled if fd not in want_fds]:
            poller.unregister(fd)
            del polled[fd]
        for fd, flags in want_fds.items():
            if polled.get(fd) != flags:
                poller.register(fd, flags)
                polled[fd] = flags
        for stripe, sock in enumerate(self._zmq.pulls):
            if want_stripes[stripe] != reading[stripe]:
                if want_stripes[stripe]:
                    poller.register(sock, zmq.POLLIN)
                else:
                    poller.unregister(sock)
                    self._counters["backpressure_pauses"] += 1
                reading[stripe] = want_stripes[stripe]

    def _drain_wakes(self) -> None:
        try:
            while self._wake_rx.recv(4096):
                pass
        except OSError:
            pass

    # ------------------------------------------------------------ closing
    def stop(self) -> threading.Lock:
        """Stop the I/O thread and get waiters out of their polls; returns the driving lock
        (hold it while tearing down: then no driver is inside a poll)."""
        self.closing = True
        with self.lock:
            self._no_waiters.notify_all()
        self.request_io()
        self._thread.join(timeout=10)
        return self._driving

    def close(self) -> None:
        for sock in (self._wake_rx, self._wake_tx):
            try:
                sock.close()
            except OSError:
                pass
