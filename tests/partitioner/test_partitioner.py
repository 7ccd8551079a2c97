"""partitioner: layer split, cost model, search, plan validity, profile DB, infeasible inputs."""

from __future__ import annotations

import ast
import json
import os
import random

import numpy as np
import pytest

from partitioner.costs import (CostModel, activation_bytes, layer_forward_flops, model_flops_per_sample,
                               pipeline_step_s, total_params, tp_choices)
from partitioner.inputs import ChipModel, FleetSpec, InfeasibleError, IslandSpec, ModelSpec, TrainSpec
from partitioner.layer_split import brute_force_split, split_layers
from partitioner.plan import Plan, PlanError
from partitioner.profile import ProfileDB, ProfileError
from partitioner.search import brute_force, search
from tests.conftest import ROOT



def chip(name, tflops, mem_gb, bw_gbps=5.0, intra_gbps=2.0, emulated=True, reserve_gb=0.0, accelerator="emulated"):
    return ChipModel(name, {"fp32": tflops * 1e12, "bf16": tflops * 1e12, "fp16": tflops * 1e12},
                     mem_gb * 1e9, reserve_gb * 1e9, bw_gbps * 1e9, intra_gbps * 1e9, emulated, accelerator)


FAST = chip("emu-fast", 0.01, 0.1, 5, 2)
SLOW = chip("emu-slow", 0.004, 0.06, 2, 1)
TINY_CHIP = chip("emu-tiny", 0.002, 0.03, 1, 0.5)
A800 = chip("A800-80G", 312, 80, 2039, 400, emulated=False, reserve_gb=2, accelerator="cuda")
ASCEND = chip("Ascend-910B", 320, 64, 1600, 392, emulated=False, reserve_gb=3, accelerator="ascend")

EMU_MIXED = FleetSpec("emulated-mixed", (IslandSpec("fast", FAST, (2,)), IslandSpec("slow", SLOW, (2,))), 1e9, 1e9, 50e-6)
EMU_3 = FleetSpec("emu-3", (IslandSpec("fast", FAST, (2, 2)), IslandSpec("slow", SLOW, (2, 2)),
                            IslandSpec("tiny", TINY_CHIP, (4,))), 1e9, 1e9, 50e-6)
GPU_16 = FleetSpec("a800-910b-16", (IslandSpec("a800", A800, (4, 4)), IslandSpec("ascend", ASCEND, (8,))),
                   25e9, 12.5e9, 30e-6)
GPU_32 = FleetSpec("a800-910b-32", (IslandSpec("a800", A800, (8, 8)), IslandSpec("ascend", ASCEND, (8, 8))),
                   25e9, 12.5e9, 30e-6)

LLAMA_TINY = ModelSpec(8, 256, 8, 4, 704, 2048, 128, name="llama-tiny")
LLAMA_12 = ModelSpec(12, 2048, 16, 8, 5632, 32000, 2048, name="llama-12")
LLAMA_7B = ModelSpec(32, 4096, 32, 32, 11008, 32000, 4096, name="llama2-7b")
LLAMA_70B = ModelSpec(80, 8192, 64, 8, 28672, 32000, 4096, name="llama2-70b")
TRAIN_TINY = TrainSpec(8, 2, "fp32")


# ----------------------------------------------------------------------------- layer split

def _random_rows(rng, P, L):
    rows = []
    for _ in range(P):
        base = rng.uniform(0, 2)
        per = rng.uniform(0.1, 3)
        row = base + per * np.arange(1, L + 1)
        # recompute-style jumps: occasionally a steeper slope after a knee
        if rng.random() < 0.5:
            knee = rng.randint(1, L)
            row[knee:] += rng.uniform(0, 4) + np.arange(1, L - knee + 1) * rng.uniform(0, 1)
        # memory limit: inf beyond some n
        if rng.random() < 0.4:
            row[rng.randint(1, L):] = np.inf
        rows.append(np.round(row, rng.choice([1, 6])))  # rounding makes ties
    return np.vstack(rows)


def test_layer_split_equals_brute_force_on_small_cases():
    rng = random.Random(7)
    checked = 0
    for _ in range(400):
        L = rng.randint(1, 10)
        P = rng.randint(1, L)
        times = _random_rows(rng, P, L)
        fast = split_layers(times)
        slow = brute_force_split(times)
        if slow is None:
            assert fast is None
            continue
        checked += 1
        assert fast is not None
        assert sum(fast.counts) == L and len(fast.counts) == P and min(fast.counts) >= 1
        assert fast.bottleneck == pytest.approx(slow.bottleneck)
        assert fast.total == pytest.approx(slow.total)
        stage = [times[i, n - 1] for i, n in enumerate(fast.counts)]
        assert max(stage) == pytest.approx(fast.bottleneck)
    assert checked > 200


def test_layer_split_gives_faster_stages_more_layers():
    L = 12
    n = np.arange(1, L + 1)
    times = np.vstack([1.0 * n, 3.0 * n])   # stage 0 is three times faster
    split = split_layers(times)
    assert split.counts == (9, 3)
    assert split.ranges() == [(0, 9), (9, 12)]


def test_layer_split_infeasible_when_memory_forbids():
    times = np.array([[1.0, np.inf, np.inf], [1.0, np.inf, np.inf]])
    assert split_layers(times) is None
    assert split_layers(np.ones((4, 3))) is None   # more stages than layers


# ----------------------------------------------------------------------------- cost model

def test_flops_match_megatron_formula():
    # With MHA and ffn = 8h/3 the SwiGLU MLP has GPT's 8h^2 weights, so Megatron's
    # 72*b*s*L*h^2*(1 + s/(6h) + V/(12hL)) (fwd + bwd, no recompute) must hold exactly.
    h, s, L, V = 3072, 2048, 24, 51200
    m = ModelSpec(L, h, 24, 24, 8 * h // 3, V, s)
    expected = 72 * s * L * h * h * (1 + s / (6 * h) + V / (12 * h * L))
    assert model_flops_per_sample(m) == pytest.approx(expected, rel=1e-12)
    assert layer_forward_flops(m, 2) == pytest.approx(2 * (24 * s * h * h + 4 * s * s * h))


def test_gqa_reduces_flops_and_memory():
    mha = ModelSpec(4, 1024, 16, 16, 2816, 1000, 512)
    gqa = ModelSpec(4, 1024, 16, 4, 2816, 1000, 512)
    assert layer_forward_flops(gqa, 1) < layer_forward_flops(mha, 1)
    assert activation_bytes(gqa, 1, 1, "bf16", "none") < activation_bytes(mha, 1, 1, "bf16", "none")


def test_activation_memory_ordering_and_s2_term():
    m = LLAMA_7B
    for t in (1, 2, 4):
        none, sel, full = (activation_bytes(m, t, 1, "bf16", mode) for mode in ("none", "selective", "full"))
        assert full < sel < none
        # selective drops exactly the softmax output: (e + 4) * b * a/t * s^2
        assert none - sel == pytest.approx((2 + 4) * (m.heads / t) * m.seq_len ** 2)


def test_one_f_one_b_step_formula():
    assert pipeline_step_s([1.0, 2.0, 1.5], [], 8, 0.0) == pytest.approx(7 * 2.0 + 4.5)
    # a link slower than every stage throttles the steady state
    assert pipeline_step_s([1.0, 1.0], [3.0], 4, 0.5) == pytest.approx(3 * 3.0 + 2.0 + 6.0 + 0.5)


def test_stage_memory_grows_with_in_flight_micro_batches_and_zero1_shrinks_it():
    cm = CostModel(GPU_32, LLAMA_7B, TrainSpec(64, 1, "bf16"))
    one = cm.stage_memory(2, 1, 4, 8, first=False, last=False, inflight=1, mode="selective")
    four = cm.stage_memory(2, 1, 4, 8, first=False, last=False, inflight=4, mode="selective")
    assert four > one
    no_zero = CostModel(GPU_32, LLAMA_7B, TrainSpec(64, 1, "bf16", zero1=False))
    assert no_zero.stage_memory(2, 1, 4, 8, first=False, last=False, inflight=1, mode="selective") > one


def test_tp_choices_divide_heads_and_stay_in_a_node():
    island = IslandSpec("x", A800, (8, 8))
    assert tp_choices(LLAMA_70B, island) == [1, 2, 4, 8]
    assert tp_choices(ModelSpec(4, 1536, 12, 3, 4096, 100, 64), island) == [1]      # kv_heads 3
    assert tp_choices(LLAMA_7B, IslandSpec("y", A800, (4, 6))) == [1, 2]           # gcd(4, 6) = 2


# ----------------------------------------------------------------------------- plans

CASES = [
    (EMU_MIXED, LLAMA_TINY, TRAIN_TINY),
    (EMU_3, LLAMA_TINY, TRAIN_TINY),
    (GPU_16, LLAMA_12, TrainSpec(32, 1, "bf16", max_micro_batch=4)),
    (GPU_32, LLAMA_7B, TrainSpec(256, 1, "bf16")),
    (GPU_32, LLAMA_70B, TrainSpec(128, 1, "bf16")),
]


def _check_plan(plan: Plan, fleet: FleetSpec, model: ModelSpec, train: TrainSpec):
    assert plan.problems(fleet) == []
    islands = {i.name: i for i in fleet.islands}
    # each chip at most once
    chips = [(r.island, r.local_rank) for r in plan.ranks]
    assert len(chips) == len(set(chips))
    # half-layer blocks cover the model exactly once, per pipeline (in order: problems() checks the
    # chunk tiling); a stage boundary may sit inside a layer
    for p in plan.pipelines:
        spans = [(plan.stages[i].blocks,) if plan.stages[i].blocks else
                 tuple((2 * lo, 2 * hi) for lo, hi in plan.stages[i].layer_ranges) for i in p.stages]
        covered = sorted(block for ranges in spans for lo, hi in ranges for block in range(lo, hi))
        assert covered == list(range(2 * model.layers))
    assert sum(p.samples for p in plan.pipelines) == train.global_batch
    cm = CostModel(fleet, model, train)
    for s in plan.stages:
        # TP within an island, inside a node, dividing heads and kv_heads
        assert model.heads % s.tp == 0 and model.kv_heads % s.tp == 0
        assert islands[s.island].tp_limit % s.tp == 0
        # memory within limits, recomputed independently of the search
        pipe = plan.pipelines[s.pipeline]
        pos = pipe.stages.index(s.index)
        P = len(pipe.stages)
        mem = cm.stage_memory(s.tp, plan.micro_batch, s.dp, s.num_layers, first=pos == 0, last=pos == P - 1,
                              inflight=min(P - pos, pipe.num_micro_batches if plan.kind == "pipeline"
                                           else train.global_batch), mode=s.recompute)
        assert mem <= islands[s.island].chip.usable_bytes
        assert s.memory_gb * 1e9 <= islands[s.island].chip.usable_bytes
    for r in plan.ranks:
        assert 0 <= r.local_rank < islands[r.island].size
    tp_nodes = {}
    for r in plan.ranks:
        tp_nodes.setdefault((r.stage, r.dp_rank), set()).add(r.node)
    assert all(len(n) == 1 for n in tp_nodes.values())


@pytest.mark.parametrize("fleet,model,train", CASES, ids=[f"{c[0].name}-{c[1].name}" for c in CASES])
def test_every_plan_is_valid(fleet, model, train):
    result = search(fleet, model, train, top=3)
    assert result.plans
    for plan in result.plans + ([result.baseline_plan] if result.baseline_plan else []):
        _check_plan(plan, fleet, model, train)
    steps = [p.predicted_step_s for p in result.plans]
    assert steps == sorted(steps)
    if result.baseline_plan:
        assert result.best.predicted_step_s <= result.baseline_plan.predicted_step_s * (1 + 1e-9)


@pytest.mark.parametrize("fleet,model,train", CASES[:3], ids=["emu-mixed", "emu-3", "gpu-16"])
def test_search_matches_brute_force_on_small_fleets(fleet, model, train):
    result = search(fleet, model, train)
    bf = brute_force(fleet, model, train)
    assert bf is not None
    assert result.best.predicted_step_s <= bf.step * 1.01
    assert result.best.predicted_step_s >= bf.step * (1 - 1e-9)   # brute force is a true optimum


def test_fast_island_gets_more_layers_on_emulated_mixed():
    plan = search(EMU_MIXED, LLAMA_TINY, TRAIN_TINY).best
    assert plan.kind == "pipeline"
    layers = {}
    chips = {}
    for s in plan.stages:
        layers[s.island] = layers.get(s.island, 0) + s.num_layers
        chips[s.island] = chips.get(s.island, 0) + s.chips
    assert layers["fast"] / chips["fast"] > layers["slow"] / chips["slow"]
    # the model does not fit one chip, so it is split
    assert len(plan.stages) >= 2 or plan.stages[0].tp >= 2


def test_plan_json_round_trip_and_stable_format():
    plan = search(EMU_3, LLAMA_TINY, TrainSpec(8, 2, "fp32", max_virtual_stages=1)).best
    data = json.loads(plan.to_json())
    assert data["format"] == "hetero-plan" and data["version"] == 1
    for key in ("stages", "pipelines", "ranks", "micro_batch", "num_micro_batches", "recompute",
                "predicted_step_s", "tokens_per_s", "mfu", "memory_gb", "measured"):
        assert key in data
    for s in data["stages"]:
        assert {"island", "chip", "tp", "dp", "layers"} <= set(s) and len(s["layers"]) == 2
    again = Plan.from_dict(data)
    assert again == plan
    assert again.problems(EMU_3) == []


def test_plan_validation_catches_broken_plans():
    plan = search(GPU_16, LLAMA_12, TrainSpec(32, 1, "bf16", max_micro_batch=4)).best
    data = plan.to_dict()
    broken = json.loads(json.dumps(data))
    broken["ranks"][1]["local_rank"] = broken["ranks"][0]["local_rank"]
    broken["ranks"][1]["island"] = broken["ranks"][0]["island"]
    assert any("used by ranks" in p for p in Plan.from_dict(broken).problems())
    gap = json.loads(json.dumps(data))
    gap["stages"][-1]["layers"][1] -= 1
    assert any("layers" in p for p in Plan.from_dict(gap).problems())
    bad_tp = json.loads(json.dumps(data))
    bad_tp["heads"] = 3
    assert any("must divide heads" in p for p in Plan.from_dict(bad_tp).problems())
    with pytest.raises(PlanError):
        Plan.from_dict(broken).validate()
    with pytest.raises(PlanError):
        Plan.from_dict({"format": "something-else"})


# ----------------------------------------------------------------------------- infeasible inputs

def test_model_that_fits_nowhere():
    fleet = FleetSpec("small", (IslandSpec("a", chip("c", 1, 0.01), (2,)),), 1e9, 1e9, 1e-5)
    with pytest.raises(InfeasibleError, match="fits nowhere.*chips with more memory"):
        search(fleet, LLAMA_7B, TrainSpec(8, 1, "bf16"))


def test_fewer_chips_than_needed():
    fleet = FleetSpec("two", (IslandSpec("a", A800, (2,)),), 25e9, 12.5e9, 1e-5)
    with pytest.raises(InfeasibleError, match="no plan fits.*add chips"):
        search(fleet, LLAMA_70B, TrainSpec(64, 1, "bf16"))


def test_heads_not_divisible():
    with pytest.raises(InfeasibleError, match="kv_heads"):
        search(EMU_MIXED, ModelSpec(8, 256, 8, 3, 704, 2048, 128), TRAIN_TINY)


# ----------------------------------------------------------------------------- profile DB

def _profile_for(fleet, model, train, chips, scale):
    db = ProfileDB(model={k: getattr(model, k) for k in ("hidden", "heads", "kv_heads", "ffn_hidden", "seq_len")},
                   dtype=train.dtype)
    cm = CostModel(fleet, model, train)
    for island in fleet.islands:
        if island.chip.name not in chips:
            continue
        for t in tp_choices(model, island):
            for b in train.micro_batch_choices():
                lc = cm.layer_cost(island.name, t, b)
                db.add_layer(island.chip.name, t, b, lc.forward_s * scale, lc.backward_s * scale)
    return db


def test_measured_profile_changes_plan_and_is_reported(tmp_path):
    db = _profile_for(EMU_MIXED, LLAMA_TINY, TRAIN_TINY, {"emu-fast", "emu-slow"}, 2.0)
    db.bridge = (0.5e9, 1e-4)
    path = tmp_path / "profile.json"
    db.save(str(path))
    loaded = ProfileDB.load(str(path))
    assert loaded.layers == db.layers and loaded.bridge == pytest.approx(db.bridge)
    est = search(EMU_MIXED, LLAMA_TINY, TRAIN_TINY).best
    meas = search(EMU_MIXED, LLAMA_TINY, TRAIN_TINY, profile=loaded).best
    assert meas.measured and not est.measured
    assert meas.provenance["bridge"] == "measured"
    assert set(meas.provenance["layer_time"].values()) == {"measured"}
    # twice the layer time: about twice the step
    assert 1.6 < meas.predicted_step_s / est.predicted_step_s < 2.2


def test_partial_profile_calibrates_other_entries():
    db = ProfileDB(model={k: getattr(LLAMA_TINY, k) for k in ("hidden", "heads", "kv_heads", "ffn_hidden", "seq_len")})
    cm = CostModel(EMU_MIXED, LLAMA_TINY, TRAIN_TINY)
    lc = cm.layer_cost("fast", 1, 2)
    db.add_layer("emu-fast", 1, 2, 3 * lc.forward_s, 3 * lc.backward_s)
    db.chips["emu-fast"] = FAST
    cm2 = CostModel(EMU_MIXED, LLAMA_TINY, TRAIN_TINY, db)
    assert cm2.layer_cost("fast", 1, 2).source == "measured"
    other = cm2.layer_cost("fast", 2, 1)
    assert other.source == "calibrated"
    assert other.forward_s == pytest.approx(3 * cm.layer_cost("fast", 2, 1).forward_s)
    assert cm2.layer_cost("slow", 1, 2).source == "estimated"
    plan = search(EMU_MIXED, LLAMA_TINY, TRAIN_TINY, profile=db).best
    assert not plan.measured


def test_a_tp_degree_is_calibrated_from_its_own_measurements_where_there_are_any():
    """A TP degree costs more than its share of FLOPs (collectives, smaller kernels): a layer at TP 2 and
    an unmeasured micro-batch takes TP 2's measured scale, not the median over every TP degree."""
    db = ProfileDB(model={k: getattr(LLAMA_TINY, k) for k in ("hidden", "heads", "kv_heads", "ffn_hidden", "seq_len")})
    cm = CostModel(EMU_MIXED, LLAMA_TINY, TRAIN_TINY)
    for tp, b, scale in ((1, 1, 1.0), (1, 2, 1.0), (2, 2, 1.5)):
        lc = cm.layer_cost("fast", tp, b)
        db.add_layer("emu-fast", tp, b, scale * lc.forward_s, scale * lc.backward_s)
    db.chips["emu-fast"] = FAST
    cm2 = CostModel(EMU_MIXED, LLAMA_TINY, TRAIN_TINY, db)
    assert cm2.layer_cost("fast", 2, 1).forward_s == pytest.approx(1.5 * cm.layer_cost("fast", 2, 1).forward_s)
    assert cm2.layer_cost("fast", 1, 4).forward_s == pytest.approx(cm.layer_cost("fast", 1, 4).forward_s)
    # a degree nobody measured: the median over all of them (1.0 of 1.0, 1.0, 1.5)
    assert cm2.layer_cost("fast", 4, 1).forward_s == pytest.approx(cm.layer_cost("fast", 4, 1).forward_s)


def test_profile_for_another_model_is_ignored():
    db = _profile_for(EMU_MIXED, LLAMA_TINY, TRAIN_TINY, {"emu-fast", "emu-slow"}, 5.0)
    other = ModelSpec(8, 512, 8, 4, 1408, 2048, 128)
    cm = CostModel(EMU_MIXED, other, TRAIN_TINY, db)
    assert cm.layer_cost("fast", 1, 2).source == "estimated"


@pytest.mark.parametrize("content,match", [
    ("{", "not valid JSON"),
    ('{"format": "x"}', "not a hetero profile"),
    ('{"format": "hetero-profile", "version": 1, "model": {}, "layers": []}', "model"),
    ('{"format": "hetero-profile", "version": 1, "model": {"hidden": 1, "heads": 1, "kv_heads": 1, '
     '"ffn_hidden": 1, "seq_len": 1}, "layers": [{"chip": "a", "tp": 1, "micro_batch": 1, "forward_s": -1, '
     '"backward_s": 1}]}', r"layers\[0\].forward_s"),
])
def test_bad_profile_files(tmp_path, content, match):
    path = tmp_path / "p.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=match):
        ProfileDB.load(str(path))


# ----------------------------------------------------------------------------- purity

def test_partitioner_imports_nothing_it_must_not():
    forbidden = {"hetero", "accelerators", "comm_bridge", "torch"}
    folder = os.path.join(ROOT, "partitioner")
    for name in os.listdir(folder):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name), encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] not in forbidden, f"partitioner/{name} imports {mod}"


def test_bridge_hops_and_the_hetero_dp_sum_pay_the_host_link_staging():
    """The bridge is CPU-mediated: a hop copies device -> host on the sender's link and host ->
    device on the receiver's; the hetero-DP sum stages each rank's shard both ways, overlapped
    with the bridge ring (the slower of the two counts)."""
    import dataclasses

    model = ModelSpec(2, 64, 4, 4, 128, 256, 32, name="m")
    fast = dataclasses.replace(FAST, host_link_bandwidth=1e9)
    slow = dataclasses.replace(SLOW, host_link_bandwidth=0.25e9)
    a, b = IslandSpec("a", fast, (1,)), IslandSpec("b", slow, (1,))
    costs = CostModel(FleetSpec("f", (a, b), bridge_bandwidth=4e9, bridge_latency=0.0), model, TrainSpec(8))
    nbytes = 2 * model.seq_len * model.hidden * 4
    assert costs.p2p_s(a, 0, b, 0, 1, 1, 2) == pytest.approx(nbytes / 4e9 + nbytes / 1e9 + nbytes / 0.25e9)
    grads = total_params(model) * 4
    ring, staging = grads / 4e9, 2 * grads / 0.25e9    # two islands: the ring moves 2(K-1)/K = 1 x
    assert costs.cross_island_reduce_s([a, b], 1) == pytest.approx(max(ring, staging))
    quick = dataclasses.replace(slow, host_link_bandwidth=64e9)
    costs = CostModel(FleetSpec("f", (a, IslandSpec("b", quick, (1,))), bridge_bandwidth=4e9, bridge_latency=0.0),
                      model, TrainSpec(8))
    assert costs.cross_island_reduce_s([a, IslandSpec("b", quick, (1,))], 1) == pytest.approx(max(ring, 2 * grads / 1e9))


def test_the_hetero_dp_sum_pays_the_buckets_device_work_at_memory_bandwidth():
    """Islands of one size sum by ownership: each rank touches 10/n of the model. Otherwise every rank
    zeroes each full-model bucket, copies its share in and out and (islands of several ranks)
    receives the island's total. On a chip of slow memory that, not the bridge, is the tail."""
    import dataclasses

    model = ModelSpec(2, 64, 4, 4, 128, 256, 32, name="m")
    sluggish = dataclasses.replace(SLOW, memory_bandwidth=1e6, host_link_bandwidth=1e9)
    a, b = IslandSpec("a", FAST, (2,)), IslandSpec("b", sluggish, (2,))
    costs = CostModel(FleetSpec("f", (a, b), bridge_bandwidth=4e9, bridge_latency=0.0), model, TrainSpec(8))
    grads = total_params(model) * 4
    per_byte = 1 / (1e6 * sluggish.bw_eff)
    assert costs.bucket_device_s(b, 2, owned=False) == pytest.approx((2 * grads + 4 * grads / 2) * per_byte)
    assert costs.bucket_device_s(b, 1, owned=False) == pytest.approx(5 * grads * per_byte)   # no island total
    assert costs.bucket_device_s(b, 4) == pytest.approx(10 * grads / 4 * per_byte)
    assert costs.cross_island_reduce_s([a, b], 1, [(a, 2), (b, 2)]) == pytest.approx(costs.bucket_device_s(b, 2))
    assert costs.cross_island_reduce_s([a, b], 1, [(a, 3), (b, 1)]) == pytest.approx(costs.bucket_device_s(b, 1, owned=False))
    # without the ranks' counts (or on fast memory) the bridge and staging decide, as before
    assert costs.cross_island_reduce_s([a, b], 1) < costs.bucket_device_s(b, 2) / 100


# ----------------------------------------------------------------------------- memory phases (the engine's layout)

def test_memory_phases_per_layout_as_the_engine_allocates():
    from partitioner.costs import optimizer_phases
    P = 1000.0
    # fp32 per parameter: 4 weight + 4 grad + 8 moments, the reference AdamW's temporaries on one tensor
    assert optimizer_phases(P, 4, 1, 0.0, 0.0, 1, True, 100, 8) == 16 * P + 8 * 100
    # fp32 ZeRO-1 over 2: 4 + 4 flat grad + 8/2; the update adds a 4/2 weight shard and the gathered 4
    # (twice on a staging backend)
    assert optimizer_phases(P, 4, 2, 0.0, 0.0, 1, True, 100, 0) == (4 + 4 + 4 + 2 + 4) * P
    assert optimizer_phases(P, 4, 2, 0.0, 0.0, 1, True, 100, 0, staged_gather=True) == (4 + 4 + 4 + 2 + 8) * P
    # bf16 without ZeRO-1: 2 weight + 12 master and moments + 4 flat fp32 grad, + 8 AdamW temporaries
    assert optimizer_phases(P, 2, 1, 0.0, 0.0, 1, True, 100, 8) == (2 + 12 + 4 + 8) * P
    # ... and at collection the bf16 grads and their fp32 copy coexist: 2 + 12 + 2 + 4 without temporaries
    assert optimizer_phases(P, 2, 1, 0.0, 0.0, 1, True, 100, 0) == (2 + 12 + 2 + 4) * P
    # bf16 ZeRO-1 over 2: 2 + 6 + 4 flat; the update's 2/2 shard cast and the gathered 2; on a staging
    # backend the reduce-scatter's 4/2 shard and a copy of its 4 input weigh more
    assert optimizer_phases(P, 2, 2, 0.0, 0.0, 1, True, 100, 0) == (2 + 6 + 4 + 1 + 2) * P
    assert optimizer_phases(P, 2, 2, 0.0, 0.0, 1, True, 100, 0, staged_gather=True) == (2 + 6 + 4 + 2 + 4) * P


def test_gradients_and_every_in_flight_micro_batch_coexist_only_in_the_steady_state():
    from partitioner.costs import optimizer_phases
    P, act, work = 1000.0, 10_000.0, 500.0
    steady = optimizer_phases(P, 4, 1, act, work, 2, True, 0, 0)
    assert steady == 12 * P + 4 * P + 2 * act + work
    # m == in-flight: the first backward starts with no gradients, the second with one micro-batch left
    assert optimizer_phases(P, 4, 1, act, work, 2, False, 0, 0) == 12 * P + max(2 * act, 4 * P + act) + work
    # fp32 ZeRO-1's flat gradient vector exists before forward: no difference
    assert (optimizer_phases(P, 4, 2, act, work, 2, False, 0, 0)
            == optimizer_phases(P, 4, 2, act, work, 2, True, 0, 0) == 8 * P + 4 * P + 2 * act + work)


def test_stage_memory_on_reference_ops_chips_uses_their_activations_and_the_loss_or_the_work():
    from partitioner.costs import backward_work_bytes, loss_bytes, reference_activation_bytes
    cm = CostModel(EMU_MIXED, LLAMA_TINY, TrainSpec(8, 2, "fp32"))
    m = LLAMA_TINY
    n, b = 3, 2
    mem = cm.stage_memory(1, b, 1, n, first=False, last=False, inflight=1, mode="none", island="fast", micro_batches=4)
    params = n * cm.layer_params
    assert mem == pytest.approx(16 * params + n * reference_activation_bytes(m, 1, b, "fp32", "none")
                                + backward_work_bytes(m, 1, b, "fp32", "none"))
    # the last stage: the loss and a layer's backward are never live together
    last = cm.stage_memory(1, b, 1, n, first=False, last=True, inflight=1, mode="full", island="fast", micro_batches=4)
    params += cm.last_static_params(1)
    act = n * reference_activation_bytes(m, 1, b, "fp32", "full")
    work = max(backward_work_bytes(m, 1, b, "fp32", "full", fused=False), loss_bytes(m, 1, b, "fp32"))
    assert last == pytest.approx(max(16 * params + act + work, 16 * params + 8 * m.vocab * m.hidden))
    # vendor chips (fused kernels) keep Korthikanti's activations: fewer than the reference ops'
    assert activation_bytes(m, 1, b, "bf16", "none") < reference_activation_bytes(m, 1, b, "bf16", "none")
