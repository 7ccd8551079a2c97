"""Hybrid plans (issue 20 item 2): several pipelines, one of them over two islands, the batch split
unevenly between them and the gradients summed across them over the bridge. The bookkeeping
(topology, groups, checkpoint writers, the bucket sum's lanes) is checked on the plan alone; one
end-to-end run on three emulated islands trains the one-process losses (1e-5 relative, fp32) and
its checkpoint resumes under a plain one-pipeline plan with the same losses."""

from __future__ import annotations

import types
import weakref

import pytest
import torch
from tests.conftest import free_port
from tests.hetero.engine.test_engine_fleet import (CONFIG, HERE, fleet_job, last_attempt, make_plan,
                                                    make_replicas_plan, run_fleet, solo_losses)

from hetero.config import load_job
from hetero.engine import support
from hetero.engine.buckets import GradBuckets, GradShard, held_names
from hetero.engine.checkpointing import Checkpoints
from hetero.engine.comms import Comms
from hetero.engine.topology import Topology
from hetero.errors import ConfigError, UserError
from hetero.plan_check import check_plan, check_supported
from hetero.planning import fleet_spec
from hetero.runner import KINDS, choose_plan, search_plan
from partitioner.plan import PipelinePlan, Plan, RankPlan, StagePlan

THREE = f"{HERE}/emulated-three-islands.yaml"
TIED = f"{HERE}/two-islands-tied.yaml"      # the model with tied embeddings
# pipeline 0: a (TP2, layers 0-1) -> b (TP1, layer 2), 6 samples; pipeline 1: c alone, 2 samples
HYBRID = [([("a", 2, 1, (0, 2), 0), ("b", 1, 1, (2, 3), 0)], 6), ([("c", 1, 1, (0, 3), 0)], 2)]


def three_islands(tmp_path, job_path=CONFIG):
    """(cluster file on a free coordinator port, the job of `job_path`'s model and train on it)."""
    path = tmp_path / "emulated-three-islands.yaml"
    path.write_text(open(THREE, encoding="utf-8").read().replace("port: 29731", f"port: {free_port()}"))
    return str(path), load_job(cluster=str(path), model=job_path, train=job_path)


def make_hybrid_plan(job, pipelines, micro_batch=2, kind="hybrid") -> Plan:
    """pipelines: [([(island, tp, dp, (start, end), offset), ...], samples)], each list in pipeline order."""
    stages, plans, by_island = [], [], {}
    for p, (specs, samples) in enumerate(pipelines):
        indices = []
        for island, tp, dp, layers, offset in specs:
            index = len(stages)
            stages.append(StagePlan(index, p, island, job.cluster.island(island).chip, tp, dp, layers, "none",
                                    offset, 0.1, 0.0))
            by_island.setdefault(island, []).extend(
                (offset + d * tp + t, index, p, t, d) for d in range(dp) for t in range(tp))
            indices.append(index)
        dp = specs[0][2]
        plans.append(PipelinePlan(p, tuple(indices), dp, micro_batch, samples // (dp * micro_batch)))
    ranks = []
    for island in [i.name for i in job.cluster.islands]:
        for local, stage, p, t, d in sorted(by_island.get(island, [])):
            ranks.append(RankPlan(len(ranks), island, local, 0, p, stage, t, d))
    return Plan(kind=kind, cluster=job.cluster.name, model=job.model.name, dtype="fp32",
                layers=job.model.layers, heads=job.model.heads, kv_heads=job.model.kv_heads,
                global_batch=job.train.global_batch, micro_batch=micro_batch,
                num_micro_batches=plans[0].num_micro_batches, recompute="none", zero1=False,
                stages=tuple(stages), pipelines=tuple(plans), ranks=tuple(ranks),
                predicted_step_s=1.0, tokens_per_s=1.0, mfu={})


@pytest.fixture
def hybrid(tmp_path):
    cluster, job = three_islands(tmp_path)
    return cluster, job, make_hybrid_plan(job, HYBRID)


def test_hybrid_plan_is_valid_and_checked_against_the_job(hybrid):
    _, job, plan = hybrid
    plan.validate(fleet_spec(job.cluster))
    assert check_supported(check_plan(plan, job, "plan.json"), "plan.json") is plan
    assert "hybrid" in support.CHOICES["kind"].values
    # against the job like the others: one island in two pipelines is refused, naming the plan file
    both = make_hybrid_plan(job, [([("a", 1, 1, (0, 2), 0), ("b", 1, 1, (2, 3), 0)], 6),
                                  ([("a", 1, 1, (0, 3), 1)], 2)])
    with pytest.raises(ConfigError, match=r"plan\.json.*island a has stages of pipelines 0 and 1"):
        check_plan(both, job, "plan.json")
    with pytest.raises(ConfigError, match="global_batch"):
        check_plan(make_hybrid_plan(job, [(HYBRID[0][0], 6), (HYBRID[1][0], 4)]), job, "plan.json")


def test_run_takes_a_hybrid_plan_file_under_kind_hybrid_or_auto_only(tmp_path, hybrid):
    _, job, plan = hybrid
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    assert "hybrid" in KINDS["auto"] and KINDS["hybrid"] == ("hybrid",)
    for kind in ("hybrid", "auto"):
        assert choose_plan(job, str(path), kind, say=print) == plan
    with pytest.raises(UserError, match=f"--kind replicas: the plan {path} is a 'hybrid' plan"):
        choose_plan(job, str(path), "replicas", say=print)


def test_kind_hybrid_on_two_islands_is_one_line_before_any_search(tmp_path):
    _, job = fleet_job(tmp_path)        # wide and narrow: no pipeline over two islands beside another
    with pytest.raises(UserError, match=r"--kind hybrid: .*at least three islands.*has 2 \(wide, narrow\)"):
        search_plan(job, "hybrid")


def test_hybrid_topology_splits_the_batch_and_pairs_neighbours_across_islands(hybrid):
    _, _, plan = hybrid
    topology = Topology(plan)
    places = [topology.place(r.rank) for r in plan.ranks]
    assert [(p.island, p.stage.index, p.first_sample, p.num_micro_batches) for p in places] == [
        ("a", 0, 0, 3), ("a", 0, 0, 3), ("b", 1, 0, 3), ("c", 2, 6, 1)]
    a0, _, b0, c0 = places
    assert topology.neighbour(a0, 1) == [2] and topology.neighbour(b0, -1) == [0, 1]
    assert topology.neighbour(c0, 1) is None and topology.neighbour(c0, -1) is None
    assert topology.tied_partners(a0) == [2] and topology.tied_partners(c0) is None
    # each island's native world holds its own pipeline's groups only
    assert topology.island_groups("a") == ([[0, 1]], [[0], [1]])
    assert topology.island_groups("c") == ([[0]], [[0]])


def bucket_islands(job, plan, capacity=4096):
    """Per bucket of the hetero-DP sum, the islands it is summed over (as GradientSync finds them)."""
    buckets = GradBuckets(job.model, capacity)
    held = {island: held_names(job.model, parts) for island, parts in Topology(plan).island_holdings().items()}
    return buckets, buckets.holders(held)


@pytest.mark.parametrize("tied", [False, True])
def test_a_bucket_is_summed_over_the_islands_holding_its_values(tmp_path, tied):
    _, job = three_islands(tmp_path, TIED if tied else CONFIG)
    buckets, islands = bucket_islands(job, make_hybrid_plan(job, HYBRID))
    for bucket, where in zip(buckets.buckets, islands):
        names = {piece.hf for piece in bucket}
        on_a = any(n == "model.embed_tokens.weight" or n.startswith(("model.layers.0.", "model.layers.1."))
                   for n in names)
        on_b = any(n.startswith("model.layers.2.") or n in ("model.norm.weight", "lm_head.weight") for n in names)
        on_b = on_b or (tied and "model.embed_tokens.weight" in names)      # b's tied LM head is a copy
        assert where == [i for i, holds in (("a", on_a), ("b", on_b), ("c", True)) if holds], (names, where)
    # a and b each carry part of the model over the bridge, c all of it
    assert any("b" not in i for i in islands) and any("a" not in i for i in islands)
    assert all("c" in i for i in islands)
    # replicas: every island holds every bucket, as before
    _, job = fleet_job(tmp_path)
    plan = make_replicas_plan(job, [("wide", [(2, (0, 2)), (1, (2, 3))], 6), ("narrow", [(1, (0, 3))], 2)])
    assert set(map(tuple, bucket_islands(job, plan)[1])) == {("wide", "narrow")}


def test_a_buckets_ring_is_one_rank_per_holding_island(hybrid):
    """The ring (or lane holders) of a bucket held by a and c, or by b and c: those islands' ranks only."""
    _, _, plan = hybrid
    comms = Comms(Topology(plan), 0, torch.device("cpu"))
    assert comms._island_sizes(["a", "c"]) == {"a": 2, "c": 1}
    assert comms._island_ranks_at(lambda size: 1 % size, ["a", "c"]) == [1, 3]
    assert comms._island_ranks_at(lambda size: 0, ["b", "c"]) == [2, 3]
    assert comms._island_ranks_at(lambda size: 0) == [0, 2, 3]        # every island: as for replicas


class LandedSum:
    """A two-phase bucket sum whose total lands in a new device tensor (as a bridge ring's does):
    doubles the bucket; records the buckets started and the most landed sums alive at once."""

    def __init__(self):
        self.started, self.landed, self.most_alive = [], [], 0

    def start(self, bucket, index):
        self.started.append(index)
        staged = bucket.clone()
        return types.SimpleNamespace(finish=lambda out: self._land(staged))

    def _land(self, staged):
        alive = [ref for ref in self.landed if ref() is not None]
        self.most_alive = max(self.most_alive, len(alive) + 1)
        total = staged * 2
        self.landed.append(weakref.ref(total))
        return total


def test_only_the_islands_buckets_are_summed_and_one_landed_sum_lives_at_a_time(tmp_path):
    """A rank sums the buckets its island holds (`indices`) and leaves the others; the landed sum of
    one bucket is freed before the next lands (the device holds the buffer and one sum: a planner's
    plan on a chip with little room to spare ran out of memory with two)."""
    _, job = three_islands(tmp_path)
    buckets = GradBuckets(job.model, 4096)
    grads = {hf: torch.ones(shape) for hf, shape in buckets.shapes.items()}
    shards = {hf: [GradShard(g, None, True)] for hf, g in grads.items()}
    summed = LandedSum()
    mine = [k for k in range(len(buckets.buckets)) if k % 3]
    buckets.all_reduce(shards, summed, torch.device("cpu"), indices=mine)
    assert summed.started == mine and summed.most_alive == 1
    for k, bucket in enumerate(buckets.buckets):
        for piece in bucket:
            rows = grads[piece.hf].view(buckets.shapes[piece.hf][0], -1)[piece.start:piece.stop]
            assert bool((rows == (2.0 if k in mine else 1.0)).all()), (k, piece)


def test_hybrid_checkpoint_is_written_once_by_pipeline_0_over_both_its_islands(hybrid):
    _, _, plan = hybrid

    class Stub:
        comms = type("C", (), {"topology": Topology(plan)})()

    writers = [r.rank for r in plan.ranks if Checkpoints._writes_checkpoint(Stub, r.rank)]
    assert writers == [0, 1, 2]          # a's TP pair and b: the whole model once; c's copy is not written


@pytest.mark.slow        # two fleet runs and the one-process reference: ~50 s on a loaded 2-core host
def test_hybrid_fleet_matches_one_process_and_resumes_under_a_plain_plan(tmp_path, monkeypatch):
    """Tied embeddings: pipeline 0 holds the embedding on a and its tied LM head on b (summed over the
    bridge first), pipeline 1 one copy on c; the cross-pipeline sum adds them up."""
    cluster, job = three_islands(tmp_path, TIED)
    plan = make_hybrid_plan(job, HYBRID)
    # 20 kB buckets: the gradients stream through the bridge in ~26 of them, islands of 2, 1, 1 ranks
    monkeypatch.setenv("HETERO_GRAD_BUCKET_MB", "0.02")
    checkpoints = tmp_path / "checkpoints"
    records, run_dir, _ = run_fleet(tmp_path, plan, job_path=TIED, steps=4, name="hybrid",
                                    checkpoints=checkpoints, cluster_path=cluster)
    reference = solo_losses(tmp_path, job, steps=6)
    fleet = [r["loss"] for r in last_attempt(records)]
    assert len(fleet) == 4 and fleet[-1] < fleet[0]
    for got, want in zip(fleet, reference):
        assert abs(got - want) <= 1e-5 * abs(want), (fleet, reference)
    # the batch split: b (pipeline 0) ran 3 micro-batches a step, c (pipeline 1) one; forward and backward
    actions = [len((run_dir / "metrics" / f"rank{r:05d}.jsonl").read_text().splitlines()) for r in (2, 3)]
    assert actions == [4 * 2 * 3, 4 * 2 * 1]
    # the checkpoint is plan-independent: one pipeline over a -> c goes on from step 4 with the same losses
    plain = make_plan(job, [("a", 1, 1, (0, 1), 0), ("c", 1, 1, (1, 3), 0)])
    records, _, log = run_fleet(tmp_path, plain, job_path=TIED, steps=6, name="plain", checkpoints=checkpoints,
                                cluster_path=cluster)
    assert "resumed from" in log and "(step 4)" in log
    resumed = last_attempt(records)
    assert [r["step"] for r in resumed] == [5, 6]
    for got, want in zip([r["loss"] for r in resumed], reference[4:]):
        assert abs(got - want) <= 1e-5 * abs(want), (resumed, reference)
