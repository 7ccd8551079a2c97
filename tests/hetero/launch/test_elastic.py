"""Elastic re-plan on a three-node loopback fleet (`hetero launch --node`, 127.0.0.1/2/3, one emulated
island per node): every process of one node is SIGKILLed mid-run; the head re-plans on the two that
remain and the job goes on from its last checkpoint; the node's launcher started again is taken back
at the next checkpoint (the plan grows back), and the job finishes all its steps. The losses trained
under the survivors' plan equal a fresh run from that checkpoint under that plan (fp32, 1e-5)."""

import json
import os
import shutil
import signal
import time

import pytest
import yaml

from hetero.config import load_job
from hetero.engine.checkpoint import pointed_step
from hetero.launch import events, loopback
from hetero.launch.fleet import launch_fleet
from tests.hetero.engine.test_engine_fleet import CONFIG, last_attempt, make_plan
from tests.hetero.launch.test_launch import finish, free_port_block, launcher

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]
TOKEN = "elastic-token-5d1e"
HOSTS = loopback.hosts(3)
LOST = HOSTS[2]
STEPS = 10
REJOIN_TIMEOUT = 2.0
# The chips' speed: slow enough that the survivors' steps outlast the returning launcher's start (seconds
# of imports), so the node is taken back mid-run rather than raced by the end of the job.
SLOW_TFLOPS = 0.00005



def _node_processes(host: str) -> list[int]:
    """The island agents and workers of this test's job on `host` (HETERO_NODE in their environment)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if f"HETERO_NODE={host}" in environ and f"HETERO_JOB_TOKEN={TOKEN}" in environ:
            found.append(int(entry))
    return found


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _steps(run_dir) -> list[dict]:
    path = run_dir / "metrics" / "steps.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fresh_losses(tmp_path, cluster: str, plan_path: str, checkpoints, from_step: int, steps: int) -> dict:
    """Losses of a fresh local run from checkpoint `from_step` of `checkpoints` under `plan_path`."""
    fresh = tmp_path / "fresh-checkpoints"
    fresh.mkdir()
    name = f"step-{from_step:08d}"
    shutil.copytree(checkpoints / name, fresh / name)
    (fresh / "latest").write_text(json.dumps({"step": from_step, "dir": name}))
    run_dir = tmp_path / "fresh"
    args = ["--plan", plan_path, "--cluster", cluster, "--model", CONFIG, "--train", CONFIG,
            "--steps", str(steps), "--checkpoint-dir", str(fresh)]
    with open(tmp_path / "fresh.log", "w") as log:
        code = launch_fleet(cluster, plan_path, "-m hetero.engine.worker", args, run_dir=str(run_dir),
                            stdout=log, stderr=log, env={**os.environ, "HETERO_JOB_TOKEN": TOKEN + "-fresh"})
    assert code == 0, (tmp_path / "fresh.log").read_text()[-3000:]
    return {r["step"]: r["loss"] for r in last_attempt(_steps(run_dir))}


def test_a_lost_node_is_planned_around_and_taken_back(tmp_path):
    cluster = str(tmp_path / "cluster.yaml")
    fleet = loopback.loopback_cluster("elastic-three", len(HOSTS), free_port_block(8))
    fleet["chips"][loopback.CHIP]["tflops"] = {"fp32": SLOW_TFLOPS}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(fleet, sort_keys=False))
    job = load_job(cluster=cluster, model=CONFIG, train=CONFIG)
    first = make_plan(job, [("a", 1, 1, (0, 1), 0), ("b", 1, 1, (1, 2), 0), ("c", 1, 1, (2, 3), 0)])
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(first.to_json())
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    argv = ["--model", CONFIG, "--train", CONFIG, "--plan", str(plan_path), "--max-restarts", "1",
            "--rejoin-timeout", str(REJOIN_TIMEOUT), "--hang-timeout", "120", "--run-dir", str(run_dir),
            "-m", "hetero.engine.worker", "--plan", str(plan_path), "--cluster", cluster, "--model", CONFIG,
            "--train", CONFIG, "--steps", str(STEPS), "--checkpoint-dir", str(checkpoints)]
    env = {"HETERO_JOB_TOKEN": TOKEN}
    members = {host: launcher(cluster, "--node", host, *argv, env=env) for host in HOSTS[1:]}
    head = launcher(cluster, "--node", HOSTS[0], *argv, env=env)
    started = [head, *members.values()]
    try:
        # Mid-run, after the first checkpoint: SIGKILL the node's launcher, agents and workers.
        _wait(lambda: len(_steps(run_dir)) >= 3 and pointed_step(str(checkpoints)), 240, "step 3")
        victims = [members[LOST].pid, *_node_processes(LOST)]
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        killed_at, killed_step = time.time(), len(_steps(run_dir))
        members[LOST].wait()
        replan = _wait(lambda: next((e for e in events.read(str(run_dir)) if e["event"] == "replan"), None),
                       120, "the replan event")
        # The node comes back: its launcher started again with the same arguments.
        back = launcher(cluster, "--node", LOST, *argv, env=env)
        started.append(back)
        codes = [finish(proc, timeout=300) for proc in (head, members[HOSTS[1]], back)]
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert [c[0] for c in codes] == [0, 0, 0], codes[0][2][-4000:]
    head_err = codes[0][2]
    found = events.read(str(run_dir))
    failure = next(e for e in found if e["event"] == "failure")
    assert failure["time"] - killed_at <= 10.0                   # detection
    down = replan["from_step"]
    assert replan["lost"] == [LOST] and replan["gone"] == [LOST]
    assert replan["old"]["world_size"] == 3 and replan["new"]["world_size"] < 3
    assert killed_step - down <= 2                               # steps lost <= the checkpoint interval
    assert "re-planned (node 127.0.0.3 not back after" in head_err and "new plan:" in head_err
    kept_first = json.loads((run_dir / f"plan-until-step-{down}.json").read_text())
    assert len(kept_first["ranks"]) == 3                          # the first plan, kept
    records = _steps(run_dir)
    first_after = min(r["time"] for r in records if r["step"] == down + 1 and r["time"] > replan["time"] - 1)
    assert first_after - failure["time"] <= 60.0                  # first step after resume
    rejoin = next(e for e in found if e["event"] == "rejoin")
    up = next(e for e in found if e["event"] == "replan" and e["back"] == [LOST])
    assert rejoin["host"] == LOST and up["lost"] == [] and up["new"]["world_size"] == 3
    assert [r["step"] for r in last_attempt(records)] == list(range(1, STEPS + 1))
    assert json.loads((run_dir / "plan.json").read_text())["ranks"] == json.loads(first.to_json())["ranks"]
    # The steps trained on the survivors equal a fresh run from the same checkpoint under their plan.
    taken_back = up["from_step"]
    small_plan = str(run_dir / f"plan-until-step-{taken_back}.json")
    assert len(json.loads(open(small_plan).read())["ranks"]) == replan["new"]["world_size"]
    got = {r["step"]: r["loss"] for r in last_attempt(records) if down < r["step"] <= taken_back}
    want = _fresh_losses(tmp_path, cluster, small_plan, checkpoints, down, taken_back)
    assert sorted(got) == list(range(down + 1, taken_back + 1))
    for step, loss in got.items():
        assert abs(loss - want[step]) <= 1e-5 * abs(want[step]), (got, want)
