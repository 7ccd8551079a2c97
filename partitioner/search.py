"""Plan search: hetero-PP (one pipeline across islands) against hetero-DP (a replica per island).

hetero-PP space: which islands and in what pipeline order; a TP degree per island
(a power of two dividing heads and kv_heads, within one node); one DP degree for
every stage; stages per island; micro-batch size (count follows from the global
batch); then the exact uneven layer split (layer_split.py) with each stage's
recompute mode the fastest that fits its memory.

hetero-DP space: per island a homogeneous pipeline (TP, stages, DP, same
micro-batch everywhere) and an uneven split of the global batch between the
islands; gradients are reduced over the bridge. Every option an island has is
kept until the batch is split: per island, the fastest option at every share of
the batch (an Envelope), then the exact min-max split over the envelopes.

Order (issue #20): the replica envelopes first (cheap); they give each island
alone on the whole batch, which seeds that island's own hetero-PP search; the
islands alone and the best hetero-DP plans seed the whole fleet's hetero-PP
search, so the chosen plan is never slower than either lower bound. hetero-PP
configurations are grouped by (order, TPs, DP, micro-batch); a group has a floor
(every island at its most stages), its configurations a bound (balanced layers,
no memory limit) that is tightened to whole layers when reached; everything is
visited best bound first and the search stops when the next bound cannot beat
the K-th best plan -- the same result as costing them all -- or after
SearchLimits.max_pp_evaluations costings (fleets of thousands of chips; the
stats say so). Stage rows and per-layer costs are memoised.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from partitioner.costs import (CostModel, divisors, head_forward_flops, interleaved_cycle_fill,
                               layer_forward_flops, pipeline_step_s, tp_choices)
from partitioner.inputs import (RECOMPUTE_MODES, FleetSpec, InfeasibleError, IslandSpec, ModelSpec,
                                SearchLimits, TrainSpec)
from partitioner.interleave import peak_in_flight
from partitioner.layer_split import compositions, min_bottleneck, min_sum_split
from partitioner.plan import PipelinePlan, Plan, StagePlan, assign_ranks


# ----------------------------------------------------------------------------- evaluated candidates

class Slot(NamedTuple):
    """One stage's place: its island, TP degree and first local rank (of DP replica 0)."""

    island: IslandSpec
    tp: int
    offset: int


@dataclass
class PipeEval:
    layout: list                     # [Slot] per stage
    dp: int
    b: int
    m: int
    counts: tuple
    modes: tuple
    stage_times: list
    boundary: list
    tail: float
    memory: list                     # bytes per chip per stage
    sources: list
    v: int = 1                       # model chunks per stage (interleaved 1F1B when > 1)
    wrap: float = 0.0                # last stage -> first stage, per crossing (v > 1 goes round)

    @property
    def cycle(self) -> float:
        if self.v == 1:
            return max(max(self.stage_times), max(self.boundary, default=0.0))
        return interleaved_cycle_fill(self.stage_times, self.boundary, self.wrap, self.v)[0]

    @property
    def fill(self) -> float:
        if self.v == 1:
            return sum(self.stage_times) + 2.0 * sum(self.boundary) + self.tail
        return interleaved_cycle_fill(self.stage_times, self.boundary, self.wrap, self.v)[1] + self.tail

    def step(self, m: int | None = None) -> float:
        m = self.m if m is None else m
        if self.v == 1:
            return pipeline_step_s(self.stage_times, self.boundary, m, self.tail)
        return (m - 1) * self.cycle + self.fill

    def takes(self, m: int) -> bool:
        """Can this pipeline run m micro-batches per replica (interleaving needs a multiple of its stages)?"""
        return self.v == 1 or m % len(self.layout) == 0

    @property
    def island(self) -> IslandSpec:
        """The first stage's island (a replica's only one)."""
        return self.layout[0].island

    @property
    def chips(self) -> int:
        return sum(slot.tp for slot in self.layout) * self.dp

    def with_micro_batches(self, m: int) -> PipeEval:
        return replace(self, m=m)


@dataclass
class Candidate:
    kind: str                        # pipeline | replicas
    pipes: list                      # PipeEval per pipeline
    step: float
    cross_s: float = 0.0
    label: str = ""


@dataclass
class SearchResult:
    plans: list                      # best first (Plan)
    candidates: list                 # the matching Candidates
    baseline: Candidate | None
    baseline_plan: Plan | None
    search_s: float
    evaluated: int
    bounded: int
    stats: dict = field(default_factory=dict)
    islands_alone: dict = field(default_factory=dict)    # island name -> Candidate (whole batch, others idle)
    hetero_dp: Candidate | None = None                   # best replica per island, exact batch split

    @property
    def best(self) -> Plan:
        return self.plans[0]


# ----------------------------------------------------------------------------- input checks

def check_inputs(fleet: FleetSpec, model: ModelSpec, train: TrainSpec) -> None:
    if model.heads % model.kv_heads:
        raise InfeasibleError(f"model {model.name}: kv_heads ({model.kv_heads}) must divide heads ({model.heads})")
    if model.hidden % model.heads:
        raise InfeasibleError(f"model {model.name}: hidden ({model.hidden}) must be a multiple of heads ({model.heads})")
    if not fleet.islands or fleet.total_chips < 1:
        raise InfeasibleError(f"cluster {fleet.name} has no chips")
    if train.global_batch < 1 or train.micro_batch < 1 or train.global_batch % train.micro_batch:
        raise InfeasibleError(f"micro_batch ({train.micro_batch}) must divide global_batch ({train.global_batch})")


def explain_infeasible(cm: CostModel, fleet: FleetSpec, model: ModelSpec, train: TrainSpec) -> str:
    """Why no plan exists, and what to change."""
    b = min(train.micro_batch_choices())
    best_single = 0.0
    for island in fleet.islands:
        t = max(tp_choices(model, island))
        one = cm.stage_memory(t, b, 1, 1, False, False, 1, "full") if "full" in train.recompute_modes else \
            cm.stage_memory(t, b, 1, 1, False, False, 1, train.recompute_modes[-1])
        best_single = max(best_single, island.chip.usable_bytes / one)
    if best_single < 1:
        largest = max(fleet.islands, key=lambda i: i.chip.usable_bytes)
        t = max(tp_choices(model, largest))
        one = cm.stage_memory(t, b, 1, 1, False, False, 1, "full")
        return (f"model {model.name} fits nowhere: one layer needs {one / 1e9:.3g} GB per chip even with "
                f"TP {t}, micro-batch {b} and full recompute, and the largest chip ({largest.chip.name}) has "
                f"{largest.chip.usable_bytes / 1e9:.3g} GB usable; use chips with more memory, a shorter "
                f"seq_len or a narrower model")
    # Whole-model memory against the whole fleet.
    zero_dp = max(1, fleet.total_chips)
    per_layer_min = min(cm.stage_memory(max(tp_choices(model, i)), b, zero_dp, 1, False, False, 1, "full")
                        for i in fleet.islands)
    need = model.layers * per_layer_min
    have = sum(i.size * i.chip.usable_bytes for i in fleet.islands)
    return (f"no plan fits: model {model.name} ({model.layers} layers) needs roughly "
            f"{model.layers * cm.stage_memory(1, b, 1, 1, False, False, 1, 'full') / 1e9:.3g} GB of weights, "
            f"gradients, optimizer state and activations, and cluster {fleet.name} has {fleet.total_chips} chips "
            f"with {have / 1e9:.3g} GB usable in all (at least {math.ceil(need / max(1.0, have / fleet.total_chips))} "
            f"chips of this kind would be needed); add chips, or use fewer layers, a shorter seq_len or a "
            f"smaller global/micro batch")


# ----------------------------------------------------------------------------- evaluation

def stage_layout(order_tps_stages, dp: int) -> list:
    """[(island, tp, n_stages)] in pipeline order -> [(island, tp, offset)] per stage."""
    layout = []
    for island, t, s in order_tps_stages:
        for j in range(s):
            layout.append(Slot(island, t, j * t * dp))
    return layout


def _stage_params(cm: CostModel, t: int, n: int, first: bool, last: bool) -> float:
    params = n * cm.layer_params / t
    if first:
        params += cm.first_static_params(t)
    if last:
        params += cm.last_static_params(t)
    return params


def in_flight(P: int, i: int, v: int, mi: int) -> float:
    """Micro-batches' worth of activations stage i of P holds at its peak: plain 1F1B's
    min(P - i, m); interleaved, the schedule's chunk count over v (each chunk 1/v of the stage),
    with m rounded up to a multiple of P (the bound for any m it may run)."""
    if v == 1:
        return min(P - i, mi)
    return peak_in_flight(P, i, v, -(-mi // P) * P) / v


def interleavable(P: int, v: int, L: int) -> bool:
    """v chunks per stage need two stages or more and at least one layer per chunk."""
    return v == 1 or (P >= 2 and P * v <= L)


def stage_time_rows(cm: CostModel, layout: list, dp: int, b: int, mi: int, v: int = 1) -> tuple[list, list]:
    """Per stage, its time at n = 1..L layers (inf where they do not fit or n < v) and the
    recompute mode picked at each n. Interleaved, each of its v chunks pays the chip's host
    costs and crosses each bridge boundary, and the wrap-around joins the last and first stages."""
    P = len(layout)
    _prefetch_rows(cm, layout, dp, b, mi, v)
    handoffs = bridge_handoffs(cm, layout)
    extra = [h + e for h, e in zip(handoffs, _chunk_extras(cm, layout, v))] if v > 1 else handoffs
    rows, picks = [], []
    for i, (island, t, _off) in enumerate(layout):
        row, pick = cm.stage_row(island.name, t, b, dp, i == 0, i == P - 1, in_flight(P, i, v, mi))
        row = row + extra[i]
        if v > 1:
            row[:v - 1] = np.inf
        rows.append(row)
        picks.append(pick)
    return rows, picks


def _chunk_extras(cm: CostModel, layout: list, v: int) -> list[float]:
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
    rows, picks = stage_time_rows(cm, layout, dp, b, mi, v)
    if counts is None:
        # at least v layers per stage: split the L - P(v-1) layers beyond each stage's first v-1
        times = np.vstack(rows)[:, v - 1:cm.model.layers - (P - 1) * (v - 1)]
        cap = min_bottleneck(times)
        if cap is None:
            return None
        if math.isfinite(bound):
            boundary = _boundaries(cm, layout, dp, b)
            if _split_bound(cm, layout, dp, b, m, v, cap, float(times[:, 0].sum()), boundary) >= bound:
                return None
        split = min_sum_split(times, cap)
        if split is None:
            return None
        counts = tuple(n + v - 1 for n in split.counts)
    stage_times = [float(rows[i][n - 1]) for i, n in enumerate(counts)]
    if not all(math.isfinite(x) for x in stage_times):
        return None
    modes = tuple(RECOMPUTE_MODES[int(picks[i][n - 1])] for i, n in enumerate(counts))
    return _finish(cm, layout, dp, b, m, tuple(counts), modes, stage_times, mi, v)


def _split_bound(cm, layout, dp, b, m, v, cap: float, least: float, boundary: list) -> float:
    """A lower bound on the step of any split whose slowest stage takes `cap` (`least`: the stages'
    sum at their fewest layers), before the split is made."""
    if v == 1:
        return (m - 1) * max(cap, max(boundary, default=0.0)) + least + 2.0 * sum(boundary)
    wrap = _wrap(cm, layout, dp, b)
    cycle = max(cap, v * max(boundary, default=0.0), (v - 1) * wrap)
    return (m - 1) * cycle + cap + (max(least, cap) - cap) / v + 2.0 * sum(boundary)


def _wrap(cm, layout, dp, b) -> float:
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


def _prefetch_rows(cm: CostModel, layout: list, dp: int, b: int, mi: int, v: int = 1) -> None:
    """Cost each island's stage rows in one pass per (island, TP, first, last)."""
    P = len(layout)
    want: dict = {}
    for i, slot in enumerate(layout):
        want.setdefault((slot.island.name, slot.tp, i == 0, i == P - 1), []).append(in_flight(P, i, v, mi))
    for (name, t, first, last), inflights in want.items():
        cm.stage_rows(name, t, b, dp, first, last, inflights)


def _boundaries(cm, layout, dp, b) -> list:
    return [cm.p2p_s(a.island, a.offset, z.island, z.offset, a.tp, dp, b) for a, z in zip(layout, layout[1:])]


def _finish(cm, layout, dp, b, m, counts, modes, stage_times, mi, v: int = 1) -> PipeEval:
    P = len(layout)
    boundary = _boundaries(cm, layout, dp, b)
    tail = 0.0
    sources = []
    for i, ((island, t, off), n) in enumerate(zip(layout, counts)):
        params = _stage_params(cm, t, n, i == 0, i == P - 1)
        tail = max(tail, cm.dp_allreduce_s(island, off, t, dp, params) + cm.optimizer_s(island, dp, params))
        sources.append(cm.layer_cost(island.name, t, b).source)
    memory = _stage_memories(cm, layout, counts, modes, dp, b, m, mi, v)
    wrap = _wrap(cm, layout, dp, b) if v > 1 else 0.0
    return PipeEval(layout, dp, b, m, counts, modes, stage_times, boundary, tail, memory, sources, v, wrap)


def _stage_memories(cm, layout, counts, modes, dp, b, m, mi, v: int = 1) -> list:
    """Each stage's peak bytes per chip; the steady-state stages (m above their in-flight
    count) of one island, TP, place and mode in one vectorised call."""
    P = len(layout)
    memory = [0.0] * P
    groups: dict = {}
    for i, (slot, n) in enumerate(zip(layout, counts)):
        inflight = in_flight(P, i, v, mi)
        first, last = i == 0, i == P - 1
        if m > inflight:
            groups.setdefault((slot.island.name, slot.tp, first, last, modes[i]), []).append((i, n, inflight))
        else:
            memory[i] = cm.stage_memory(slot.tp, b, dp, n, first, last, inflight, modes[i],
                                        island=slot.island.name, micro_batches=m)
    for (name, t, first, last, mode), rows in groups.items():
        idx, ns, ks = zip(*rows)
        got = cm.stage_memory(t, b, dp, np.array(ns, dtype=np.float64), first, last, np.array(ks, dtype=np.float64),
                              mode, island=name)
        for i, value in zip(idx, np.atleast_1d(got).tolist()):
            memory[i] = value
    return memory


def evaluate_uniform(cm: CostModel, layout: list, dp: int, b: int, m: int, counts: tuple, mode: str) -> PipeEval | None:
    """A pipeline with a given split and one recompute mode everywhere (the naive baseline)."""
    P = len(layout)
    times = []
    handoffs = bridge_handoffs(cm, layout)
    for i, ((island, t, _off), n) in enumerate(zip(layout, counts)):
        mem = cm.stage_memory(t, b, dp, n, i == 0, i == P - 1, min(P - i, m), mode, island=island.name)
        if mem > cm.capacity(island.name):
            return None
        time_s = n * cm.per_layer_s(island.name, t, b, mode) + cm.stage_host_s(island.name) + handoffs[i]
        if i == 0:
            time_s += cm.first_extra_s(island.name, t, b)
        if i == P - 1:
            time_s += cm.last_extra_s(island.name, t, b)
        times.append(time_s)
    return _finish(cm, layout, dp, b, m, tuple(counts), (mode,) * P, times, m)


# ----------------------------------------------------------------------------- hetero-PP enumeration

def island_orders(islands, limits: SearchLimits) -> list:
    """Ordered non-empty subsets of islands, all of them when few; else a heuristic set."""
    out = []
    for k in range(1, len(islands) + 1):
        out.extend(itertools.permutations(islands, k))
    if len(out) <= limits.max_orders:
        return out
    # Many islands: the full set in a few sensible orders, plus each island alone.
    by_mem = sorted(islands, key=lambda i: -i.chip.usable_bytes)
    by_speed = sorted(islands, key=lambda i: -i.chip.flops("bf16"))
    picks = [tuple(islands), tuple(by_mem), tuple(by_speed), tuple(reversed(by_speed)), tuple(reversed(by_mem))]
    picks += [(i,) for i in islands]
    seen, uniq = set(), []
    for order in picks:
        key = tuple(i.name for i in order)
        if key not in seen:
            seen.add(key)
            uniq.append(order)
    return uniq


def stage_choices(S: int, limits: SearchLimits, small_fleet: bool) -> list[int]:
    """Stage counts tried for an island that has room for S stages: all of them on small
    fleets (and whenever asked to be exhaustive), else S, S-1, S/2 and S/4."""
    if S <= 0:
        return []
    if limits.exhaustive_stages or (small_fleet and S <= 8) or S <= 2:
        return list(range(1, S + 1))
    picks = {S, S - 1, (S + 1) // 2, (S + 3) // 4}
    return sorted(p for p in picks if p >= 1)


class _Bounds:
    """Cached per-(island, tp, micro-batch, dp) numbers for lower bounds and quick memory checks."""

    def __init__(self, cm: CostModel):
        self.cm = cm
        self.tau: dict = {}
        self.first: dict = {}
        self.last: dict = {}
        self.max_layers: dict = {}
        self.tails: dict = {}

    def layer(self, island, t, b):
        key = (island.name, t, b)
        hit = self.tau.get(key)
        if hit is None:
            hit = self.cm.best_layer_s(island.name, t, b)
            self.tau[key] = hit
            self.first[key] = self.cm.first_extra_s(island.name, t, b)
            self.last[key] = self.cm.last_extra_s(island.name, t, b)
        return hit

    def tail(self, island, t, dp, n) -> float:
        """DP reduction + optimizer of a middle stage with n layers (some stage has >= L/P)."""
        key = ("tail", island.name, t, dp, n)
        hit = self.tails.get(key)
        if hit is None:
            params = n * self.cm.layer_params / t
            hit = self.cm.dp_allreduce_s(island, 0, t, dp, params) + self.cm.optimizer_s(island, dp, params)
            self.tails[key] = hit
        return hit

    def tail_line(self, island, t, dp) -> tuple[float, float]:
        """tail(n) = a*n + c for n >= 1 layers (both parts are linear in the stage's parameters)."""
        one, two = self.tail(island, t, dp, 1), self.tail(island, t, dp, 2)
        return (two - one, one - (two - one))

    def layers_fit(self, island, t, b, dp) -> int:
        """Most layers one middle stage could hold (one micro-batch in flight, cheapest mode)."""
        key = (island.name, t, b, dp)
        hit = self.max_layers.get(key)
        if hit is None:
            cm = self.cm
            mode = "full" if "full" in cm.train.recompute_modes else cm.train.recompute_modes[-1]
            one = cm.stage_memory(t, b, dp, 1, False, False, 1, mode)
            two = cm.stage_memory(t, b, dp, 2, False, False, 1, mode)
            cap = cm.capacity(island.name)
            per = max(two - one, 1e-9)
            hit = 0 if one > cap else 1 + int((cap - one) // per)
            self.max_layers[key] = hit
        return hit


GROUP, CONFIG, REFINED = 0, 1, 2      # hetero-PP heap entries, in the order they turn into each other


def _interleaved_bound(m, c, fill, other, v):
    """Lower bound on an interleaved step (v chunks) from a bottleneck bound c and a fill bound
    (every layer at its fastest, embedding and head): the fill and drain shrink by v at most
    (costs.interleaved_cycle_fill); `other`: bounds on the rest (bridge hops, DP tail)."""
    return (m - 1) * c + c + (np.maximum(fill, c) - c) / v + other


def _group_floors(cm, bounds, order, ts, b: int, dps: np.ndarray, bridge: float, vmax: int = 1) -> np.ndarray:
    """A floor under every configuration of (order, TPs, dp, micro-batch b), one per dp: each
    island holds its most stages (more stages only lower the bound), no DP tail; with
    interleaving allowed (vmax > 1), the lower of plain and interleaved at vmax chunks."""
    L, G = cm.model.layers, cm.train.global_batch
    taus = np.array([bounds.layer(i, t, b) for i, t in zip(order, ts)])
    e_first = bounds.first[(order[0].name, ts[0], b)]
    e_last = bounds.last[(order[-1].name, ts[-1], b)]
    sizes = np.array([i.size for i in order])
    stages = sizes[None, :] // (np.array(ts)[None, :] * dps[:, None])
    inv = stages @ (1.0 / taus)
    with np.errstate(divide="ignore"):
        c = np.maximum((L + e_first / taus[0] + e_last / taus[-1]) / inv,
                       max(e_first + taus[0], e_last + taus[-1], float(taus.max())))
    m = G // (dps * b)
    plain = (m - 1) * c + L * float(taus.min()) + e_first + e_last + bridge
    if vmax == 1:
        return plain
    fill = L * float(taus.min()) + e_first + e_last
    return np.where(m >= 2, np.minimum(plain, _interleaved_bound(m, c, fill, bridge, vmax)), plain)


def _pp_groups(cm: CostModel, fleet: FleetSpec, limits: SearchLimits, bounds: _Bounds,
               cutoff: float = math.inf, stats: dict | None = None):
    """Yield (floor, order, TPs, dp, b, bridge bound) for every hetero-PP group of configurations
    (one per island order, TP per island, DP degree and micro-batch) whose floor is below `cutoff`
    (the K-th best plan known: nothing at or above it can enter the top K). A group's stage
    counts are enumerated only when the search reaches its floor."""
    model, train = cm.model, cm.train
    G = train.global_batch
    bs = train.micro_batch_choices()
    nbytes = model.seq_len * model.hidden * cm.e
    tps = {i.name: tp_choices(model, i) for i in fleet.islands}
    divs = np.array(divisors(G))
    stats = {} if stats is None else stats
    for order in island_orders(fleet.islands, limits):
        bridge_lb = [2.0 * (len(order) - 1) * (cm.bridge_latency + b * nbytes / cm.bridge_bandwidth) for b in bs]
        for ts in itertools.product(*[tps[i.name] for i in order]):
            max_dp = min(i.size // t for i, t in zip(order, ts))
            for bi, b in enumerate(bs):
                dps = divs[(divs <= max_dp) & ((G // divs) % b == 0)]
                if dps.size == 0:
                    continue
                stats["pp_groups"] = stats.get("pp_groups", 0) + int(dps.size)
                floors = _group_floors(cm, bounds, order, ts, b, dps, bridge_lb[bi], limits.max_virtual_stages)
                for dp, floor in zip(dps.tolist(), floors.tolist()):
                    if floor < cutoff:
                        yield floor, order, ts, dp, b, bridge_lb[bi]


def _group_configs(cm, bounds, limits, small, products, order, ts, dp, b, bridge, cutoff):
    """The stage-count configurations of one (order, TPs, dp, b) whose lower bound is below
    `cutoff`, best bound first (None if none)."""
    G, L = cm.train.global_batch, cm.model.layers
    m = G // (dp * b)
    fits = [bounds.layers_fit(i, t, b, dp) for i, t in zip(order, ts)]
    if min(fits) < 1:
        return None
    taus = [bounds.layer(i, t, b) for i, t in zip(order, ts)]
    e_first, e_last = bounds.first[(order[0].name, ts[0], b)], bounds.last[(order[-1].name, ts[-1], b)]
    choices = tuple(tuple(stage_choices(i.size // (t * dp), limits, small)) for i, t in zip(order, ts))
    arr = products.get(choices)
    if arr is None:
        arr = np.array(list(itertools.product(*choices)), dtype=np.int64).reshape(-1, len(order))
        products[choices] = arr
    P = arr.sum(axis=1)
    ok = (P <= L) & (arr @ np.array(fits, dtype=np.int64) >= L)
    if not ok.any():
        return None
    sel, P = arr[ok], P[ok]
    inv = sel @ (1.0 / np.array(taus))
    c = np.maximum((L + e_first / taus[0] + e_last / taus[-1]) / inv,
                   max(e_first + taus[0], e_last + taus[-1], max(taus)))
    n_avg = -(-L // P)
    ab = np.array([bounds.tail_line(i, t, dp) for i, t in zip(order, ts)])
    tail = (n_avg[:, None] * ab[None, :, 0] + ab[None, :, 1]).min(axis=1)
    rest = L * min(taus) + e_first + e_last + bridge + tail
    lb = (m - 1) * c + rest
    fill = L * min(taus) + e_first + e_last
    vs = np.where((P >= 2) & (m % P == 0), np.minimum(limits.max_virtual_stages, L // P), 1)
    if (vs > 1).any():
        lb = np.where(vs > 1, np.minimum(lb, _interleaved_bound(m, c, fill, bridge + tail, np.maximum(vs, 1))), lb)
    keep = np.flatnonzero(lb < cutoff)
    if keep.size == 0:
        return None
    keep = keep[np.argsort(lb[keep], kind="stable")]
    return _Configs(lb[keep].tolist(), sel[keep], c[keep].tolist(), rest[keep].tolist(), vs[keep].tolist(),
                    (tuple(zip(order, ts)), dp, b, m, taus, e_first, e_last, fill))


class _Configs:
    """One group's configurations, best bound first; a configuration becomes a tuple only
    when the search reaches it (most never do)."""

    __slots__ = ("lb", "sel", "c", "rest", "vs", "shared")

    def __init__(self, lb, sel, c, rest, vs, shared):
        self.lb, self.sel, self.c, self.rest, self.vs, self.shared = lb, sel, c, rest, vs, shared

    def __len__(self) -> int:
        return len(self.lb)

    def config(self, k: int) -> tuple:
        pairs, dp, b, m, taus, e_first, e_last, fill = self.shared
        return (self.lb[k], pairs, self.sel[k].tolist(), dp, b, m,
                (self.c[k], taus, e_first, e_last, self.rest[k], fill, self.vs[k]))


def _integer_bottleneck(c: float, ss, taus, e_first: float, e_last: float, L: int) -> float:
    """Smallest C >= c at which whole layers fit: sum over stages of floor((C - extra_i) / tau_i) >= L.

    Ignores memory and uses each island's fastest mode, so it bounds the true bottleneck from below."""
    eps = 1e-12
    floor = math.floor
    if sum(ss) == 1:
        return max(c, e_first + e_last + L * taus[0])
    for _ in range(4 * L + 8):
        total = 0
        for s, tau in zip(ss, taus):
            total += s * floor(c / tau + eps)
        # the first and last stages also carry the embedding / LM head
        total -= floor(c / taus[0] + eps) - max(0, floor((c - e_first) / taus[0] + eps))
        total -= floor(c / taus[-1] + eps) - max(0, floor((c - e_last) / taus[-1] + eps))
        if total >= L:
            return c
        nxt = min((floor(c / tau + eps) + 1) * tau for tau in taus)
        nxt = min(nxt, (floor((c - e_first) / taus[0] + eps) + 1) * taus[0] + e_first,
                  (floor((c - e_last) / taus[-1] + eps) + 1) * taus[-1] + e_last)
        c = max(nxt, c * (1 + 1e-12))
    return c


def _label_pp(pe: PipeEval) -> str:
    parts = []
    for island, t, _off in pe.layout:
        if parts and parts[-1][0] == island.name and parts[-1][1] == t:
            parts[-1][2] += 1
        else:
            parts.append([island.name, t, 1])
    chain = " -> ".join(f"{name}(tp{t} x{s} stage{'s' if s > 1 else ''})" for name, t, s in parts)
    chunks = f", {pe.v} chunks per stage (interleaved)" if pe.v > 1 else ""
    return f"pipeline {chain}, dp {pe.dp}, micro-batch {pe.b} x {pe.m}{chunks}"


def _search_pp(cm, fleet, limits, keep: int, bounds, stats, progress=None, best: list | None = None):
    """The K best of `best` (plans already known, any kind) and the hetero-PP plans of `fleet`.

    One heap, best bound first, of three kinds of entry: a group (its floor; expanded into
    its stage-count configurations when popped), a configuration (its continuous bound;
    tightened to whole layers when popped) and a tightened configuration (costed when popped).
    It stops when the next bound cannot beat the K-th best, so the result is as if every
    configuration were costed -- or after limits.max_pp_evaluations costings."""
    L = cm.model.layers
    best = sorted(best or [], key=lambda c: c.step)[:keep]

    def cutoff() -> float:
        return best[-1].step if len(best) >= keep else math.inf

    heap = [(g[0], n, GROUP, g) for n, g in enumerate(_pp_groups(cm, fleet, limits, bounds, cutoff(), stats))]
    heapq.heapify(heap)
    small = fleet.total_chips <= limits.small_fleet_chips
    products: dict = {}
    counter = itertools.count(len(heap))
    evaluated = refined = configs = 0
    while heap:
        lb, _n, kind, entry = heapq.heappop(heap)
        if lb >= cutoff():
            break
        if kind == GROUP:
            _floor, order, ts, dp, b, bridge = entry
            stats["pp_groups_expanded"] = stats.get("pp_groups_expanded", 0) + 1
            group = _group_configs(cm, bounds, limits, small, products, order, ts, dp, b, bridge, cutoff())
            if group is not None:
                configs += len(group)
                heapq.heappush(heap, (group.lb[0], next(counter), CONFIG, (group, 0)))
            continue
        if kind == CONFIG:
            group, k = entry
            if k + 1 < len(group):
                heapq.heappush(heap, (group.lb[k + 1], next(counter), CONFIG, (group, k + 1)))
            entry = group.config(k)
        _lb, pairs, ss, dp, b, m, (c, taus, e_first, e_last, rest, fill, vmax) = entry
        if kind == CONFIG:
            # the bound is tightened to whole layers only when the config comes up
            refined += 1
            c = _integer_bottleneck(c, ss, taus, e_first, e_last, L)
            bound = (m - 1) * c + rest
            if vmax > 1:
                bound = min(bound, float(_interleaved_bound(m, c, fill, rest - fill, vmax)))
            heapq.heappush(heap, (bound, next(counter), REFINED, entry))
            continue
        if evaluated >= limits.max_pp_evaluations:
            # Best bound first, so what is left is what the bounds rank last; the plan is
            # still never worse than the seeds (islands alone, hetero-DP).
            stats["pp_cut_at_budget"] = stats.get("pp_cut_at_budget", 0) + 1
            stats["pp_open_bound_s"] = lb
            break
        layout = stage_layout([(i, t, k) for (i, t), k in zip(pairs, ss)], dp)
        evaluated += 1
        if progress and evaluated % 16 == 0:
            progress(evaluated, limits.max_pp_evaluations, "hetero-PP configurations")
        for v in range(1, vmax + 1):
            pe = evaluate_pipeline(cm, layout, dp, b, m, bound=cutoff(), v=v)
            stats["pp_evaluated_v"] = stats.get("pp_evaluated_v", 0) + 1
            if pe is None:
                continue
            cand = Candidate("pipeline", [pe], pe.step(), 0.0, _label_pp(pe))
            best = _dedup(sorted(best + [cand], key=lambda c: c.step))[:keep]
    if progress and evaluated:
        progress(limits.max_pp_evaluations, limits.max_pp_evaluations, "hetero-PP configurations")
    stats["pp_configs"] = stats.get("pp_configs", 0) + configs
    stats["pp_evaluated"] = stats.get("pp_evaluated", 0) + evaluated
    stats["pp_refined"] = stats.get("pp_refined", 0) + refined
    return best


# ----------------------------------------------------------------------------- hetero-DP

def _pipeline_counts(L: int, p_max: int) -> list[int]:
    picks = set(range(1, min(p_max, 8) + 1))
    x = 16
    while x <= p_max:
        picks.add(x)
        x *= 2
    picks.update(d for d in divisors(L) if d <= p_max)
    return sorted(picks)


def _replica_options(cm: CostModel, island: IslandSpec, b: int, limits: SearchLimits, bounds: _Bounds,
                     stats: dict, exhaustive: bool = False, small: bool = True) -> list[PipeEval]:
    """Homogeneous pipelines on one island, each costed with worst-case in-flight memory, plain
    and interleaved (v chunks per stage). On a large fleet (`small` False) an interleaved option
    keeps its plain twin's layer split and recompute modes (`interleaved_twin`) instead of being
    costed afresh: they are most of the options and the search must stay within seconds."""
    model, train = cm.model, cm.train
    G, L = train.global_batch, model.layers
    out = []
    for t in tp_choices(model, island):
        p_max = min(L, island.size // t)
        ps = list(range(1, p_max + 1)) if exhaustive else _pipeline_counts(L, p_max)
        for p in ps:
            d_max = min(island.size // (t * p), G // b)
            if d_max < 1:
                continue
            dps = range(1, d_max + 1) if exhaustive else {d_max, 1 << (d_max.bit_length() - 1)}
            for dp in sorted(dps):
                if bounds.layers_fit(island, t, b, dp) * p < L:
                    continue
                layout = stage_layout([(island, t, p)], dp)
                plain = None
                for v in range(1, limits.max_virtual_stages + 1):
                    if not interleavable(p, v, L) or (v > 1 and p * dp > G // b):
                        continue
                    if v == 1 or small:
                        pe = evaluate_pipeline(cm, layout, dp, b, m=G, inflight_m=G, v=v)
                        stats["dp_evaluated"] = stats.get("dp_evaluated", 0) + 1
                    else:
                        pe = interleaved_twin(cm, plain, v) if plain is not None else None
                        stats["dp_twins"] = stats.get("dp_twins", 0) + 1
                    plain = pe if v == 1 else plain
                    if pe is not None:
                        out.append(pe)
    return out


def interleaved_twin(cm: CostModel, pe: PipeEval, v: int) -> PipeEval | None:
    """`pe` (plain 1F1B) run interleaved with v chunks per stage, same layers: the extra host costs
    and hand-offs of the chunks, the wrap-around, and the memory of the schedule's peak; a stage
    that no longer fits recomputes more (the next allowed mode that fits). None where none does,
    or a stage has fewer than v layers."""
    P = len(pe.layout)
    if pe.v != 1 or not interleavable(P, v, cm.model.layers) or min(pe.counts) < v:
        return None
    extra = _chunk_extras(cm, pe.layout, v)
    stage_times = [t + e for t, e in zip(pe.stage_times, extra)]
    modes = list(pe.modes)
    memory = _stage_memories(cm, pe.layout, pe.counts, pe.modes, pe.dp, pe.b, pe.m, pe.m, v)
    for i, (slot, n) in enumerate(zip(pe.layout, pe.counts)):
        name, cap = slot.island.name, cm.capacity(slot.island.name)
        if memory[i] <= cap:
            continue
        later = RECOMPUTE_MODES[RECOMPUTE_MODES.index(modes[i]) + 1:]
        for mode in (x for x in later if x in cm.train.recompute_modes):
            need = cm.stage_memory(slot.tp, pe.b, pe.dp, n, i == 0, i == P - 1, in_flight(P, i, v, pe.m), mode,
                                   island=name, micro_batches=pe.m)
            if need <= cap:
                stage_times[i] += n * (cm.per_layer_s(name, slot.tp, pe.b, mode)
                                       - cm.per_layer_s(name, slot.tp, pe.b, modes[i]))
                modes[i], memory[i] = mode, need
                break
        else:
            return None
    return replace(pe, stage_times=stage_times, memory=memory, modes=tuple(modes), v=v,
                   wrap=_wrap(cm, pe.layout, pe.dp, pe.b))


def _micro_batch_counts(pe: PipeEval, units: int) -> np.ndarray:
    """The micro-batch counts per replica this pipeline can run within `units` (interleaved: multiples
    of its stages)."""
    step = len(pe.layout) if pe.v > 1 else 1
    return np.arange(step, units // pe.dp + 1, step)


def best_batch_split(pes: list[PipeEval], units: int):
    """Split `units` micro-batches of the global batch between pipelines (each >= 1 micro-batch
    per replica) to minimise the slowest pipeline's step. Exact; returns (step, [m_k]) or None."""
    f = np.full(units + 1, np.inf)
    f[0] = 0.0
    back = []
    for pe in pes:
        d = pe.dp
        ms = _micro_batch_counts(pe, units)
        if ms.size == 0:
            return None
        tm = (ms - 1) * pe.cycle + pe.fill
        u = np.arange(units + 1)[:, None]
        prev = u - d * ms[None, :]
        valid = prev >= 0
        cand = np.maximum(np.where(valid, f[np.where(valid, prev, 0)], np.inf), tm[None, :])
        arg = np.argmin(cand, axis=1)
        f = cand[np.arange(units + 1), arg]
        back.append(ms[arg])
    if not np.isfinite(f[units]):
        return None
    m_list = []
    u = units
    for k in range(len(pes) - 1, -1, -1):
        mk = int(back[k][u])
        m_list.append(mk)
        u -= pes[k].dp * mk
    m_list.reverse()
    return float(f[units]), m_list


def _replica_label(pes: list, b: int) -> str:
    return "replicas " + " + ".join(
        f"{p.island.name}(pp{len(p.layout)}{f' x{p.v} chunks' if p.v > 1 else ''} tp{p.layout[0].tp} dp{p.dp}, "
        f"{p.dp * p.b * p.m} samples)"
        for p in pes) + f", micro-batch {b}"


def _replica_candidate(cm: CostModel, pes: list, b: int) -> Candidate:
    """Replicas with their micro-batch counts set: the slowest one plus the bridge reduction."""
    links = min(pe.island.nodes_spanned(0, pe.chips) for pe in pes)
    cross = cm.cross_island_reduce_s([pe.island for pe in pes], links)
    step = max(p.step() for p in pes) + cross
    return Candidate("replicas", pes, step, cross, _replica_label(pes, b))


def _combine_replicas(cm: CostModel, options_by_island: dict, b: int, keep: int):
    """Every combination of one option per island, each with its exact batch split (brute force)."""
    G = cm.train.global_batch
    units = G // b
    names = [n for n in options_by_island if options_by_island[n]]
    out = []
    for k in range(2, len(names) + 1):
        for subset in itertools.combinations(names, k):
            for combo in itertools.product(*[options_by_island[n] for n in subset]):
                res = best_batch_split(list(combo), units)
                if res is None:
                    continue
                _, m_list = res
                pes = [pe.with_micro_batches(mk) for pe, mk in zip(combo, m_list)]
                out.append(_replica_candidate(cm, pes, b))
    out.sort(key=lambda c: c.step)
    return out[:keep]


@dataclass
class Envelope:
    """One island's best replica step at every share of the batch.

    step[u]: the fastest option (TP, stages, DP) that takes exactly u micro-batches of
    the global batch (u a multiple of its DP), inf where none does; pick[u]: which.
    Keeping every option until the batch is split is the point: a few options cut by
    steady-state throughput cannot serve every share (issue #20)."""

    island: IslandSpec
    b: int
    options: list
    step: np.ndarray
    pick: np.ndarray

    def replica(self, u: int) -> PipeEval:
        pe = self.options[int(self.pick[u])]
        return pe.with_micro_batches(u // pe.dp)


def envelope(island: IslandSpec, b: int, options: list, units: int) -> Envelope:
    step = np.full(units + 1, np.inf)
    pick = np.full(units + 1, -1, dtype=np.int64)
    for k, pe in enumerate(options):
        ms = _micro_batch_counts(pe, units)
        u = ms * pe.dp
        t = (ms - 1) * pe.cycle + pe.fill
        better = t < step[u]
        step[u[better]] = t[better]
        pick[u[better]] = k
    return Envelope(island, b, options, step, pick)


def _reach(envs: list, units: int, cap: float) -> list:
    """reach[k][u]: can the first k islands take exactly u micro-batches, each at least one,
    with every step <= cap. Boolean convolutions, by FFT (counts are small integers)."""
    size = 1 << (2 * units + 1).bit_length()
    reach = [np.zeros(units + 1, dtype=bool)]
    reach[0][0] = True
    for env in envs:
        ok = env.step <= cap
        conv = np.fft.irfft(np.fft.rfft(reach[-1], size) * np.fft.rfft(ok, size), size)[:units + 1]
        reach.append(conv > 0.5)
    return reach


def split_batch(envs: list, units: int) -> tuple[float, list[int]] | None:
    """The split of `units` micro-batches over the islands (each >= 1) that minimises the
    slowest island's step: binary search over the envelopes' values, exact feasibility."""
    values = np.unique(np.concatenate([e.step[np.isfinite(e.step)] for e in envs]))
    if values.size == 0 or not _reach(envs, units, values[-1])[-1][units]:
        return None
    lo = int(np.searchsorted(values, max(float(np.min(e.step)) for e in envs)))
    hi = values.size - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _reach(envs, units, values[mid])[-1][units]:
            hi = mid
        else:
            lo = mid + 1
    cap = float(values[lo])
    reach = _reach(envs, units, cap)
    shares = []
    left = units
    for k in range(len(envs) - 1, -1, -1):
        v = np.arange(1, left + 1)
        ok = (envs[k].step[v] <= cap) & reach[k][left - v]
        # among feasible shares, the one this island runs fastest
        pick = int(v[ok][np.argmin(envs[k].step[v[ok]])])
        shares.append(pick)
        left -= pick
    shares.reverse()
    return cap, shares


def _island_envelopes(cm, fleet, limits, bounds, stats, progress=None) -> dict:
    """{micro-batch: {island name: Envelope}} with every replica option kept."""
    G = cm.train.global_batch
    out = {}
    bs = cm.train.micro_batch_choices()
    for k, b in enumerate(bs):
        out[b] = {}
        for island in fleet.islands:
            pes = _replica_options(cm, island, b, limits, bounds, stats,
                                   small=fleet.total_chips <= limits.small_fleet_chips)
            if pes:
                out[b][island.name] = envelope(island, b, pes, G // b)
        if progress:
            progress(k + 1, len(bs), "replica options")
    return out


def _subsets(names: list, limit: int = 5):
    """Island subsets of two or more for hetero-DP: all of them when few islands, else the whole fleet."""
    if len(names) > limit:
        return [tuple(names)]
    return [c for k in range(2, len(names) + 1) for c in itertools.combinations(names, k)]


def _search_replicas(cm, envelopes: dict, keep: int, stats) -> list:
    out = []
    for b, by_island in envelopes.items():
        units = cm.train.global_batch // b
        for subset in _subsets(list(by_island)):
            envs = [by_island[n] for n in subset]
            res = split_batch(envs, units)
            stats["dp_splits"] = stats.get("dp_splits", 0) + 1
            if res is None:
                continue
            pes = [env.replica(u) for env, u in zip(envs, res[1])]
            out.append(_replica_candidate(cm, pes, b))
    out.sort(key=lambda c: c.step)
    return out[:keep]


def _alone_candidates(envelopes: dict, name: str) -> list:
    """The island alone as one homogeneous pipeline on the whole batch (from its envelope)."""
    out = []
    for by_island in envelopes.values():
        env = by_island.get(name)
        if env is None or not np.isfinite(env.step[-1]):
            continue
        pe = env.replica(len(env.step) - 1)
        out.append(Candidate("pipeline", [pe], pe.step(), 0.0, _label_pp(pe)))
    return out


# ----------------------------------------------------------------------------- baseline

def naive_baseline(cm: CostModel, fleet: FleetSpec) -> Candidate | None:
    """Equal layers per stage, one TP for the whole fleet, islands in cluster order, every
    island full, the user's micro-batch, one recompute mode (the fastest that fits), best DP."""
    model, train = cm.model, cm.train
    G, L, b = train.global_batch, model.layers, train.micro_batch
    common = set.intersection(*[set(tp_choices(model, i)) for i in fleet.islands])
    best = None
    for t in sorted(common):
        for dp in divisors(G // b):
            S = [i.size // (t * dp) for i in fleet.islands]
            if min(S) < 1:
                continue
            P = sum(S)
            if P > L:
                continue
            m = G // (dp * b)
            counts = tuple(L // P + (1 if i < L % P else 0) for i in range(P))
            layout = stage_layout([(i, t, s) for i, s in zip(fleet.islands, S)], dp)
            for mode in train.recompute_modes:
                pe = evaluate_uniform(cm, layout, dp, b, m, counts, mode)
                if pe is not None:
                    cand = Candidate("pipeline", [pe], pe.step(), 0.0, "naive " + _label_pp(pe))
                    if best is None or cand.step < best.step:
                        best = cand
                    break
    return best


# ----------------------------------------------------------------------------- materialise

def to_plan(cm: CostModel, fleet: FleetSpec, cand: Candidate) -> Plan:
    model, train = cm.model, cm.train
    stages = []
    pipelines = []
    for k, pe in enumerate(cand.pipes):
        idx = []
        start = 0
        cuts = chunk_ranges(pe.counts, pe.v)
        for i, ((island, t, off), n) in enumerate(zip(pe.layout, pe.counts)):
            chunks = tuple(cuts[i]) if pe.v > 1 else ()
            layers = (chunks[0][0], chunks[-1][1]) if chunks else (start, start + n)
            stages.append(StagePlan(
                index=len(stages), pipeline=k, island=island.name, chip=island.chip.name, tp=t, dp=pe.dp,
                layers=layers, recompute=pe.modes[i], offset=off, time_s=pe.stage_times[i],
                memory_gb=pe.memory[i] / 1e9, source=pe.sources[i], chunks=chunks))
            idx.append(stages[-1].index)
            start += n
        pipelines.append(PipelinePlan(index=k, stages=tuple(idx), dp=pe.dp, micro_batch=pe.b,
                                      num_micro_batches=pe.m, virtual_stages=pe.v))
    ranks = assign_ranks(fleet, stages)
    step = cand.step
    # Model FLOPs (no recompute) and hardware FLOPs (with it) per chip type.
    f_layer = 3.0 * layer_forward_flops(model, 1)
    f_head = 3.0 * head_forward_flops(model, 1)
    done: dict = {}
    hw: dict = {}
    chips: dict = {}
    peak: dict = {}
    for st, pe in zip(_stages_by_pipe(stages, pipelines), cand.pipes):
        samples = pe.dp * pe.b * pe.m
        for s in st:
            flops = samples * (s.num_layers * f_layer + (f_head if s.index == st[-1].index else 0.0))
            if s.recompute == "full":
                extra = samples * s.num_layers * f_layer / 3.0
            elif s.recompute == "selective":
                extra = samples * s.num_layers * 4.0 * model.seq_len * model.seq_len * model.hidden
            else:
                extra = 0.0
            done[s.chip] = done.get(s.chip, 0.0) + flops
            hw[s.chip] = hw.get(s.chip, 0.0) + flops + extra
            chips[s.chip] = chips.get(s.chip, 0) + s.chips
            peak[s.chip] = fleet.island(s.island).chip.flops(train.dtype)
    mfu = {c: done[c] / (step * chips[c] * peak[c]) for c in done}
    all_peak = sum(i.size * i.chip.flops(train.dtype) for i in fleet.islands)
    used_peak = sum(chips[c] * peak[c] for c in chips)
    slowest = max(cand.pipes, key=lambda p: p.step())
    breakdown = {
        "cycle_s": slowest.cycle,
        "steady_s": (slowest.m - 1) * slowest.cycle,
        "fill_drain_s": (sum(slowest.stage_times) if slowest.v == 1
                         else slowest.fill - 2.0 * sum(slowest.boundary) - slowest.tail),
        "p2p_s": 2.0 * sum(slowest.boundary),
        "max_boundary_s": max(slowest.boundary, default=0.0),
        "dp_reduce_and_optimizer_s": slowest.tail,
        "cross_island_reduce_s": cand.cross_s,
        "bubble_fraction": _bubble(slowest),
        "mfu_used_chips": sum(done.values()) / (step * used_peak),
        "mfu_fleet": sum(done.values()) / (step * all_peak),
        "hfu_used_chips": sum(hw.values()) / (step * used_peak),
    }
    modes = {s.recompute for s in stages}
    sources = {}
    for s in stages:
        sources.setdefault(s.chip, set()).add(s.source)
    layer_src = {c: (v.pop() if len(v) == 1 else "mixed") for c, v in sources.items()}
    used_by_island = {}
    for r in ranks:
        used_by_island[r.island] = used_by_island.get(r.island, 0) + 1
    return Plan(
        kind=cand.kind, cluster=fleet.name, model=model.name, dtype=train.dtype, layers=model.layers,
        heads=model.heads, kv_heads=model.kv_heads, global_batch=train.global_batch,
        micro_batch=cand.pipes[0].b, num_micro_batches=cand.pipes[0].m,
        recompute=modes.pop() if len(modes) == 1 else "mixed", zero1=cm.zero1(max(p.dp for p in cand.pipes)),
        stages=tuple(stages), pipelines=tuple(pipelines), ranks=ranks, predicted_step_s=step,
        tokens_per_s=train.global_batch * model.seq_len / step, mfu=mfu, breakdown=breakdown,
        measured=all(s.source == "measured" for s in stages),
        provenance={"layer_time": layer_src, "bridge": cm.bridge_source, "host_costs": _host_sources(cm, layer_src),
                    "matmul_efficiency": {i.chip.name: i.chip.mm_eff for i in fleet.islands
                                          if layer_src.get(i.chip.name, "estimated") != "measured"},
                    "label": cand.label},
        idle={i.name: i.size - used_by_island.get(i.name, 0) for i in fleet.islands},
    )


def chunk_ranges(counts, v: int) -> list[list[tuple[int, int]]]:
    """Each stage's v layer ranges: its layers split as evenly as they go (larger chunks first),
    the model cut into the p*v pieces in the order docs/plan-format.md prescribes (stage i
    holds pieces i, i+p, ...). v == 1: one range per stage, the stages in order."""
    sizes = [[n // v + (1 if c < n % v else 0) for c in range(v)] for n in counts]
    out: list[list[tuple[int, int]]] = [[] for _ in counts]
    start = 0
    for c in range(v):
        for i, size in enumerate(sizes):
            out[i].append((start, start + size[c]))
            start += size[c]
    return out


def _bubble(pe: PipeEval) -> float:
    """Idle share of the pipeline's compute time (communication and tail aside): plain 1F1B's
    (m-1)*max + sum against m*mean, the fill and drain shrunk by v when interleaved."""
    T, m = pe.stage_times, pe.m
    top, total = max(T), sum(T)
    span = (m - 1) * top + top + (total - top) / pe.v if pe.v > 1 else (m - 1) * top + total
    return 1.0 - (m * total / len(T)) / span


def _host_sources(cm: CostModel, chips) -> dict:
    """Per chip the plan uses: 'measured' when the profile states its host costs, else 'none' (0 s)."""
    have = cm.profile.host_costs if cm.profile is not None else {}
    return {chip: "measured" if chip in have else "none" for chip in chips}


def _stages_by_pipe(stages, pipelines):
    return [[stages[i] for i in p.stages] for p in pipelines]


# ----------------------------------------------------------------------------- entry point

def search(fleet: FleetSpec, model: ModelSpec, train: TrainSpec, profile=None, top: int = 1,
           limits: SearchLimits | None = None, progress=None) -> SearchResult:
    """The best plans (best first), the naive baseline, the lower bounds the best plan is held
    to (each island alone, hetero-DP with an exact batch split) and how long the search took.

    Order matters for speed: the replica envelopes come first (cheap), they seed each
    island's own search, and the best of those seeds the whole fleet's hetero-PP search,
    whose configurations are then cut by their bounds against that incumbent."""
    t0 = time.perf_counter()
    limits = limits or SearchLimits()
    check_inputs(fleet, model, train)
    cm = CostModel(fleet, model, train, profile)
    bounds = _Bounds(cm)
    keep = max(2, top)
    stats: dict = {}
    timing: dict = {}
    envelopes = _island_envelopes(cm, fleet, limits, bounds, stats, progress)
    timing["replica_options_s"] = time.perf_counter() - t0
    alone = _islands_alone(cm, fleet, limits, bounds, envelopes, stats, progress)
    timing["islands_alone_s"] = time.perf_counter() - t0 - sum(timing.values())
    hetero_dp = []
    if "replicas" in train.modes and len(fleet.islands) >= 2:
        hetero_dp = _search_replicas(cm, envelopes, keep, stats)
    timing["hetero_dp_s"] = time.perf_counter() - t0 - sum(timing.values())
    cands = hetero_dp + ([c for c in alone.values() if c.kind in train.modes] if len(fleet.islands) > 1 else [])
    if "pipeline" in train.modes:
        seeds = cands if len(fleet.islands) > 1 else _alone_candidates(envelopes, fleet.islands[0].name)
        cands = _search_pp(cm, fleet, limits, keep, bounds, stats, progress, best=seeds)
    timing["hetero_pp_s"] = time.perf_counter() - t0 - sum(timing.values())
    cands = _dedup(sorted(cands, key=lambda c: c.step))[:keep]
    if not cands:
        raise InfeasibleError(explain_infeasible(cm, fleet, model, train))
    if len(fleet.islands) == 1:
        alone = {fleet.islands[0].name: cands[0]}
    plans = [to_plan(cm, fleet, c) for c in cands]
    base = naive_baseline(cm, fleet)
    base_plan = to_plan(cm, fleet, base) if base else None
    elapsed = time.perf_counter() - t0
    stats.update({k: round(v, 4) for k, v in timing.items()})
    return SearchResult(plans=plans, candidates=cands, baseline=base,
                        baseline_plan=base_plan, search_s=elapsed,
                        evaluated=stats.get("pp_evaluated", 0) + stats.get("dp_evaluated", 0),
                        bounded=stats.get("pp_configs", 0), stats=stats,
                        islands_alone=alone, hetero_dp=hetero_dp[0] if hetero_dp else None)


def _islands_alone(cm, fleet, limits, bounds, envelopes, stats, progress=None) -> dict:
    """{island: its best plan on the whole batch with the other islands idle}: a lower bound the
    fleet's plan must meet, and the denominator of its efficiency (issue #20)."""
    out = {}
    if len(fleet.islands) < 2:
        return out
    sub_stats: dict = {}
    for k, island in enumerate(fleet.islands):
        seeds = _alone_candidates(envelopes, island.name)
        if "pipeline" in cm.train.modes:
            seeds = _search_pp(cm, replace(fleet, islands=(island,)), limits, 1, bounds, sub_stats, best=seeds)
        if seeds:
            out[island.name] = min(seeds, key=lambda c: c.step)
        if progress:
            progress(k + 1, len(fleet.islands), "islands alone")
    stats["alone_pp_configs"] = sub_stats.get("pp_configs", 0)
    stats["alone_pp_evaluated"] = sub_stats.get("pp_evaluated", 0)
    return out


def _dedup(cands: list) -> list:
    seen, out = set(), []
    for c in cands:
        key = (c.label, round(c.step, 12))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


# ----------------------------------------------------------------------------- brute force

def brute_force(fleet: FleetSpec, model: ModelSpec, train: TrainSpec, profile=None,
                max_virtual_stages: int = SearchLimits.max_virtual_stages) -> Candidate | None:
    """Every configuration of the same space (chunks per stage 1..max_virtual_stages included),
    every layer split: for checking the search on small fleets. Exponential; keep layers
    <= ~16 and chips <= ~16."""
    cm = CostModel(fleet, model, train, profile)
    limits = SearchLimits(exhaustive_stages=True, max_orders=10 ** 6, max_virtual_stages=max_virtual_stages)
    G, L = train.global_batch, model.layers
    best = None
    comps_cache: dict = {}
    if "pipeline" in train.modes:
        tps = {i.name: tp_choices(model, i) for i in fleet.islands}
        for order in island_orders(fleet.islands, limits):
            for ts in itertools.product(*[tps[i.name] for i in order]):
                max_dp = min(i.size // t for i, t in zip(order, ts))
                for dp in divisors(G):
                    if dp > max_dp:
                        break
                    for b in train.micro_batch_choices():
                        if (G // dp) % b:
                            continue
                        m = G // (dp * b)
                        for ss in itertools.product(*[range(1, i.size // (t * dp) + 1) for i, t in zip(order, ts)]):
                            P = sum(ss)
                            if P > L:
                                continue
                            layout = stage_layout(list(zip(order, ts, ss)), dp)
                            for v in range(1, max_virtual_stages + 1):
                                if not interleavable(P, v, L) or (v > 1 and m % P):
                                    continue
                                pe = _brute_pipeline(cm, layout, dp, b, m, m, comps_cache, v=v)
                                if pe is not None and (best is None or pe.step() < best.step):
                                    best = Candidate("pipeline", [pe], pe.step(), 0.0, _label_pp(pe))
    if "replicas" in train.modes and len(fleet.islands) >= 2:
        for b in train.micro_batch_choices():
            options = {}
            for island in fleet.islands:
                opts = []
                for t in tp_choices(model, island):
                    for p in range(1, min(L, island.size // t) + 1):
                        for dp in range(1, min(island.size // (t * p), G // b) + 1):
                            layout = stage_layout([(island, t, p)], dp)
                            for v in range(1, max_virtual_stages + 1):
                                if not interleavable(p, v, L) or (v > 1 and p * dp > G // b):
                                    continue
                                pe = _brute_pipeline(cm, layout, dp, b, G, G, comps_cache, objective="cycle", v=v)
                                if pe is not None:
                                    opts.extend(pe)
                options[island.name] = _pareto(opts)
            for cand in _combine_replicas(cm, options, b, 1):
                if best is None or cand.step < best.step:
                    best = cand
    return best


def _pareto(pes: list) -> list:
    """Drop replica options another option that takes the same micro-batch counts (same DP; same
    chunks and stages when interleaved) beats at every one of them."""
    def same(o, pe) -> bool:
        return o.dp == pe.dp and o.v == pe.v and (pe.v == 1 or len(o.layout) == len(pe.layout))

    out = []
    for pe in pes:
        if not any(o is not pe and same(o, pe) and o.cycle <= pe.cycle and o.fill <= pe.fill
                   and (o.cycle, o.fill) != (pe.cycle, pe.fill) for o in pes):
            if not any(same(o, pe) and (o.cycle, o.fill) == (pe.cycle, pe.fill) for o in out):
                out.append(pe)
    return out


def _brute_pipeline(cm, layout, dp, b, m, mi, cache, objective="step", v: int = 1):
    """Best split of one pipeline (v chunks per stage) by enumerating every composition (vectorised)."""
    P = len(layout)
    L = cm.model.layers
    comps = cache.get((L, P))
    if comps is None:
        comps = compositions(L, P)
        cache[(L, P)] = comps
    rows = np.vstack(stage_time_rows(cm, layout, dp, b, mi, v)[0])
    times = rows[np.arange(P)[None, :], comps - 1]
    ok = np.isfinite(times).all(axis=1)
    if not ok.any():
        return None
    times, comps = times[ok], comps[ok]
    if objective == "step":
        # tail depends on the split: compute it exactly for the best few by (cycle, sum), then all ties.
        top = times.max(axis=1)
        key = (m - 1) * top + (times.sum(axis=1) if v == 1 else top + (times.sum(axis=1) - top) / v)
        order = np.argsort(key)
        best = None
        bound = None
        for j in order:
            if bound is not None and key[j] >= bound:
                break
            pe = evaluate_pipeline(cm, layout, dp, b, m, counts=tuple(int(x) for x in comps[j]), inflight_m=mi, v=v)
            if pe is not None and (best is None or pe.step() < best.step()):
                best = pe
                bound = pe.step()
        return best
    # For replicas: the throughput-optimal split (min cycle, then min fill) and the fill-optimal one.
    out = []
    for key in ((times.max(axis=1), times.sum(axis=1)), (times.sum(axis=1), times.max(axis=1))):
        j = int(np.lexsort((key[1], key[0]))[0])
        pe = evaluate_pipeline(cm, layout, dp, b, m, counts=tuple(int(x) for x in comps[j]), inflight_m=mi, v=v)
        if pe is not None:
            out.append(pe)
    return out or None
