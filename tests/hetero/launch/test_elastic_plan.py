"""The elastic re-plan's planning half (hetero.launch.elastic): the survivors of a lost node, and
the planner's plan for them widened back to the whole cluster's numbering, valid against it."""

import pytest

from hetero.config import load_job
from hetero.errors import UserError
from hetero.launch.elastic import Replanner, hosts_of, summary, survivors
from hetero.launch.layout import build_layout
from hetero.plan_check import check_plan
from tests.hetero.engine.test_engine_fleet import CONFIG

CLUSTER = """
name: elastic-unit
coordinator: {host: 127.0.0.1, port: 29731}
chips:
  fleet-chip: {accelerator: emulated, emulated: true, tflops: {fp32: 1000}, memory_gb: 1,
               memory_bandwidth_gbps: 100000, intra_node_gbps: 1000, host_link_gbps: 100000}
islands:
  - name: wide
    accelerator: emulated
    chip: fleet-chip
    nodes: [{host: 127.0.0.1, chips: 2}, {host: 127.0.0.2, chips: 2}, {host: 127.0.0.3, chips: 2}]
  - name: solo
    accelerator: emulated
    chip: fleet-chip
    nodes: [{host: 127.0.0.3, chips: 1}]
"""


@pytest.fixture
def job(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER)
    return load_job(cluster=str(path), model=CONFIG, train=CONFIG)


def test_survivors_keep_the_longest_run_of_nodes_and_drop_an_emptied_island(job):
    reduced, kept = survivors(job.cluster, {"127.0.0.3"})
    assert [i.name for i in reduced.islands] == ["wide"]
    assert [n.host for n in reduced.islands[0].nodes] == ["127.0.0.1", "127.0.0.2"]
    assert (kept["wide"].first_node, kept["wide"].first_chip) == (0, 0)
    _, kept = survivors(job.cluster, {"127.0.0.1"})
    assert (kept["wide"].first_node, kept["wide"].first_chip) == (1, 2)
    assert kept["solo"].first_chip == 0
    _, kept = survivors(job.cluster, {"127.0.0.2"})      # a middle node lost: one block of chips is kept
    assert [n.host for n in kept["wide"].nodes] == ["127.0.0.1"]
    with pytest.raises(UserError, match="no chip is left"):
        survivors(job.cluster, set(hosts_of(job.cluster)))


def test_a_re_plan_without_the_first_node_uses_only_the_survivors_chips_in_the_clusters_numbering(job):
    plan = Replanner(job)(job.cluster, ["127.0.0.1"])
    check_plan(plan, job, "the re-plan")                   # valid against the whole cluster and the job
    assert plan.global_batch == job.train.global_batch
    assert all(not (r.island == "wide" and r.local_rank < 2) for r in plan.ranks)
    assert plan.idle["wide"] >= 2
    layout = build_layout(job.cluster, plan, "127.0.0.2")
    assert "127.0.0.1" not in layout.hosts                  # no worker on the lost node
    assert summary(plan)["world_size"] == plan.world_size and summary(plan)["predicted_step_s"] > 0


def test_report_lines_for_replan_and_rejoin_events():
    from hetero.report.analysis import event_text

    replan = {"time": 1.0, "event": "replan", "from_step": 4, "gone": ["127.0.0.3"], "back": [],
              "new": {"plan": "a(tp1 dp1 layers 0-3), 4 x micro-batch 2", "predicted_step_s": 0.25}}
    assert event_text(replan) == ("re-planned (lost 127.0.0.3) from step 4: a(tp1 dp1 layers 0-3), "
                                  "4 x micro-batch 2, predicted 0.250 s/step")
    assert event_text({"time": 2.0, "event": "rejoin", "host": "127.0.0.3", "at_step": 6}) == \
        "node 127.0.0.3 taken back at step 6"
