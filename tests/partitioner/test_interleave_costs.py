"""Interleaved 1F1B in the cost model and the search (issue 19 item 1): the step formula against
running the schedule, the memory of its peak, and the search against brute force with chunks."""

from __future__ import annotations

import json
import random

import pytest

from partitioner.costs import CostModel, interleaved_cycle_fill, pipeline_step_s
from partitioner.inputs import ChipModel, FleetSpec, IslandSpec, ModelSpec, TrainSpec
from partitioner.interleave import bubble_fraction, simulate
from partitioner.plan import Plan
from partitioner.search import brute_force, evaluate_pipeline, in_flight, interleaved_twin, search, stage_layout
from tests.conftest import ROOT



def chip(name: str, tflops: float, mem_gb: float) -> ChipModel:
    return ChipModel(name, dict.fromkeys(("fp32", "bf16", "fp16"), tflops * 1e12), mem_gb * 1e9, 0.0,
                     5e9, 2e9, True, "emulated")


FLEET = FleetSpec("emulated-mixed", (IslandSpec("fast", chip("emu-fast", 0.01, 0.1), (2,)),
                                     IslandSpec("slow", chip("emu-slow", 0.004, 0.06), (2,))), 1e9, 1e9, 50e-6)
MODEL = ModelSpec(8, 256, 8, 4, 704, 2048, 128, name="llama-tiny")
TRAIN = TrainSpec(8, 2, "fp32")
INTERLEAVED = TrainSpec(8, 2, "fp32", max_virtual_stages=4)


def step(T, hops, wrap, m, v) -> float:
    cycle, fill = interleaved_cycle_fill(T, hops, wrap, v)
    return (m - 1) * cycle + fill


def test_v1_is_plain_1f1b():
    T, hops = [1.0, 1.5, 0.7], [0.1, 0.3]
    assert step(T, hops, 9.0, 12, 1) == pytest.approx(pipeline_step_s(T, hops, 12, 0.0))


def test_equal_stages_without_hops_have_megatrons_bubble():
    for p, v, m in ((4, 2, 8), (8, 4, 16), (6, 3, 12)):
        assert step([3.0] * p, [0.0] * (p - 1), 0.0, m, v) == pytest.approx(3.0 * m * (1 + bubble_fraction(p, v, m)))


def test_step_formula_tracks_the_schedule_run_op_by_op():
    """Uneven stages, hops up to a fifth of a chunk (some boundaries and the wrap-around five times
    that, like a bridge): the closed form against `simulate`, the schedule's own timing."""
    rng = random.Random(5)
    errors = []
    for _ in range(120):
        p, v = rng.choice([2, 3, 4, 6, 8]), rng.choice([2, 3, 4])
        m = p * rng.choice([1, 2, 4])
        T = [rng.uniform(1.0, 1.6) for _ in range(p)]
        r = rng.choice([0.0, 0.05, 0.1, 0.2]) * 1.3 / v
        hops = [rng.choice([r, r, 5 * r]) for _ in range(p - 1)]
        wrap = rng.choice([r, 5 * r])
        ran = simulate(p, v, m, [t / 3 / v for t in T], [2 * t / 3 / v for t in T], hops, wrap).makespan
        errors.append(step(T, hops, wrap, m, v) / ran - 1)
    assert sum(abs(e) for e in errors) / len(errors) < 0.05
    assert max(abs(e) for e in errors) < 0.2


def test_interleaving_holds_more_activations_on_the_first_stage():
    assert in_flight(4, 0, 2, 8) > in_flight(4, 0, 1, 8) == 4
    assert in_flight(4, 3, 2, 8) > in_flight(4, 3, 1, 8) == 1
    cm = CostModel(FLEET, MODEL, TRAIN)
    layout = stage_layout([(FLEET.islands[0], 1, 2)], 1)
    plain = evaluate_pipeline(cm, layout, 1, 2, 4, counts=(4, 4))
    inter = evaluate_pipeline(cm, layout, 1, 2, 4, counts=(4, 4), v=2)
    assert inter.memory[0] > plain.memory[0] and inter.v == 2 and inter.step() < plain.step()


def test_twin_equals_a_fresh_costing_with_the_same_split():
    cm = CostModel(FLEET, MODEL, TrainSpec(16, 1, "fp32"))
    layout = stage_layout([(FLEET.islands[0], 1, 2)], 1)
    plain = evaluate_pipeline(cm, layout, 1, 1, 16)
    for v in (2, 4):
        twin, fresh = interleaved_twin(cm, plain, v), evaluate_pipeline(cm, layout, 1, 1, 16, counts=plain.counts, v=v)
        assert twin.modes == fresh.modes
        assert twin.step() == pytest.approx(fresh.step()) and twin.memory == pytest.approx(fresh.memory)


def test_search_with_chunks_agrees_with_brute_force_and_builds_a_valid_plan():
    result = search(FLEET, MODEL, INTERLEAVED)
    bf = brute_force(FLEET, MODEL, INTERLEAVED)
    plain = search(FLEET, MODEL, TRAIN).best
    best = result.best
    assert bf.step * (1 - 1e-9) <= best.predicted_step_s <= bf.step * 1.01
    assert best.predicted_step_s < plain.predicted_step_s          # interleaving pays on this fleet
    assert all(p.virtual_stages == 1 for p in plain.pipelines)
    pipe = max(best.pipelines, key=lambda p: p.virtual_stages)
    assert pipe.virtual_stages > 1 and best.to_dict()["version"] == 2
    assert best.problems(FLEET) == []
    assert sorted(x for i in pipe.stages for lo, hi in best.stages[i].layer_ranges for x in range(lo, hi)) \
        == list(range(MODEL.layers))
    assert best.breakdown["bubble_fraction"] < plain.breakdown["bubble_fraction"]


def test_hetero_plan_shows_an_interleaved_stages_chunks():
    from hetero.commands.plan import _summary, layers_text

    best = search(FLEET, MODEL, INTERLEAVED).best
    stage = next(s for s in best.stages if s.chunks)
    assert layers_text(stage) == ",".join(f"{a}-{b}" for a, b in stage.chunks) + f" ({stage.num_layers})"
    assert _summary(best)["stages"][stage.index]["chunks"] == [list(c) for c in stage.chunks]
    plain = search(FLEET, MODEL, TRAIN).best
    assert all("chunks" not in s for s in _summary(plain)["stages"])
    assert layers_text(plain.stages[0]) == f"{plain.stages[0].layers[0]}-{plain.stages[0].layers[1]} " \
                                           f"({plain.stages[0].num_layers})"


def test_hetero_plan_virtual_stages_flag(hetero_cli, monkeypatch):
    monkeypatch.chdir(ROOT)
    job = ("--cluster", "configs/emulated-small-memory.yaml", "--model", "configs/llama-tiny.yaml",
           "--train", "configs/train-tiny.yaml")
    code, out, err = hetero_cli("plan", *job, "--virtual-stages", "4", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["version"] == 2 and max(p["virtual_stages"] for p in data["pipelines"]) > 1
    assert Plan.from_dict(data).problems() == []
    code, out, err = hetero_cli("plan", *job, "--json")
    assert code == 0, err
    assert json.loads(out)["version"] == 1
    code, out, err = hetero_cli("plan", *job, "--virtual-stages", "5")
    assert code == 2 and "--virtual-stages" in err and len(err.strip().splitlines()) == 1
