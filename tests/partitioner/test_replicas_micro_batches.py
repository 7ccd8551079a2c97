"""hetero-DP with each island at its own micro-batch: an island whose memory holds only small
micro-batches no longer forces them on an island that pays a large host cost per micro-batch. The
batch then splits in samples; brute force over the same space agrees, and the plan is format version 3."""

from __future__ import annotations

from dataclasses import replace

import pytest

from partitioner.brute_force import brute_force
from partitioner.inputs import FleetSpec, IslandSpec, TrainSpec
from partitioner.profile import HostCost, ProfileDB
from partitioner.search import search
from tests.partitioner.test_partitioner import FAST, LLAMA_TINY, SLOW

SHAPE = {k: getattr(LLAMA_TINY, k) for k in ("hidden", "heads", "kv_heads", "ffn_hidden", "seq_len")}
# fast: roomy, 0.2 s of host work per micro-batch (wants large ones); slow: memory for small ones only
FLEET = FleetSpec("roomy-and-tight", (IslandSpec("fast", replace(FAST, memory_bytes=1e9), (2,)),
                                      IslandSpec("slow", replace(SLOW, memory_bytes=0.07e9), (2,))), 1e9, 1e9, 50e-6)
TRAIN = replace(TrainSpec(32, 1, "fp32"), modes=("replicas",))


def _profile() -> ProfileDB:
    db = ProfileDB(model=dict(SHAPE))
    db.add_host_cost("emu-fast", HostCost(launch_s=0.2), "emulated", 2)
    return db


def test_each_island_runs_the_micro_batch_it_is_fastest_at():
    result = search(FLEET, LLAMA_TINY, TRAIN, _profile())
    best = result.candidates[0]
    sizes = {pe.island.name: pe.b for pe in best.pipes}
    assert best.kind == "replicas" and sizes["fast"] > sizes["slow"], best.label
    assert sum(pe.samples for pe in best.pipes) == TRAIN.global_batch
    plan = result.plans[0]
    assert plan.version == (5 if any(p.last_micro_batch for p in plan.pipelines) else 3)
    assert plan.problems(FLEET) == []
    assert [p.micro_batch for p in plan.pipelines] == [pe.b for pe in best.pipes]
    # strictly faster than the best plan with one micro-batch for both islands, whichever it is
    one_each = []
    for b in TRAIN.micro_batch_choices():
        try:
            one = search(FLEET, LLAMA_TINY, replace(TRAIN, micro_batch=b, search_micro_batch=False), _profile())
        except ValueError:
            continue        # no plan at this micro-batch (the slow island's memory)
        one_each.append(one.candidates[0].step)
    assert one_each and best.step < min(one_each) * 0.99, (best.step, one_each)


def test_brute_force_agrees_with_mixed_micro_batches():
    found = search(FLEET, LLAMA_TINY, TRAIN, _profile()).candidates[0]
    exhaustive = brute_force(FLEET, LLAMA_TINY, TRAIN, _profile())
    assert exhaustive is not None and found.step == pytest.approx(exhaustive.step, rel=1e-9)
    assert len({pe.b for pe in exhaustive.pipes}) == 2
