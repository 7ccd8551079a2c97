"""The hang watchdog's rules on hand-made progress reports (who is hung, who is to blame, who is
never called hung), the stack dump of a really stopped process, the stamps the schedule and
`during` leave, and the flags' checks."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import pytest

from hetero.engine import progress
from hetero.engine.schedule import one_f_one_b
from hetero.errors import UserError
from hetero.launch import watchdog
from hetero.launch.fleet import check_timeout
from hetero.launch.progress_report import progress_key, stacks_path
from tests.conftest import ROOT

TIMEOUT = 10.0


class FakeStore:
    """The coordinator's key-value store as the watchdog reads it."""

    def __init__(self):
        self.values = {}

    def kv_get(self, key):
        from comm_bridge.errors import CoordinatorTimeoutError

        if key not in self.values:
            raise CoordinatorTimeoutError(f"key '{key}' was never set")
        return self.values[key]

    def report(self, rank, phase, moves, beat, since=1000.0, **extra):
        self.values[progress_key(0, rank)] = json.dumps(
            {"step": 3, "micro_batch": 1, "phase": phase, "since": since, "moves": moves, "beat": beat,
             "pid": 100 + rank, "host": "127.0.0.1", "island": "a", "stacks": f"/run/stacks/rank{rank}.txt",
             **extra})


def _watch(store, world=3):
    """A watchdog that has seen the attempt begin at step 2 (the reports are of step 3 unless said:
    past the attempt's first step, which gets three timeouts)."""
    dog = watchdog.Watchdog(store, attempt=0, world_size=world, timeout=TIMEOUT)
    dog.observe(0, {"phase": "forward", "step": 2, "moves": -1, "beat": -1}, -100.0)
    return dog


def test_the_job_is_hung_only_when_every_training_rank_is_still_and_the_silent_one_is_blamed():
    store, dog = FakeStore(), None
    for rank in range(3):
        store.report(rank, "forward", moves=1, beat=1)
    dog = _watch(store)
    assert dog.check(now=0.0) is None
    for t in range(1, 12):            # ranks 0 and 2 keep beating while waiting; rank 1 stopped at t = 0
        store.report(0, "bridge receive", moves=2, beat=t, since=1000.5)
        store.report(2, "island collective", moves=2, beat=t, since=1000.2)
        hang = dog.check(now=float(t))
        if t < TIMEOUT + 1:           # ranks 0 and 2 last moved at t = 1
            assert hang is None, t
    assert hang is not None and hang.rank == 1 and hang.silent
    assert hang.phase == "forward" and hang.step == 4 and hang.micro_batch == 1 and hang.pid == 101
    assert "rank 1 (island a, host 127.0.0.1) hung in forward for" in hang.line()
    assert "the process had stopped answering; its stacks: /run/stacks/rank1.txt" in hang.line()


def test_a_rank_stuck_in_its_own_work_is_blamed_before_ranks_waiting_for_it():
    store = FakeStore()
    store.report(0, "bridge receive", moves=1, beat=1, since=999.0)   # waiting longest, but waiting
    store.report(1, "optimizer", moves=1, beat=1, since=1000.0)
    dog = _watch(store, world=2)
    for t in range(0, 13):
        store.report(0, "bridge receive", moves=1, beat=t + 2, since=999.0)
        store.report(1, "optimizer", moves=1, beat=t + 2, since=1000.0)   # both still beat: no process stopped
        hang = dog.check(now=float(t))
    assert hang is not None and hang.rank == 1 and not hang.silent


def test_among_ranks_in_their_own_work_the_one_behind_is_blamed():
    """TP peers: rank 0 began step 4's first forward and waits inside it for rank 1, which entered
    step 4 but never began a micro-batch; rank 0 left the last shared sum first (earlier `since`)."""
    store = FakeStore()
    dog = _watch(store, world=2)
    for t in range(0, 13):
        store.report(0, "forward", moves=9, beat=t + 1, since=1000.0, step=3, micro_batch=0)
        store.report(1, "checkpoint", moves=9, beat=t + 1, since=1000.1, step=3, micro_batch=-1)
        hang = dog.check(now=float(t))
    assert hang is not None and hang.rank == 1 and hang.phase == "checkpoint" and hang.step == 4


def test_the_attempts_first_step_gets_three_timeouts():
    store = FakeStore()
    store.report(0, "forward", moves=1, beat=1, step=0)
    dog = watchdog.Watchdog(store, attempt=0, world_size=1, timeout=TIMEOUT)
    assert dog.check(now=0.0) is None
    assert dog.check(now=3 * TIMEOUT - 1) is None
    assert dog.check(now=3 * TIMEOUT + 1) is not None


def test_starting_done_gone_and_unheard_ranks_hold_the_verdict_back():
    store = FakeStore()
    store.report(0, "forward", moves=1, beat=1)
    store.report(1, "backward", moves=1, beat=1)
    dog = _watch(store, world=3)
    assert dog.check(now=0.0) is None and dog.check(now=60.0) is None      # rank 2 never reported
    store.report(2, progress.START, moves=0, beat=1)
    assert dog.check(now=61.0) is None and dog.check(now=120.0) is None    # rank 2 still starting
    store.report(2, progress.DONE, moves=5, beat=2)
    assert dog.check(now=121.0) is not None                                 # 0 and 1 still for 120 s
    dog = _watch(store, world=3)
    dog.check(now=0.0)
    assert dog.check(gone={0, 1}, now=60.0) is None                         # they left or failed: not hung


def test_a_rank_the_coordinator_dropped_is_a_stopped_process_only_if_its_reports_stopped():
    store = FakeStore()
    store.report(0, "forward", moves=1, beat=1)
    dog = _watch(store, world=1)
    dog.check(now=0.0)
    store.report(0, "forward", moves=1, beat=2)
    assert dog.stopped(0, now=2.0) is None                                  # still reporting: crashed, not stopped
    hang = dog.stopped(0, now=2.0 + watchdog.SILENT_S)
    assert hang is not None and hang.rank == 0 and hang.silent


def test_default_timeout_is_the_larger_of_60_s_and_five_predicted_steps():
    assert watchdog.default_timeout(None) == 60.0
    assert watchdog.default_timeout(2.0) == 60.0
    assert watchdog.default_timeout(30.0) == 150.0
    assert "5 x the plan's predicted step time, 30 s" in watchdog.describe_timeout(150.0, False, 30.0)
    assert watchdog.describe_timeout(7.0, True, 30.0) == "hang timeout 7 s (--hang-timeout)"


def test_rejoin_timeout_defaults_to_60_s():
    assert watchdog.rejoin_or_default(None) == 60.0 and watchdog.rejoin_or_default(5) == 5.0


def test_dump_and_kill_gets_the_stacks_of_a_stopped_process(tmp_path):
    env = dict(os.environ, HETERO_RESTART_COUNT="0", HETERO_GLOBAL_RANK="3")
    script = textwrap.dedent(f"""
        import sys, time
        from hetero.launch import progress_report
        progress_report._arm_dump({str(tmp_path)!r}, 0, 3)
        def training_loop():
            print("ready", flush=True)
            while True:
                time.sleep(0.05)
        training_loop()
    """)
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True,
                             cwd=ROOT)
    try:
        assert child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGSTOP)
        path = stacks_path(str(tmp_path), 0, 3)
        assert os.path.getsize(path) == 0
        assert watchdog.dump_and_kill(child.pid, path)
        assert child.wait(timeout=10) == -signal.SIGKILL
        dump = open(path).read()
        assert "in training_loop" in dump and "Current thread" in dump
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    watchdog.remove_empty_stacks(str(tmp_path), 0)
    assert os.path.exists(path)                                      # a filled dump is kept


def test_remove_empty_stacks_drops_unfilled_files_and_empty_folders(tmp_path):
    folder = tmp_path / "stacks" / "attempt_1"
    folder.mkdir(parents=True)
    (folder / "rank00000.txt").write_text("")
    watchdog.remove_empty_stacks(str(tmp_path), 1)
    assert not (tmp_path / "stacks").exists()


def test_walking_the_schedule_and_waiting_stamp_the_phase():
    schedule = one_f_one_b(0, 2, 2)
    assert schedule == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
    progress.step(6)
    seen = []
    for action in schedule:
        seen.append((progress.STAMP.phase, progress.STAMP.micro_batch))
        if action.kind == "B":
            moves = progress.STAMP.moves
            with progress.during("bridge receive"):
                assert progress.STAMP.phase == "bridge receive"
            assert progress.STAMP.phase == "backward" and progress.STAMP.moves == moves + 2
    assert seen == [("forward", 0), ("forward", 1), ("backward", 0), ("backward", 1)]
    assert progress.STAMP.snapshot()["step"] == 6 and time.time() - progress.STAMP.since < 60


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "5"])
def test_a_bad_timeout_is_one_line(value):
    with pytest.raises(UserError, match="--hang-timeout must be a number of seconds > 0"):
        check_timeout("--hang-timeout", value)
    check_timeout("--hang-timeout", None)
    check_timeout("--rejoin-timeout", 0.5)


@pytest.mark.parametrize("command", ["run", "launch"])
def test_the_flags_refuse_bad_values_with_exit_2(hetero_cli, command):
    extra = ["--cluster", "x.yaml", "script.py"] if command == "launch" else []
    code, _, err = hetero_cli(command, "--rejoin-timeout", "-3", *extra)
    assert code == 2 and "--rejoin-timeout" in err and "Traceback" not in err
    code, _, err = hetero_cli(command, "--hang-timeout", "soon", *extra)
    assert code == 2 and "--hang-timeout" in err


class _FakeCoordinator:
    def __init__(self):
        self.failed: dict = {}
        self.finished: set = set()


class _FakeClient:
    def kv_set(self, key, value):
        pass


class _QuietWatchdog:
    """A watchdog that finds no hang (the failed rank is gone, not stopped)."""

    def stopped(self, rank):
        return None

    def check(self, gone=()):
        return None


def test_a_heartbeat_failure_waits_for_the_watchdog_to_look_at_it(tmp_path):
    """A failure the coordinator records between the launcher's watch() and step() must not end the
    attempt before the watchdog has judged it (it may be a stopped process whose stacks it dumps):
    the verdict comes one round later, after watch(). (Under load the SIGSTOPped worker of `hetero
    bench recovery` lost its stack dump to exactly that race.)"""
    from hetero.config import load_job
    from hetero.launch.agents import LocalStatus
    from hetero.launch.control import HeadControl
    from hetero.launch.layout import build_layout
    from tests.conftest import FIXTURES

    cluster = load_job(cluster=os.path.join(FIXTURES, "launch", "ray-two-node.yaml")).cluster
    control = HeadControl(build_layout(cluster, None), "token", [], 1, 5.0, ack_timeout=1.0, join_timeout=1.0,
                          lost_timeout=1.0, run_dir=str(tmp_path), hang_timeout=TIMEOUT)
    control.coordinator, control.client, control.watchdog = _FakeCoordinator(), _FakeClient(), _QuietWatchdog()
    running = LocalStatus("running")
    control.watch()
    control.coordinator.failed[2] = "no heartbeat for 5.0 s"    # lands after watch(), before step()
    assert control.step(running, None) is None
    control.watch()
    verdict = control.step(running, None)
    assert verdict is not None and verdict.state == "failed" and "global rank 2 failed: no heartbeat" in verdict.reason


class _ReportsClient(_FakeClient):
    """A store that holds one member's report."""

    def __init__(self, reports: dict):
        self.reports = reports

    def kv_get(self, key):
        return self.reports[key]


@pytest.mark.parametrize("quiet_s, waits", [(0.0, True), (20.0, False)])
def test_a_hang_on_a_lost_node_does_not_wait_for_stacks_no_one_will_dump(tmp_path, quiet_s, waits):
    """A rank hung on another node: the head waits for that node's launcher to dump its stacks, unless
    the launcher has stopped reporting too (the node was lost with the rank: SIGKILL, power): then the
    attempt fails at once, and end() does not wait for that node's acknowledgement."""
    from hetero.config import load_job
    from hetero.launch.agents import LocalStatus
    from hetero.launch.control import QUIET_S, HeadControl
    from hetero.launch.layout import build_layout
    from hetero.launch.protocol import node_key
    from tests.conftest import FIXTURES

    member = "127.0.0.2"
    cluster = load_job(cluster=os.path.join(FIXTURES, "launch", "ray-two-node.yaml")).cluster
    control = HeadControl(build_layout(cluster, None), "token", [member], 1, 5.0, ack_timeout=1.0,
                          join_timeout=60.0, lost_timeout=60.0, run_dir=str(tmp_path), hang_timeout=TIMEOUT)
    report = json.dumps({"state": "running", "beat": 7})
    control.attempt = 0
    control.coordinator, control.watchdog = _FakeCoordinator(), _QuietWatchdog()
    control.client = _ReportsClient({node_key(0, member): report})
    assert quiet_s == 0.0 or quiet_s > QUIET_S
    control._seen = {member: (report if quiet_s else "an older report", time.monotonic() - quiet_s)}
    control.hang = (types.SimpleNamespace(host=member), "rank 1 hung in backward", time.monotonic() + 60.0)
    verdict = control.step(LocalStatus("running"), None)
    if waits:
        assert verdict is None and member not in control._silent
    else:
        assert verdict is not None and verdict.state == "failed" and verdict.reason == "rank 1 hung in backward"
        assert member in control._silent
