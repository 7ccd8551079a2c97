"""The head's hang watchdog: declares the job hung when no rank's training loop has moved
for the hang timeout, names the rank that stuck it, dumps its stacks and kills it.

Workers report their progress stamps (hetero.launch.progress_report). Training is
synchronous, so one stuck rank soon stalls every other (they wait for its activations,
gradients or sums); a rank that waits while others still move is not hung. So the job
is hung when every rank that is training (phase neither `start` nor `done`) has been
still for `timeout` seconds, and the rank to blame is, in this order: one whose reports
stopped too (a stopped process, or one stuck in C code holding the GIL), one stuck in
its own work rather than waiting for a peer (forward, backward, optimizer, checkpoint),
the one furthest behind (an earlier step; in the same step, no micro-batch begun), the
one that has been in its phase longest. An attempt's first step (allocation, compilation,
autotuning) gets FIRST_STEP_FACTOR times the timeout. The watchdog waits until every rank has
reported, and while any rank is still starting (building, loading a checkpoint, meeting
its island) the job is never called hung: rendezvous and communication timeouts cover that.

`dump_and_kill` signals the rank for its stacks (faulthandler, hetero.launch.progress_report)
and SIGCONTs it (a stopped process runs its handler only when continued), waits up to
DUMP_WAIT_S for the file, then SIGKILLs it; the launcher on the rank's own host does it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass

from hetero.engine import progress
from hetero.launch.progress_report import DUMP_SIGNAL, REPORT_S, progress_key

MIN_DEFAULT_S = 60.0     # the default hang timeout: the larger of this and
STEPS_DEFAULT = 5        # this many predicted step times
SILENT_S = 3 * REPORT_S  # reports missing this long: the process itself is stopped
FIRST_STEP_FACTOR = 3    # an attempt's first step (allocation, compilation, autotuning) gets this many timeouts
READ_S = 0.5             # the head reads the reports at most this often
DUMP_WAIT_S = 3.0
WAITING = ("bridge send", "bridge receive", "island collective", "bridge all-reduce")


def default_timeout(predicted_step_s: float | None) -> float:
    """The larger of 60 s and 5 x the plan's predicted step time."""
    return max(MIN_DEFAULT_S, STEPS_DEFAULT * float(predicted_step_s or 0.0))


REJOIN_DEFAULT_S = 60.0   # --rejoin-timeout's default (issue 18: the elastic re-plan's wait for a lost node)


def rejoin_or_default(rejoin_timeout: float | None) -> float:
    """--rejoin-timeout as given, else its default; recorded for the elastic re-plan to come."""
    return REJOIN_DEFAULT_S if rejoin_timeout is None else float(rejoin_timeout)


def describe_timeout(timeout: float, given: bool, predicted_step_s: float | None) -> str:
    """The start-up line that says the hang timeout and where it came from."""
    if given:
        return f"hang timeout {timeout:g} s (--hang-timeout)"
    predicted = f"{predicted_step_s:.3g} s" if predicted_step_s else "unknown"
    return (f"hang timeout {timeout:g} s (the larger of {MIN_DEFAULT_S:g} s and {STEPS_DEFAULT} x the plan's "
            f"predicted step time, {predicted}; set it with --hang-timeout)")


@dataclass(frozen=True)
class Hang:
    rank: int
    island: str
    host: str
    phase: str
    stalled_s: float          # how long its phase had lasted when the head gave up on it
    step: int                 # 1-based, as the step records count; 0 before the first
    micro_batch: int          # -1 outside a micro-batch
    pid: int
    stacks: str | None        # the rank's stack-dump file
    silent: bool              # its reports had stopped too (the whole process stopped)

    def line(self) -> str:
        where = f"step {self.step}" + (f", micro-batch {self.micro_batch}" if self.micro_batch >= 0 else "")
        stopped = "; the process had stopped answering" if self.silent else ""
        stacks = f"; its stacks: {self.stacks}" if self.stacks else "; no stack file (no run directory)"
        return (f"rank {self.rank} (island {self.island}, host {self.host}) hung in {self.phase} for "
                f"{self.stalled_s:.0f} s ({where}){stopped}{stacks}")

    def to_dict(self) -> dict:
        return asdict(self)


class Watchdog:
    """Reads every rank's progress report from the coordinator's store; `check()` says when the job is hung."""

    def __init__(self, client, attempt: int, world_size: int, timeout: float):
        self.client = client
        self.attempt = attempt
        self.world_size = world_size
        self.timeout = timeout
        self._ranks: dict[int, dict] = {}    # rank -> {"report", "moved", "beat_at"}
        self._first_step: int | None = None  # the attempt's first step (the lowest any rank trained)
        self._read_at = float("-inf")

    def check(self, gone=(), now: float | None = None) -> Hang | None:
        """The hang, if the job is hung; `gone`: ranks the coordinator already knows left or failed
        (their own failure path handles them; a rank that left stops reporting)."""
        now = time.monotonic() if now is None else now
        if now - self._read_at >= READ_S:
            self._read_at = now
            for rank in range(self.world_size):
                self.observe(rank, self._read(rank), now)
        return self.verdict(now, set(gone))

    def observe(self, rank: int, report: dict | None, now: float) -> None:
        """Take in rank `rank`'s newest report (None: none yet)."""
        if report is None:
            return
        if report.get("phase") != progress.START and int(report.get("step", -1)) >= 0:
            step = int(report["step"])
            self._first_step = step if self._first_step is None else min(self._first_step, step)
        seen = self._ranks.get(rank)
        if seen is None:
            self._ranks[rank] = {"report": report, "moved": now, "beat_at": now}
            return
        if report.get("moves") != seen["report"].get("moves") or report.get("phase") != seen["report"].get("phase"):
            seen["moved"] = now
        if report.get("beat") != seen["report"].get("beat"):
            seen["beat_at"] = now
        seen["report"] = report

    def verdict(self, now: float, gone: Collection[int] = frozenset()) -> Hang | None:
        if len(self._ranks) < self.world_size:
            return None     # a rank not heard from yet: the others may be waiting for it to start
        training = {rank: seen for rank, seen in self._ranks.items()
                    if seen["report"].get("phase") not in (progress.START, progress.DONE) and rank not in gone}
        if not training or any(s["report"].get("phase") == progress.START for s in self._ranks.values()):
            return None
        first = all(int(seen["report"].get("step", -1)) <= (self._first_step or 0) for seen in training.values())
        limit = self.timeout * (FIRST_STEP_FACTOR if first else 1)
        if any(now - seen["moved"] < limit for seen in training.values()):
            return None
        rank, seen = min(training.items(), key=lambda item: _blame_order(item, now))
        return self._hang(rank, seen, now)

    def stopped(self, rank: int, now: float | None = None) -> Hang | None:
        """Rank `rank` as a hang if its reports have stopped (the coordinator also lost its
        heartbeats: the whole process is stopped, not gone), else None."""
        now = time.monotonic() if now is None else now
        self.observe(rank, self._read(rank), now)
        seen = self._ranks.get(rank)
        if seen is None or now - seen["beat_at"] < SILENT_S or seen["report"].get("phase") == progress.DONE:
            return None
        return self._hang(rank, seen, now)

    def _hang(self, rank: int, seen: dict, now: float) -> Hang:
        report = seen["report"]
        stalled = max(now - seen["moved"], time.time() - float(report.get("since", time.time())))
        return Hang(rank, str(report.get("island", "?")), str(report.get("host", "?")), str(report.get("phase")),
                    stalled, int(report.get("step", -1)) + 1, int(report.get("micro_batch", -1)),
                    int(report.get("pid", 0)), report.get("stacks"), now - seen["beat_at"] >= SILENT_S)

    def summary(self, now: float | None = None) -> dict:
        """Every rank's last report in short, for the hang event: {rank: {phase, step, micro_batch,
        still_s (since its loop last moved), silent}}."""
        now = time.monotonic() if now is None else now
        return {str(rank): {"phase": seen["report"].get("phase"), "step": int(seen["report"].get("step", -1)) + 1,
                            "micro_batch": seen["report"].get("micro_batch"),
                            "still_s": round(now - seen["moved"], 3), "silent": now - seen["beat_at"] >= SILENT_S}
                for rank, seen in sorted(self._ranks.items())}

    def _read(self, rank: int) -> dict | None:
        from comm_bridge.errors import CoordinatorError

        try:
            return json.loads(self.client.kv_get(progress_key(self.attempt, rank)))
        except CoordinatorError:    # not reported yet (or the store is busy: the next read)
            return None
        except ValueError:
            return None


def _blame_order(item, now: float) -> tuple:
    """Most to blame first: reports stopped; stuck in its own work; behind the others (an earlier step;
    in the same step, no micro-batch begun yet); longest in its phase. (The time in the phase alone
    misleads: ranks leave a shared sum at slightly different times.)"""
    _rank, seen = item
    report = seen["report"]
    return (now - seen["beat_at"] < SILENT_S, report.get("phase") in WAITING, int(report.get("step", -1)),
            int(report.get("micro_batch", -1)) >= 0, float(report.get("since", 0.0)))


def dump_and_kill(pid: int, stacks: str | None, wait_s: float = DUMP_WAIT_S) -> bool:
    """Dump process `pid`'s Python stacks into `stacks` (its faulthandler file), then SIGKILL it.
    Returns whether the file holds a dump."""
    if pid <= 0:
        return False
    for sig in (DUMP_SIGNAL, signal.SIGCONT):
        try:
            os.kill(pid, sig)
        except OSError:
            return False    # already gone
    deadline = time.monotonic() + wait_s
    size = -1
    while time.monotonic() < deadline:
        now_size = _size(stacks)
        if now_size > 0 and now_size == size:
            break           # written, and no longer growing
        size = now_size
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    return _size(stacks) > 0


def alive(pid: int) -> bool:
    """Whether process `pid` exists on this host and has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:
        return 0


def remove_empty_stacks(run_dir: str | None, attempt: int) -> None:
    """Drop the stack files of this attempt that no dump filled (and the folders left empty)."""
    if not run_dir:
        return
    folder = os.path.join(run_dir, "stacks", f"attempt_{attempt}")
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        path = os.path.join(folder, name)
        if _size(path) == 0:
            try:
                os.remove(path)
            except OSError:
                pass
    for empty in (folder, os.path.dirname(folder)):
        try:
            os.rmdir(empty)
        except OSError:
            break
