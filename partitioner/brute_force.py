"""Brute force over the search's space: every configuration, every layer split (and every
chunk count up to train.max_virtual_stages), hetero-PP, hetero-DP and hybrid (every grouping of the
islands into pipelines); exponential, for checking the search on fleets of at most ~16 chips and ~16
layers (tests, `hetero bench planner`)."""

from __future__ import annotations

import itertools

import numpy as np

from partitioner.candidates import Candidate, label_pp, stage_layout
from partitioner.costs import CostModel, divisors, tp_choices
from partitioner.evaluate import evaluate_pipeline, interleavable, shortened, stage_time_rows
from partitioner.inputs import FleetSpec, ModelSpec, SearchLimits, TrainSpec
from partitioner.layer_split import compositions
from partitioner.pipeline_search import island_orders
from partitioner.hybrid import groupings, hybrid_candidate
from partitioner.replicas import combine_replicas, envelope, split_batch


def brute_force(fleet: FleetSpec, model: ModelSpec, train: TrainSpec, profile=None) -> Candidate | None:
    """Every configuration of the same space (chunks per stage 1..train.max_virtual_stages included),
    every layer split: for checking the search on small fleets. Exponential; keep layers
    <= ~16 and chips <= ~16."""
    cm = CostModel(fleet, model, train, profile)
    limits = SearchLimits(exhaustive_stages=True, max_orders=10 ** 6)
    max_virtual_stages = train.max_virtual_stages
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
                                pe = _best_split(cm, layout, dp, b, m, comps_cache, v=v)
                                if pe is not None and (best is None or pe.step() < best.step):
                                    best = Candidate("pipeline", [pe], pe.step(), 0.0, label_pp(pe))
    several = ("replicas" in train.modes and len(fleet.islands) >= 2) or ("hybrid" in train.modes
                                                                          and len(fleet.islands) >= 3)
    every_b: dict = {island.name: [] for island in fleet.islands}     # replica options at any micro-batch
    for b in train.micro_batch_choices() if several else ():
        options = {island.name: _pareto([pe for t in tp_choices(model, island) for p in range(1, min(L, island.size // t) + 1)
                                         for pe in _group_options(cm, ((island, t, p),), b, comps_cache)])
                   for island in fleet.islands}
        for name, pes in options.items():
            every_b[name].extend(pes)
        if "replicas" in train.modes:
            for cand in combine_replicas(cm, options, b, 1):
                if best is None or cand.step < best.step:
                    best = cand
        if "hybrid" in train.modes:
            cand = _best_hybrid(cm, fleet, options, b, comps_cache)
            if cand is not None and (best is None or cand.step < best.step):
                best = cand
    in_samples = len(train.micro_batch_choices()) > 1 or any(pe.shortens for pes in every_b.values() for pe in pes)
    if "replicas" in train.modes and in_samples and len(fleet.islands) >= 2:
        # each island at its own micro-batch, a one-stage replica's last one maybe smaller
        for cand in combine_replicas(cm, every_b, 1, 1):
            if best is None or cand.step < best.step:
                best = cand
    return best


def _group_options(cm, order_tps_stages, b: int, cache: dict) -> list:
    """Every DP degree and chunk count of one pipeline shape ((island, TP, stages) in order), each
    at its throughput- and fill-optimal layer splits, costed as replica options are (the whole batch
    in flight at most)."""
    G, L = cm.train.global_batch, cm.model.layers
    P = sum(s for _i, _t, s in order_tps_stages)
    out: list = []
    if P > L:
        return out
    max_dp = min(min(i.size // (t * s) for i, t, s in order_tps_stages), G // b)
    for dp in range(1, max_dp + 1):
        layout = stage_layout(list(order_tps_stages), dp)
        for v in range(1, cm.train.max_virtual_stages + 1):
            if not interleavable(P, v, L) or (v > 1 and P * dp > G // b):
                continue
            out.extend(shortened(cm, pe) for pe in _replica_splits(cm, layout, dp, b, G, cache, v=v))
    return out


def _best_hybrid(cm, fleet: FleetSpec, options: dict, b: int, cache: dict):
    """Every grouping of the islands into pipelines (hybrid.groupings), every pipeline shape over
    each group (island order, TP per island, stages per island, DP, chunks, both layer splits), the
    exact min-max batch split over the groups' envelopes."""
    units = cm.train.global_batch // b
    envs: dict = {(n,): envelope(fleet.island(n), b, opts, units) for n, opts in options.items() if opts}
    best = None
    for grouping in groupings([i.name for i in fleet.islands], len(fleet.islands)):
        for group in grouping:
            if group not in envs:
                islands = [fleet.island(n) for n in group]
                opts = [pe for order in itertools.permutations(islands)
                        for ts in itertools.product(*[tp_choices(cm.model, i) for i in order])
                        for ss in itertools.product(*[range(1, i.size // t + 1) for i, t in zip(order, ts)])
                        for pe in _group_options(cm, tuple(zip(order, ts, ss)), b, cache)]
                envs[group] = envelope(islands[0], b, _pareto(opts), units) if opts else None
        if any(envs.get(g) is None for g in grouping):
            continue
        chosen = [envs[g] for g in grouping]
        res = split_batch(chosen, units)
        if res is not None:
            cand = hybrid_candidate(cm, [env.replica(u) for env, u in zip(chosen, res.shares)], b)
            if best is None or cand.step < best.step:
                best = cand
    return best


def _pareto(pes: list) -> list:
    """Drop replica options another option that takes the same micro-batch counts (same DP; same
    chunks and stages when interleaved) beats at every one of them (a one-stage option's smaller last
    micro-batches, evaluate.shortened, included)."""
    def same(o, pe) -> bool:
        return (o.dp == pe.dp and o.v == pe.v and (pe.v == 1 or len(o.layout) == len(pe.layout))
                and len(o.short_times) == len(pe.short_times)
                and all(x <= y for x, y in zip(o.short_times, pe.short_times)))

    out: list = []
    for pe in pes:
        if not any(o is not pe and same(o, pe) and o.cycle <= pe.cycle and o.fill <= pe.fill
                   and (o.cycle, o.fill) != (pe.cycle, pe.fill) for o in pes):
            if not any(same(o, pe) and (o.cycle, o.fill) == (pe.cycle, pe.fill) for o in out):
                out.append(pe)
    return out


def _split_times(cm, layout, dp: int, b: int, mi: int, cache: dict, v: int):
    """(stage times, layer counts) of every composition of the layers over the pipeline's stages
    that fits (one row each), or None; `cache` keeps the compositions by (layers, stages)."""
    P, L = len(layout), cm.model.layers
    comps = cache.get((L, P))
    if comps is None:
        comps = compositions(L, P)
        cache[(L, P)] = comps
    rows = np.vstack(stage_time_rows(cm, layout, dp, b, mi, v)[0])
    times = rows[np.arange(P)[None, :], comps - 1]
    ok = np.isfinite(times).all(axis=1)
    return (times[ok], comps[ok]) if ok.any() else None


def _best_split(cm, layout, dp: int, b: int, m: int, cache: dict, *, v: int = 1):
    """The pipeline (v chunks per stage, m micro-batches) at its best layer split, every split tried."""
    found = _split_times(cm, layout, dp, b, m, cache, v)
    if found is None:
        return None
    times, comps = found
    # the tail depends on the split: cost exactly the best few by (cycle, sum), then all ties
    top = times.max(axis=1)
    key = (m - 1) * top + (times.sum(axis=1) if v == 1 else top + (times.sum(axis=1) - top) / v)
    best = None
    for j in np.argsort(key):
        if best is not None and key[j] >= best.step():
            break
        pe = evaluate_pipeline(cm, layout, dp, b, m, counts=tuple(int(x) for x in comps[j]), inflight_m=m, v=v)
        if pe is not None and (best is None or pe.step() < best.step()):
            best = pe
    return best


def _replica_splits(cm, layout, dp: int, b: int, m: int, cache: dict, *, v: int = 1) -> list:
    """A replica option's candidate splits: the throughput-optimal one (min cycle, then min fill)
    and the fill-optimal one, each costed for m micro-batches in flight at most."""
    found = _split_times(cm, layout, dp, b, m, cache, v)
    if found is None:
        return []
    times, comps = found
    out = []
    for key in ((times.max(axis=1), times.sum(axis=1)), (times.sum(axis=1), times.max(axis=1))):
        j = int(np.lexsort((key[1], key[0]))[0])
        pe = evaluate_pipeline(cm, layout, dp, b, m, counts=tuple(int(x) for x in comps[j]), inflight_m=m, v=v)
        if pe is not None:
            out.append(pe)
    return out
