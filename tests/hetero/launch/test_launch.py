"""`hetero launch` on one host: island-local worlds, HETERO_* env, prefixed logs, restarts, signals.

Helpers at the top are shared with tests/hetero/launch/test_launch_multinode.py and tests/hetero/launch/test_launch_inputs.py.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from hetero.launch.loopback import free_port_block  # noqa: F401  (shared: other tests import it from here)
from tests.conftest import FIXTURES, ROOT, WORKERS

LAUNCH_CONFIGS = os.path.join(FIXTURES, "launch")
PREFIXED = re.compile(r"^\[(\w+):(\d+)\] (.*)$")

pytestmark = pytest.mark.timeout(120)


# ----------------------------------------------------------------- helpers
def write_cluster(tmp_path, name: str, chips: int | None = None) -> str:
    """tests/fixtures/launch/<name>.yaml with a free coordinator port (rendezvous ports follow it),
    and optionally `chips` chips on every node (fewer processes: faster on 2 cores)."""
    with open(os.path.join(LAUNCH_CONFIGS, f"{name}.yaml"), encoding="utf-8") as fh:
        text = fh.read()
    text = text.replace("port: 29400", f"port: {free_port_block(8)}")
    if chips is not None:
        text = re.sub(r"chips: \d+", f"chips: {chips}", text)
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def launcher(cluster: str, *argv: str, env: dict | None = None, cwd: str = ROOT) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "hetero", "launch", "--cluster", cluster, *argv]
    return subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 90) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"launcher did not finish in {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    return proc.returncode, out, err


def prefixed_lines(text: str) -> list[tuple[str, int, str]]:
    return [(m.group(1), int(m.group(2)), m.group(3)) for m in map(PREFIXED.match, text.splitlines()) if m]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def plan_for(cluster_path: str, out_path) -> str:
    from hetero.config import load_job
    from hetero.planning import plan_job

    job = load_job(cluster=cluster_path, model=os.path.join(ROOT, "configs", "llama-tiny.yaml"),
                   train=os.path.join(ROOT, "configs", "train-tiny.yaml"))
    out_path.write_text(plan_job(job).best.to_json())
    return str(out_path)


# ------------------------------------------------------------------- tests
def test_plain_torchrun_script_runs_unchanged_in_each_island(tmp_path):
    cluster = write_cluster(tmp_path, "two-island")
    out = tmp_path / "env"
    out.mkdir()
    token = "launch-test-token-5f3a9c"
    proc = launcher(cluster, "--run-dir", str(tmp_path / "run"),
                    os.path.join(WORKERS, "torchrun_allreduce.py"), str(out), env={"HETERO_JOB_TOKEN": token})
    code, stdout, stderr = finish(proc)
    assert code == 0, stderr

    # Each island is its own world of 2: ranks 0 and 1 all-reduce 1 + 2 = 3, whatever the other island does.
    results = sorted((island, rank, text) for island, rank, text in prefixed_lines(stdout))
    assert results == [("fast", 0, "rank 0 of 2: sum 3"), ("fast", 1, "rank 1 of 2: sum 3"),
                       ("host", 0, "rank 0 of 2: sum 3"), ("host", 1, "rank 1 of 2: sum 3")], stdout

    envs = [json.loads(p.read_text()) for p in out.iterdir()]
    assert len(envs) == 4
    for env in envs:
        assert env["WORLD_SIZE"] == "2" and env["LOCAL_WORLD_SIZE"] == "2"
        assert env["HETERO_WORLD_SIZE"] == "4"
        # No plan: global ranks island by island in cluster order.
        assert int(env["HETERO_GLOBAL_RANK"]) == 2 * int(env["HETERO_ISLAND_INDEX"]) + int(env["RANK"])
        assert "HETERO_PLAN" not in env
        assert env["HETERO_JOB_TOKEN"] == token
        assert env["HETERO_RESTART_COUNT"] == "0"
        assert env["HETERO_RUN_DIR"] == str(tmp_path / "run")
        assert env["HETERO_COORDINATOR"].startswith("127.0.0.1:")
        if env["HETERO_ISLAND"] == "fast":
            assert env["HETERO_ACCELERATOR"] == "emulated" and env["HETERO_ISLAND_INDEX"] == "0"
            assert json.loads(env["HETERO_EMULATED_CHIP"])["name"] == "emu-fast"
        else:
            assert env["HETERO_ACCELERATOR"] == "cpu" and env["HETERO_ISLAND_INDEX"] == "1"
            assert "HETERO_EMULATED_CHIP" not in env
    assert sorted(int(e["HETERO_GLOBAL_RANK"]) for e in envs) == [0, 1, 2, 3]
    # Two separate rendezvous: one MASTER_PORT per island, derived from the coordinator's port.
    ports = {e["HETERO_ISLAND"]: int(e["MASTER_PORT"]) for e in envs}
    coordinator_port = int(envs[0]["HETERO_COORDINATOR"].rsplit(":", 1)[1])
    assert ports == {"fast": coordinator_port + 1, "host": coordinator_port + 2}

    assert token not in stdout + stderr
    log = tmp_path / "run" / "logs" / "attempt_0" / "host.1" / "stdout.log"
    assert log.read_text().strip() == "rank 1 of 2: sum 3"


def test_plan_decides_who_runs_and_global_ranks(tmp_path):
    cluster = write_cluster(tmp_path, "two-island")
    plan = plan_for(cluster, tmp_path / "plan.json")
    used = {(r["island"], r["local_rank"]): r["rank"] for r in json.loads(open(plan).read())["ranks"]}
    # This plan leaves the emulated island idle (llama-tiny fits on the CPU chips): it gets no worker.
    assert sorted(used) == [("host", 0), ("host", 1)]
    out = tmp_path / "env"
    out.mkdir()
    # The module form (python -m), run from the folder that holds it.
    proc = launcher(cluster, "--plan", plan, "-m", "torchrun_allreduce", str(out), cwd=WORKERS)
    code, stdout, stderr = finish(proc)
    assert code == 0, stderr
    assert sorted(prefixed_lines(stdout)) == [("host", 0, "rank 0 of 2: sum 3"), ("host", 1, "rank 1 of 2: sum 3")]
    envs = [json.loads(p.read_text()) for p in out.iterdir()]
    assert sorted((e["HETERO_ISLAND"], int(e["RANK"]), int(e["HETERO_GLOBAL_RANK"])) for e in envs) == \
        sorted((island, local, rank) for (island, local), rank in used.items())
    assert all(e["HETERO_PLAN"] == plan and e["HETERO_WORLD_SIZE"] == "2" for e in envs)


def test_failed_island_restarts_whole_job_then_succeeds(tmp_path):
    cluster = write_cluster(tmp_path, "two-island", chips=1)
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = launcher(cluster, "--max-restarts", "1", os.path.join(WORKERS, "fail_first_attempt.py"), str(marks))
    code, stdout, stderr = finish(proc)
    assert code == 0, stderr
    # Every rank ran twice: the whole job restarted, not only the island that failed.
    assert sorted(p.name for p in marks.iterdir()) == ["0.0", "0.1", "1.0", "1.1"]
    done = sorted((island, rank) for island, rank, text in prefixed_lines(stdout) if text.startswith("attempt 1 done"))
    assert done == [("fast", 0), ("host", 0)], stdout
    assert "restarting the whole job from the start (restart 1 of 1): rank 0 on 127.0.0.1 exited with 7" in stderr
    for mark in marks.iterdir():
        assert not alive(int(mark.read_text().split()[1])), mark.name


def test_failed_island_without_restarts_stops_every_island(tmp_path):
    cluster = write_cluster(tmp_path, "two-island", chips=1)
    marks = tmp_path / "marks"
    marks.mkdir()
    start = time.monotonic()
    proc = launcher(cluster, "--max-restarts", "0", os.path.join(WORKERS, "fail_first_attempt.py"), str(marks))
    code, stdout, stderr = finish(proc)
    assert code == 1, stderr
    # The other ranks would sleep 300 s: the launcher stopped them.
    assert time.monotonic() - start < 60
    assert sorted(p.name for p in marks.iterdir()) == ["0.0", "1.0"]
    for mark in marks.iterdir():
        assert not alive(int(mark.read_text().split()[1])), mark.name
    assert "worker rank 0 (global rank 0) failed with exit code 7" in stderr
    assert "job failed: rank 0 on 127.0.0.1 exited with 7 (island fast" in stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_every_worker_and_exits_nonzero(tmp_path, sig):
    cluster = write_cluster(tmp_path, "two-island", chips=1)
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = launcher(cluster, os.path.join(WORKERS, "record_and_sleep.py"), str(marks))
    deadline = time.monotonic() + 60
    while len([p for p in marks.iterdir() if p.suffix == ".pid"]) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in marks.iterdir() if p.suffix == ".pid"]
    proc.send_signal(sig)
    code, _, stderr = finish(proc, timeout=40)
    assert code == 128 + sig, stderr
    assert f"interrupted by {sig.name}" in stderr
    assert not [pid for pid in pids if alive(pid)]


def test_worker_the_coordinator_declares_failed_restarts_the_job(tmp_path):
    cluster = write_cluster(tmp_path, "two-island", chips=1)
    marks = tmp_path / "marks"
    marks.mkdir()
    proc = launcher(cluster, "--max-restarts", "1", os.path.join(WORKERS, "coordinator_heartbeats.py"), str(marks))
    code, stdout, stderr = finish(proc)
    assert code == 0, stderr
    assert "the coordinator reports global rank 1 failed: no heartbeat" in stderr
    assert sorted(p.name for p in marks.iterdir()) == ["0.0", "0.1", "1.0", "1.1"]
    assert sorted(line[:2] for line in prefixed_lines(stdout) if line[2] == "attempt 1 done") == \
        [("fast", 0), ("host", 0)]
    for mark in marks.iterdir():
        assert not alive(int(mark.read_text().split()[1])), mark.name
