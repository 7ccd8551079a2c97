"""Processes that must not outlive their parent: the island agents and their workers.

PDEATHSIG alone is not enough. It fires, but elastic's shutdown can be cut short
by a second event (its workers failing as the coordinator vanishes with the
launcher), and then the interpreter's exit waits forever for elastic's log-tail
threads: an agent orphaned for good. So an agent also polls its parent
(watch_parent), stops its workers itself when the launcher is gone
(stop_children_and_exit), and always leaves with exit_now, never waiting on
threads elastic left running. Imports nothing heavy: workers use it at start.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

AGENT_PID_ENV = "HETERO_AGENT_PID"     # set by the island agent: the parent its workers must have
PR_SET_PDEATHSIG = 1
PARENT_POLL_S = 0.5


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to signal this process when its parent dies (kept across exec)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the agent's own shutdown still stops workers


def watch_parent(parent_pid: int, on_loss) -> threading.Thread:
    """Call `on_loss()` (from a daemon thread) once this process's parent is no longer
    `parent_pid`: the parent died, whatever PDEATHSIG did or did not do."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        on_loss()

    thread = threading.Thread(target=watch, name="hetero-parent-watch", daemon=True)
    thread.start()
    return thread


def children(pid: int | None = None) -> list[int]:
    """Live (not zombie) child processes of `pid` (default: this process), from /proc."""
    pid = os.getpid() if pid is None else pid
    found: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(name))
    return found


def stop_children_and_exit(grace: float, code: int = 128 + signal.SIGTERM, then=None) -> None:
    """SIGTERM every child's process group (elastic starts each worker in its own session),
    SIGKILL what is left after `grace` seconds, call `then()` (a clean-up), and leave at once with `code`."""
    deadline = time.monotonic() + grace
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for child in children():
            _signal_group(child, sig)
        while children() and time.monotonic() < deadline:
            time.sleep(0.1)
        deadline = time.monotonic() + 5.0
    if then is not None:
        try:
            then()
        except Exception:   # noqa: BLE001 - leaving matters more than any clean-up
            pass
    exit_now(code, join_s=0.0)


def exit_now(code: int, join_s: float = 5.0) -> None:
    """Leave with `code`: give other non-daemon threads (elastic's log tails, which copy
    the last worker lines) up to `join_s` seconds, flush, and exit without waiting longer."""
    deadline = time.monotonic() + join_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except OSError:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
