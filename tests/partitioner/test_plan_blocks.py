"""Stage boundaries inside a layer (plan format version 4): a stage's `blocks`, the half-layer range it holds
(block 2k: layer k's attention half, 2k+1: its MLP half). Written, as version 4, only when a boundary is odd, so
every whole-layer plan reads exactly as before; the blocks must tile the model and agree with `layers`."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest

from hetero.commands.plan import layers_text
from hetero.report.analysis import stage_flops
from partitioner.costs import attention_share
from partitioner.plan import PipelinePlan, Plan, PlanError, StagePlan, assign_ranks, interleaved, layers_span_text
from tests.partitioner.test_interleave_plan import FLEET, MODEL


def whole_layers() -> Plan:
    """slow TP2 over layers [0, 3), fast TP2 over [3, 8): a plain two-stage pipeline of whole layers."""
    stages = [StagePlan(0, 0, "slow", "emu-slow", 2, 1, (0, 3), "none", 0, 0.1, 0.01),
              StagePlan(1, 0, "fast", "emu-fast", 2, 1, (3, 8), "none", 0, 0.1, 0.01)]
    return Plan(kind="pipeline", cluster=FLEET.name, model=MODEL.name, dtype="fp32", layers=8, heads=8, kv_heads=4,
                global_batch=8, micro_batch=1, num_micro_batches=8, recompute="none", zero1=False,
                stages=tuple(stages), pipelines=(PipelinePlan(0, (0, 1), 1, 1, 8),),
                ranks=assign_ranks(FLEET, stages), predicted_step_s=1.0, tokens_per_s=1.0, mfu={})


def split(plan: Plan, first: tuple, second: tuple, **fields) -> Plan:
    """`plan` with its two stages' blocks and layers replaced: first = (blocks, layers), second likewise."""
    stages = tuple(replace(s, blocks=blocks, layers=layers, **fields)
                   for s, (blocks, layers) in zip(plan.stages, (first, second)))
    return replace(plan, stages=stages)


def halved() -> Plan:
    """whole_layers() split at block 5, inside layer 2: slow holds 2.5 layers, fast the other 5.5."""
    return split(whole_layers(), ((0, 5), (0, 3)), ((5, 16), (2, 8)))


def test_a_boundary_inside_a_layer_is_version_4_and_reads_back():
    plan = halved()
    assert plan.problems(FLEET) == [] and plan.version == 4
    data = json.loads(plan.to_json())
    assert data["version"] == 4 and [s["blocks"] for s in data["stages"]] == [[0, 5], [5, 16]]
    back = Plan.from_json(plan.to_json())
    assert back == plan and back.stages[1].blocks == (5, 16)
    assert [s.block_range for s in plan.stages] == [(0, 5), (5, 16)]
    assert [s.held_layers for s in plan.stages] == [2.5, 5.5] and [s.num_layers for s in plan.stages] == [3, 6]


def test_a_whole_layer_plan_is_written_as_before():
    plan = whole_layers()
    data = json.loads(plan.to_json())
    assert data["version"] == 1 and all("blocks" not in s for s in data["stages"])
    assert [s.block_range for s in plan.stages] == [(0, 6), (6, 16)]
    assert [s.held_layers for s in plan.stages] == [3.0, 5.0]
    assert Plan.from_dict(data) == plan


@pytest.mark.parametrize("version", [1, 2, 3])
def test_an_older_version_with_blocks_is_refused(version):
    data = halved().to_dict()
    data["version"] = version
    with pytest.raises(PlanError, match="stage boundaries inside a layer \\(blocks\\) need plan version 4"):
        Plan.from_dict(data)


def test_version_4_without_blocks_is_refused():
    data = whole_layers().to_dict()
    data["version"] = 4
    with pytest.raises(PlanError, match="version 4 is not supported without a stage boundary inside a layer.*"
                                        "such a plan is version 1"):
        Plan.from_dict(data)


def test_an_unknown_version_names_version_4():
    data = halved().to_dict()
    data["version"] = 6
    with pytest.raises(PlanError, match="plan version 6 is not supported .* 4 for stage boundaries inside a layer"):
        Plan.from_dict(data)


@pytest.mark.parametrize("blocks, message", [
    ([1], r"stages\[0\]\.blocks: expected \[start, end\], got \[1\]"),
    ([1.5, 3], r"stages\[0\]\.blocks\[0\]: expected a whole number, got 1.5"),
    ("x", r"stages\[0\]\.blocks: expected \[start, end\], got \"x\""),
    (None, r"stages\[0\]\.blocks: expected \[start, end\], got null"),
    ([0, -5], r"stages\[0\]\.blocks\[1\]: expected a whole number from 0"),
])
def test_a_malformed_blocks_field_is_refused_by_name(blocks, message):
    data = halved().to_dict()
    data["stages"][0]["blocks"] = blocks
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(data)


@pytest.mark.parametrize("first, second, message", [
    # a gap: blocks 5 and 6 are nobody's
    (((0, 5), (0, 3)), ((7, 16), (3, 8)), "pipeline 0: stage 1 has blocks [7, 16], expected to start at 5 "
                                          "and be non-empty"),
    # an overlap: blocks 3 and 4 are held twice
    (((0, 5), (0, 3)), ((3, 16), (1, 8)), "pipeline 0: stage 1 has blocks [3, 16], expected to start at 5 "
                                          "and be non-empty"),
    # the blocks stop short of the model's 16
    (((0, 5), (0, 3)), ((5, 15), (2, 8)), "pipeline 0: blocks end at 15, the model has 16 (8 layers)"),
    # an empty stage
    (((0, 16), (0, 8)), ((16, 16), (8, 8)), "pipeline 0: stage 1 has blocks [16, 16], expected to start at 16 "
                                            "and be non-empty"),
    # both ends even: whole layers, which `layers` alone says
    (((0, 6), (0, 3)), ((6, 16), (3, 8)), "stage 0: blocks [0, 6] start and end on whole layers: write layers "
                                          "[0, 3] without blocks"),
    # layers not the ones the blocks touch
    (((0, 5), (0, 2)), ((5, 16), (2, 8)), "stage 0: layers [0, 2] must be the layers its blocks touch, [0, 3]"),
    (((0, 5), (0, 3)), ((5, 16), (3, 8)), "stage 1: layers [3, 8] must be the layers its blocks touch, [2, 8]"),
])
def test_blocks_must_tile_the_model_and_match_layers(first, second, message):
    plan = split(whole_layers(), first, second)
    assert message in plan.problems(FLEET)
    with pytest.raises(PlanError, match=re.escape(message)):
        plan.validate(FLEET)


def test_a_whole_layer_stage_beside_one_with_blocks_tiles_by_its_layers():
    """Only one end need be odd: stage 1 [5, 16) beside a stage 0 of layers [0, 2) leaves block 4 to nobody."""
    plan = halved()
    gap = replace(plan, stages=(replace(plan.stages[0], blocks=(), layers=(0, 2)), plan.stages[1]))
    assert "pipeline 0: stage 1 has blocks [5, 16], expected to start at 4 and be non-empty" in gap.problems(FLEET)


def test_blocks_are_never_with_chunks():
    plan = halved()
    chunked = replace(plan, stages=(replace(plan.stages[0], chunks=((0, 1), (2, 3))), plan.stages[1]))
    assert any("stage 0: has chunks, but its pipeline has a stage boundary inside a layer" in problem
               for problem in chunked.problems(FLEET))
    with pytest.raises(PlanError, match="stage 0: has chunks"):
        chunked.validate(FLEET)
    two = replace(plan, pipelines=(replace(plan.pipelines[0], virtual_stages=2),))
    assert ("pipeline 0: has a stage boundary inside a layer (blocks), so its virtual_stages must be 1, got 2"
            in two.problems(FLEET))


def test_interleaving_a_plan_with_blocks_is_refused():
    with pytest.raises(PlanError, match="interleaved pipeline keeps whole layers"):
        interleaved(halved(), 2)
    assert interleaved(whole_layers(), 2).version == 2


def test_summary_and_table_show_half_layers():
    plan = halved()
    assert [layers_span_text(s) for s in plan.stages] == ["0-2.5", "2.5-8"]
    assert plan.summary() == "slow(tp2 dp1 layers 0-2.5) -> fast(tp2 dp1 layers 2.5-8), 8 x micro-batch 1"
    assert whole_layers().summary() == "slow(tp2 dp1 layers 0-3) -> fast(tp2 dp1 layers 3-8), 8 x micro-batch 1"
    assert [layers_text(s) for s in plan.stages] == ["0-2.5 (2.5)", "2.5-8 (5.5)"]
    assert [layers_text(s) for s in whole_layers().stages] == ["0-3 (3)", "3-8 (5)"]
    odd_both = replace(plan.stages[1], blocks=(5, 11), layers=(2, 6))
    assert layers_span_text(odd_both) == "2.5-5.5" and layers_text(odd_both) == "2.5-5.5 (3)"


def test_the_report_counts_a_half_layer_by_its_flops():
    """Stage 0 holds layers 0-1 and layer 2's attention half, stage 1 the rest: together the whole model."""
    halves, whole = (stage_flops(SimpleNamespace(model=MODEL, plan=p.to_dict())) for p in (halved(), whole_layers()))
    assert halves[0] / whole[0] == pytest.approx((2 + attention_share(MODEL)) / 3)
    assert halves[0] + halves[1] == pytest.approx(whole[0] + whole[1])
