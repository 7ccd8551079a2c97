"""A worker's side of hang detection: report the training loop's progress stamps to the
head, and be ready to dump its Python stacks on SIGUSR1.

The worker bootstrap calls `start()` before the entrypoint runs. A daemon thread writes
the newest stamp (hetero.engine.progress) under progress_key(attempt, rank) in the job
coordinator's store every REPORT_S, with a beat counter: the head's watchdog
(hetero.launch.watchdog) sees both whether the loop moves (the stamp's `moves`) and
whether the process runs at all (the beat: a SIGSTOPped process stops beating too).

faulthandler is registered on DUMP_SIGNAL with a file opened now, under
<run dir>/stacks/attempt_<k>/rank<NNNNN>.txt: the dump is written from the C signal
handler, so it works while the loop is stuck in C code holding the GIL. The launcher
removes the files that stayed empty when an attempt ends.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import threading

from hetero.engine import progress

REPORT_S = 1.0
DUMP_SIGNAL = signal.SIGUSR1


def progress_key(attempt: int, rank: int) -> str:
    return f"hetero.progress/{attempt}/{rank}"


def stacks_path(run_dir: str, attempt: int, rank: int) -> str:
    """Where global rank `rank` of attempt `attempt` dumps its stacks."""
    return os.path.join(run_dir, "stacks", f"attempt_{attempt}", f"rank{rank:05d}.txt")


def start(env=None) -> threading.Thread | None:
    """Arm the stack dump and start reporting, if this worker belongs to a hetero job
    (HETERO_COORDINATOR, HETERO_JOB_TOKEN and HETERO_GLOBAL_RANK set); else do nothing."""
    env = os.environ if env is None else env
    needed = ("HETERO_COORDINATOR", "HETERO_JOB_TOKEN", "HETERO_GLOBAL_RANK")
    if not all(env.get(name) for name in needed):
        return None
    rank, attempt = int(env["HETERO_GLOBAL_RANK"]), int(env.get("HETERO_RESTART_COUNT", "0"))
    stacks = _arm_dump(env.get("HETERO_RUN_DIR"), attempt, rank)
    from comm_bridge.client import CoordinatorClient   # imported here, on the main thread

    client = CoordinatorClient(env["HETERO_COORDINATOR"], env["HETERO_JOB_TOKEN"], rank, timeout=5.0)
    fixed = {"pid": os.getpid(), "host": env.get("HETERO_NODE", ""), "island": env.get("HETERO_ISLAND", ""),
             "stacks": stacks}
    thread = threading.Thread(target=_report_loop, args=(client, progress_key(attempt, rank), fixed),
                              name="hetero-progress-report", daemon=True)
    thread.start()
    return thread


def _arm_dump(run_dir: str | None, attempt: int, rank: int) -> str | None:
    """Register faulthandler on DUMP_SIGNAL, writing every thread's stack to this rank's file."""
    if not run_dir:
        return None
    path = stacks_path(run_dir, attempt, rank)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle = open(path, "w", encoding="utf-8")   # pylint: disable=consider-using-with  # kept for the dump
    except OSError:
        return None
    faulthandler.register(DUMP_SIGNAL, file=handle, all_threads=True, chain=False)
    _KEPT.append(handle)   # faulthandler keeps only the descriptor; the file object must live
    return path


_KEPT: list = []


def _report_loop(client, key: str, fixed: dict) -> None:
    from comm_bridge.errors import AuthenticationError, CoordinatorError

    beat = 0
    while True:
        beat += 1
        report = dict(progress.STAMP.snapshot(), beat=beat, **fixed)
        try:
            client.kv_set(key, json.dumps(report))
        except AuthenticationError:
            return    # another job's coordinator: nothing to report to
        except CoordinatorError:
            pass      # the coordinator is gone or busy: the heartbeat decides what that means
        if progress.FINISHED.wait(REPORT_S) and report["phase"] == progress.DONE:
            return    # `done` is reported: nothing more will move
