"""Worker bootstrap: `python -m hetero.launch.bootstrap [-m module | script] args...`.

torch elastic gives every worker of an island the same command and sets only
torchrun's per-worker variables; this small step adds the per-worker
HETERO_GLOBAL_RANK (from the island's rank table and RANK), arranges for the
worker to get SIGTERM if its agent dies, then execs the real entrypoint, so the
worker is an ordinary `python script.py` process (same pid, same argv).
Imports nothing heavy: it runs once per worker start.
"""

from __future__ import annotations

import os
import signal
import sys

RANK_TABLE_ENV = "HETERO_RANK_TABLE"   # same as hetero.launch.environment.RANK_TABLE_ENV
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to signal this process when its parent dies (kept across exec)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the agent's own shutdown still stops workers


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m hetero.launch.bootstrap [-m module | script] args...")
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:   # the agent died before prctl took effect
        sys.exit(1)
    table = os.environ.get(RANK_TABLE_ENV, "")
    rank = int(os.environ.get("RANK", "0"))
    if table:
        os.environ["HETERO_GLOBAL_RANK"] = table.split(",")[rank]
    os.execv(sys.executable, [sys.executable, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
