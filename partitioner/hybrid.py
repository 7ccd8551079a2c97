"""hetero-DP of hetero-PP (plan kind "hybrid"): the islands grouped into pipelines, the batch split.

A hybrid plan is several pipelines, each over one island or a group of islands, every island in at
most one pipeline (the others idle), one pipeline at least over several islands. Each group of two
or more islands gets an Envelope like an island's replica options (replicas.py): its hetero-PP
pipelines (island order, TP per island, one DP, stages per island, the exact uneven layer split)
costed with worst-case in-flight memory, the fastest at every share of the batch; single islands
reuse their replica envelopes. Every grouping is then split exactly by replicas.split_batch (the
same min-max split as hetero-DP), and gradients are reduced across the pipelines over the bridge
as for replicas (CostModel.cross_island_reduce_s).

Pruning (a pipeline over thousands of chips costs milliseconds): every configuration of a group
has a bound (bounds.py's balanced cycle, a fill from the stages' fewest layers, their hops and the
ends' DP tails), so each group has a floor at every share, and each (micro-batch, grouping) a floor
(`relaxed_split` over the floors). Groupings are visited lowest floor first and dropped once the
floor cannot beat the K-th best plan known (hetero-DP, the islands alone, hybrids found). A visited
grouping costs its groups best bound first at the shares its floor gives them, until the next bound
cannot beat the best costed there, splits exactly, and costs again at the split's shares if they
moved (a few rounds). On large fleets (above SearchLimits.small_fleet_chips) a group tries the TP
degrees its islands' replica envelopes pick, DP degrees 1..8, 2^k and 3 x 2^k, and the largest
stage counts of stage_choices; small fleets cost every configuration, which brute_force.py checks.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from partitioner.bounds import Bounds, integer_bottleneck
from partitioner.candidates import Candidate, PipeEval, hybrid_label, stage_layout
from partitioner.costs import CostModel, tp_choices
from partitioner.evaluate import evaluate_pipeline, interleavable, interleaved_twin, stage_memories
from partitioner.inputs import IslandSpec, SearchLimits
from partitioner.pipeline_search import island_orders, stage_choices, stage_product, tail_floor_line
from partitioner.replicas import BatchSplit, Envelope, envelope, split_batch


def groupings(names: list, limit: int) -> list[tuple[tuple[str, ...], ...]]:
    """The ways to group islands into hybrid pipelines: set partitions of every subset of `names`
    (the rest idle) into two groups or more, one at least of two islands or more. None beyond
    `limit` islands (their number grows like the Bell numbers)."""
    if len(names) > limit:
        return []
    out = []
    for k in range(3, len(names) + 1):
        for subset in itertools.combinations(names, k):
            for parts in _set_partitions(list(subset)):
                if len(parts) >= 2 and max(len(p) for p in parts) >= 2:
                    out.append(tuple(tuple(p) for p in parts))
    return out


def _set_partitions(items: list):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for parts in _set_partitions(rest):
        yield [[first]] + parts
        for i in range(len(parts)):
            yield parts[:i] + [[first] + parts[i]] + parts[i + 1:]


class GroupConfig(NamedTuple):
    """One hetero-PP pipeline over a group before it is costed, with its bounds."""

    order: tuple                     # islands in pipeline order
    tps: tuple                       # TP per island
    dp: int
    stages: tuple                    # stages per island
    cycle: float                     # a lower bound on its cycle (slowest stage)
    fill: float                      # a lower bound on its fill (one micro-batch through, tail)

    def bound(self, units: int, vmax: int = 1) -> float:
        """A lower bound on its step at `units` micro-batches of the global batch (`vmax`: the most
        chunks per stage it may be run with)."""
        return float(_bound(max(units // self.dp, 1), self.cycle, self.fill, vmax))


def _bound(m, cycle, fill, vmax: int):
    """A lower bound on a pipeline's step at m micro-batches per replica from bounds on its cycle and
    fill; with up to `vmax` chunks per stage, the fill may shrink by vmax at most (bounds.py's
    interleaved bound, the hops and the tail shrunk too: lower still)."""
    plain = (m - 1) * cycle + fill
    if vmax == 1:
        return plain
    return np.minimum(plain, m * cycle + (np.maximum(fill, cycle) - cycle) / vmax)


def _dp_choices(max_dp: int, small: bool) -> list[int]:
    """DP degrees tried for a group pipeline: all on small fleets, else 1..8 and 2^k, 3 x 2^k."""
    if small:
        return list(range(1, max_dp + 1))
    picks = set(range(1, min(8, max_dp) + 1))
    x = 8
    while x <= max_dp:
        picks.update(d for d in (x, 3 * x // 2) if d <= max_dp)
        x *= 2
    return sorted(picks)


def _stage_sets(caps: list, limits: SearchLimits, small: bool, L: int, fits: list, products: dict) -> np.ndarray:
    """Stages per island (one row each) for one (order, TPs, DP) whose islands have room for `caps`
    stages: every count on small fleets, else the counts of stage_choices no other choice beats at
    every island (more stages of one DP: a shorter cycle). `products`: rows already built, by choices."""
    if not small and sum(caps) <= L:      # every island at its most stages: the one maximal choice
        ok = sum(c * f for c, f in zip(caps, fits)) >= L
        return np.array([caps] if ok else [], dtype=np.int64).reshape(-1, len(caps))
    choices = tuple(tuple(range(1, c + 1)) if small else tuple(stage_choices(c, limits, False)) for c in caps)
    arr = stage_product(choices, products)
    P = arr.sum(axis=1)
    ok = (P <= L) & (arr @ np.array(fits, dtype=np.int64) >= L)
    if not small:
        # maximal: no island can take its next stage count within L stages (more only fits better)
        for j, c in enumerate(choices):
            after = np.array(list(c[1:]) + [10 ** 9])
            nxt = after[np.searchsorted(np.array(c), arr[:, j])]
            ok &= P - arr[:, j] + nxt > L
    return arr[ok]


def group_configs(cm: CostModel, bounds: Bounds, group: tuple, b: int, limits: SearchLimits, small: bool,
                  tps_hint: dict | None = None) -> list[GroupConfig]:
    """Every configuration tried for a pipeline over all islands of `group` at micro-batch b, with its
    bounds (balanced layers at each island's fastest mode, no memory limit: below the true step)."""
    L = cm.model.layers
    orders = [o for o in island_orders(group, limits) if len(o) == len(group)]
    out: list[GroupConfig] = []
    products: dict = {}
    for order in orders:
        sizes = [i.size for i in order]
        for ts in _tp_combos(order, tps_hint, cm.model, small):
            rows, dps = [], []
            for dp in _dp_choices(min(n // t for n, t in zip(sizes, ts)), small):
                fits = [bounds.layers_fit(i, t, b, dp) for i, t in zip(order, ts)]
                caps = [n // (t * dp) for n, t in zip(sizes, ts)]
                if min(fits) >= 1 and min(caps) >= 1:
                    key = (tuple(caps), tuple(fits), small)
                    arr = bounds.stage_sets.get(key)
                    if arr is None:
                        arr = bounds.stage_sets[key] = _stage_sets(caps, limits, small, L, fits, products)
                    rows.append(arr)
                    dps.extend([dp] * len(arr))
            if dps:
                arr, dp_col = np.vstack(rows), np.array(dps, dtype=np.int64)
                cycle, fill = _config_bounds(cm, bounds, order, ts, b, arr, dp_col)
                out.extend(GroupConfig(order, ts, d, tuple(ss), c, f)
                           for ss, d, c, f in zip(arr.tolist(), dps, cycle.tolist(), fill.tolist()))
    return out


def _config_bounds(cm: CostModel, bounds: Bounds, order, ts, b: int, arr: np.ndarray, dp_col: np.ndarray):
    """Lower bounds on the cycle and the fill of each row of stage counts `arr` (DP `dp_col`): balanced
    layers at each island's fastest mode; every stage holds a layer at least, the rest at the fastest;
    each hop there and back; the slowest stage's update."""
    L = cm.model.layers
    taus = np.array([bounds.layer(i, t, b) for i, t in zip(order, ts)])
    e_first, e_last = bounds.first[(order[0].name, ts[0], b)], bounds.last[(order[-1].name, ts[-1], b)]
    P = arr.sum(axis=1)
    cycle = np.maximum((L + e_first / taus[0] + e_last / taus[-1]) / (arr @ (1.0 / taus)),
                       max(e_first + taus[0], e_last + taus[-1], float(taus.max())))
    host = np.array([cm.stage_host_s(i.name) for i in order])
    per_dp = []                                     # per distinct DP degree, gathered per row below
    dps, which = np.unique(dp_col, return_inverse=True)
    for dp in dps.tolist():
        hop_bridge, hop_inside = _hop_floors(cm, bounds.tails, order, ts, dp, b)
        per_dp.append((hop_bridge, hop_inside, [tail_floor_line(bounds, i, t, dp) for i, t in zip(order, ts)],
                       _end_tails(cm, bounds, order, ts, dp)))
    which = which.reshape(-1)
    bridges = np.array([r[0] for r in per_dp])[which]
    insides = np.array([r[1] for r in per_dp]).reshape((len(per_dp), -1))[which]
    lines = np.array([r[2] for r in per_dp]).reshape((len(per_dp), -1, 2))[which]    # rows x islands x (a, c)
    middle = (-(-L // P)[:, None] * lines[:, :, 0] + lines[:, :, 1]).min(axis=1)
    ends = np.array([r[3] for r in per_dp]).reshape(-1, 2)[which]
    tail = ends[:, 0] + np.maximum(middle, ends[:, 1])
    fill = (arr @ (taus + host) + (L - P) * taus.min() + e_first + e_last + 2.0 * bridges
            + 2.0 * ((arr - 1) * insides).sum(axis=1) + tail)
    return cycle, np.maximum(fill, cycle)


def _end_tails(cm: CostModel, bounds: Bounds, order, ts, dp: int) -> tuple[float, float]:
    """Floors under the step's tail from the pipeline's ends (memoised): the first stage's DP reduction
    (it starts after the last backward of all, so none of it hides; schedule_time.exposed_reduce_s),
    and the slower of the ends' updates (with ZeRO-1's all-gather) over the embedding or the LM head
    and one layer."""
    key = ("ends", order[0].name, ts[0], order[-1].name, ts[-1], dp)
    hit = bounds.tails.get(key)
    if hit is None:
        exposed, after = 0.0, 0.0
        for island, t, first in ((order[0], ts[0], True), (order[-1], ts[-1], False)):
            params = cm.stage_params(t, 1, first=first, last=not first)
            overlapped, gather = cm.reduce_parts(island, 0, t, dp, params)
            exposed = overlapped if first else exposed
            after = max(after, gather + cm.optimizer_s(island, dp, params))
        hit = (exposed, after)
        bounds.tails[key] = hit
    return hit


def _hop_floors(cm: CostModel, hops: dict, order, ts, dp: int, b: int) -> tuple[float, list[float]]:
    """(the bridge hops between the islands of `order`, per island the cheapest hop between two of its
    stages): the point-to-point part of a configuration's fill, whatever its stage counts."""
    bridge = sum(cm.p2p_s(a, 0, z, 0, t, dp, b) for a, z, t in zip(order, order[1:], ts))
    return bridge, [_inside_hop(cm, hops, island, t, dp, b) for island, t in zip(order, ts)]


def _inside_hop(cm: CostModel, hops: dict, island: IslandSpec, t: int, dp: int, b: int) -> float:
    """The cheapest hop between two stages of one island (same node or the next), memoised in `hops`."""
    key = (island.name, t, dp, b)
    if key not in hops:
        other = island.nodes[0] if len(island.nodes) > 1 else 0
        hops[key] = min(cm.p2p_s(island, 0, island, 0, t, dp, b), cm.p2p_s(island, 0, island, other, t, dp, b))
    return hops[key]


def cost_config(cm: CostModel, cfg: GroupConfig, b: int, stats: dict, small: bool,
                at: tuple[int, float] | None = None) -> list[PipeEval]:
    """The configuration costed as a replica option is (every m up to the whole batch in flight),
    plain and interleaved up to train.max_virtual_stages (twins of the plain one on large fleets).
    `at` (share, step): the plain pipeline is given up (none) as soon as its step at that share
    provably reaches that step, before its layer split is made (evaluate_pipeline's bound)."""
    G, L = cm.train.global_batch, cm.model.layers
    layout = stage_layout(list(zip(cfg.order, cfg.tps, cfg.stages)), cfg.dp)
    P = len(layout)
    out: list[PipeEval] = []
    plain = None
    for v in range(1, cm.train.max_virtual_stages + 1):
        if not interleavable(P, v, L) or (v > 1 and P * cfg.dp > G // b):
            continue
        if v == 1 or small:
            pe = _evaluate(cm, layout, cfg.dp, b, v, at if v == 1 and cm.train.max_virtual_stages == 1 else None)
            stats["hybrid_evaluated"] = stats.get("hybrid_evaluated", 0) + 1
        else:
            pe = interleaved_twin(cm, plain, v) if plain is not None else None
        plain = pe if v == 1 else plain
        if pe is not None:
            out.append(pe)
    return out


def _evaluate(cm: CostModel, layout: list, dp: int, b: int, v: int, at: tuple[int, float] | None):
    """evaluate_pipeline with the whole batch in flight; with `at` (share, step), first at the share's
    micro-batches with that step as its bound (None when reached), then, if it may beat it, again at
    the whole batch with the same layer split (the same pipeline, its memory at any m)."""
    G = cm.train.global_batch
    if at is not None and math.isfinite(at[1]) and at[0] // dp >= 1:
        probe = evaluate_pipeline(cm, layout, dp, b, m=at[0] // dp, inflight_m=G, bound=at[1], v=v)
        if probe is None:
            return None
        # the same stages at m = G: only the memory's steady state depends on m
        return replace(probe, m=G, memory=stage_memories(cm, layout, probe.counts, probe.modes, dp, b, G, G, v))
    return evaluate_pipeline(cm, layout, dp, b, m=G, inflight_m=G, v=v)


class GroupOptions:
    """One group's pipelines at one micro-batch: its configurations with their bounds, those costed
    so far, and from them two envelopes: `floor` (every configuration's bound: below any step the
    group can take at each share) and `envelope()` (the costed ones: its fastest known pipeline)."""

    def __init__(self, cm: CostModel, bounds: Bounds, group: tuple, b: int, configs: list, stats: dict, small: bool):
        self.cm, self.bounds, self.group, self.b, self.configs = cm, bounds, group, b, configs
        self.stats, self.small = stats, small
        self._tightened: dict[int, GroupConfig] = {}
        self.units = cm.train.global_batch // b
        self.costed: dict[int, list[PipeEval]] = {}
        self._env: Envelope | None = None
        self.dps = np.array([c.dp for c in configs], dtype=np.int64)
        self.cycles = np.array([c.cycle for c in configs])
        self.fills = np.array([c.fill for c in configs])
        self.vmax = cm.train.max_virtual_stages
        self.floor = np.full(self.units + 1, np.inf)
        for dp in np.unique(self.dps).tolist():
            mine = self.dps == dp
            ms = np.arange(1, self.units // dp + 1)
            steps = _bound(ms[None, :], self.cycles[mine][:, None], self.fills[mine][:, None], self.vmax)
            self.floor[ms * dp] = steps.min(axis=0)

    def cost_at(self, u: int, cutoff: float = math.inf) -> None:
        """Cost configurations best bound first at share u until the next bound reaches the best step
        costed there or `cutoff` (a step the grouping must beat); all of them on small fleets. A
        bound is tightened to whole layers when it comes up (bounds.integer_bottleneck)."""
        if self.small:
            for k in range(len(self.configs)):
                if k not in self.costed:
                    self._cost(k)
            return
        best = min((_step_at(pe, u) for pes in self.costed.values() for pe in pes), default=math.inf)
        lbs = _bound(np.maximum(u // self.dps, 1), self.cycles, self.fills, self.vmax)
        heap = [(lb, k, False) for k, lb in enumerate(lbs.tolist()) if lb < min(best, cutoff) and k not in self.costed]
        heapq.heapify(heap)
        while heap and heap[0][0] < min(best, cutoff):
            _lb, k, tight = heapq.heappop(heap)
            if not tight:
                heapq.heappush(heap, (self._tight(k).bound(u, self.vmax), k, True))
                continue
            best = min([best] + [_step_at(pe, u) for pe in self._cost(k, (u, best))])
            self.stats["hybrid_costed_at_share"] = self.stats.get("hybrid_costed_at_share", 0) + 1

    def _tight(self, k: int) -> GroupConfig:
        """Configuration k with its cycle bound raised to whole layers per stage (memoised)."""
        cfg = self.configs[k]
        if k not in self._tightened:
            bounds, b = self.bounds, self.b
            taus = [bounds.layer(i, t, b) for i, t in zip(cfg.order, cfg.tps)]
            cycle = integer_bottleneck(cfg.cycle, list(cfg.stages), taus, bounds.first[(cfg.order[0].name, cfg.tps[0], b)],
                                       bounds.last[(cfg.order[-1].name, cfg.tps[-1], b)], self.cm.model.layers)
            self._tightened[k] = cfg._replace(cycle=cycle, fill=max(cfg.fill, cycle))
        return self._tightened[k]

    def _cost(self, k: int, at: tuple[int, float] | None = None) -> list[PipeEval]:
        """Configuration k costed; one given up at a share (`at`) stays uncosted for the other shares."""
        pes = cost_config(self.cm, self.configs[k], self.b, self.stats, self.small, at)
        if pes or at is None:
            self.costed[k] = pes
            self._env = None
        return pes

    def envelope(self) -> Envelope | None:
        if self._env is None:
            options = [pe for pes in self.costed.values() for pe in pes]
            self._env = envelope(self.group[0], self.b, options, self.units) if options else None
        return self._env


def _step_at(pe: PipeEval, units: int) -> float:
    """The pipeline's step at `units` micro-batches of the batch (the nearest count it can run below)."""
    step = len(pe.layout) if pe.v > 1 else 1
    m = (units // pe.dp) // step * step
    return pe.step(m) if m >= 1 else math.inf


def island_ranks(pes: list) -> dict[str, tuple[IslandSpec, int]]:
    """Per island the pipelines `pes` use, the island and how many of its chips they use."""
    chips: dict[str, tuple[IslandSpec, int]] = {}
    for pe in pes:
        for slot in pe.layout:
            island, used = chips.get(slot.island.name, (slot.island, 0))
            chips[slot.island.name] = (island, used + slot.tp * pe.dp)
    return chips


def pipe_links(pe: PipeEval) -> int:
    """Nodes the pipeline's chips sit on, over all its islands: the bridge links its share of the
    cross-pipeline gradient reduction can use in parallel (a replica's: its island's nodes)."""
    return sum(island.nodes_spanned(0, used) for island, used in island_ranks([pe]).values())


def hybrid_candidate(cm: CostModel, pes: list, b: int) -> Candidate:
    """Pipelines with their micro-batch counts set: the slowest plus the reduction across them, which
    is the replicas' (one ring over the pipelines, staged at the slowest host link they use)."""
    links = min(pipe_links(pe) for pe in pes)
    ends = [min((slot.island for slot in pe.layout), key=lambda i: i.chip.host_link_bandwidth) for pe in pes]
    cross = cm.cross_island_reduce_s(ends, links, list(island_ranks(pes).values()))
    return Candidate("hybrid", pes, max(pe.step() for pe in pes) + cross, cross, hybrid_label(pes, b))


def _tp_hints(by_island: dict) -> dict:
    """Per island the TP degrees its replica envelope picks at some share and those between, the one
    of its fastest replica on the whole batch first (large fleets try only these in a group: an
    island's TP is mostly a matter of its chip and the model)."""
    out = {}
    for name, env in by_island.items():
        picks = [int(env.pick[-1])] + np.unique(env.pick[env.pick >= 0]).tolist()
        tps = [env.options[k].layout[0].tp for k in picks if k >= 0]
        # and the powers of two between them (each divides the largest, so each is a TP choice too)
        between = [1 << k for k in range(16) if tps and min(tps) < 1 << k < max(tps)]
        out[name] = list(dict.fromkeys(tps + between))
    return out


def _tp_combos(order, tps_hint: dict | None, model, small: bool, most: int = 16) -> list[tuple]:
    """TP degrees per island of `order` tried: every combination on small fleets or when the hinted
    ones make at most `most`; else each island at its first hint, and each island in turn at its others."""
    if small or not tps_hint:
        return list(itertools.product(*[tp_choices(model, i) for i in order]))
    sets = [tps_hint.get(i.name) or tp_choices(model, i) for i in order]
    if math.prod(len(x) for x in sets) <= most:
        return list(itertools.product(*sets))
    base = tuple(x[0] for x in sets)
    return [base] + [base[:j] + (t,) + base[j + 1:] for j, x in enumerate(sets) for t in x[1:]]


def _speed(env: Envelope) -> float:
    """Micro-batches per second the island's envelope reaches at its best share."""
    u = np.flatnonzero(np.isfinite(env.step))
    u = u[u > 0]
    return float(np.max(u / env.step[u])) if u.size else 0.0


class Hybrid(NamedTuple):
    """What search_hybrid needs besides the cost model: the islands, their replica envelopes by
    micro-batch, the search's limits and bounds, and the plans known so far (the incumbent)."""

    islands: tuple
    envelopes: dict
    limits: SearchLimits
    bounds: Bounds
    known: list


def search_hybrid(cm: CostModel, space: Hybrid, keep: int, stats: dict, progress=None) -> list[Candidate]:
    """The `keep` best hybrid plans. Each (micro-batch, grouping) gets a floor first: the exact
    min-max split over its groups' floors (every configuration's bound) and its single islands'
    envelopes; they are visited lowest floor first, and one whose floor cannot beat the `keep`-th
    best plan known (hetero-DP, the islands alone, hybrids found) is dropped uncosted. Otherwise
    each group is costed at the share the floor's split gives it, and the grouping split exactly."""
    names = [i.name for i in space.islands]
    parts = groupings(names, space.limits.max_hybrid_islands)
    stats["hybrid_groupings"] = len(parts)
    if not parts:
        return []
    small = sum(i.size for i in space.islands) <= space.limits.small_fleet_chips
    groups: dict = {}
    visits = []
    known = sorted(c.step for c in space.known)
    for b, singles in space.envelopes.items():
        if len(known) >= keep and _one_micro_batch_through(cm, space, b) >= known[keep - 1]:
            stats["hybrid_cut_micro_batches"] = stats.get("hybrid_cut_micro_batches", 0) + 1
            continue
        hints = _tp_hints(singles)
        for grouping in parts:
            floor = _floor_split(cm, space, groups, grouping, b, small, hints, stats)
            if floor is not None:
                visits.append((floor.step, b, grouping, floor.shares))
    visits.sort(key=lambda v: v[0])
    out: list[Candidate] = []
    for n, (floor_step, b, grouping, shares) in enumerate(visits):
        best = sorted(known + [c.step for c in out])
        if len(best) >= keep and floor_step >= best[keep - 1]:
            stats["hybrid_cut_by_floor"] = len(visits) - n
            break
        cutoff = best[keep - 1] if len(best) >= keep else math.inf
        cand = _cost_grouping(cm, space, groups, grouping, b, shares, stats, cutoff)
        if cand is not None:
            out = sorted(out + [cand], key=lambda c: c.step)[:keep]
        if progress:
            progress(n + 1, len(visits), "hybrid plans")
    stats["hybrid_groups"] = len(groups)
    return out


def _one_micro_batch_through(cm: CostModel, space: Hybrid, b: int) -> float:
    """A floor under every hybrid plan at micro-batch b: its pipeline over several islands takes at
    least one micro-batch through every layer at the fleet's fastest, the embedding and the head."""
    bounds, L = space.bounds, cm.model.layers
    pairs = [(i, t) for i in space.islands for t in tp_choices(cm.model, i)]
    taus = [bounds.layer(i, t, b) for i, t in pairs]
    return (L * min(taus) + min(bounds.first[(i.name, t, b)] for i, t in pairs)
            + min(bounds.last[(i.name, t, b)] for i, t in pairs))


def _floor_split(cm, space: Hybrid, groups: dict, grouping, b: int, small: bool, hints: dict, stats: dict):
    """The min-max split of the batch over the grouping's floors (None where a group has no option)."""
    envs: list = []
    for group in grouping:
        if len(group) == 1:
            env = space.envelopes[b].get(group[0])
            if env is None:
                return None
            envs.append(env)
            continue
        if (group, b) not in groups:
            islands = tuple(i for n in group for i in space.islands if i.name == n)
            configs = group_configs(cm, space.bounds, islands, b, space.limits, small, hints)
            stats["hybrid_configs"] = stats.get("hybrid_configs", 0) + len(configs)
            groups[(group, b)] = GroupOptions(cm, space.bounds, islands, b, configs, stats, small) if configs else None
        options = groups[(group, b)]
        if options is None:
            return None
        envs.append(options.floor)
    return relaxed_split([env.step if isinstance(env, Envelope) else env for env in envs],
                         cm.train.global_batch // b)


def relaxed_split(steps: list, units: int) -> BatchSplit | None:
    """A lower bound on split_batch's step over envelopes `steps` (each indexed by micro-batches),
    cheap: the least step T at which the groups could take `units` between them if each could take
    any number up to the most it takes within T. The shares: those most-numbers, scaled to `units`."""
    best = [np.minimum.accumulate(s[::-1])[::-1] for s in steps]      # best[u]: fastest at u or more
    values = np.unique(np.concatenate([s[np.isfinite(s)] for s in steps])) if steps else np.array([])
    if values.size == 0:
        return None

    def caps(t: float) -> np.ndarray:
        return np.array([int(np.flatnonzero(bb <= t)[-1]) if (bb <= t).any() else 0 for bb in best])

    lo, hi = 0, values.size - 1
    if caps(values[hi]).sum() < units or any(not np.isfinite(s[1:]).any() for s in steps):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if caps(values[mid]).sum() >= units:
            hi = mid
        else:
            lo = mid + 1
    got = caps(values[lo])
    shares = np.maximum(1, np.floor(got * units / max(got.sum(), 1))).astype(int).tolist()
    return BatchSplit(float(values[lo]), shares)


def _cost_grouping(cm, space: Hybrid, groups: dict, grouping, b: int, shares: list, stats: dict, cutoff: float):
    """The grouping's best plan: each group costed around its share, the exact split, and again at
    the split's shares while they move to shares not costed yet (a few rounds)."""
    res: BatchSplit | None = None
    envs: list[Envelope] = []
    seen: set = set()
    for _round in range(3):
        envs = []
        for group, u in zip(grouping, shares):
            if len(group) == 1:
                envs.append(space.envelopes[b][group[0]])
                continue
            options = groups[(group, b)]
            if (group, u) not in seen:
                options.cost_at(u, cutoff)
                seen.add((group, u))
            env = options.envelope()
            if env is None:
                return None
            envs.append(env)
        res = split_batch(envs, cm.train.global_batch // b)
        stats["hybrid_splits"] = stats.get("hybrid_splits", 0) + 1
        if res is None:
            return None
        shares = res.shares
        if all(len(g) == 1 or (g, u) in seen for g, u in zip(grouping, shares)):
            break
    return hybrid_candidate(cm, [env.replica(u) for env, u in zip(envs, shares)], b)
