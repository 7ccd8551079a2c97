"""The plan search's fast paths give the numbers of the slow ones exactly (issue #20: the search at
8,192 chips within seconds, the same plans): the layer split's bottleneck by selection and its
min-sum DP on the columns within the bottleneck, memory looked up in the stage rows or costed for
many stages at once, memoised hops, replica options pruned by their bounds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from partitioner.bounds import Bounds
from partitioner.costs import CostModel
from partitioner.inputs import RECOMPUTE_MODES, FleetSpec, IslandSpec, SearchLimits, TrainSpec
from partitioner.layer_split import _min_bottleneck_search, brute_force_split, min_bottleneck, min_sum_split
from partitioner.replicas import envelope, replica_options
from tests.partitioner.test_partitioner import A800, ASCEND, EMU_MIXED, LLAMA_7B, LLAMA_TINY, TRAIN_TINY


def _rows(rng, P: int, L: int, ties: bool = True) -> np.ndarray:
    """Nondecreasing rows (layer-split inputs), inf beyond a random memory limit on some stages;
    quantised steps so that many splits tie."""
    steps = rng.choice([0.25, 0.5, 1.0], size=(P, L)) if ties else rng.random((P, L))
    times = np.cumsum(steps, axis=1) + rng.choice([0.0, 0.5, 1.5], size=(P, 1))
    for i in range(P):
        if rng.random() < 0.5:
            times[i, int(rng.integers(1, L + 1)):] = np.inf
    return times


def _min_sum_reference(times: np.ndarray, cap: float):
    """The min-sum DP over every (layers so far, layers of this stage), first minimum kept."""
    P, L = times.shape
    ok = np.logical_and.accumulate(times <= cap, axis=1)
    cost = np.where(ok, times, np.inf)
    best = np.full(L + 1, np.inf)
    best[0] = 0.0
    choices = []
    for i in range(P):
        cand = np.full((L + 1, L), np.inf)
        for k, n in itertools.product(range(L + 1), range(1, L + 1)):
            if k - n >= 0:
                cand[k, n - 1] = best[k - n] + cost[i, n - 1]
        arg = np.argmin(cand, axis=1)
        best = cand[np.arange(L + 1), arg]
        choices.append(arg)
    if not np.isfinite(best[L]):
        return None
    counts, k = [], L
    for i in range(P - 1, -1, -1):
        counts.append(int(choices[i][k]) + 1)
        k -= counts[-1]
    return tuple(reversed(counts))


def test_bottleneck_by_selection_equals_the_binary_search():
    rng = np.random.default_rng(7)
    for _ in range(400):
        P = int(rng.integers(1, 8))
        times = _rows(rng, P, int(rng.integers(P, 24)), ties=bool(rng.random() < 0.5))
        assert min_bottleneck(times) == _min_bottleneck_search(times)
    # rows that break the contract take the search (a stage holds its leading run within the
    # bound): counting entries would say 1 here
    times = np.array([[1.0, 5.0, 1.0], [1.0, 9.0, 9.0]])
    assert min_bottleneck(times) == _min_bottleneck_search(times) == 5.0


def test_min_sum_split_equals_the_full_dynamic_program_ties_included():
    rng = np.random.default_rng(11)
    checked = 0
    for _ in range(300):
        P = int(rng.integers(1, 7))
        times = _rows(rng, P, int(rng.integers(P, 16)))
        cap = min_bottleneck(times)
        if cap is None:
            assert brute_force_split(times) is None
            continue
        got = min_sum_split(times, cap)
        assert got is not None and got.counts == _min_sum_reference(times, cap)
        brute = brute_force_split(times)
        assert brute is not None and (got.bottleneck, got.total) == (brute.bottleneck, brute.total)
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("fleet, model, train", [
    (EMU_MIXED, LLAMA_TINY, TRAIN_TINY),
    (FleetSpec("two", (IslandSpec("a800", A800, (8, 8)), IslandSpec("ascend", ASCEND, (8, 8))), 25e9, 12.5e9, 30e-6),
     LLAMA_7B, TrainSpec(256, 1, "bf16")),
    (FleetSpec("two", (IslandSpec("a800", A800, (8, 8)), IslandSpec("ascend", ASCEND, (8, 8))), 25e9, 12.5e9, 30e-6),
     LLAMA_7B, TrainSpec(256, 1, "fp32", zero1=True)),
])
def test_memory_lookups_equal_stage_memory_exactly(fleet, model, train):
    """Every memory the search reads (the stage rows' memory, steady_memories, stage_memory_many)
    is stage_memory's number for that stage, bit for bit, on vendor and reference-op chips."""
    cm = CostModel(fleet, model, train)
    L = model.layers
    modes = [m for m in RECOMPUTE_MODES if m in train.recompute_modes]
    for island in fleet.islands:
        name = island.name
        for t, dp, first, last, k in itertools.product((1, 2), (1, 4), (False, True), (False, True), (1, 3, 2.25)):
            stages = [(name, t, first, last, k, mode, n) for mode in modes for n in (1, L // 2, L)]
            want = [cm.stage_memory(t, 1, dp, n, first=first, last=last, inflight=k, mode=mode, island=name)
                    for _, _, _, _, _, mode, n in stages]
            # before any row is costed: vectorised per island; after: looked up in the rows
            assert cm.steady_memories(1, dp, stages) == want
            assert cm.stage_memory_many(t, 1, dp, name, [s[6] for s in stages], [first] * len(stages),
                                        [last] * len(stages), [k] * len(stages), [s[5] for s in stages]) == want
            cm.stage_rows(name, t, 1, dp, first=first, last=last, inflights=[k])
            assert cm.steady_memories(1, dp, stages) == want
            row, pick = cm.stage_row(name, t, 1, dp, first=first, last=last, inflight=k)
            for n in (1, L):
                if pick[n - 1] >= 0:
                    mode = RECOMPUTE_MODES[int(pick[n - 1])]
                    assert cm.stage_memory(t, 1, dp, n, first=first, last=last, inflight=k, mode=mode,
                                           island=name) <= cm.capacity(name)
                    assert np.isfinite(row[n - 1])


def test_memoised_hops_and_tails_are_the_costed_ones():
    fleet = FleetSpec("two", (IslandSpec("a800", A800, (8, 8)), IslandSpec("ascend", ASCEND, (8, 8))),
                      25e9, 12.5e9, 30e-6)
    cm = CostModel(fleet, LLAMA_7B, TrainSpec(256, 1, "bf16"))
    a, z = fleet.islands
    for src, s_off, dst, d_off in ((a, 0, a, 4), (a, 0, a, 8), (a, 8, z, 0)):
        first = cm.p2p_s(src, s_off, dst, d_off, 2, 4, 1)
        assert first == cm.p2p_s(src, s_off, dst, d_off, 2, 4, 1)
        assert first == cm._p2p_s(src, s_off, dst, d_off, 2, 4, 1)   # pylint: disable=protected-access
    overlapped, gather, update = cm.stage_tail(a, 8, 2, 4, 5, first=False, last=True)
    params = cm.stage_params(2, 5, first=False, last=True)
    assert (overlapped, gather) == cm.reduce_parts(a, 8, 2, 4, params)
    assert update == cm.optimizer_s(a, 4, params)


@pytest.mark.parametrize("vmax", [1, 4])
def test_pruned_replica_options_give_the_same_envelope(vmax):
    """island_envelopes leaves out the (TP, stages, DP) whose lower bounds cannot beat the options
    costed before them at any share: every island's Envelope is step for step the same, and at
    every share it picks the same pipeline."""
    fleet = FleetSpec("two-128", (IslandSpec("a800", A800, (8,) * 16), IslandSpec("ascend", ASCEND, (8,) * 16)),
                      25e9, 12.5e9, 30e-6)
    train = TrainSpec(512, 1, "bf16", max_virtual_stages=vmax, search_micro_batch=False)
    cm = CostModel(fleet, LLAMA_7B, train)

    def shape(pe):
        return pe.layout[0].tp, len(pe.layout), pe.dp, pe.v, pe.counts, pe.modes

    pruned_total = 0
    for island in fleet.islands:
        stats: dict = {}
        full = replica_options(cm, island, 1, SearchLimits(), Bounds(cm), {}, small=False)
        kept = replica_options(cm, island, 1, SearchLimits(), Bounds(cm), stats, small=False, prune=True)
        pruned_total += stats.get("dp_pruned", 0)
        a, b = envelope(island, 1, full, 512), envelope(island, 1, kept, 512)
        assert np.array_equal(a.step, b.step)
        for u in np.flatnonzero(np.isfinite(a.step)).tolist():
            assert shape(a.replica(u)) == shape(b.replica(u))
    assert pruned_total > 0      # the case prunes something
