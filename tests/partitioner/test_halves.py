"""Stage boundaries inside a layer (partitioner/halves.py): the planner moves a boundary half a
layer, to the seam between a layer's attention and MLP halves, where that shortens the step."""

import dataclasses
import math

import pytest

from partitioner import halves
from partitioner.candidates import stage_layout
from partitioner.costs import CostModel, attention_share, blocks_layers
from partitioner.evaluate import _time_matrix, evaluate_pipeline
from partitioner.inputs import TrainSpec
from partitioner.plan import Plan
from partitioner.search import search
from tests.partitioner.test_partitioner import EMU_MIXED, GPU_16, LLAMA_12, LLAMA_TINY

PIPELINE_64 = TrainSpec(64, 1, "fp32", modes=("pipeline",))


def test_blocks_count_a_half_by_its_share_of_the_layer():
    share = attention_share(LLAMA_TINY)
    assert 0.2 < share < 0.5                                   # the MLP half is the heavier one
    assert blocks_layers(LLAMA_TINY, 0, 4) == 2.0
    assert blocks_layers(LLAMA_TINY, 0, 3) == pytest.approx(1 + share)      # ends after an attention half
    assert blocks_layers(LLAMA_TINY, 1, 4) == pytest.approx(2 - share)      # begins at an MLP half
    assert blocks_layers(LLAMA_TINY, 1, 5) == 2.0


def test_cuts_give_each_stage_its_blocks_and_the_layers_it_touches():
    assert halves.spans((3, 5), ()) == [(0, 6), (6, 16)]
    assert halves.spans((3, 5), (7,)) == [(0, 7), (7, 16)]
    assert halves.spans((3, 5), (5,)) == [(0, 5), (5, 16)]
    assert [halves.touched(a, b) for a, b in halves.spans((3, 5), (7,))] == [4, 5]   # the first reaches into layer 3
    assert [halves.touched(a, b) for a, b in halves.spans((3, 5), (5,))] == [3, 6]   # the second back into layer 2


@pytest.mark.parametrize("fleet,model,train", [(EMU_MIXED, LLAMA_TINY, PIPELINE_64),
                                               (GPU_16, LLAMA_12, TrainSpec(64, 1, "bf16", modes=("pipeline",)))],
                         ids=["emulated-mixed", "a800-910b-16"])
def test_a_boundary_inside_a_layer_shortens_the_pipeline(fleet, model, train):
    whole = search(fleet, model, dataclasses.replace(train, half_layers=False)).best
    split = search(fleet, model, train).best
    assert not any(s.blocks for s in whole.stages) and whole.version == 1
    assert any(s.blocks for s in split.stages) and split.version == 4
    assert split.predicted_step_s < whole.predicted_step_s * 0.99
    assert split.validate(fleet) is split
    assert Plan.from_json(split.to_json()).to_dict() == split.to_dict()
    # the slowest stage gave away part of a layer
    assert max(s.time_s for s in split.stages) < max(s.time_s for s in whole.stages)


def test_a_half_goes_only_where_the_layer_it_touches_fits():
    cm = CostModel(EMU_MIXED, LLAMA_TINY, PIPELINE_64)
    fast, slow = EMU_MIXED.islands
    layout = stage_layout([(fast, 2, 1), (slow, 2, 1)], 1)
    pe = evaluate_pipeline(cm, layout, 1, 1, 64)
    assert pe.cuts == (13,) and pe.whole_times is not None      # fast takes layer 6's attention half
    share, per = attention_share(LLAMA_TINY), cm.per_layer_s("fast", 2, 1, pe.modes[0])
    assert pe.stage_times[0] == pytest.approx(pe.whole_times[0] + share * per)
    plain = dataclasses.replace(pe, stage_times=pe.whole_times, cuts=(), whole_times=None)
    rows, picks = _time_matrix(cm, layout, 1, 1, 64, 1)
    assert halves.best_cuts(cm, plain, rows, picks)[0] == (13,)
    rows[0, plain.counts[0]] = math.inf                          # 7 layers no longer fit the fast stage
    assert halves.best_cuts(cm, plain, rows, picks) is None


def test_a_deep_pipeline_is_cut_over_all_blocks_not_only_next_to_its_layer_boundaries():
    """8 stages of one kind over 20 layers (a small vocabulary: the head weighs little) split
    3,3,3,3,2,2,2,2: whole layers run at the 3-layer stages' pace; moving each boundary by half a
    layer cannot relieve a run of them, the cut over all blocks can (5 blocks a stage)."""
    fleet = dataclasses.replace(GPU_16, islands=(dataclasses.replace(GPU_16.islands[0], nodes=(8,)),))
    model = dataclasses.replace(LLAMA_12, layers=20, vocab=256)
    train = TrainSpec(64, 1, "bf16", modes=("pipeline",), search_micro_batch=False)
    cm = CostModel(fleet, model, train)
    layout = stage_layout([(fleet.islands[0], 1, 8)], 1)
    whole = evaluate_pipeline(cm, layout, 1, 1, 64, counts=(3, 3, 3, 3, 2, 2, 2, 2))
    assert whole.cuts
    rows, picks = _time_matrix(cm, layout, 1, 1, 64, 1)
    plain = dataclasses.replace(whole, stage_times=whole.whole_times, cuts=(), whole_times=None)
    stages = halves._Stages(cm, plain, rows, picks)             # pylint: disable=protected-access
    shifted = halves._shifted(plain, stages)                   # pylint: disable=protected-access
    shifted_top = max(stages.time(i, a, b) for i, (a, b) in enumerate(halves.spans(plain.counts, shifted)))
    assert max(whole.stage_times) < shifted_top * 0.97 < max(whole.whole_times)
    assert max(b - a for a, b in halves.spans(plain.counts, whole.cuts)) <= 5          # no stage of 3 layers left
