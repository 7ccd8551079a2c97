"""hetero-PP search: island orders, TP per island, one DP degree, stages per island, micro-batch.

Configurations are grouped by (order, TPs, DP, micro-batch); a group has a floor, its
configurations a bound tightened to whole layers when reached; one heap, best bound first,
stops when the next bound cannot beat the K-th best plan -- the same result as costing them
all -- or after SearchLimits.max_pp_evaluations costings. Each configuration is costed plain
and with v = 2..max_virtual_stages chunks per stage where its micro-batches allow."""

from __future__ import annotations

import heapq
import itertools
import math
from typing import NamedTuple

import numpy as np

from partitioner.bounds import Bounds, group_floors, integer_bottleneck, interleaved_bound
from partitioner.candidates import Candidate, dedup, label_pp, stage_layout
from partitioner.costs import CostModel, divisors, tp_choices
from partitioner.evaluate import evaluate_pipeline
from partitioner.inputs import FleetSpec, SearchLimits


def stage_product(choices: tuple, products: dict) -> np.ndarray:
    """Every combination of stage counts, one row each (a column per island of `choices`), memoised
    in `products` by the choices."""
    arr = products.get(choices)
    if arr is None:
        arr = np.array(list(itertools.product(*choices)), dtype=np.int64).reshape(-1, len(choices))
        products[choices] = arr
    return arr


def island_orders(islands, limits: SearchLimits) -> list:
    """Ordered non-empty subsets of islands, all of them when few; else a heuristic set."""
    out: list = []
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


GROUP, CONFIG, REFINED = 0, 1, 2      # hetero-PP heap entries, in the order they turn into each other


class Group(NamedTuple):
    """Every configuration of one island order, TP per island, DP degree and micro-batch."""

    floor: float                     # below every configuration's step
    order: tuple                     # islands in pipeline order
    tps: tuple                       # TP degree per island
    dp: int
    b: int
    bridge: float                    # a lower bound on the bridge hops' share of the step


class GroupShape(NamedTuple):
    """What a group's configurations share, for their bounds and their costing."""

    pairs: tuple                     # (island, TP) in pipeline order
    dp: int
    b: int
    m: int                           # micro-batches per replica
    taus: list                       # fastest per-layer time per island
    e_first: float                   # embedding on the first stage
    e_last: float                    # LM head and loss on the last
    fill: float                      # a lower bound on the sum of the stage times


class Config(NamedTuple):
    """One configuration: stages per island, with its bounds."""

    shape: GroupShape
    stages: list                     # stages per island
    bottleneck: float                # a lower bound on the slowest stage
    rest: float                      # a lower bound on the fill, the bridge hops and the DP tail
    vmax: int                        # most chunks per stage its micro-batches allow (1: plain only)

    def bound(self, bottleneck: float) -> float:
        """The step's lower bound at this bottleneck, plain or interleaved (the lower)."""
        m, fill = self.shape.m, self.shape.fill
        plain = (m - 1) * bottleneck + self.rest
        if self.vmax == 1:
            return plain
        return min(plain, float(interleaved_bound(m, bottleneck, fill, self.rest - fill, self.vmax)))


def _pp_groups(cm: CostModel, fleet: FleetSpec, limits: SearchLimits, bounds: Bounds,
               cutoff: float = math.inf, stats: dict | None = None):
    """Yield a Group for every island order, TP per island, DP degree and micro-batch whose floor
    is below `cutoff` (the K-th best plan known: nothing at or above it can enter the top K). A
    group's stage counts are enumerated only when the search reaches its floor."""
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
            max_dp = min(bounds.size(i) // t for i, t in zip(order, ts))
            for bi, b in enumerate(bs):
                dps = divs[(divs <= max_dp) & ((G // divs) % b == 0)]
                if dps.size == 0:
                    continue
                stats["pp_groups"] = stats.get("pp_groups", 0) + int(dps.size)
                floors = group_floors(cm, bounds, order, ts, b, dps, bridge_lb[bi], train.max_virtual_stages)
                for dp, floor in zip(dps.tolist(), floors.tolist()):
                    if floor < cutoff:
                        yield Group(floor, order, ts, dp, b, bridge_lb[bi])


def _group_configs(cm, bounds, limits, *, small: bool, products: dict, group: Group, cutoff: float):
    """The stage-count configurations of one group whose lower bound is below `cutoff`, best
    bound first (None if none). `products`: the stage-count products already built, by choices."""
    order, ts, dp, b, bridge = group.order, group.tps, group.dp, group.b, group.bridge
    G, L = cm.train.global_batch, cm.model.layers
    m = G // (dp * b)
    fits = [bounds.layers_fit(i, t, b, dp) for i, t in zip(order, ts)]
    if min(fits) < 1:
        return None
    taus = [bounds.layer(i, t, b) for i, t in zip(order, ts)]
    e_first, e_last = bounds.first[(order[0].name, ts[0], b)], bounds.last[(order[-1].name, ts[-1], b)]
    choices = tuple(tuple(stage_choices(bounds.size(i) // (t * dp), limits, small)) for i, t in zip(order, ts))
    arr = stage_product(choices, products)
    P = arr.sum(axis=1)
    ok = (P <= L) & (arr @ np.array(fits, dtype=np.int64) >= L)
    if not ok.any():
        return None
    sel, P = arr[ok], P[ok]
    inv = sel @ (1.0 / np.array(taus))
    c = np.maximum((L + e_first / taus[0] + e_last / taus[-1]) / inv,
                   max(e_first + taus[0], e_last + taus[-1], max(taus)))
    n_avg = -(-L // P)
    ab = np.array([tail_floor_line(bounds, i, t, dp) for i, t in zip(order, ts)])
    tail = (n_avg[:, None] * ab[None, :, 0] + ab[None, :, 1]).min(axis=1)
    rest = L * min(taus) + e_first + e_last + bridge + tail
    lb = (m - 1) * c + rest
    fill = L * min(taus) + e_first + e_last
    vs = np.where((P >= 2) & (m % P == 0), np.minimum(cm.train.max_virtual_stages, L // P), 1)
    if (vs > 1).any():
        lb = np.where(vs > 1, np.minimum(lb, interleaved_bound(m, c, fill, bridge + tail, np.maximum(vs, 1))), lb)
    keep = np.flatnonzero(lb < cutoff)
    if keep.size == 0:
        return None
    keep = keep[np.argsort(lb[keep], kind="stable")]
    shape = GroupShape(tuple(zip(order, ts)), dp, b, m, taus, e_first, e_last, fill)
    return _Configs(lb[keep].tolist(), sel[keep], c[keep].tolist(), rest[keep].tolist(), vs[keep].tolist(), shape)


def tail_floor_line(bounds, island, t: int, dp: int) -> tuple[float, float]:
    """floor(n) = a*n + c: the part of a middle stage's tail (n layers) that no overlap hides, its
    update and ZeRO-1's all-gather after it (the DP reduction itself may hide behind the backward:
    partitioner/schedule_time.py); linear in the stage's parameters, memoised with the bounds."""
    key = ("floor", island.name, t, dp)
    hit = bounds.tails.get(key)
    if hit is None:
        one, two = (_tail_floor(bounds.cm, island, t, dp, n) for n in (1, 2))
        hit = (two - one, 2 * one - two)
        bounds.tails[key] = hit
    return hit


def _tail_floor(cm, island, t: int, dp: int, n: int) -> float:
    params = cm.stage_params(t, n, first=False, last=False)
    return cm.reduce_parts(island, 0, t, dp, params)[1] + cm.optimizer_s(island, dp, params)


class _Configs:
    """One group's configurations, best bound first; a configuration becomes a Config only
    when the search reaches it (most never do)."""

    __slots__ = ("lb", "sel", "c", "rest", "vs", "shape")

    def __init__(self, lb, sel, c, rest, vs, shape: GroupShape):
        self.lb, self.sel, self.c, self.rest, self.vs, self.shape = lb, sel, c, rest, vs, shape

    def __len__(self) -> int:
        return len(self.lb)

    def config(self, k: int) -> Config:
        return Config(self.shape, self.sel[k].tolist(), self.c[k], self.rest[k], self.vs[k])


class _NextConfig(NamedTuple):
    configs: _Configs
    k: int


def _cost(cm, config: Config, cutoff: float, stats: dict) -> list:
    """The configuration costed plain and with 2..vmax chunks per stage (None-free list)."""
    shape = config.shape
    layout = stage_layout([(i, t, k) for (i, t), k in zip(shape.pairs, config.stages)], shape.dp)
    out = []
    for v in range(1, config.vmax + 1):
        pe = evaluate_pipeline(cm, layout, shape.dp, shape.b, shape.m, bound=cutoff, v=v)
        stats["pp_evaluated_v"] = stats.get("pp_evaluated_v", 0) + 1
        if pe is not None:
            out.append(Candidate("pipeline", [pe], pe.step(), 0.0, label_pp(pe)))
    return out


def search_pp(cm, fleet, limits, keep: int, bounds, stats, progress=None, seeds: list | None = None) -> list:
    """The K best of `seeds` (plans already known, any kind) and the hetero-PP plans of `fleet`.

    One heap, best bound first, of three kinds of entry: a group (its floor; expanded into
    its stage-count configurations when popped), a configuration (its continuous bound;
    tightened to whole layers when popped) and a tightened configuration (costed when popped).
    It stops when the next bound cannot beat the K-th best, so the result is as if every
    configuration were costed -- or after limits.max_pp_evaluations costings."""
    L = cm.model.layers
    best = sorted(seeds or [], key=lambda c: c.step)[:keep]

    def cutoff() -> float:
        return best[-1].step if len(best) >= keep else math.inf

    heap: list = [(g.floor, n, GROUP, g) for n, g in enumerate(_pp_groups(cm, fleet, limits, bounds, cutoff(), stats))]
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
            stats["pp_groups_expanded"] = stats.get("pp_groups_expanded", 0) + 1
            group = _group_configs(cm, bounds, limits, small=small, products=products, group=entry, cutoff=cutoff())
            if group is not None:
                configs += len(group)
                heapq.heappush(heap, (group.lb[0], next(counter), CONFIG, _NextConfig(group, 0)))
        elif kind == CONFIG:
            group, k = entry
            if k + 1 < len(group):
                heapq.heappush(heap, (group.lb[k + 1], next(counter), CONFIG, _NextConfig(group, k + 1)))
            # the bound is tightened to whole layers only when the config comes up
            config = group.config(k)
            refined += 1
            shape = config.shape
            c = integer_bottleneck(config.bottleneck, config.stages, shape.taus, shape.e_first, shape.e_last, L)
            heapq.heappush(heap, (config.bound(c), next(counter), REFINED, config))
        elif evaluated >= limits.max_pp_evaluations:
            # Best bound first, so what is left is what the bounds rank last; the plan is
            # still never worse than the seeds (islands alone, hetero-DP).
            stats["pp_cut_at_budget"] = stats.get("pp_cut_at_budget", 0) + 1
            stats["pp_open_bound_s"] = lb
            break
        else:
            evaluated += 1
            if progress and evaluated % 16 == 0:
                progress(evaluated, limits.max_pp_evaluations, "hetero-PP configurations")
            for cand in _cost(cm, entry, cutoff(), stats):
                best = dedup(sorted(best + [cand], key=lambda c: c.step))[:keep]
    if progress and evaluated:
        progress(limits.max_pp_evaluations, limits.max_pp_evaluations, "hetero-PP configurations")
    stats["pp_configs"] = stats.get("pp_configs", 0) + configs
    stats["pp_evaluated"] = stats.get("pp_evaluated", 0) + evaluated
    stats["pp_refined"] = stats.get("pp_refined", 0) + refined
    return best
