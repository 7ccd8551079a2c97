"""Hybrid plans (issue 20 items 1, 2, 5): the search groups islands into pipelines, splits the batch
between them, agrees with brute force on small fleets, and emits valid 'hybrid' Plans."""

from __future__ import annotations

import json
import os

import pytest

from hetero.config import load_job
from hetero.planning import headroom, plan_job
from partitioner.hybrid import groupings
from partitioner.inputs import FleetSpec, InfeasibleError, IslandSpec, SearchLimits, TrainSpec
from partitioner.plan import Plan
from partitioner.search import brute_force, search
from tests.partitioner.test_partitioner import A800, ASCEND, EMU_3, EMU_MIXED, LLAMA_12, LLAMA_TINY, ROOT, chip
from tests.partitioner.test_partitioner_fleet import GPU_3x, LLAMA_8

# Two small-memory islands that hold llama-tiny only together, and one that holds it alone: the
# fleet's best plan is a pipeline over the first two beside a replica on the third.
HYB = FleetSpec("hybrid-3", (IslandSpec("a", chip("emu-a", 0.006, 0.04, 3, 1.5), (2,)),
                             IslandSpec("b", chip("emu-b", 0.004, 0.04, 2, 1), (2,)),
                             IslandSpec("c", chip("emu-c", 0.008, 0.1, 4, 2), (4,))), 1e9, 1e9, 50e-6)
HYB_TRAIN = TrainSpec(8, 2, "fp32")


def test_groupings_put_each_island_in_one_pipeline_and_one_pipeline_over_several():
    three = groupings(["a", "b", "c"], 5)
    assert {frozenset(g) for g in three} == {frozenset({("a", "b"), ("c",)}), frozenset({("a",), ("b", "c")}),
                                             frozenset({("a", "c"), ("b",)})}
    four = groupings(["a", "b", "c", "d"], 5)
    assert len(four) == 25 and len(set(four)) == 25
    for grouping in four:
        used = [n for group in grouping for n in group]
        assert len(used) == len(set(used)) and len(grouping) >= 2 and max(map(len, grouping)) >= 2
    assert frozenset({("a", "b"), ("c",)}) in {frozenset(g) for g in four}      # d idle
    assert groupings(["a", "b", "c", "d"], 3) == [] and groupings(["a", "b"], 5) == []


def test_hybrid_wins_where_two_islands_hold_the_model_only_together():
    result = search(HYB, LLAMA_TINY, HYB_TRAIN, top=3)
    assert set(result.islands_alone) == {"c"}                # a and b cannot hold it alone
    best = result.best
    assert best.kind == "hybrid" and best.validate(HYB) is best
    pipes = [{best.stages[i].island for i in p.stages} for p in best.pipelines]
    assert sorted(map(sorted, pipes)) == [["a", "b"], ["c"]]
    assert sum(p.samples for p in best.pipelines) == HYB_TRAIN.global_batch
    assert best.label.startswith("hybrid [") and " -> " in best.label and "] + [" in best.label
    # one line as it runs: each pipeline's stages in order and its own micro-batches, pipelines joined by " + "
    first, second = best.summary().split(" + ")
    assert " -> " in first + second and all(f" x micro-batch {best.micro_batch}" in p for p in (first, second))
    assert Plan.from_json(best.to_json()).to_dict() == best.to_dict()
    # version 1, or 4 where a stage boundary sits inside a layer (the a -> b pipeline splits one here)
    assert json.loads(best.to_json())["version"] == (4 if any(s.blocks for s in best.stages) else 1)
    # never slower than the island alone or any other kind, and what brute force finds
    assert best.predicted_step_s <= result.islands_alone["c"].step
    assert all(p.predicted_step_s >= best.predicted_step_s for p in result.plans)
    bf = brute_force(HYB, LLAMA_TINY, HYB_TRAIN)
    assert bf is not None and bf.kind == "hybrid"
    assert bf.step * (1 - 1e-9) <= best.predicted_step_s <= bf.step * 1.01
    assert result.stats["hybrid_groupings"] == 3 and result.stats["hybrid_evaluated"] >= 1
    assert "hybrid_s" in result.stats


@pytest.mark.parametrize("fleet,model,train", [
    (EMU_3, LLAMA_TINY, TrainSpec(8, 2, "fp32", modes=("hybrid",))),
    (GPU_3x, LLAMA_8, TrainSpec(8, 1, "bf16", search_micro_batch=False, modes=("hybrid",))),
    (HYB, LLAMA_TINY, TrainSpec(16, 1, "fp32", max_micro_batch=4, modes=("hybrid",))),
    (HYB, LLAMA_TINY, TrainSpec(16, 2, "fp32", search_micro_batch=False, max_virtual_stages=2, modes=("hybrid",))),
], ids=["emu-3", "three-kinds-12", "hybrid-3-batch-16", "hybrid-3-interleaved"])
def test_hybrid_search_matches_brute_force_on_small_fleets(fleet, model, train):
    """Hybrid plans alone (modes=("hybrid",)), so the agreement is about them, not the other kinds."""
    result = search(fleet, model, train)
    bf = brute_force(fleet, model, train)
    assert result.best.kind == "hybrid" and bf is not None and bf.kind == "hybrid"
    assert bf.step * (1 - 1e-9) <= result.best.predicted_step_s <= bf.step * 1.01
    result.best.validate(fleet)


def test_two_islands_have_no_hybrid_plan():
    result = search(EMU_MIXED, LLAMA_TINY, TrainSpec(8, 2, "fp32"))
    assert result.best.kind != "hybrid" and "hybrid_groupings" not in result.stats
    with pytest.raises(InfeasibleError):
        search(EMU_MIXED, LLAMA_TINY, TrainSpec(8, 2, "fp32", modes=("hybrid",)))


def test_best_bound_first_costing_finds_what_costing_everything_finds():
    """Above SearchLimits.small_fleet_chips the search costs a group's configurations best bound first
    and stops early; costing every one of them (the fleet below the limit) finds no faster hybrid."""
    fleet = FleetSpec("three-24", (IslandSpec("a800", A800, (8,)), IslandSpec("ascend", ASCEND, (8,)),
                                   IslandSpec("a800b", A800, (4, 4))), 25e9, 12.5e9, 30e-6)
    train = TrainSpec(32, 1, "bf16", max_micro_batch=2, modes=("hybrid",))
    fast = search(fleet, LLAMA_12, train, limits=SearchLimits(small_fleet_chips=8))
    full = search(fleet, LLAMA_12, train)
    assert fast.stats["hybrid_evaluated"] < full.stats["hybrid_evaluated"]
    assert fast.best.predicted_step_s <= full.best.predicted_step_s * 1.01


@pytest.mark.slow
def test_mixed_8192_fleet_chooses_a_hybrid_plan_above_its_lower_bounds():
    """Issue 20's fleet: a pipeline over several kinds beside single-island ones beats both the best
    hetero-DP plan and the best island alone (predicted)."""
    cfg = os.path.join(ROOT, "configs")
    job = load_job(cluster=os.path.join(cfg, "mixed-8192.yaml"), model=os.path.join(cfg, "llama2-70b.yaml"),
                   train=os.path.join(cfg, "train-llama2-4096.yaml"))
    result = plan_job(job, top=2)
    room = headroom(result)
    assert result.best.kind == "hybrid" and room["meets_lower_bounds"]
    assert result.best.tokens_per_s > room["lower_bounds"]["hetero_dp"]["tokens_per_s"]
    assert result.stats["hybrid_groupings"] == 25
    assert result.stats["hybrid_evaluated"] < result.stats["hybrid_configs"] / 4
