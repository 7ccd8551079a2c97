"""The Plan's interleaved (virtual-stage) fields: virtual_stages, chunks, layer_ranges, format version 2.

A plain plan (v == 1) must serialise exactly as before (version 1, no new keys), so old readers keep
working; an interleaved one is version 2 and its chunks must tile the model in Megatron's order.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from partitioner.inputs import ChipModel, FleetSpec, IslandSpec, ModelSpec
from partitioner.plan import PipelinePlan, Plan, PlanError, StagePlan, assign_ranks, interleaved



def chip(name: str, tflops: float, mem_gb: float, bw_gbps: float, intra_gbps: float) -> ChipModel:
    return ChipModel(name, dict.fromkeys(("fp32", "bf16", "fp16"), tflops * 1e12), mem_gb * 1e9, 0.0,
                     bw_gbps * 1e9, intra_gbps * 1e9, True, "emulated")


FLEET = FleetSpec("emulated-mixed", (IslandSpec("fast", chip("emu-fast", 0.01, 0.1, 5, 2), (2,)),
                                     IslandSpec("slow", chip("emu-slow", 0.004, 0.06, 2, 1), (2,))), 1e9, 1e9, 50e-6)
MODEL = ModelSpec(8, 256, 8, 4, 704, 2048, 128, name="llama-tiny")


@pytest.fixture(scope="module")
def plain() -> Plan:
    """A plain two-stage pipeline on FLEET: slow TP2 over layers [0, 2), fast TP2 over [2, 8), 8 micro-batches
    (made by hand: the planner may choose an interleaved plan itself)."""
    stages = [StagePlan(0, 0, "slow", "emu-slow", 2, 1, (0, 2), "none", 0, 0.1, 0.01),
              StagePlan(1, 0, "fast", "emu-fast", 2, 1, (2, 8), "none", 0, 0.1, 0.01)]
    plan = Plan(kind="pipeline", cluster=FLEET.name, model=MODEL.name, dtype="fp32", layers=8, heads=8, kv_heads=4,
                global_batch=8, micro_batch=1, num_micro_batches=8, recompute="none", zero1=False,
                stages=tuple(stages), pipelines=(PipelinePlan(0, (0, 1), 1, 1, 8),),
                ranks=assign_ranks(FLEET, stages), predicted_step_s=1.0, tokens_per_s=1.0, mfu={})
    assert plan.problems(FLEET) == []
    return plan


def test_plain_plan_is_version_1_without_new_keys(plain):
    data = plain.to_dict()
    assert data["version"] == 1
    assert all("chunks" not in s for s in data["stages"]) and all("virtual_stages" not in p for p in data["pipelines"])
    assert all(s.layer_ranges == (s.layers,) for s in plain.stages)
    assert Plan.from_dict(data) == plain


def test_interleaved_plan_tiles_the_model_in_megatron_order(plain):
    plan = interleaved(plain, 2)
    first, second = plan.stages
    # each stage keeps its layer count; pieces i, i+p of the model cut into p*v
    assert [s.num_layers for s in plan.stages] == [s.num_layers for s in plain.stages]
    pieces = [first.chunks[0], second.chunks[0], first.chunks[1], second.chunks[1]]
    assert [a[1] for a in pieces[:-1]] == [b[0] for b in pieces[1:]] and pieces[0][0] == 0 and pieces[-1][1] == 8
    assert first.layer_ranges == first.chunks and first.layers == (first.chunks[0][0], first.chunks[1][1])
    assert plan.pipelines[0].virtual_stages == 2
    assert plan.problems(FLEET) == []
    data = json.loads(plan.to_json())
    assert data["version"] == 2 and data["pipelines"][0]["virtual_stages"] == 2
    assert data["stages"][0]["chunks"] == [list(c) for c in first.chunks]
    assert Plan.from_json(plan.to_json()) == plan
    assert interleaved(plan, 1) == plain      # and back: the plain cut again


def test_interleaved_needs_a_layer_per_chunk(plain):
    with pytest.raises(PlanError, match="cannot hold 3 non-empty chunks"):
        interleaved(plain, 3)     # the slow stage has 2 layers


@pytest.mark.parametrize("edit,fragment", [
    (lambda d: d["pipelines"][0].update(num_micro_batches=7) or d.update(global_batch=7),
     "to be a multiple of its 2 stages"),
    (lambda d: d["stages"][0]["chunks"].pop(), "expected 2 chunks"),
    (lambda d: d["stages"][0].update(chunks=[d["stages"][1]["chunks"][0], d["stages"][0]["chunks"][1]]),
     "expected to start at 0"),
    (lambda d: d["stages"][0].update(layers=[0, 8]), "must be the span of its chunks"),
    (lambda d: d["pipelines"][0].update(virtual_stages=1) or d.update(version=1), "has chunks but"),
])
def test_broken_interleaved_plans_are_refused(plain, edit, fragment):
    data = json.loads(interleaved(plain, 2).to_json())
    edit(data)
    assert any(fragment in p for p in Plan.from_dict(data).problems()), Plan.from_dict(data).problems()


@pytest.mark.parametrize("version,fragment", [(1, "needs plan version 2"), (3, "version 3 is not supported")])
def test_version_must_say_whether_a_pipeline_is_interleaved(plain, version, fragment):
    data = json.loads(interleaved(plain, 2).to_json())
    data["version"] = version
    with pytest.raises(PlanError, match=fragment):
        Plan.from_dict(data)
    data = plain.to_dict()
    data["version"] = 2
    with pytest.raises(PlanError, match="version 2 is not supported without"):
        Plan.from_dict(data)


def test_one_stage_pipeline_cannot_interleave(plain):
    single = replace(plain.pipelines[0], virtual_stages=2)
    stage = replace(plain.stages[0], chunks=((0, 4), (4, 8)), layers=(0, 8))
    plan = replace(plain, pipelines=(replace(single, stages=(0,)),), stages=(stage,))
    assert any("needs at least 2 stages" in p for p in plan.problems())


def test_chunks_are_read_as_ranges(plain):
    data = json.loads(interleaved(plain, 2).to_json())
    data["stages"][1]["chunks"][0] = [1, 2.5]
    with pytest.raises(PlanError, match=r"stages\[1\]\.chunks\[0\]\[1\]: expected a whole number"):
        Plan.from_dict(data)
    data["stages"][1]["chunks"] = "0-4"
    with pytest.raises(PlanError, match=r"stages\[1\]\.chunks: expected a list"):
        Plan.from_dict(data)
