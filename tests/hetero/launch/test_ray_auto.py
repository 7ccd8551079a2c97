"""`host: auto` nodes without a Ray cluster: the config accepts them as distinct nodes, every
launch but `--on ray` refuses them in one line, and the placement data `--on ray` builds for
them (a STRICT_PACK group per auto node, then the host Ray chose made the cluster's).
Also: under --on ray, the driver's stdout is the job's alone (Ray's own lines go to stderr).
The real run on a Ray cluster is tests/hetero/launch/test_ray_launch.py's."""

from __future__ import annotations

import os
import sys

import pytest
import yaml

from tests.conftest import ROOT, WORKERS
from hetero.config import load_job
from hetero.errors import UserError
from hetero.launch.layout import build_layout
from hetero.launch.ray_placement import (WORKER_CPUS, crowded, placed_cluster, placed_yaml, plan_placement,
                                         rebind, short_of, with_node_ids)

CONFIGS = os.path.join(ROOT, "configs")
JOB = ["--model", os.path.join(CONFIGS, "llama-tiny.yaml"), "--train", os.path.join(CONFIGS, "train-tiny.yaml")]
AUTO = """name: autos
coordinator: {host: 127.0.0.1, port: 29400}
islands:
  - name: fast
    accelerator: emulated
    chip: emu-fast
    nodes: [{host: 127.0.0.1, chips: 2}, {host: auto, chips: 2}]
  - name: slow
    accelerator: emulated
    chip: emu-slow
    nodes: [{host: auto, chips: 2}, {host: auto, chips: 1}]
"""


@pytest.fixture
def auto_file(tmp_path):
    path = tmp_path / "autos.yaml"
    path.write_text(AUTO)
    return str(path)


def test_auto_nodes_are_distinct_nodes_of_the_cluster(auto_file, hetero_cli):
    cluster = load_job(cluster=auto_file).cluster
    hosts = [(node.host, node.auto) for island in cluster.islands for node in island.nodes]
    assert hosts == [("127.0.0.1", False), ("auto:fast:1", True), ("auto:slow:0", True), ("auto:slow:1", True)]
    layout = build_layout(cluster, None, node="127.0.0.1", auto=True)
    assert layout.hosts == ("127.0.0.1", "auto:fast:1", "auto:slow:0", "auto:slow:1")
    code, out, err = hetero_cli("check", "--simulate", "--cluster", auto_file)
    assert code == 0, err
    assert "7 chips, 4 nodes, 2 islands" in out
    code, out, err = hetero_cli("validate", auto_file)
    assert code == 0 and "cluster autos: 7 chips" in out, err


@pytest.mark.parametrize("argv, how", [
    (("run",), "hetero run without --on"),
    (("run", "--on", "slurm"), "--on slurm"),
    (("launch",), "a launch without --on ray"),
])
def test_every_launch_but_ray_refuses_auto_in_one_line(auto_file, hetero_cli, tmp_path, argv, how):
    out = tmp_path / "run"
    tail = [*JOB, "--out", str(out)] if argv[0] == "run" else [os.path.join(WORKERS, "torchrun_allreduce.py")]
    code, _, err = hetero_cli(*argv, "--cluster", auto_file, *tail)
    assert code == 2
    assert err.strip() == (f"hetero {argv[0]}: error: cluster 'autos': host: auto (islands fast, slow) needs --on "
                           f"ray, where Ray picks the node; {how} needs every node's host named in the cluster file")
    assert not out.exists()


def test_launch_on_slurm_refuses_auto_before_mapping_hosts(auto_file):
    from hetero.errors import UserError
    from hetero.launch.slurm import slurm_launcher

    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_NODEID": "0", "SLURMD_NODENAME": "n1"}
    with pytest.raises(UserError, match="host: auto .* needs --on ray.*; --on slurm needs every node's host"):
        slurm_launcher("name")(auto_file, None, "train.py", env=env)


def placements_of(path: str):
    layout = build_layout(load_job(cluster=path).cluster, None, node="127.0.0.1", auto=True)
    return layout, plan_placement(layout, {"127.0.0.1": "10.0.0.1"})


def test_each_auto_node_gets_a_strict_pack_group_of_unpinned_bundles(auto_file):
    _, placements = placements_of(auto_file)
    assert [(p.label, p.strategy, len(p.bundles)) for p in placements] == \
        [("fast.1", "STRICT_PACK", 2), ("fast", "PACK", 2), ("slow.0", "STRICT_PACK", 2), ("slow.1", "STRICT_PACK", 1)]
    assert placements[0].bundles == ({"CPU": WORKER_CPUS},) * 2                        # placed by Ray
    assert placements[1].bundles == ({"CPU": WORKER_CPUS, "node:10.0.0.1": 0.001},) * 2   # pinned
    assert [(s.ip, s.first) for p in placements for s in p.shares] == \
        [(None, 0), ("10.0.0.1", 0), (None, 0), (None, 0)]
    nodes = {"10.0.0.1": {"CPU": 4.0}, "10.0.0.2": {"CPU": 1.0}}
    assert short_of(placements, nodes) == []
    assert short_of(placements, {"10.0.0.1": {"CPU": 1.0}, "10.0.0.2": {"CPU": 1.0}}) == \
        ["10.0.0.1: needs 2 CPU, has 1", "auto node fast.1: needs 2 CPU on one node",
         "auto node slow.0: needs 2 CPU on one node"]


def test_where_ray_put_an_auto_node_becomes_its_host(auto_file):
    layout, placements = placements_of(auto_file)
    landed = {"auto:fast:1": "10.0.0.2", "auto:slow:0": "10.0.0.1", "auto:slow:1": "10.0.0.3"}
    assert crowded(placements, landed) == []
    placed = placed_cluster(layout.cluster, landed)
    assert [n.host for i in placed.islands for n in i.nodes] == ["127.0.0.1", "10.0.0.2", "10.0.0.1", "10.0.0.3"]
    new_layout = build_layout(placed, None, node="127.0.0.1")
    shares = [s for p in rebind(placements, new_layout, landed) for s in p.shares]
    assert [(s.island.name, s.node.host, s.ip) for s in shares] == \
        [("fast", "10.0.0.2", "10.0.0.2"), ("fast", "127.0.0.1", "10.0.0.1"), ("slow", "10.0.0.1", "10.0.0.1"),
         ("slow", "10.0.0.3", "10.0.0.3")]
    assert new_layout.islands[1].master_addr == "10.0.0.1"   # the island's first node, as Ray placed it
    with open(auto_file) as handle:
        written = placed_yaml(yaml.safe_load(handle), landed)
    assert [[n["host"] for n in i["nodes"]] for i in written["islands"]] == \
        [["127.0.0.1", "10.0.0.2"], ["10.0.0.1", "10.0.0.3"]]
    # Two nodes of one island on one Ray node: an island lists a host once.
    assert crowded(placements, {**landed, "auto:fast:1": "10.0.0.1"}) == \
        ["fast: auto:fast:1 and 127.0.0.1 on 10.0.0.1"]


class FakeRay:
    """ray.nodes() of a two-node cluster: all _place_auto asks Ray."""

    @staticmethod
    def nodes():
        return [{"NodeID": "aa", "NodeManagerAddress": "10.0.0.1", "Alive": True},
                {"NodeID": "bb", "NodeManagerAddress": "10.0.0.2", "Alive": True}]


def test_the_workers_get_a_cluster_file_naming_the_chosen_hosts(tmp_path):
    from hetero.launch.ray_fleet import PLACED_CLUSTER, _place_auto

    path = tmp_path / "two.yaml"
    path.write_text(AUTO.replace("{host: auto, chips: 2}, {host: auto, chips: 1}", "{host: auto, chips: 2}")
                    .replace("[{host: 127.0.0.1, chips: 2}, {host: auto, chips: 2}]", "[{host: 10.0.0.1, chips: 2}]"))
    layout = build_layout(load_job(cluster=str(path)).cluster, None, node="10.0.0.1", auto=True)
    original = layout.cluster
    fast, slow = plan_placement(layout, {"10.0.0.1": "10.0.0.1"})
    placements = [with_node_ids(fast, {0: "aa", 1: "aa"}), with_node_ids(slow, {0: "bb", 1: "bb"})]
    entry = ["-m", "hetero.engine.worker", "--cluster", str(path), "--steps", "2"]
    layout, placed, cluster_path, entry = _place_auto(FakeRay, placements, original, None, "10.0.0.1",
                                                      str(tmp_path), None, entry)
    assert cluster_path == str(tmp_path / PLACED_CLUSTER)
    assert entry == ["-m", "hetero.engine.worker", "--cluster", cluster_path, "--steps", "2"]
    assert [n.host for i in load_job(cluster=cluster_path).cluster.islands for n in i.nodes] == \
        ["10.0.0.1", "10.0.0.2"]
    assert layout.hosts == ("10.0.0.1", "10.0.0.2") and placed[1].shares[0].ip == "10.0.0.2"
    beside = [with_node_ids(fast, {0: "aa", 1: "aa"}), with_node_ids(slow, {0: "aa", 1: "aa"})]
    layout, _, _, _ = _place_auto(FakeRay, beside, original, None, "10.0.0.1", str(tmp_path), None, [])
    assert layout.hosts == ("10.0.0.1",)   # beside another island's node: allowed, as with hosts named


def test_two_auto_nodes_of_one_island_on_one_ray_node_are_refused(auto_file, tmp_path):
    from hetero.launch.ray_fleet import _place_auto

    layout, placements = placements_of(auto_file)
    nodes = {"fast": {0: "aa", 1: "aa"}, "fast.1": {0: "bb", 1: "bb"}, "slow.0": {0: "bb", 1: "bb"},
             "slow.1": {0: "bb"}}
    placements = [with_node_ids(p, nodes[p.label]) for p in placements]
    with pytest.raises(UserError, match=r"^--on ray: Ray put two nodes of one island on one Ray node "
                                        r"\(slow: auto:slow:0 and auto:slow:1 on 10\.0\.0\.2\)"):
        _place_auto(FakeRay, placements, layout.cluster, None, "127.0.0.1", str(tmp_path), auto_file, [])


def test_under_ray_stdout_is_the_jobs_alone(capfd):
    from hetero.launch.ray_fleet import _stdout_for_the_job

    with _stdout_for_the_job(None) as job_out:
        print("(raylet) A worker died or was killed")   # Ray's error listener prints on sys.stdout
        os.write(1, b"(raylet) from C\n")
        job_out.write("[fast:0] a worker line\n")
        job_out.flush()
    print('{"ok": true}')
    sys.stdout.flush()
    out, err = capfd.readouterr()
    assert out == '[fast:0] a worker line\n{"ok": true}\n'
    assert err == "(raylet) A worker died or was killed\n(raylet) from C\n"
