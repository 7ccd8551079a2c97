"""Costing one pipeline: its stages' time rows, the exact uneven layer split, memory per stage,
DP tail, boundaries, plain 1F1B or interleaved with v chunks per stage (partitioner/interleave.py).
Everything the searches ask of a single pipeline goes through `evaluate_pipeline`."""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import numpy as np

from partitioner import halves
from partitioner.candidates import PipeEval
from partitioner.costs import CostModel, exposed_reduce_s
from partitioner.inputs import RECOMPUTE_MODES
from partitioner.interleave import peak_in_flight
from partitioner.layer_split import min_bottleneck, min_sum_split


def in_flight(P: int, i: int, v: int, mi: int) -> float:
    """Micro-batches' worth of activations stage i of P holds at its peak: plain 1F1B's
    min(P - i, m); interleaved, the schedule's chunk count over v (each chunk 1/v of the stage),
    with m rounded up to a multiple of P (the bound for any m it may run)."""
    if v == 1:
        return min(P - i, mi)
    return peak_in_flight(P, i, v, -(-mi // P) * P) / v


@functools.lru_cache(maxsize=4096)
def in_flights(P: int, v: int, mi: int) -> tuple:
    """in_flight of every stage of P (memoised: the searches ask for the same pipelines' shapes)."""
    return tuple(in_flight(P, i, v, mi) for i in range(P))


def interleavable(P: int, v: int, L: int) -> bool:
    """v chunks per stage need two stages or more and at least one layer per chunk."""
    return v == 1 or (P >= 2 and P * v <= L)


def stage_time_rows(cm: CostModel, layout: list, dp: int, b: int, mi: int, v: int = 1) -> tuple[list, list]:
    """Per stage, its time at n = 1..L layers (inf where they do not fit or n < v) and the
    recompute mode picked at each n. Interleaved, each of its v chunks pays the chip's host
    costs and crosses each bridge boundary, and the wrap-around joins the last and first stages."""
    times, picks = _time_matrix(cm, layout, dp, b, mi, v)
    return list(times), picks


def _time_matrix(cm: CostModel, layout: list, dp: int, b: int, mi: int, v: int) -> tuple[np.ndarray, list]:
    """stage_time_rows as one matrix (a row per stage), from the cost model's memoised rows."""
    P = len(layout)
    entries = cm.stage_entries(b, dp, [(slot.island.name, slot.tp, i == 0, i == P - 1, k)
                                       for i, (slot, k) in enumerate(zip(layout, in_flights(P, v, mi)))])
    handoffs = bridge_handoffs(cm, layout)
    extra = [h + e for h, e in zip(handoffs, chunk_extras(cm, layout, v))] if v > 1 else handoffs
    times = np.vstack([entry[0] for entry in entries]) + np.array(extra)[:, None]
    if v > 1:
        times[:, :v - 1] = np.inf
    return times, [entry[1] for entry in entries]


def chunk_extras(cm: CostModel, layout: list, v: int) -> list[float]:
    """Host seconds per micro-batch a stage pays beyond plain 1F1B's when it holds v chunks: each
    extra chunk launches and synchronises again and hands off across each bridge boundary again,
    and the wrap-around (last stage to first) is a bridge boundary when the ends' islands differ."""
    extra = [(v - 1) * h for h in bridge_handoffs(cm, layout)]
    if v > 1:
        if layout[0].island.name != layout[-1].island.name:
            extra[0] += (v - 1) * cm.handoff_s(layout[0].island.name)
            extra[-1] += (v - 1) * cm.handoff_s(layout[-1].island.name)
        for i, slot in enumerate(layout):
            extra[i] += (v - 1) * cm.stage_host_s(slot.island.name)
    return extra


def evaluate_pipeline(cm: CostModel, layout: list, dp: int, b: int, m: int,
                      counts=None, inflight_m: int | None = None, bound: float = math.inf,
                      v: int = 1) -> PipeEval | None:
    """Cost one pipeline (v chunks per stage: interleaved 1F1B when > 1); the layer split is
    searched unless `counts` is given.

    With a `bound`, gives up (None) as soon as the step time provably reaches it."""
    P = len(layout)
    if P == 0 or P > cm.model.layers or not interleavable(P, v, cm.model.layers):
        return None
    mi = m if inflight_m is None else inflight_m
    rows, picks = _time_matrix(cm, layout, dp, b, mi, v)
    if counts is None:
        # at least v layers per stage: split the L - P(v-1) layers beyond each stage's first v-1
        times = rows[:, v - 1:cm.model.layers - (P - 1) * (v - 1)]
        cap = min_bottleneck(times)
        if cap is None:
            return None
        if math.isfinite(bound):
            boundary = boundaries(cm, layout, dp, b)
            if _split_bound(cm, layout, dp, b, m, v, cap, float(times[:, 0].sum()), boundary) >= bound:
                return None
        split = min_sum_split(times, cap)
        if split is None:
            return None
        counts = tuple(n + v - 1 for n in split.counts)
    stage_times = rows[np.arange(P), np.array(counts) - 1].tolist()
    if not all(math.isfinite(x) for x in stage_times):
        return None
    modes = tuple(RECOMPUTE_MODES[int(picks[i][n - 1])] for i, n in enumerate(counts))
    return with_halves(cm, _finish(cm, layout, dp, b, m, tuple(counts), modes, stage_times, mi, v), rows, picks, mi)


def shortened(cm: CostModel, pe: PipeEval) -> PipeEval:
    """A one-stage plain pipeline with its stage's time at every smaller micro-batch (1 .. b-1 samples, in
    the recompute mode it runs b in: fewer samples need less memory), so a replica's last micro-batch
    may be smaller (`PipeEval.with_samples`); any other pipeline as it is."""
    if len(pe.layout) != 1 or pe.v != 1 or pe.b < 2:
        return pe
    slot = pe.layout[0]
    times = tuple(cm.stage_s(slot.island.name, slot.tp, r, pe.counts[0], pe.modes[0], first=True, last=True)
                  for r in range(1, pe.b))
    return replace(pe, short_times=times)


def with_halves(cm: CostModel, pe: PipeEval, rows, picks, mi: int) -> PipeEval:
    """`pe` cut at half-layer blocks where that shortens its step and every stage still fits the layers
    it touches (partitioner/halves.py); `pe` itself otherwise. `mi`: the micro-batches its memory is
    costed at (evaluate_pipeline's inflight_m)."""
    found = halves.best_cuts(cm, pe, rows, picks) if cm.train.half_layers else None
    if found is None:
        return pe
    cuts, times = found
    touched = [halves.touched(a, b) for a, b in halves.spans(pe.counts, cuts)]
    memory = stage_memories(cm, pe.layout, touched, pe.modes, pe.dp, pe.b, pe.m, mi)
    if any(need > cm.capacity(slot.island.name) for need, slot in zip(memory, pe.layout)):
        return pe
    # the DP reduction and update of the layers each stage touches (a layer held in part counts whole)
    tail = step_tail(cm, pe.layout, pe.dp, touched, times, pe.boundary, 1)
    return replace(pe, stage_times=times, memory=memory, tail=tail, cuts=cuts, whole_times=list(pe.stage_times))


def _split_bound(cm, layout, dp, b, m, v, cap: float, least: float, boundary: list) -> float:
    """A lower bound on the step of any split whose slowest stage takes `cap` (`least`: the stages'
    sum at their fewest layers), before the split is made."""
    if v == 1:
        return (m - 1) * max(cap, max(boundary, default=0.0)) + least + 2.0 * sum(boundary)
    wrap = wrap_hop(cm, layout, dp, b)
    cycle = max(cap, v * max(boundary, default=0.0), (v - 1) * wrap)
    return (m - 1) * cycle + cap + (max(least, cap) - cap) / v + 2.0 * sum(boundary)


def wrap_hop(cm, layout, dp, b) -> float:
    """One crossing from the last stage back to the first (interleaved 1F1B goes round)."""
    a, z = layout[-1], layout[0]
    return cm.p2p_s(a.island, a.offset, z.island, z.offset, a.tp, dp, b)


def bridge_handoffs(cm: CostModel, layout: list) -> list[float]:
    """Host seconds per micro-batch each stage pays handing activations and gradients across
    its bridge boundaries (its chip's measured hand-off per boundary; 0 within an island)."""
    out = [0.0] * len(layout)
    for i, (a, z) in enumerate(zip(layout, layout[1:])):
        if a.island.name != z.island.name:
            out[i] += cm.handoff_s(a.island.name)
            out[i + 1] += cm.handoff_s(z.island.name)
    return out


def boundaries(cm, layout, dp, b) -> list:
    return [cm.p2p_s(a.island, a.offset, z.island, z.offset, a.tp, dp, b) for a, z in zip(layout, layout[1:])]


def _finish(cm, layout, dp, b, m, counts, modes, stage_times, mi, v: int = 1) -> PipeEval:
    boundary = boundaries(cm, layout, dp, b)
    parts = stage_tail_parts(cm, layout, dp, counts)
    tail = step_tail(cm, layout, dp, counts, stage_times, boundary, v, parts)
    sources = [cm.layer_cost(slot.island.name, slot.tp, b).source for slot in layout]
    memory = stage_memories(cm, layout, counts, modes, dp, b, m, mi, v)
    wrap = wrap_hop(cm, layout, dp, b) if v > 1 else 0.0
    return PipeEval(layout, dp, b, m, counts, modes, stage_times, boundary, tail, memory, sources, v, wrap,
                    tail_parts=parts)


def step_tail(cm, layout, dp, counts, stage_times, boundary, v: int, parts: tuple | None = None) -> float:
    """The step's tail after the pipeline's last backward: the part of the stages' DP reductions
    the backward does not hide (schedule_time.exposed_reduce_s), then the slowest update (with
    ZeRO-1's all-gather); the fleet-wide norm between them joins the stages. `parts`: the
    stages' stage_tail_parts when known (an interleaved twin has its plain pipeline's)."""
    return sum(tail_parts(cm, layout, dp, counts, stage_times, boundary, v, parts)[:2])


def tail_parts(cm, layout, dp, counts, stage_times, boundary, v: int,
               parts: tuple | None = None) -> tuple[float, float, float]:
    """(exposed DP reduction, update with ZeRO-1's all-gather, the slowest stage's whole DP reduction)
    seconds of the step's tail (`step_tail` is the first two's sum)."""
    hidden, after, whole = parts if parts is not None else stage_tail_parts(cm, layout, dp, counts)
    return exposed_reduce_s(stage_times, boundary, v, hidden, chunked=cm.e >= 4), after, whole


def stage_tail_parts(cm, layout, dp, counts) -> tuple[list, float, float]:
    """What the tail takes from the stages whatever the schedule: each stage's overlappable DP
    reduction, the slowest update (with ZeRO-1's all-gather), the slowest whole reduction."""
    P = len(layout)
    hidden, after, whole = [], 0.0, 0.0
    for i, ((island, t, off), n) in enumerate(zip(layout, counts)):
        overlapped, gather, update = cm.stage_tail(island, off, t, dp, n, first=i == 0, last=i == P - 1)
        hidden.append(overlapped)
        after = max(after, gather + update)
        whole = max(whole, overlapped + gather)
    return hidden, after, whole


def stage_memories(cm, layout, counts, modes, dp, b, m, mi, v: int = 1, at: tuple | None = None) -> list:
    """Each stage's peak bytes per chip: the steady-state stages (m above their in-flight count)
    through CostModel.steady_memories (looked up or vectorised), the others one by one. `at`
    (places, P): the stages are those places of a pipeline of P stages (all of it if None)."""
    places, P = at if at is not None else (range(len(layout)), len(layout))
    ks = in_flights(P, v, mi)
    memory = [0.0] * len(layout)
    steady, where = [], []
    for j, (i, slot, n) in enumerate(zip(places, layout, counts)):
        inflight = ks[i]
        if m > inflight:
            steady.append((slot.island.name, slot.tp, i == 0, i == P - 1, inflight, modes[j], n))
            where.append(j)
        else:
            memory[j] = cm.stage_memory(slot.tp, b, dp, n, first=i == 0, last=i == P - 1, inflight=inflight,
                                        mode=modes[j], island=slot.island.name, micro_batches=m)
    for j, value in zip(where, cm.steady_memories(b, dp, steady)):
        memory[j] = value
    return memory


def evaluate_uniform(cm: CostModel, layout: list, dp: int, b: int, m: int, counts: tuple, mode: str) -> PipeEval | None:
    """A pipeline with a given split and one recompute mode everywhere (the naive baseline)."""
    P = len(layout)
    times = []
    handoffs = bridge_handoffs(cm, layout)
    for i, ((island, t, _off), n) in enumerate(zip(layout, counts)):
        mem = cm.stage_memory(t, b, dp, n, first=i == 0, last=i == P - 1, inflight=min(P - i, m), mode=mode,
                              island=island.name)
        if mem > cm.capacity(island.name):
            return None
        time_s = n * cm.per_layer_s(island.name, t, b, mode) + cm.stage_host_s(island.name) + handoffs[i]
        if i == 0:
            time_s += cm.first_extra_s(island.name, t, b)
        if i == P - 1:
            time_s += cm.last_extra_s(island.name, t, b)
        times.append(time_s)
    return _finish(cm, layout, dp, b, m, tuple(counts), (mode,) * P, times, m)


def interleaved_twin(cm: CostModel, pe: PipeEval, v: int) -> PipeEval | None:
    """`pe` (plain 1F1B) run interleaved with v chunks per stage, same layers: the extra host costs
    and hand-offs of the chunks, the wrap-around, and the memory of the schedule's peak; a stage
    that no longer fits recomputes more (the next allowed mode that fits). None where none does,
    or a stage has fewer than v layers."""
    P = len(pe.layout)
    if pe.v != 1 or not interleavable(P, v, cm.model.layers) or min(pe.counts) < v:
        return None
    extra = chunk_extras(cm, pe.layout, v)
    stage_times = [t + e for t, e in zip(pe.whole_times or pe.stage_times, extra)]
    modes = list(pe.modes)
    memory = stage_memories(cm, pe.layout, pe.counts, pe.modes, pe.dp, pe.b, pe.m, pe.m, v)
    # each stage over its memory tries the later allowed modes in order, the first that fits kept;
    # the stages try theirs side by side (one costing per round)
    left = {}
    for i, slot in enumerate(pe.layout):
        if memory[i] > cm.capacity(slot.island.name):
            later = RECOMPUTE_MODES[RECOMPUTE_MODES.index(modes[i]) + 1:]
            left[i] = [x for x in later if x in cm.train.recompute_modes]
    while left:
        if not all(left.values()):
            return None
        tries = [(i, tried.pop(0)) for i, tried in left.items()]
        needs = stage_memories(cm, [pe.layout[i] for i, _ in tries], [pe.counts[i] for i, _ in tries],
                               [mode for _, mode in tries], pe.dp, pe.b, pe.m, pe.m, v,
                               at=([i for i, _ in tries], P))
        for (i, mode), need in zip(tries, needs):
            slot, n = pe.layout[i], pe.counts[i]
            name = slot.island.name
            if need <= cm.capacity(name):
                stage_times[i] += n * (cm.per_layer_s(name, slot.tp, pe.b, mode)
                                       - cm.per_layer_s(name, slot.tp, pe.b, modes[i]))
                modes[i], memory[i] = mode, need
                del left[i]
    return replace(pe, stage_times=stage_times, memory=memory, modes=tuple(modes), v=v, cuts=(), whole_times=None,
                   wrap=wrap_hop(cm, pe.layout, pe.dp, pe.b),
                   tail=step_tail(cm, pe.layout, pe.dp, pe.counts, stage_times, pe.boundary, v, pe.tail_parts))
