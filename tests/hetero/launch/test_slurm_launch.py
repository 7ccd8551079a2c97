"""`hetero launch --on slurm`: Slurm's node list, node id and node name mapped to the cluster's
hosts, tested against recorded Slurm environments and a stand-in srun that starts one task
per "node" on loopback (127.0.0.2 and 127.0.0.3), as srun --ntasks-per-node=1 would.
Not run under a real Slurm."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hetero.config import load_job
from hetero.errors import UserError
from hetero.launch.slurm import allocation, expand_nodelist, map_hosts, srun_command, this_host
from tests.hetero.launch.test_launch import WORKERS, finish, prefixed_lines, write_cluster

pytestmark = pytest.mark.timeout(330)

# What sbatch --nodes=2 gives the task srun starts on the second node (recorded fields).
STEP_ON_SECOND = {"SLURM_JOB_ID": "48213", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2",
                  "SLURM_NODEID": "1", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0",
                  "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURMD_NODENAME": "gpu08", "SLURM_NTASKS": "2"}
# The batch script itself: no step yet.
BATCH = {"SLURM_JOB_ID": "48213", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2",
         "SLURM_NODEID": "0", "SLURMD_NODENAME": "gpu07"}


def cluster_of(tmp_path, hosts: list[str]):
    nodes = ", ".join(f"{{host: {h}, chips: 1}}" for h in hosts)
    path = tmp_path / "cluster.yaml"
    path.write_text(f"name: s\ncoordinator: {{host: {hosts[0]}, port: 29400}}\nislands:\n"
                    f"  - {{name: a, accelerator: cpu, chip: cpu, nodes: [{nodes}]}}\n")
    return load_job(cluster=str(path)).cluster


@pytest.mark.parametrize("text, names", [
    ("node01", ["node01"]),
    ("gpu[07-08]", ["gpu07", "gpu08"]),
    ("gpu[01-03,7],cpu5", ["gpu01", "gpu02", "gpu03", "gpu7", "cpu5"]),
    ("a[1-2]-ib,b[09-10]", ["a1-ib", "a2-ib", "b09", "b10"]),
    ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
])
def test_node_lists_expand_as_slurm_writes_them(text, names):
    assert expand_nodelist(text) == names


def test_a_step_task_runs_its_nodes_host_by_name(tmp_path):
    cluster = cluster_of(tmp_path, ["gpu07", "gpu08"])
    assert allocation(STEP_ON_SECOND) == (["gpu07", "gpu08"], 1)
    assert this_host(cluster, STEP_ON_SECOND) == "gpu08"
    fqdn = dict(STEP_ON_SECOND, SLURMD_NODENAME="gpu08")
    assert this_host(cluster_of(tmp_path, ["gpu07.cluster.example", "gpu08.cluster.example"]), fqdn) == \
        "gpu08.cluster.example"   # short names match


def test_by_order_node_i_is_the_files_host_i(tmp_path):
    cluster = cluster_of(tmp_path, ["10.1.0.1", "10.1.0.2"])
    assert map_hosts(cluster, ["gpu07", "gpu08"], "order") == {"gpu07": "10.1.0.1", "gpu08": "10.1.0.2"}
    assert this_host(cluster, STEP_ON_SECOND, "order") == "10.1.0.2"


def test_mismatches_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"host 10\.1\.0\.1 of cluster 's' is not a node of this allocation "
                                        r"\(gpu07, gpu08\).*--slurm-by order"):
        this_host(cluster_of(tmp_path, ["10.1.0.1", "10.1.0.2"]), STEP_ON_SECOND)
    with pytest.raises(UserError, match="allocation has 2 node.*names 3 hosts; allocate --nodes=3"):
        map_hosts(cluster_of(tmp_path, ["h1", "h2", "h3"]), ["gpu07", "gpu08"], "order")
    with pytest.raises(UserError, match="inside a Slurm allocation"):
        allocation({})


def test_the_batch_script_starts_one_launcher_per_node_under_srun():
    assert allocation(BATCH) == (["gpu07", "gpu08"], None)   # no step: this command goes under srun
    assert srun_command(["launch", "--on", "slurm"], 2) == [
        "srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--export=ALL",
        sys.executable, "-m", "hetero", "launch", "--on", "slurm"]


STAND_IN_SRUN = '''#!{python}
"""srun --ntasks-per-node=1 on this machine: one task per node of SLURM_JOB_NODELIST, each with its step's variables."""
import os, subprocess, sys
sys.path.insert(0, {root!r})
from hetero.launch.slurm import expand_nodelist
nodes = expand_nodelist(os.environ["SLURM_JOB_NODELIST"])
command = sys.argv[1:]
while command and command[0].startswith("--"):
    command.pop(0)
tasks = [subprocess.Popen(command, env=dict(os.environ, SLURM_STEP_ID="0", SLURM_NODEID=str(i), SLURM_PROCID=str(i),
                                             SLURMD_NODENAME=node))
         for i, node in enumerate(nodes)]
sys.exit(max(t.wait() for t in tasks))
'''


@pytest.mark.slow
def test_launch_on_slurm_runs_the_fleet_across_the_allocations_nodes(tmp_path):
    from tests.conftest import ROOT

    srun = tmp_path / "srun"
    srun.write_text(STAND_IN_SRUN.format(python=sys.executable, root=ROOT))
    srun.chmod(0o755)
    cluster = write_cluster(tmp_path, "two-node")   # hosts 127.0.0.2 (coordinator), 127.0.0.3
    out = tmp_path / "env"
    out.mkdir()
    env = {**os.environ, "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "HETERO_SRUN": str(srun)}
    for name in ("SLURM_STEP_ID", "SLURM_NODEID", "SLURMD_NODENAME", "HETERO_JOB_TOKEN"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "hetero", "launch", "--on", "slurm", "--slurm-by", "order",
                             "--cluster", cluster, "--run-dir", str(tmp_path / "run"),
                             os.path.join(WORKERS, "torchrun_allreduce.py"), str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    code, stdout, stderr = finish(proc, timeout=300)
    assert code == 0, stderr
    assert sorted(prefixed_lines(stdout)) == [("right", 0, "rank 0 of 1: sum 1"), ("wide", 0, "rank 0 of 2: sum 3"),
                                              ("wide", 1, "rank 1 of 2: sum 3")]
    envs = {int(e["HETERO_GLOBAL_RANK"]): e for e in (json.loads(p.read_text()) for p in out.iterdir())}
    assert [envs[r]["HETERO_NODE"] for r in range(3)] == ["127.0.0.2", "127.0.0.3", "127.0.0.3"]
    assert len({e["HETERO_JOB_TOKEN"] for e in envs.values()}) == 1   # one job: the token srun passed on


def test_run_on_slurm_starts_every_nodes_launcher_from_the_batch_script(tmp_path, monkeypatch):
    import hetero.launch.slurm as slurm

    started = []
    monkeypatch.setattr(slurm, "run_under_srun", lambda argv, env, stdout, stderr: started.append(argv) or 0)
    monkeypatch.setattr(os, "environ", dict(BATCH))
    cluster = cluster_of(tmp_path, ["gpu07", "gpu08"])
    run_dir = str(tmp_path / "run")
    code = slurm.slurm_run_launcher()(cluster, "/r/plan.json", "-m hetero.engine.worker", ["--steps", "3"],
                                      max_restarts=1, run_dir=run_dir)
    assert code == 0
    assert started == [["launch", "--on", "slurm", "--slurm-by", "name", "--cluster", f"{run_dir}/cluster.yaml",
                        "--max-restarts", "1", "--run-dir", run_dir, "--plan", "/r/plan.json",
                        "-m", "hetero.engine.worker", "--steps", "3"]]
    monkeypatch.setattr(os, "environ", dict(STEP_ON_SECOND))
    with pytest.raises(UserError, match="not under srun"):
        slurm.slurm_run_launcher()(cluster, None, "-m hetero.engine.worker", run_dir=run_dir)


def test_on_slurm_says_in_one_line_that_it_is_not_elastic(tmp_path, monkeypatch, capsys):
    """srun ends the step when a node is lost: `hetero run --on slurm` says so (elastic is hetero run's
    default), `--no-elastic` is quiet, and every node's launcher runs with elastic off."""
    import hetero.launch.fleet as fleet
    import hetero.launch.slurm as slurm

    monkeypatch.setattr(slurm, "run_under_srun", lambda argv, env, stdout, stderr: 0)
    monkeypatch.setattr(os, "environ", dict(BATCH))
    cluster = cluster_of(tmp_path, ["gpu07", "gpu08"])
    slurm.slurm_run_launcher()(cluster, None, "-m hetero.engine.worker", run_dir=str(tmp_path / "run"),
                               elastic=True, rejoin_timeout=5.0)
    assert capsys.readouterr().err == f"hetero run: {slurm.NOT_ELASTIC}\n"
    slurm.slurm_run_launcher()(cluster, None, "-m hetero.engine.worker", run_dir=str(tmp_path / "run"),
                               elastic=False)
    assert capsys.readouterr().err == ""

    calls = []
    monkeypatch.setattr(fleet, "launch_fleet", lambda *args, **options: calls.append(options) or 0)
    monkeypatch.setattr(os, "environ", dict(STEP_ON_SECOND, SLURMD_NODENAME="gpu07", SLURM_NODEID="0"))
    assert slurm.slurm_launcher()(cluster, None, "-m hetero.engine.worker", rejoin_timeout=5.0) == 0
    assert calls[-1]["elastic"] is False and capsys.readouterr().err == f"hetero launch: {slurm.NOT_ELASTIC}\n"
    assert slurm.slurm_launcher()(cluster, None, "-m hetero.engine.worker", rejoin_timeout=5.0,
                                  elastic=False) == 0
    assert calls[-1]["elastic"] is False and capsys.readouterr().err == ""


def test_hetero_launch_on_slurm_repeats_no_elastic_for_every_node():
    """The batch script's `hetero launch --on slurm --no-elastic` reruns itself under srun with the flag
    kept, so no node's launcher says it is not elastic after the user turned elasticity off."""
    from hetero.cli import build_parser
    from hetero.commands.launch import _argv

    parser = build_parser()
    quiet = parser.parse_args(["launch", "--on", "slurm", "--cluster", "c.yaml", "--no-elastic", "train.py"])
    assert "--no-elastic" in _argv(quiet)
    assert "--no-elastic" not in _argv(parser.parse_args(["launch", "--on", "slurm", "--cluster", "c.yaml",
                                                            "train.py"]))


def test_a_step_without_a_node_name_or_id_is_one_line(tmp_path):
    cluster = cluster_of(tmp_path, ["gpu07", "gpu08"])
    outside = {k: v for k, v in STEP_ON_SECOND.items() if k not in ("SLURMD_NODENAME", "SLURM_STEP_ID")}
    with pytest.raises(UserError, match="neither SLURMD_NODENAME nor SLURM_NODEID"):
        this_host(cluster, outside)
