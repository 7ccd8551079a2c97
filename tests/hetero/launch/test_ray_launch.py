"""`--on ray`: the placement it asks Ray for, its refusals, and the default job on a real
two-node Ray cluster on loopback (head 127.0.0.2, second node 127.0.0.3, each with the CPUs
of one island), started and stopped here by process id.

The cluster tests compare `hetero run --on ray` with the local `hetero run` of the same
cluster file (losses within 1e-5), kill a worker actor after the first checkpoint (the job
restarts from it and finishes with the same losses), run the job with the slow island's node
as `host: auto` (Ray places it; same losses), print the start-up overhead of --on ray, and
last kill the second Ray node mid-run (the job stops in one line naming the node and island,
nothing of it is left in Ray; the node is then started again).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import FIXTURES, ROOT, WORKERS, free_port
from hetero.config import load_job
from hetero.engine.checkpoint import pointed_step
from hetero.launch import events
from hetero.launch.layout import build_layout
from hetero.launch.ray_placement import WORKER_CPUS, missing_hosts, plan_placement, short_of

CLUSTER = os.path.join(FIXTURES, "launch", "ray-two-node.yaml")
MODEL = os.path.join(ROOT, "configs", "llama-tiny.yaml")
STEPS = 2
HEAD, SECOND = "127.0.0.2", "127.0.0.3"


def layout_of(text: str, tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    config = load_job(cluster=str(path)).cluster
    return build_layout(config, None, node=config.coordinator.host)


def test_one_bundle_per_chip_pinned_to_its_node(tmp_path):
    layout = build_layout(load_job(cluster=CLUSTER).cluster, None, node=HEAD)
    fast, slow = plan_placement(layout, {HEAD: HEAD, SECOND: SECOND})
    assert fast.bundles == ({"CPU": WORKER_CPUS, f"node:{HEAD}": 0.001},) * 2   # emulated chips are CPUs
    assert slow.bundles == ({"CPU": WORKER_CPUS, f"node:{SECOND}": 0.001},) * 2
    assert [(s.ip, s.first, s.node.nproc) for s in slow.shares] == [(SECOND, 0, 2)]


def test_accelerators_ask_for_their_ray_resource_node_by_node(tmp_path):
    layout = layout_of("name: gpus\ncoordinator: {host: 10.0.0.1, port: 29400}\nislands:\n"
                       "  - {name: a, accelerator: cuda, chip: A800-80G, nodes: [{host: 10.0.0.1, chips: 2}, "
                       "{host: 10.0.0.2, chips: 1}]}\n"
                       "  - {name: b, accelerator: ascend, chip: Ascend-910B, nodes: [{host: 10.0.0.2, chips: 1}]}\n"
                       "  - {name: k, accelerator: kunlun, chip: Kunlun-P800, nodes: [{host: 10.0.0.3, chips: 1}]}\n",
                       tmp_path)
    a, b, k = plan_placement(layout, {"10.0.0.1": "10.0.0.1", "10.0.0.2": "10.0.0.2", "10.0.0.3": "10.0.0.3"})
    assert [bundle["GPU"] for bundle in a.bundles] == [1.0, 1.0, 1.0]
    assert [next(key for key in bundle if key.startswith("node:")) for bundle in a.bundles] == \
        ["node:10.0.0.1", "node:10.0.0.1", "node:10.0.0.2"]
    assert [(s.first, s.node.nproc) for s in a.shares] == [(0, 2), (2, 1)]   # a node's bundles are consecutive
    assert b.bundles[0]["NPU"] == 1.0 and "GPU" not in b.bundles[0]
    assert k.bundles[0]["kunlun_xpu"] == 1.0
    nodes = {"10.0.0.1": {"GPU": 2.0, "CPU": 8.0}, "10.0.0.2": {"GPU": 1.0, "NPU": 0.0, "CPU": 8.0}}
    assert missing_hosts({"10.0.0.1": "10.0.0.1", "n3": "10.0.0.3"}, nodes) == ["n3 (10.0.0.3)"]
    assert short_of([a, b], nodes) == ["10.0.0.2: needs 1 NPU, has 0"]


def test_without_ray_on_ray_says_how_to_install_it(hetero_cli, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)   # `import ray` raises ImportError
    code, _, stderr = hetero_cli("run", "--on", "ray", "--cluster", CLUSTER, "--out", str(tmp_path / "run"))
    assert code == 2
    assert stderr.strip() == ("hetero run: error: --on ray needs Ray, which is not installed here: "
                              "pip install -e '.[ray]' (or pip install 'ray>=2.10')")
    assert not (tmp_path / "run").exists()


def test_launch_on_ray_refuses_node(hetero_cli):
    pytest.importorskip("ray")
    code, _, stderr = hetero_cli("launch", "--on", "ray", "--node", HEAD, "--cluster", CLUSTER,
                                 os.path.join(WORKERS, "torchrun_allreduce.py"))
    assert code == 2 and "--node and --on ray exclude each other" in stderr


# -- a real Ray cluster ------------------------------------------------------------------------


class RayCluster:
    """`ray start --block` for a head and a second node, each in its own session: stopping
    them (SIGTERM, then their process groups) ends every process they started."""

    def __init__(self, root: str):
        self.root = root
        self.port = free_port()
        self.address = f"{HEAD}:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)

    def start(self, timeout: float = 180.0) -> None:
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        common = ["--block", "--num-cpus", "2", "--disable-usage-stats"]
        self._start("head", [ray, "start", "--head", "--node-ip-address", HEAD, "--port", str(self.port),
                             "--ray-client-server-port", str(free_port()), "--include-dashboard", "false",
                             "--temp-dir", self.root, *common])
        deadline = time.monotonic() + timeout
        self._wait("head", deadline)
        # Only once the head is registered: a node that joins earlier gives up on a loaded machine.
        self._start("second", [ray, "start", "--address", self.address, "--node-ip-address", SECOND, *common])
        self._wait("second", deadline)

    def lose_second(self) -> None:
        """The second node dies as a machine would: SIGKILL to everything it started (its own group)."""
        second = self.procs.pop()
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()

    def restore_second(self, timeout: float = 180.0) -> None:
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        self._start("second", [ray, "start", "--address", self.address, "--node-ip-address", SECOND, "--block",
                               "--num-cpus", "2", "--disable-usage-stats"])
        self._wait("second", time.monotonic() + timeout)

    def _wait(self, name: str, deadline: float) -> None:
        while "Ray runtime started" not in self.log(name):
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                self.stop()
                raise RuntimeError(f"the Ray {name} node did not start:\n{self.log(name)[-3000:]}")
            time.sleep(0.5)

    def _start(self, name: str, command: list[str]) -> None:
        with open(os.path.join(self.root, f"{name}.log"), "w") as log:
            self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                               start_new_session=True))

    def log(self, name: str) -> str:
        with open(os.path.join(self.root, f"{name}.log"), errors="replace") as handle:
            return handle.read()

    def stop(self) -> None:
        for proc in reversed(self.procs):   # the second node first, then the head
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # its own group: what it started and left
            except OSError:
                pass
            proc.wait()


@pytest.fixture(scope="module")
def ray_cluster():
    pytest.importorskip("ray")
    root = tempfile.mkdtemp(prefix="hray", dir="/tmp")   # Ray's socket paths must stay short
    cluster = RayCluster(root)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)   # Ray's session: logs, sockets, spilled objects


@pytest.fixture(scope="module")
def job_files(tmp_path_factory):
    """The ray-two-node cluster on a free port; the default train file for STEPS steps, checkpointing every step."""
    folder = tmp_path_factory.mktemp("ray-job")
    cluster = folder / "cluster.yaml"
    with open(CLUSTER) as handle:
        cluster.write_text(handle.read().replace("port: 29400", f"port: {free_port()}"))
    train = folder / "train.yaml"
    with open(os.path.join(ROOT, "configs", "train-tiny.yaml")) as handle:
        text = handle.read()
    text = re.sub(r"^steps: \d+", f"steps: {STEPS}", text, flags=re.M)
    text = re.sub(r"^global_batch: \d+", "global_batch: 4", text, flags=re.M)   # half the default's work per step
    train.write_text(re.sub(r"every: \d+", "every: 1", text))
    return ["--cluster", str(cluster), "--model", MODEL, "--train", str(train)]


def without_ray_address() -> dict:
    """This environment less RAY_ADDRESS, so the address on the command line is the one used."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def hetero(*argv: str, timeout: float = 420) -> tuple[subprocess.CompletedProcess, float]:
    """Run `hetero ARGV`; return it and the wall time it started at."""
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "hetero", *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=without_ray_address())
    return done, started


def steps_of(run_dir) -> list[dict]:
    """The run's step records so far ([] before the first)."""
    path = os.path.join(run_dir, "metrics", "steps.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def first_step_after(run_dir, started: float) -> float:
    """Seconds from the command's start to the start of its first step."""
    first = steps_of(run_dir)[0]
    return first["time"] - first["step_s"] * first.get("time_dilation", 1.0) - started


@pytest.fixture(scope="module")
def runs(ray_cluster, job_files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-runs")
    local, local_started = hetero("run", *job_files, "--out", str(folder / "local"), "--json")
    assert local.returncode == 0, local.stderr[-3000:]
    ray, ray_started = hetero("run", "--on", f"ray={ray_cluster.address}", *job_files, "--out", str(folder / "ray"),
                              "--json")
    assert ray.returncode == 0, ray.stderr[-3000:]
    return {"local": (json.loads(local.stdout), folder / "local", local_started),
            "ray": (json.loads(ray.stdout), folder / "ray", ray_started), "stderr": ray.stderr}


@pytest.mark.slow
@pytest.mark.timeout(900)   # with the module's Ray cluster and runs (setup counts): minutes on a loaded CI machine
def test_default_job_on_ray_matches_the_local_run(runs):
    local, ray = runs["local"][0], runs["ray"][0]
    assert len(ray["losses"]) == STEPS
    assert ray["losses"] == pytest.approx(local["losses"], abs=1e-5)
    log = (runs["ray"][1] / "launcher.log").read_text()
    # streamed, prefixed: rank 0 of each island says how its hetero-DP sum goes (fast:0 also its checkpoints)
    assert re.search(r"^\[fast:0\] ", log, re.M) and re.search(r"^\[slow:0\] ", log, re.M)
    for island, rank in (("fast", 0), ("slow", 1)):
        assert (runs["ray"][1] / "logs" / "attempt_0" / f"{island}.{rank}" / "stdout.log").exists()
    on_ray = first_step_after(runs["ray"][1], runs["ray"][2])
    here = first_step_after(runs["local"][1], runs["local"][2])
    print(f"\n--on ray start-up overhead over the local launcher (command to first step): {on_ray - here:.1f} s "
          f"({on_ray:.1f} s on Ray, {here:.1f} s here; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")



def start_run_on_ray(ray_cluster, job_files, out, *extra: str):
    """`hetero run --on ray=ADDRESS --max-restarts 1 --json EXTRA` in the background (RAY_ADDRESS dropped)."""
    command = [sys.executable, "-m", "hetero", "run", "--on", f"ray={ray_cluster.address}", *job_files,
               "--out", str(out), "--max-restarts", "1", "--json", *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=without_ray_address())



@pytest.mark.slow
@pytest.mark.timeout(900)   # with the module's Ray cluster and runs (setup counts): minutes on a loaded CI machine
def test_a_killed_worker_actor_restarts_the_job_from_its_checkpoint(ray_cluster, job_files, runs, tmp_path):
    """The kill lands after some checkpoint is sealed, but on a loaded host maybe after a later one
    (the job checkpoints every step): the restart must resume from the newest checkpoint sealed when
    the kill landed (never an older one), and the workers must load the very checkpoint it names."""
    out = tmp_path / "run"
    proc = start_run_on_ray(ray_cluster, job_files, out)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "latest").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        actor = agent_actor_pid(str(out), "slow")
        sealed = pointed_step(str(out / "checkpoints"))     # latest only moves forward
        os.kill(actor, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    restart = re.search(r"restarting the whole job from step (\d+) \(restart 1 of 1\): island slow on 127\.0\.0\.3",
                        stderr)
    assert restart, stderr[-3000:]
    # A seal already agreed by every rank may still land just after the kill; nothing later can.
    assert sealed <= int(restart[1]) <= min(sealed + 1, STEPS)
    log = stderr + (out / "launcher.log").read_text()
    assert {int(s) for s in re.findall(r"resumed from \S*step-0*(\d+) \(step \d+\)", log)} == {int(restart[1])}
    # Ray's "(raylet) A worker died ..." goes to stderr: stdout holds the summary alone.
    summary = json.loads(stdout)
    assert summary["losses"] == pytest.approx(runs["ray"][0]["losses"], abs=1e-5)
    assert steps_of(out)[-1]["step"] == STEPS


@pytest.mark.slow
@pytest.mark.timeout(900)   # with the module's Ray cluster and runs (setup counts): minutes on a loaded CI machine
def test_an_auto_node_runs_where_ray_placed_it(ray_cluster, job_files, runs, tmp_path):
    """The slow island's node says `host: auto`: Ray places it (the head's CPUs are the fast
    island's, so on the second node) and the job trains as with the host named."""
    cluster = tmp_path / "auto.yaml"
    with open(job_files[1]) as handle:
        cluster.write_text(handle.read().replace(f"host: {SECOND}", "host: auto"))
    out = tmp_path / "run"
    done, _ = hetero("run", "--on", f"ray={ray_cluster.address}", "--cluster", str(cluster), *job_files[2:],
                     "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["losses"] == pytest.approx(runs["local"][0]["losses"], abs=1e-5)
    assert f"auto node slow.0 on {SECOND}" in done.stderr
    placed = load_job(cluster=str(out / "cluster-placed.yaml")).cluster
    assert [node.host for island in placed.islands for node in island.nodes] == [HEAD, SECOND]


LEFTOVERS = """
import json, sys, time
import ray
from ray._private import state
from ray.util import placement_group_table
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + 60   # Ray removes a finished driver's actors and groups in the background
while True:
    groups = [g["name"] for g in placement_group_table().values() if g["state"] != "REMOVED"]
    actors = [a["ActorClassName"] for a in state.actors().values() if a["State"] != "DEAD"]
    if not (groups or actors) or time.monotonic() > deadline:
        break
    time.sleep(0.5)
print(json.dumps({"groups": groups, "actors": actors}))
"""


ELASTIC_STEPS = 20   # the node is back within a few steps; the rest leave room to take it back


def wait_for(predicate, timeout: float, what: str, proc):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


# Takes the second node down and brings it back.
@pytest.mark.slow
@pytest.mark.timeout(900)   # with the module's Ray cluster (setup counts): minutes on a loaded CI machine
def test_a_lost_ray_node_is_planned_around_and_taken_back(ray_cluster, job_files, tmp_path):
    """Elastic --on ray: the slow island's Ray node dies mid-run; the driver re-plans on the fast island's
    chips (the loopback launcher's planner and events) and resumes from the last checkpoint; the node
    started again is taken back at the next checkpoint, the plan grows back, and all steps finish."""
    train = tmp_path / "train.yaml"
    with open(job_files[5]) as handle:
        text = re.sub(r"^steps: \d+", f"steps: {ELASTIC_STEPS}", handle.read(), flags=re.M)
    train.write_text(re.sub(r"every: \d+", "every: 2", text))
    out = tmp_path / "run"
    proc = start_run_on_ray(ray_cluster, [*job_files[:5], str(train)], out, "--rejoin-timeout", "3")
    try:
        wait_for(lambda: len(steps_of(out)) >= 3 and (out / "checkpoints" / "latest").exists(), 300,
                 "step 3", proc)
        ray_cluster.lose_second()
        killed_at, killed_step = time.time(), len(steps_of(out))
        replan = wait_for(lambda: next((e for e in events.read(str(out)) if e["event"] == "replan"), None), 120,
                          "the replan event", proc)
        ray_cluster.restore_second()
        stdout, stderr = proc.communicate(timeout=480)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    found = events.read(str(out))
    failure = next(e for e in found if e["event"] == "failure")
    assert "Ray node 127.0.0.3 (island slow) is lost" in failure["reason"]
    assert failure["time"] - killed_at <= 10.0                                    # detection
    assert replan["lost"] == [SECOND] and replan["old"]["world_size"] == 4 and replan["new"]["world_size"] == 2
    assert "re-planned (node 127.0.0.3 not back after" in stderr and "new plan: fast(" in stderr
    down = replan["from_step"]
    assert killed_step - down <= 2                                                # <= the checkpoint interval
    rejoin = next(e for e in found if e["event"] == "rejoin")
    up = next(e for e in found if e["event"] == "replan" and e["back"] == [SECOND])
    assert rejoin["host"] == SECOND and up["lost"] == [] and up["new"]["world_size"] == 4
    assert len(json.loads((out / f"plan-until-step-{up['from_step']}.json").read_text())["ranks"]) == 2
    assert len(json.loads((out / "plan.json").read_text())["ranks"]) == 4         # the first plan again
    records = steps_of(out)
    assert records[-1]["step"] == ELASTIC_STEPS and len(json.loads(stdout)["losses"]) == ELASTIC_STEPS
    # A step trained under the first plan and again on the survivors (from the checkpoint): the same loss.
    twice: dict = {}
    for record in records:
        twice.setdefault(record["step"], []).append(record["loss"])
    for step in range(down + 1, killed_step + 1):
        assert max(twice[step]) - min(twice[step]) <= 1e-5 * abs(twice[step][0]), (step, twice[step])


# Last in the module: it takes the second node down (and brings it back for any test after it).
@pytest.mark.slow
@pytest.mark.timeout(900)   # with the module's Ray cluster and runs (setup counts): minutes on a loaded CI machine
def test_a_lost_node_stops_every_actor_of_the_job(ray_cluster, job_files, tmp_path):
    """Not elastic (--no-elastic): a restart onto the lost node is refused at once, in one line."""
    out = tmp_path / "run"
    proc = start_run_on_ray(ray_cluster, job_files, out, "--no-elastic")
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("logs/attempt_0/slow.*/stdout.log")):   # the slow island's workers run
            assert proc.poll() is None and time.monotonic() < deadline, "the slow island never started"
            time.sleep(0.2)
        ray_cluster.lose_second()
        # Restarting would wait for the lost node's bundles (and the rendezvous, 300 s): it must not.
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        assert proc.returncode == 1, stderr[-3000:]
        assert json.loads(stdout)["ok"] is False   # the summary alone: Ray's "worker died" lines went to stderr
        assert re.search(r"^hetero launch: job failed: cannot restart on the same Ray nodes: Ray node 127\.0\.0\.3 "
                         r"\(island slow\) is lost", stderr, re.M), stderr[-3000:]
        left = subprocess.run([sys.executable, "-c", LEFTOVERS, ray_cluster.address], capture_output=True,
                              text=True, timeout=180, env=without_ray_address())
        assert json.loads(left.stdout) == {"groups": [], "actors": []}, left.stderr[-3000:]
    finally:
        ray_cluster.restore_second()


def agent_actor_pid(run_dir: str, island: str) -> int:
    """The pid of the Ray actor running `island`'s agent for the run in `run_dir` (the agent's parent)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if b"hetero.launch.island_agent" in argv[:-1]:
            spec = json.loads(argv[argv.index(b"hetero.launch.island_agent") + 1])
            if spec["island"] == island and spec["log_dir"].startswith(run_dir):
                return spec["parent_pid"]
    raise AssertionError(f"no agent of island {island} for {run_dir}")


def test_on_ray_refuses_an_address_where_nothing_answers(hetero_cli, tmp_path):
    pytest.importorskip("ray")
    port = free_port()   # free: nothing listens there
    code, _, stderr = hetero_cli("run", "--on", f"ray=127.0.0.1:{port}", "--cluster", CLUSTER,
                                 "--out", str(tmp_path / "run"))
    assert code == 2
    assert stderr.strip() == (f"hetero run: error: --on ray: nothing answers at 127.0.0.1:{port} "
                              f"(is the Ray head running? `ray start --head`)")
    assert not (tmp_path / "run").exists()
