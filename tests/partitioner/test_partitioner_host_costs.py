"""Host costs in the cost model (issue #19 item 2): a profile's per-chip fixed host seconds change
a stage's time, a bridge stage's hand-off and the step's tail by exactly what it states; the
profile JSON carries them and an older file without them still loads (0 s each)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from partitioner.costs import CostModel
from partitioner.profile import HOST_FIELDS, NO_HOST_COST, HostCost, ProfileDB, ProfileError
from partitioner.search import Slot, evaluate_pipeline, search
from tests.partitioner.test_partitioner import EMU_MIXED, LLAMA_TINY, TRAIN_TINY

SHAPE = {k: getattr(LLAMA_TINY, k) for k in ("hidden", "heads", "kv_heads", "ffn_hidden", "seq_len")}
FAST_HOST = HostCost(launch_s=0.004, sync_s=0.001, handoff_s=0.0007, optimizer_step_s=0.02)
SLOW_HOST = HostCost(launch_s=0.006, sync_s=0.002, handoff_s=0.0009, optimizer_step_s=0.03)


def _with_host() -> ProfileDB:
    db = ProfileDB(model=dict(SHAPE))
    db.add_host_cost("emu-fast", FAST_HOST, "emulated", 2)
    db.add_host_cost("emu-slow", SLOW_HOST, "emulated", 2)
    return db


def _two_stage(cm):
    fast, slow = EMU_MIXED.islands
    return evaluate_pipeline(cm, [Slot(fast, 1, 0), Slot(slow, 1, 0)], 1, 2, 4, counts=(5, 3))


def test_a_stage_pays_launch_and_sync_per_micro_batch_exactly():
    bare, hosted = CostModel(EMU_MIXED, LLAMA_TINY, TRAIN_TINY), CostModel(EMU_MIXED, LLAMA_TINY, TRAIN_TINY, _with_host())
    for island, cost in (("fast", FAST_HOST), ("slow", SLOW_HOST)):
        for first, last in ((True, False), (False, False), (False, True)):
            before = bare.stage_row(island, 1, 2, 1, first=first, last=last, inflight=1)[0]
            after = hosted.stage_row(island, 1, 2, 1, first=first, last=last, inflight=1)[0]
            fits = np.isfinite(before)
            assert fits.any() and (np.isfinite(after) == fits).all()      # host time costs no memory
            assert after[fits] - before[fits] == pytest.approx([cost.launch_s + cost.sync_s] * int(fits.sum()), abs=1e-12)


def test_a_bridge_stage_pays_its_hand_off_and_every_tail_the_optimizer_step():
    whole = dataclasses.replace(TRAIN_TINY, half_layers=False)      # the 5 / 3 split as given
    bare = _two_stage(CostModel(EMU_MIXED, LLAMA_TINY, whole))
    hosted = _two_stage(CostModel(EMU_MIXED, LLAMA_TINY, whole, _with_host()))
    for cost, t0, t1 in zip((FAST_HOST, SLOW_HOST), bare.stage_times, hosted.stage_times):
        assert t1 - t0 == pytest.approx(cost.launch_s + cost.sync_s + cost.handoff_s, abs=1e-12)
    assert hosted.boundary == bare.boundary               # the link model's part is unchanged
    cm = CostModel(EMU_MIXED, LLAMA_TINY, TRAIN_TINY)
    params = [cm.stage_params(1, 5, first=True, last=False), cm.stage_params(1, 3, first=False, last=True)]
    tails = [cm.optimizer_s(island, 1, p) + cost.optimizer_step_s
             for island, p, cost in zip(EMU_MIXED.islands, params, (FAST_HOST, SLOW_HOST))]
    assert hosted.tail == pytest.approx(max(tails)) and hosted.tail > bare.tail
    # the step: m=4 micro-batches through 1F1B, so (m - 1) cycles plus the fill, plus the tail
    expected = (3 * max(hosted.stage_times) + sum(hosted.stage_times) + 2 * sum(hosted.boundary) + hosted.tail)
    assert hosted.step() == pytest.approx(expected)
    assert hosted.step() > bare.step()


def test_the_plan_search_includes_host_costs():
    bare = search(EMU_MIXED, LLAMA_TINY, TRAIN_TINY).best
    hosted = search(EMU_MIXED, LLAMA_TINY, TRAIN_TINY, profile=_with_host()).best
    m = TRAIN_TINY.global_batch // TRAIN_TINY.micro_batch_choices()[0]
    # every micro-batch pays at least the cheaper chip's launch and sync once
    assert set(hosted.provenance["host_costs"].values()) == {"measured"}
    assert set(bare.provenance["host_costs"].values()) == {"none"}
    assert hosted.predicted_step_s >= bare.predicted_step_s + (FAST_HOST.launch_s + FAST_HOST.sync_s) * min(m, 4) - 1e-9


def test_host_costs_round_trip_through_json(tmp_path):
    db = _with_host()
    path = tmp_path / "profile.json"
    db.save(str(path))
    data = json.loads(path.read_text())
    assert {e["chip"]: {k: e[k] for k in HOST_FIELDS} for e in data["host_costs"]} == {
        "emu-fast": {k: getattr(FAST_HOST, k) for k in HOST_FIELDS},
        "emu-slow": {k: getattr(SLOW_HOST, k) for k in HOST_FIELDS}}
    assert all(e["accelerator"] == "emulated" and e["micro_batch"] == 2 for e in data["host_costs"])
    loaded = ProfileDB.load(str(path))
    assert loaded.host_costs == db.host_costs and loaded.to_dict() == db.to_dict()


def test_a_profile_without_host_costs_loads_with_zero_host_costs(tmp_path):
    db = ProfileDB(model=dict(SHAPE))
    path = tmp_path / "old.json"
    db.save(str(path))
    assert "host_costs" not in json.loads(path.read_text())
    loaded = ProfileDB.load(str(path))
    assert loaded.host_cost("emu-fast") == NO_HOST_COST == HostCost(0.0, 0.0, 0.0, 0.0)
    partial = dict(json.loads(path.read_text()), host_costs=[{"chip": "emu-fast", "sync_s": 0.001}])
    assert ProfileDB.from_dict(partial).host_cost("emu-fast") == HostCost(sync_s=0.001)
    cm = CostModel(EMU_MIXED, LLAMA_TINY, TRAIN_TINY, loaded)
    assert cm.stage_host_s("fast") == cm.handoff_s("slow") == 0.0


@pytest.mark.parametrize("bad, message", [
    ({"host_costs": {"chip": "emu-fast"}}, "host_costs: expected a list"),
    ({"host_costs": [{"launch_s": 0.1}]}, r"host_costs\[0\]: expected an object with a 'chip' name"),
    ({"host_costs": [{"chip": "x", "launch_s": -1}]}, r"host_costs\[0\].launch_s: expected a number of seconds >= 0"),
    ({"host_costs": [{"chip": "x", "handoff_s": "fast"}]}, r"host_costs\[0\].handoff_s"),
])
def test_bad_host_costs_are_refused_by_name(bad, message):
    data = dict(ProfileDB(model=dict(SHAPE)).to_dict(), **bad)
    with pytest.raises(ProfileError, match=message):
        ProfileDB.from_dict(data, source="p.json")


def test_scaled_host_costs_are_in_the_slower_clock():
    assert FAST_HOST.scaled(2.0) == HostCost(0.002, 0.0005, 0.00035, 0.01)
    assert FAST_HOST.micro_batch_s == pytest.approx(0.005)


def test_the_update_is_one_pass_where_the_chip_fuses_adamw_and_eight_where_it_runs_the_reference():
    """Kunlun runs the reference AdamW (accelerators/ops: no fused kernel there): 92 bytes a
    parameter against the fused kernel's 28, and the reference's temporaries in the memory peak."""
    import dataclasses

    fused = EMU_MIXED.islands[0]
    reference = dataclasses.replace(fused, name="kunlun", chip=dataclasses.replace(fused.chip, accelerator="kunlun"))
    fleet = dataclasses.replace(EMU_MIXED, islands=(fused, reference))
    cm = CostModel(fleet, LLAMA_TINY, TRAIN_TINY)
    assert fused.chip.fused_adamw and not reference.chip.fused_adamw
    assert cm.optimizer_s(reference, 1, 1e6) / cm.optimizer_s(fused, 1, 1e6) == pytest.approx(92 / 28)
    # nothing in flight, full recompute: the update's phase sets the peak, temporaries included
    peaks = [cm.stage_memory(1, 1, 1, 8, True, True, 0, "full", island=i.name) for i in (fused, reference)]
    assert peaks[1] > peaks[0]
