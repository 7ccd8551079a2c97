"""Pipelines of different micro-batches (plan format version 3): each island of a hetero-DP plan runs the
micro-batch it is fastest at. Written as version 3 only when the micro-batches differ, so every other
plan reads exactly as before; the version must say so."""

from __future__ import annotations

import json

import pytest

from partitioner.plan import PipelinePlan, Plan, PlanError, StagePlan, assign_ranks
from tests.partitioner.test_interleave_plan import FLEET, MODEL


def replicas(fast_mb: int, slow_mb: int) -> Plan:
    """fast TP2 on 6 samples, slow TP2 on 2, each a whole model, at their own micro-batches."""
    stages = [StagePlan(0, 0, "fast", "emu-fast", 2, 1, (0, 8), "none", 0, 0.1, 0.01),
              StagePlan(1, 1, "slow", "emu-slow", 2, 1, (0, 8), "none", 0, 0.1, 0.01)]
    pipelines = (PipelinePlan(0, (0,), 1, fast_mb, 6 // fast_mb), PipelinePlan(1, (1,), 1, slow_mb, 2 // slow_mb))
    return Plan(kind="replicas", cluster=FLEET.name, model=MODEL.name, dtype="fp32", layers=8, heads=8, kv_heads=4,
                global_batch=8, micro_batch=fast_mb, num_micro_batches=6 // fast_mb, recompute="none", zero1=False,
                stages=tuple(stages), pipelines=pipelines, ranks=assign_ranks(FLEET, stages),
                predicted_step_s=1.0, tokens_per_s=1.0, mfu={})


def test_different_micro_batches_are_version_3_and_read_back():
    plan = replicas(3, 1)
    assert plan.problems(FLEET) == [] and plan.version == 3
    back = Plan.from_json(plan.to_json())
    assert [p.micro_batch for p in back.pipelines] == [3, 1] and back == plan
    assert replicas(2, 2).version == 1 and json.loads(replicas(2, 2).to_json())["version"] == 1


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_version_with_different_micro_batches_is_refused(version):
    data = replicas(3, 1).to_dict()
    data["version"] = version
    with pytest.raises(PlanError, match="pipelines of different micro_batch need plan version 3"):
        Plan.from_dict(data)


def test_version_3_with_one_micro_batch_is_refused():
    data = replicas(2, 2).to_dict()
    data["version"] = 3
    with pytest.raises(PlanError, match="version 3 is not supported when every pipeline has the same micro_batch"):
        Plan.from_dict(data)


def test_the_top_level_micro_batch_is_pipeline_0s():
    data = replicas(3, 1).to_dict()
    data["micro_batch"] = 1
    assert "pipeline 0: micro_batch 3 != plan's 1" in Plan.from_dict(data).problems(FLEET)
