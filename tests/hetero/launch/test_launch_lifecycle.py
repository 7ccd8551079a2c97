"""The launcher's lifecycle: failures that would repeat stop the job at once, restarts are
announced on the console naming the rank that failed first, refused coordinator calls are
counted in the run directory, and no signal to the launcher leaves a process or a
shared-memory ring behind.

Workers are small scripts (tests/workers/), not training: every test runs in seconds.
"""

import errno
import json
import os
import signal
import time
import uuid

import pytest

from tests.hetero.launch.test_launch import WORKERS, finish, launcher, prefixed_lines, write_cluster

pytestmark = pytest.mark.timeout(120)
FOLLOWS = os.path.join(WORKERS, "fail_then_peer_follows.py")


def job_processes(marker: str) -> list[int]:
    """Live (not zombie) processes whose environment holds HETERO_LIFECYCLE_TEST=<marker>."""
    needle = f"HETERO_LIFECYCLE_TEST={marker}".encode() + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as fh:
                if needle not in fh.read() + b"\0":
                    continue
            with open(f"/proc/{name}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(int(name))
    return found


def test_fatal_failure_stops_the_job_at_once_naming_rank_host_and_file(tmp_path):
    cluster = write_cluster(tmp_path, "two-island", chips=1)
    marks, run = tmp_path / "marks", tmp_path / "run"
    marks.mkdir()
    # Global rank 1 (island "host") stops on a failure every restart would repeat; rank 0
    # (island "fast") stops itself at once, so its island fails first.
    proc = launcher(cluster, "--max-restarts", "2", "--run-dir", str(run), FOLLOWS, str(marks), "1", "3")
    code, _, stderr = finish(proc)
    fatal = f"rank 1 on 127.0.0.1: {marks}/state.json: corrupt checkpoint (no good one left)"
    assert code == 2, stderr
    assert stderr.strip().splitlines()[-1] == f"hetero launch: error: {fatal}", stderr
    # No restart spent: only attempt 0 ran.
    assert sorted(p.name for p in marks.iterdir()) == ["0.0", "1.0", "failing"]
    assert "restarting" not in stderr
    assert (run / "fatal" / "rank00001.txt").read_text() == f"hetero: {fatal}\n"


def test_restart_is_announced_on_the_console_naming_the_rank_that_failed_first(tmp_path, capsys):
    from hetero.launch import launch_fleet

    cluster = write_cluster(tmp_path, "two-island", chips=1)
    marks, run = tmp_path / "marks", tmp_path / "run"
    marks.mkdir()
    checkpoints = run / "checkpoints"
    (checkpoints / "step-00000005").mkdir(parents=True)
    (checkpoints / "latest").write_text(json.dumps({"step": 5, "dir": "step-00000005"}))
    log_path = tmp_path / "launcher.log"
    with open(log_path, "w") as log:   # as `hetero run` does: the launcher's own lines go to a log
        code = launch_fleet(cluster, None, FOLLOWS, [str(marks), "1", "7"], max_restarts=1, run_dir=str(run),
                            env={**os.environ, "HETERO_JOB_TOKEN": uuid.uuid4().hex}, stdout=log, stderr=log)
    assert code == 0
    announcement = ("hetero launch: restarting the whole job from step 5 (restart 1 of 1): "
                    "rank 1 on 127.0.0.1 exited with 7 (island host")
    console = capsys.readouterr().err
    assert announcement in console
    assert announcement in log_path.read_text()
    # Rank 0 stopped itself (exit 43) before rank 1's island reported; it is not the one named.
    assert "rank 0 on" not in console
    assert sorted(p.name for p in marks.iterdir()) == ["0.0", "0.1", "1.0", "1.1", "failing"]


def test_refused_coordinator_calls_are_counted_in_the_run_directory(tmp_path):
    cluster = write_cluster(tmp_path, "two-island", chips=1)
    run = tmp_path / "run"
    proc = launcher(cluster, "--run-dir", str(run), os.path.join(WORKERS, "knock_wrong_token.py"))
    code, stdout, stderr = finish(proc)
    assert code == 0, stderr
    assert ("fast", 0, "refused") in prefixed_lines(stdout)
    metrics = json.loads((run / "metrics" / "coordinator.json").read_text())
    assert metrics["refusals"].get("wrong_token", metrics["refusals"].get("token", 0)) >= 1
    assert metrics["refused_total"] == sum(metrics["refusals"].values()) >= 1


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_no_process_or_ring_outlives_a_signalled_launcher(tmp_path, sig):
    from comm_bridge.shm import job_hex_of, ring_path

    cluster = write_cluster(tmp_path, "two-island", chips=1)
    marks = tmp_path / "marks"
    marks.mkdir()
    marker, token = uuid.uuid4().hex, uuid.uuid4().hex
    # The workers exit the moment the launcher is gone, as training workers do when the
    # coordinator in the launcher vanishes: the race that left agents orphaned.
    proc = launcher(cluster, os.path.join(WORKERS, "record_and_sleep.py"), str(marks), "--exit-with-launcher",
                    env={"HETERO_LIFECYCLE_TEST": marker, "HETERO_JOB_TOKEN": token})
    deadline = time.monotonic() + 60
    while len([p for p in marks.iterdir() if p.suffix == ".pid"]) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    assert len(job_processes(marker)) == 5   # launcher, two agents, two workers
    # A ring the job's bridge would have left behind (a receiver that never mapped it).
    ring = ring_path(job_hex_of(token), 0, 1)
    with open(ring, "wb") as fh:
        fh.write(b"\0" * 64)
    try:
        proc.send_signal(sig)
        finish(proc, timeout=40)
        deadline = time.monotonic() + 30
        while job_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert job_processes(marker) == []
        assert not os.path.exists(ring)
    finally:
        for pid in job_processes(marker):
            os.kill(pid, signal.SIGKILL)
        if os.path.exists(ring):
            os.unlink(ring)


# ------------------------------------------------------------- the worker's side
CONFIGS = os.path.join(os.path.dirname(WORKERS), "..", "configs")


def worker_args(tmp_path, cluster: str) -> list[str]:
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    return ["--plan", str(plan), "--cluster", cluster, "--model", os.path.join(CONFIGS, "llama-tiny.yaml"),
            "--train", os.path.join(CONFIGS, "train-tiny.yaml"), "--run-dir", str(tmp_path / "run")]


@pytest.fixture
def rank_two(monkeypatch):
    monkeypatch.setenv("HETERO_GLOBAL_RANK", "2")
    monkeypatch.setenv("HETERO_NODE", "127.0.0.1")


def test_worker_stops_on_a_user_error_with_one_line_and_the_fatal_code(tmp_path, capsys, rank_two):
    from hetero.engine import worker
    from hetero.errors import FATAL_EXIT_CODE

    bad = tmp_path / "cluster.yaml"
    bad.write_text("name: [unclosed\n")
    assert worker.main(worker_args(tmp_path, str(bad))) == FATAL_EXIT_CODE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hetero: rank 2 on 127.0.0.1: {bad}"), err
    assert (tmp_path / "run" / "fatal" / "rank00002.txt").read_text() == err[0] + "\n"


def test_worker_rechecks_the_plan_against_its_job_and_stops_on_a_mismatch(tmp_path, capsys, rank_two):
    """A plan the launcher did not see (hetero launch knows no model) is checked by each rank."""
    import json

    from hetero.engine import worker
    from hetero.errors import FATAL_EXIT_CODE

    args = worker_args(tmp_path, os.path.join(CONFIGS, "emulated-mixed.yaml"))
    assert _plan_for_tiny(tmp_path) == 0
    plan = json.loads((tmp_path / "good.json").read_text())
    plan["model"] = "llama-other"
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert worker.main(args) == FATAL_EXIT_CODE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hetero: rank 2 on 127.0.0.1: {tmp_path / 'plan.json'}"), err
    assert "llama-other" in err[0] and "llama-tiny" in err[0]


def _plan_for_tiny(tmp_path) -> int:
    from hetero.cli import main

    return main(["plan", "--cluster", os.path.join(CONFIGS, "emulated-mixed.yaml"),
                 "--model", os.path.join(CONFIGS, "llama-tiny.yaml"), "--train", os.path.join(CONFIGS, "train-tiny.yaml"),
                 "--out", str(tmp_path / "good.json")])


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS])
def test_worker_stops_on_a_full_disk_naming_the_file(tmp_path, capsys, monkeypatch, rank_two, code):
    from hetero.engine import worker
    from hetero.errors import FATAL_EXIT_CODE

    def full(*args, **kwargs):
        raise OSError(code, os.strerror(code), "/data/ckpt/step-00000004.partial/model-stage0.safetensors")

    monkeypatch.setattr(worker, "load_checked_plan", full)
    assert worker.main(worker_args(tmp_path, os.path.join(CONFIGS, "emulated-mixed.yaml"))) == FATAL_EXIT_CODE
    line = f"hetero: rank 2 on 127.0.0.1: /data/ckpt/step-00000004.partial/model-stage0.safetensors: {os.strerror(code)}"
    assert capsys.readouterr().err.strip() == line
    assert (tmp_path / "run" / "fatal" / "rank00002.txt").read_text() == line + "\n"


def test_worker_leaves_other_failures_to_a_restart(tmp_path, monkeypatch, rank_two):
    from hetero.engine import worker

    def flaky(*args, **kwargs):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setattr(worker, "load_checked_plan", flaky)
    with pytest.raises(ConnectionResetError):
        worker.main(worker_args(tmp_path, os.path.join(CONFIGS, "emulated-mixed.yaml")))
    assert not (tmp_path / "run" / "fatal").exists()
