"""A replica's last micro-batch may be smaller (plan format version 5, `pipelines[].last_micro_batch`): the
batch then splits between islands at any number of samples, not in whole micro-batches of each. Written only
where a pipeline has one, so every other plan reads as before; the planner costs the short micro-batch in the
replica's own recompute mode, and brute force over the same space agrees."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from partitioner import replicas
from partitioner.brute_force import brute_force
from partitioner.costs import CostModel
from partitioner.evaluate import evaluate_pipeline, shortened
from partitioner.candidates import stage_layout
from partitioner.inputs import FleetSpec, IslandSpec, TrainSpec
from partitioner.plan import PipelinePlan, Plan, PlanError, StagePlan, assign_ranks
from partitioner.profile import HostCost, ProfileDB
from partitioner.search import search
from tests.partitioner.test_partitioner import FAST, LLAMA_TINY, SLOW

SHAPE = {k: getattr(LLAMA_TINY, k) for k in ("hidden", "heads", "kv_heads", "ffn_hidden", "seq_len")}
# two roomy islands, each chip 50 ms of host work per micro-batch: whole micro-batches split 24 samples coarsely
FLEET = FleetSpec("roomy", (IslandSpec("fast", replace(FAST, memory_bytes=1e9), (2,)),
                            IslandSpec("slow", replace(SLOW, memory_bytes=1e9), (2,))), 1e9, 1e9, 50e-6)
TRAIN = replace(TrainSpec(24, 1, "fp32"), modes=("replicas",), max_micro_batch=4)


def _profile() -> ProfileDB:
    db = ProfileDB(model=dict(SHAPE))
    for chip in ("emu-fast", "emu-slow"):
        db.add_host_cost(chip, HostCost(launch_s=0.05), "emulated", 2)
    return db


def replicas_plan(fast_samples: int = 7, slow_samples: int = 1, micro_batch: int = 2) -> Plan:
    """fast (TP2) and slow (TP2) each a whole replica; fast on `fast_samples` in micro-batches of
    `micro_batch` (the last one smaller where it does not divide), slow on `slow_samples` alone."""
    stages = [StagePlan(0, 0, "fast", "emu-fast", 2, 1, (0, 8), "none", 0, 0.1, 0.01),
              StagePlan(1, 1, "slow", "emu-slow", 2, 1, (0, 8), "none", 0, 0.1, 0.01)]
    m = -(-fast_samples // micro_batch)
    last = fast_samples - (m - 1) * micro_batch
    pipelines = (PipelinePlan(0, (0,), 1, micro_batch, m, last_micro_batch=0 if last == micro_batch else last),
                 PipelinePlan(1, (1,), 1, slow_samples, 1))
    return Plan(kind="replicas", cluster=FLEET.name, model=LLAMA_TINY.name, dtype="fp32", layers=8, heads=8,
                kv_heads=4, global_batch=fast_samples + slow_samples, micro_batch=micro_batch, num_micro_batches=m,
                recompute="none", zero1=False, stages=tuple(stages), pipelines=pipelines,
                ranks=assign_ranks(FLEET, stages), predicted_step_s=1.0, tokens_per_s=1.0, mfu={})


# -- the format ------------------------------------------------------------------------------------

def test_a_smaller_last_micro_batch_is_version_5_and_reads_back():
    plan = replicas_plan()
    assert plan.problems(FLEET) == [] and plan.version == 5
    p = plan.pipelines[0]
    assert (p.num_micro_batches, p.last_micro_batch, p.replica_samples, p.samples) == (4, 1, 7, 7)
    assert [p.micro_batch_size(mb) for mb in range(4)] == [2, 2, 2, 1]
    data = json.loads(plan.to_json())
    assert data["version"] == 5 and data["pipelines"][0]["last_micro_batch"] == 1
    assert data["pipelines"][0]["samples"] == 7 and "last_micro_batch" not in data["pipelines"][1]
    assert Plan.from_json(plan.to_json()) == plan
    assert "fast(tp2 dp1 layers 0-8), 4 x micro-batch 2 (the last of 1)" in plan.summary()


def test_whole_micro_batches_are_written_as_before():
    plan = replicas_plan(fast_samples=6, slow_samples=2, micro_batch=2)
    data = json.loads(plan.to_json())
    assert plan.version == 1 and data["version"] == 1
    assert all("last_micro_batch" not in p for p in data["pipelines"])
    assert Plan.from_dict(data) == plan


@pytest.mark.parametrize("version, message", [
    (4, "a smaller last micro-batch \\(last_micro_batch\\) needs plan version 5"),
    (1, "a smaller last micro-batch \\(last_micro_batch\\) needs plan version 5"),
])
def test_an_older_version_with_a_short_last_micro_batch_is_refused(version, message):
    data = json.loads(replicas_plan().to_json())
    data["version"] = version
    with pytest.raises(PlanError, match=message) as caught:
        Plan.from_dict(data)
    assert caught.value.field == "version"


def test_version_5_without_a_short_last_micro_batch_is_refused():
    data = json.loads(replicas_plan(fast_samples=6, slow_samples=2).to_json())
    data["version"] = 5
    with pytest.raises(PlanError, match="plan version 5 is not supported without a smaller last micro-batch"):
        Plan.from_dict(data)


def test_an_unknown_version_names_version_5():
    data = json.loads(replicas_plan().to_json())
    data["version"] = 6
    with pytest.raises(PlanError, match="or 5 for a smaller last micro-batch"):
        Plan.from_dict(data)


@pytest.mark.parametrize("value, message", [
    (0, r"pipelines\[0\]\.last_micro_batch: expected a whole number from 1"),
    (1.5, r"pipelines\[0\]\.last_micro_batch: expected a whole number, got 1.5"),
    ("1", r"pipelines\[0\]\.last_micro_batch: expected a whole number, got \"1\""),
])
def test_a_bad_last_micro_batch_is_refused_by_name(value, message):
    data = json.loads(replicas_plan().to_json())
    data["pipelines"][0]["last_micro_batch"] = value
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(data)


def test_a_last_micro_batch_not_smaller_than_the_micro_batch_is_a_problem():
    plan = replicas_plan()
    bad = replace(plan, pipelines=(replace(plan.pipelines[0], last_micro_batch=2), plan.pipelines[1]))
    assert any("last_micro_batch 2 must be smaller than its micro_batch 2" in p for p in bad.problems(FLEET))
    # the samples no longer add up either: 4 x 2 + 1 = 9, not the batch of 8
    assert any("process 9 samples" in p for p in bad.problems(FLEET))


# -- the costing -------------------------------------------------------------------------------------

def _replica(b: int = 4, dp: int = 1, tp: int = 2):
    cm = CostModel(FLEET, LLAMA_TINY, TRAIN, _profile())
    layout = stage_layout([(FLEET.island("fast"), tp, 1)], dp)
    pe = evaluate_pipeline(cm, layout, dp, b, m=TRAIN.global_batch, inflight_m=TRAIN.global_batch)
    return cm, shortened(cm, pe)


def test_the_short_micro_batch_costs_a_stage_at_its_samples():
    cm, pe = _replica()
    assert pe.shortens and len(pe.short_times) == 3
    # each the stage's time at 1, 2, 3 samples in its mode: what the cost model's row says at that micro-batch
    for r, t in enumerate(pe.short_times, start=1):
        at_r = evaluate_pipeline(cm, pe.layout, 1, r, m=1, counts=pe.counts)
        assert at_r.modes == pe.modes and t == pytest.approx(at_r.stage_times[0], rel=1e-12)
    assert list(pe.short_times) == sorted(pe.short_times) and pe.short_times[-1] < pe.stage_times[0]


def test_shares_and_steps_agree_with_the_replica_on_those_samples():
    _cm, pe = _replica(b=4, dp=2, tp=1)
    shares, steps = replicas.shares_and_steps(pe, TRAIN.global_batch, 1)
    assert list(shares) == list(range(2, TRAIN.global_batch + 1, 2))      # every whole number per replica
    for u, t in zip(shares, steps):
        one = replicas.at_share(pe, int(u), 1)
        assert one.samples == u and one.step() == pytest.approx(float(t), rel=1e-12)
        k = int(u) // 2            # per replica: whole micro-batches of 4, the rest in a last one
        if k < 4:                  # (a single short one runs as that micro-batch)
            assert (one.b, one.m, one.last_b) == (k, 1, 0)
        else:
            assert (one.b, one.m, one.last_b) == (4, -(-k // 4), k % 4)


def test_one_short_micro_batch_alone_runs_as_that_micro_batch():
    _cm, pe = _replica(b=4)
    one = pe.with_samples(3)
    assert (one.b, one.m, one.last_b) == (3, 1, 0)
    assert one.stage_times == [pe.short_times[2]] and one.step() == pytest.approx(pe.short_times[2] + pe.tail)
    assert pe.with_samples(10).last_b == 2 and pe.with_samples(8).last_b == 0


def test_a_pipeline_of_several_stages_keeps_whole_micro_batches():
    cm = CostModel(FLEET, LLAMA_TINY, TRAIN, _profile())
    layout = stage_layout([(FLEET.island("fast"), 1, 2)], 1)
    pe = shortened(cm, evaluate_pipeline(cm, layout, 1, 4, m=6, inflight_m=24))
    assert not pe.shortens
    with pytest.raises(ValueError, match="cannot take 5 samples per replica"):
        pe.with_samples(5)
    shares, _ = replicas.shares_and_steps(pe, 24, 1)
    assert list(shares) == [4, 8, 12, 16, 20, 24]


# -- the search -----------------------------------------------------------------------------------------

def test_the_planner_splits_the_batch_in_samples_and_beats_whole_micro_batches(monkeypatch):
    result = search(FLEET, LLAMA_TINY, TRAIN, _profile())
    best = result.candidates[0]
    assert best.kind == "replicas" and any(pe.last_b for pe in best.pipes), best.label
    assert sum(pe.samples for pe in best.pipes) == TRAIN.global_batch
    plan = result.plans[0]
    assert plan.version == 5 and plan.problems(FLEET) == []
    assert [p.last_micro_batch for p in plan.pipelines] == [pe.last_b for pe in best.pipes]
    assert plan.predicted_step_s == pytest.approx(best.step)
    # the same search with every replica in whole micro-batches: over 3 % slower on this fleet
    monkeypatch.setattr(replicas, "shortened", lambda cm, pe: pe)
    whole = search(FLEET, LLAMA_TINY, TRAIN, _profile()).candidates[0]
    assert not any(pe.last_b for pe in whole.pipes)
    assert best.step < whole.step * 0.97, (best.label, best.step, whole.label, whole.step)


def test_brute_force_agrees_with_short_last_micro_batches():
    found = search(FLEET, LLAMA_TINY, TRAIN, _profile()).candidates[0]
    exhaustive = brute_force(FLEET, LLAMA_TINY, TRAIN, _profile())
    assert exhaustive is not None and found.step == pytest.approx(exhaustive.step, rel=1e-9)
    assert np.isclose(sum(pe.samples for pe in exhaustive.pipes), TRAIN.global_batch)


def test_with_one_micro_batch_the_split_is_still_in_samples():
    # no search over micro-batches: every island at 4, and a replica's last micro-batch still smaller where
    # that balances the islands; brute force over the same space agrees
    train = replace(TRAIN, micro_batch=4, search_micro_batch=False)
    found = search(FLEET, LLAMA_TINY, train, _profile()).candidates[0]
    assert {pe.b for pe in found.pipes} <= {1, 2, 3, 4} and any(pe.last_b for pe in found.pipes), found.label
    exhaustive = brute_force(FLEET, LLAMA_TINY, train, _profile())
    assert exhaustive is not None and found.step == pytest.approx(exhaustive.step, rel=1e-9)
