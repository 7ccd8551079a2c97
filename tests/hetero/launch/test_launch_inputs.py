"""`hetero launch`: bad input (one line, exit 2), and the layout rules, without starting workers."""

import os
import textwrap

import pytest

from tests.hetero.launch.test_launch import plan_for, write_cluster
from tests.conftest import FIXTURES, ROOT, WORKERS

pytestmark = pytest.mark.timeout(60)
SCRIPT = os.path.join(WORKERS, "torchrun_allreduce.py")


def one_line_error(code, out, err, *fragments):
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hetero launch: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_node_host(tmp_path, hetero_cli):
    cluster = write_cluster(tmp_path, "two-node")
    one_line_error(*hetero_cli("launch", "--cluster", cluster, "--node", "127.0.0.9", SCRIPT),
                   "--node 127.0.0.9 is not a host of cluster 'launch-two-node'", "127.0.0.2, 127.0.0.3")


def test_plan_for_another_cluster(tmp_path, hetero_cli):
    cluster = write_cluster(tmp_path, "two-island")
    plan = plan_for(os.path.join(ROOT, "configs", "emulated-mixed.yaml"), tmp_path / "plan.json")
    one_line_error(*hetero_cli("launch", "--cluster", cluster, "--plan", plan, SCRIPT),
                   "made for cluster 'emulated-mixed', not 'launch-two-island'")


def test_plan_that_does_not_fit_the_cluster(tmp_path, hetero_cli):
    cluster = write_cluster(tmp_path, "two-island")
    plan_path = plan_for(cluster, tmp_path / "plan.json")
    # Same cluster name, but one node fewer: the plan's ranks no longer fit.
    shrunk = tmp_path / "shrunk.yaml"
    shrunk.write_text(open(cluster).read().replace("chips: 2", "chips: 1"))
    one_line_error(*hetero_cli("launch", "--cluster", str(shrunk), "--plan", plan_path, SCRIPT),
                   "does not match cluster 'launch-two-island'")


def test_unreadable_plan(tmp_path, hetero_cli):
    cluster = write_cluster(tmp_path, "two-island")
    bad = tmp_path / "plan.json"
    bad.write_text('{"format": "something-else"}')
    one_line_error(*hetero_cli("launch", "--cluster", cluster, "--plan", str(bad), SCRIPT), "not a hetero plan")


def test_missing_script_and_module(tmp_path, hetero_cli):
    cluster = write_cluster(tmp_path, "two-island")
    one_line_error(*hetero_cli("launch", "--cluster", cluster, str(tmp_path / "nope.py")), "nope.py not found")
    one_line_error(*hetero_cli("launch", "--cluster", cluster, "-m", "no_such_module_xyz"),
                   "module 'no_such_module_xyz' not found")


def test_non_head_node_needs_the_token(tmp_path, hetero_cli, monkeypatch):
    monkeypatch.delenv("HETERO_JOB_TOKEN", raising=False)
    cluster = write_cluster(tmp_path, "two-node")
    one_line_error(*hetero_cli("launch", "--cluster", cluster, "--node", "127.0.0.3", SCRIPT),
                   "HETERO_JOB_TOKEN", "--token-file")


def test_negative_max_restarts_is_a_usage_error(tmp_path, hetero_cli):
    cluster = write_cluster(tmp_path, "two-island")
    code, _, err = hetero_cli("launch", "--cluster", cluster, "--max-restarts", "-1", SCRIPT)
    assert code == 2 and "argument --max-restarts: expected a whole number from 0 to 1000, got -1" in err


def test_non_head_node_with_a_wrong_token_stops_at_once(tmp_path, capsys):
    from comm_bridge.coordinator import Coordinator
    from hetero.launch import launch_fleet

    cluster = write_cluster(tmp_path, "two-node")
    port = int(open(cluster).read().split("port: ")[1].split()[0])
    with Coordinator("the-real-token", 3, host="127.0.0.2", port=port):
        code = launch_fleet(cluster, None, SCRIPT, node="127.0.0.3", env={"HETERO_JOB_TOKEN": "a-wrong-token"},
                            join_timeout=20)
    assert code == 1
    assert "refused this node's job token" in capsys.readouterr().err


def test_non_head_node_gives_up_when_no_head_appears(tmp_path, capsys):
    from hetero.launch import launch_fleet

    cluster = write_cluster(tmp_path, "two-node")
    code = launch_fleet(cluster, None, SCRIPT, node="127.0.0.3", env={"HETERO_JOB_TOKEN": "t"}, join_timeout=1)
    assert code == 1
    assert "no coordinator running attempt 0 at 127.0.0.2:" in capsys.readouterr().err


# ------------------------------------------------------------ layout rules
CUDA_TWO_ISLANDS = """
name: cuda-pair
coordinator: {host: 10.0.0.1, port: 29500}
islands:
  - name: a100
    accelerator: cuda
    chip: A100-80G
    nodes: [{host: 10.0.0.1, chips: 2}, {host: 10.0.0.2, chips: 4}]
  - name: h100
    accelerator: cuda
    chip: H100-SXM
    nodes: [{host: 10.0.0.2, chips: 4}]
"""


def load(tmp_path, text):
    from hetero.launch.inputs import load_cluster

    path = tmp_path / "cluster.yaml"
    path.write_text(textwrap.dedent(text))
    return load_cluster(str(path))[0]


def test_layout_ranks_ports_and_devices(tmp_path):
    from hetero.errors import UserError
    from hetero.launch.environment import island_env
    from hetero.launch.layout import build_layout

    cluster = load(tmp_path, CUDA_TWO_ISLANDS)
    layout = build_layout(cluster, node="10.0.0.2")
    a100, h100 = layout.islands
    assert (a100.rdzv_port, h100.rdzv_port) == (29501, 29502)
    assert a100.master_addr == "10.0.0.1" and h100.master_addr == "10.0.0.2"
    assert [(n.host, n.group_rank, n.island_ranks) for n in a100.nodes] == \
        [("10.0.0.1", 0, (0, 1)), ("10.0.0.2", 1, (2, 3, 4, 5))]
    assert a100.rank_table == (0, 1, 2, 3, 4, 5) and h100.rank_table == (6, 7, 8, 9)
    # Two CUDA islands on 10.0.0.2 share its devices without overlap, in cluster order.
    mine = {island.name: node for island, node in layout.on_host("10.0.0.2")}
    assert mine["a100"].devices == (0, 1, 2, 3) and mine["h100"].devices == (4, 5, 6, 7)
    env = island_env(layout, h100, mine["h100"], attempt=2, token="t", run_dir="/r", plan_path=None,
                     cluster_path=None, base={"HETERO_PLAN": "stale"})
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    # A list the user already set restricts the host first.
    restricted = island_env(layout, h100, mine["h100"], attempt=0, token="t", run_dir="/r", plan_path=None,
                            cluster_path=None, base={"CUDA_VISIBLE_DEVICES": "7,6,5,4,3,2,1,0"})
    assert restricted["CUDA_VISIBLE_DEVICES"] == "3,2,1,0"
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES=0,1 leaves 2 device"):
        island_env(layout, h100, mine["h100"], attempt=0, token="t", run_dir="/r", plan_path=None,
                   cluster_path=None, base={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert env["HETERO_ACCELERATOR"] == "cuda" and env["HETERO_RESTART_COUNT"] == "2"
    assert env["HETERO_COORDINATOR"] == "10.0.0.1:29500"
    assert "HETERO_PLAN" not in env and "HETERO_EMULATED_CHIP" not in env
    # Local mode: every node on this host, every address loopback.
    local = build_layout(cluster)
    assert local.coordinator_address == "127.0.0.1:29500"
    assert {i.master_addr for i in local.islands} == {"127.0.0.1"}
    assert len(local.on_host(None)) == 3


def test_layout_follows_the_plan(tmp_path):
    from hetero.launch.inputs import load_cluster, load_plan
    from hetero.launch.layout import build_layout

    cluster_path = os.path.join(ROOT, "configs", "emulated-mixed.yaml")
    plan_path = plan_for(cluster_path, tmp_path / "plan.json")
    cluster = load_cluster(cluster_path)[0]
    plan = load_plan(plan_path, cluster)
    layout = build_layout(cluster, plan)
    by_rank = {g: (island.name, rank) for island in layout.islands
               for node in island.nodes for rank, g in zip(node.island_ranks, node.global_ranks)}
    assert by_rank == {r.rank: (r.island, r.local_rank) for r in plan.ranks}


def test_ports_beyond_range(tmp_path, hetero_cli):
    path = tmp_path / "c.yaml"
    path.write_text(open(os.path.join(FIXTURES, "launch", "two-island.yaml")).read()
                    .replace("port: 29400", "port: 65535"))
    one_line_error(*hetero_cli("launch", "--cluster", str(path), SCRIPT), "rendezvous ports")


def test_a_coordinator_port_held_by_another_job_is_one_line(tmp_path, hetero_cli):
    """A second job on the same ports fails at once, in one line naming host:port, before any worker."""
    import socket

    cluster = write_cluster(tmp_path, "two-island")
    port = int(open(cluster).read().split("port: ")[1].split()[0])
    with socket.create_server(("127.0.0.1", port)):
        one_line_error(*hetero_cli("launch", "--cluster", cluster, "--run-dir", str(tmp_path / "run"), SCRIPT),
                       f"127.0.0.1:{port} is already in use")
    assert not (tmp_path / "run" / "metrics" / "coordinator.json").exists()   # a coordinator that never served
