"""Hang detection on the emulated fleet: one rank's process is SIGSTOPped mid-run, or its
training loop stops moving while its threads (heartbeat included) go on; the head's watchdog
(fed by the training loop's progress stamps) names it, its Python stacks are dumped into the
run directory before it is killed, events.jsonl says so, and the job restarts from its last
checkpoint and finishes every step."""

import json
import os
import signal
import threading
import time

import pytest

from hetero.engine import progress
from hetero.launch import events
from hetero.launch.progress_report import REPORT_S
from hetero.launch.fleet import launch_fleet
from tests.hetero.engine.test_engine_fleet import CONFIG, fleet_job, last_attempt, make_plan

pytestmark = pytest.mark.slow     # two fleet start-ups: about two minutes on a loaded 2-core host

STEPS = 6
HANG_TIMEOUT = 4.0


def _narrow_worker(marker: str) -> int | None:
    """The pid of the worker of island `narrow` (one rank) of the run whose paths hold `marker`."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().decode(errors="replace")
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "hetero.engine.worker" in cmdline and marker in cmdline and "island_agent" not in cmdline \
                and "HETERO_ISLAND=narrow" in environ:
            return int(entry)
    return None


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _launch(tmp_path, during=None, env=None):
    """Train STEPS steps on the two-island emulated fleet (TP 2 on `wide`: ranks 0-1, then `narrow`:
    rank 2) with --hang-timeout HANG_TIMEOUT and one restart; `during(run_dir, thread)` runs beside it.
    Returns (run dir, launcher log text); asserts the job succeeded."""
    cluster, job = fleet_job(tmp_path)
    plan = make_plan(job, [("wide", 2, 1, (0, 2), 0), ("narrow", 1, 1, (2, 3), 0)])
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.to_json())
    run_dir = tmp_path / "run"
    args = ["--plan", str(plan_path), "--cluster", cluster, "--model", CONFIG, "--train", CONFIG,
            "--steps", str(STEPS), "--checkpoint-dir", str(run_dir / "checkpoints")]
    outcome = {}
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        def launch():
            outcome["code"] = launch_fleet(cluster, str(plan_path), "-m hetero.engine.worker", args,
                                           run_dir=str(run_dir), max_restarts=1, stdout=log, stderr=log,
                                           hang_timeout=HANG_TIMEOUT, rejoin_timeout=30.0, env=env)
        thread = threading.Thread(target=launch)
        thread.start()
        if during:
            during(run_dir, thread)
        thread.join(timeout=240)
    text = log_path.read_text()
    assert outcome.get("code") == 0, text[-3000:]
    assert f"hang timeout {HANG_TIMEOUT:g} s (--hang-timeout)" in text
    with open(run_dir / "metrics" / "steps.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    assert [r["step"] for r in last_attempt(records)] == list(range(1, STEPS + 1))     # the job recovered
    return run_dir, text


def _the_hang(run_dir, text, rank: int) -> dict:
    """The one hang event (of attempt 0, naming `rank`), after checking its stack file and the
    failure and restart that followed it."""
    found = events.read(str(run_dir))
    hangs = [e for e in found if e["event"] == "hang"]
    assert len(hangs) == 1, found
    hang = hangs[0]
    assert hang["rank"] == rank and hang["attempt"] == 0 and hang["host"] == "127.0.0.1"
    assert f"rank {rank} (island {hang['island']}, host 127.0.0.1) hung in {hang['phase']}" in text
    assert hang["stacks"] == os.path.join("stacks", "attempt_0", f"rank{rank:05d}.txt")
    dump = (run_dir / hang["stacks"]).read_text()
    assert "trainer.py" in dump and "in run" in dump, dump               # the training loop's own stack
    assert sorted(os.listdir(run_dir / "stacks" / "attempt_0")) == [f"rank{rank:05d}.txt"]   # empty ones removed
    kinds = [e["event"] for e in found]
    assert kinds[:1] == ["start"] and found[0]["hang_timeout_s"] == HANG_TIMEOUT
    assert found[0]["rejoin_timeout_s"] == 30.0
    failure = next(e for e in found if e["event"] == "failure")
    assert failure["restart"] and "hung in" in failure["reason"]
    restart = next(e for e in found if e["event"] == "restart")
    assert restart["attempt"] == 1 and restart["from_step"] >= 2
    assert f"restarting the whole job from step {restart['from_step']}" in text
    return hang


def test_sigstopped_worker_is_caught_dumped_and_the_job_recovers(tmp_path):
    stopped = {}

    def stop_narrow(run_dir, thread):
        try:
            steps_file = run_dir / "metrics" / "steps.jsonl"
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and thread.is_alive() and not stopped.get("pid"):
                lines = len(steps_file.read_text().splitlines()) if steps_file.exists() else 0
                if lines and "first_step" not in stopped:
                    stopped["first_step"] = time.time()
                if lines >= 3:
                    pid = _narrow_worker(str(tmp_path))
                    if pid:
                        stopped["pid"], stopped["at"] = pid, time.time()
                        os.kill(pid, signal.SIGSTOP)
                time.sleep(0.05)
            thread.join(timeout=240)
        finally:
            if stopped.get("pid") and not _gone(stopped["pid"]):
                os.kill(stopped["pid"], signal.SIGKILL)

    run_dir, text = _launch(tmp_path, during=stop_narrow)
    assert stopped.get("pid"), "no worker was stopped"
    assert _gone(stopped["pid"])                                   # the launcher killed the stopped worker

    hang = _the_hang(run_dir, text, rank=2)
    assert hang["island"] == "narrow" and hang["pid"] == stopped["pid"] and hang["silent"]
    assert hang["time"] > stopped["at"]
    # Its last report is up to progress_report.REPORT_S old when it stopped: once two report periods
    # have passed since the first step was recorded, it is of a training step; on a fast host the
    # first steps can all fall between the start's report and the next one.
    assert hang["phase"] in progress.PHASES
    if stopped["at"] - stopped["first_step"] >= 2 * REPORT_S:
        assert hang["step"] >= 1 and hang["phase"] != progress.START


def test_a_loop_stuck_while_its_heartbeat_goes_on_is_caught(tmp_path):
    """The case the coordinator's heartbeat cannot see: rank 1 (TP rank 1 of `wide`) stops moving at
    the start of step 4 while its threads go on; its TP peer waits inside its forward, `narrow` for
    the bridge. The watchdog blames rank 1: still the longest, in its own work, its reports still
    coming (not silent)."""
    marker = tmp_path / "hung-once"
    env = dict(os.environ, **{progress.HANG_HOOK: f"1:3:{marker}"})
    run_dir, text = _launch(tmp_path, env=env)
    assert marker.exists()
    hang = _the_hang(run_dir, text, rank=1)
    assert hang["island"] == "wide" and not hang["silent"] and hang["step"] == 4
    assert hang["stalled_s"] >= HANG_TIMEOUT
    assert "no heartbeat" not in text                                # the coordinator saw nothing wrong
