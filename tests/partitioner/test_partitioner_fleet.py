"""The planner at fleet scale (issue #20): lower bounds, the hetero-DP batch split, the search budget."""

from __future__ import annotations

import importlib
import itertools
import os
import random

import numpy as np
import pytest

from hetero.config import load_job
from hetero.planning import headroom, plan_job
from partitioner.bounds import Bounds
from partitioner.costs import CostModel
from partitioner.inputs import FleetSpec, IslandSpec, ModelSpec, SearchLimits, TrainSpec
from partitioner.replicas import combine_replicas, replica_options
from tests.partitioner.test_partitioner import (A800, ASCEND, EMU_3, EMU_MIXED, GPU_16, GPU_32, LLAMA_12, LLAMA_7B, ROOT,
                              LLAMA_TINY, TRAIN_TINY, chip)

S = importlib.import_module("partitioner.search")   # the package re-exports search() under the same name

KUNLUN = chip("Kunlun-P800", 345, 96, 2700, 400, emulated=False, reserve_gb=2, accelerator="kunlun")
GPU_3x = FleetSpec("three-kinds-12", (IslandSpec("a800", A800, (4,)), IslandSpec("ascend", ASCEND, (4,)),
                                      IslandSpec("kunlun", KUNLUN, (4,))), 25e9, 12.5e9, 30e-6)
LLAMA_8 = ModelSpec(8, 2048, 16, 8, 5632, 32000, 2048, name="llama-8L-2048")
CASES = [(EMU_MIXED, LLAMA_TINY, TRAIN_TINY), (EMU_3, LLAMA_TINY, TRAIN_TINY),
         (GPU_16, LLAMA_12, TrainSpec(32, 1, "bf16", max_micro_batch=4)),
         (GPU_32, LLAMA_7B, TrainSpec(256, 1, "bf16"))]


def _env(step_by_u: dict, units: int) -> S.Envelope:
    step = np.full(units + 1, np.inf)
    for u, t in step_by_u.items():
        step[u] = t
    return S.Envelope(None, 1, [], step, np.zeros(units + 1, dtype=np.int64))


def test_split_batch_is_the_exact_min_max_split():
    rng = random.Random(7)
    for _ in range(40):
        units = rng.randint(2, 14)
        k = rng.randint(2, 3)
        envs = [_env({u: round(rng.uniform(0.1, 5.0), rng.choice([1, 4]))
                      for u in range(1, units + 1) if rng.random() < 0.7}, units) for _ in range(k)]
        best = None
        for shares in itertools.product(range(1, units + 1), repeat=k):
            if sum(shares) == units:
                worst = max(e.step[u] for e, u in zip(envs, shares))
                best = worst if best is None else min(best, worst)
        got = S.split_batch(envs, units)
        if best is None or not np.isfinite(best):
            assert got is None
            continue
        cap, shares = got
        assert cap == pytest.approx(best)
        assert sum(shares) == units and max(e.step[u] for e, u in zip(envs, shares)) == pytest.approx(cap)


@pytest.mark.parametrize("fleet,model,train", CASES, ids=[c[0].name for c in CASES])
def test_chosen_plan_meets_both_lower_bounds(fleet, model, train):
    res = S.search(fleet, model, train, top=2)
    step = res.best.predicted_step_s
    # an island the model does not fit on alone has no plan alone (emulated-mixed's slow pair)
    assert res.islands_alone and set(res.islands_alone) <= {i.name for i in fleet.islands}
    for cand in res.islands_alone.values():
        assert step <= cand.step * (1 + 1e-9)
        assert {pe.island.name for pe in cand.pipes} == {cand.pipes[0].island.name}   # one island only
    if fleet is EMU_MIXED:       # no replica fits on the slow pair: no hetero-DP plan
        assert res.hetero_dp is None
        return
    assert res.hetero_dp is not None and res.hetero_dp.kind == "replicas"
    assert step <= res.hetero_dp.step * (1 + 1e-9)
    assert sum(pe.dp * pe.b * pe.m for pe in res.hetero_dp.pipes) == train.global_batch


def test_hetero_dp_keeps_every_replica_option_until_the_batch_is_split():
    """The old search cut each island to its 3 best options by steady-state throughput and then
    split the batch; splitting over every option is never worse, and here strictly better."""
    fleet, model, train = GPU_32, LLAMA_7B, TrainSpec(256, 1, "bf16", half_layers=False)
    res = S.search(fleet, model, train)
    cm = CostModel(fleet, model, train)
    bounds, old = Bounds(cm), []
    for b in train.micro_batch_choices():
        options = {}
        for island in fleet.islands:
            pes = replica_options(cm, island, b, SearchLimits(), bounds, {})
            pes.sort(key=lambda pe: (-pe.dp * pe.b / pe.cycle, pe.fill))
            options[island.name] = pes[:3]
        old += combine_replicas(cm, options, b, 1)
    old_best = min(c.step for c in old)
    assert res.hetero_dp.step < old_best


def test_search_matches_brute_force_on_three_kinds_of_chip():
    train = TrainSpec(8, 1, "bf16", search_micro_batch=False)
    res = S.search(GPU_3x, LLAMA_8, train)
    bf = S.brute_force(GPU_3x, LLAMA_8, train)
    assert bf is not None
    assert bf.step * (1 - 1e-9) <= res.best.predicted_step_s <= bf.step * 1.01


def test_pp_costing_budget_stops_the_search_but_keeps_the_seeds():
    fleet, model, train = GPU_32, LLAMA_7B, TrainSpec(256, 1, "bf16", half_layers=False)
    full = S.search(fleet, model, train)
    cut = S.search(fleet, model, train, limits=SearchLimits(max_pp_evaluations=1))
    assert cut.stats["pp_evaluated"] <= 1 and cut.stats.get("pp_cut_at_budget") == 1
    assert full.stats["pp_evaluated"] > 1 and not full.stats.get("pp_cut_at_budget")
    assert cut.best.predicted_step_s >= full.best.predicted_step_s * (1 - 1e-9)
    assert cut.best.predicted_step_s <= min(c.step for c in cut.islands_alone.values()) * (1 + 1e-9)


def test_one_island_is_its_own_island_alone():
    fleet = FleetSpec("a800-only", (IslandSpec("a800", A800, (8, 8)),), 25e9, 12.5e9, 30e-6)
    res = S.search(fleet, LLAMA_12, TrainSpec(32, 1, "bf16", max_micro_batch=4))
    assert list(res.islands_alone) == ["a800"] and res.hetero_dp is None
    assert res.islands_alone["a800"].step == pytest.approx(res.best.predicted_step_s)


@pytest.mark.slow
def test_mixed_8192_fleet_meets_its_bounds_within_the_costing_budget():
    """Issue #20's fleet: 8,192 chips of four kinds, llama2-70b, global batch 4,096, bf16."""
    cfg = os.path.join(ROOT, "configs")
    job = load_job(cluster=os.path.join(cfg, "mixed-8192.yaml"), model=os.path.join(cfg, "llama2-70b.yaml"),
                   train=os.path.join(cfg, "train-llama2-4096.yaml"))
    res = plan_job(job, top=2)
    room = headroom(res)
    assert set(room["islands_alone_tokens_per_s"]) == {"a800", "h100", "ascend", "kunlun", "sum"}
    assert room["meets_lower_bounds"]
    # the one 40-stage pipeline the search used to choose predicted 2.51 M tokens/s (0.69 of the sum)
    assert res.best.tokens_per_s > 2.55e6 and room["efficiency_vs_islands"] > 0.69
    assert res.stats["pp_evaluated"] <= SearchLimits().max_pp_evaluations
