"""`hetero-strict`'s deadlock watchdog: a crossing or a stall is an error, not a hang
(accelerators/strict_backend.py has the contract).

Every WATCH_INTERVAL_S the watchdog looks at each pair stream's running entry. Once one has
run `stall_s`, it is published in the group's store for the peer to see; when both sides of
a pair run entries that can never match each other (two sends, two receives) and still the
same two entries half a `stall_s` later, or when an entry has run `deadlock_timeout` seconds,
the pair fails with P2PDeadlock naming both ranks and their pending operations.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from accelerators.strict_errors import BACKEND_NAME, P2PDeadlock
from accelerators.strict_p2p import PairStream

TIMEOUT_ENV = "HETERO_STRICT_TIMEOUT"
WATCH_INTERVAL_S = 0.1


class PairWatchdog:
    """A thread that fails the pairs of rank `me` that deadlock (`streams()`: the live pair streams)."""

    def __init__(self, me: int, streams: Callable[[], list[PairStream]], deadlock_timeout: float):
        self.me, self.streams = me, streams
        self.deadlock_timeout = deadlock_timeout
        self.stall_s = min(1.0, deadlock_timeout / 4)
        self._seen: dict[int, tuple[tuple[int, int], float]] = {}   # peer: (both entries, first seen stuck)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name=f"{BACKEND_NAME} watchdog")
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            for stream in self.streams():
                if stream.error is None:
                    try:
                        self._check(stream)
                    except Exception:  # the store went away (shutdown): stop watching
                        return

    def _check(self, stream: PairStream) -> None:
        mine = stream.snapshot()
        if mine is None:
            self._seen.pop(stream.peer, None)
            return
        waited = time.monotonic() - mine["since"]
        if waited < self.stall_s:
            return
        with stream.lock:
            if not stream.published and stream.active is not None and stream.active.id == mine["entry"]:
                stream.publish(mine)
                stream.published = True
        theirs = stream.peer_state()
        if stuck(mine, theirs, stream.completed):
            key = (mine["entry"], theirs["entry"])
            first = self._seen.setdefault(stream.peer, (key, time.monotonic()))
            if first[0] != key:
                self._seen[stream.peer] = (key, time.monotonic())
            elif time.monotonic() - first[1] >= self.stall_s / 2:  # the same two entries, stuck a while
                stream.fail_all(self._deadlock(stream.peer, mine, theirs, "neither can match the other"))
                return
        else:
            self._seen.pop(stream.peer, None)
        if waited >= self.deadlock_timeout:
            stream.fail_all(self._deadlock(stream.peer, mine, theirs,
                                           f"no progress in {self.deadlock_timeout:g} s ({TIMEOUT_ENV})"))

    def _deadlock(self, peer: int, mine: dict, theirs: dict, why: str) -> P2PDeadlock:
        me = self.me
        return P2PDeadlock(
            f"{BACKEND_NAME}: point-to-point deadlock between rank {me} and rank {peer} ({why}): "
            f"rank {me} is running {pending_text(mine)}, "
            f"rank {peer} is running {pending_text(theirs)}. NCCL/HCCL would hang here: each pair's ops run in "
            "issue order and a send waits for its receive. Exchange in both directions with "
            "dist.batch_isend_irecv, or have one side receive first.")


def pending_text(state: dict) -> str:
    """'[running ops]' plus what is queued behind them, from a published snapshot."""
    running = "; ".join(op["text"] for op in state.get("ops", [])) or "nothing toward it"
    queued = state.get("queued") or []
    return f"[{running}]" + (f" with [{'; '.join(queued)}] queued behind" if queued else "")


def stuck(mine: dict, theirs: dict, completed: dict) -> bool:
    """Whether two running entries can never match: no send of one is a receive of the other.

    The peer's entry is stale (it finished meanwhile) if it lists an op this rank already
    completed the other half of; a stale entry is not called stuck."""
    if not theirs.get("ops"):
        return False
    my_sends = {op["seq"] for op in mine["ops"] if op["kind"] == "send"}
    my_recvs = {op["seq"] for op in mine["ops"] if op["kind"] == "recv"}
    their_sends = {op["seq"] for op in theirs["ops"] if op["kind"] == "send"}
    their_recvs = {op["seq"] for op in theirs["ops"] if op["kind"] == "recv"}
    if any(seq < completed["send"] for seq in their_recvs) or any(seq < completed["recv"] for seq in their_sends):
        return False
    return not (my_sends & their_recvs or their_sends & my_recvs)
