"""hetero-DP: a homogeneous pipeline per island and an exact split of the global batch.

Per island every replica option (TP, stages, DP; plain or interleaved) is kept until the batch
is split: the fastest option at every share of the batch (an Envelope), then the exact min-max
split over the envelopes (issue #20). Also each island alone on the whole batch."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from partitioner.bounds import Bounds, interleaved_bound
from partitioner.candidates import Candidate, PipeEval, label_pp, replica_label, stage_layout
from partitioner.costs import CostModel, divisors, tp_choices
from partitioner.evaluate import evaluate_pipeline, interleavable, interleaved_twin, shortened
from partitioner.inputs import IslandSpec, SearchLimits


def _pipeline_counts(L: int, p_max: int) -> list[int]:
    picks = set(range(1, min(p_max, 8) + 1))
    x = 16
    while x <= p_max:
        picks.add(x)
        x *= 2
    picks.update(d for d in divisors(L) if d <= p_max)
    return sorted(picks)


def replica_options(cm: CostModel, island: IslandSpec, b: int, limits: SearchLimits, bounds: Bounds,
                     stats: dict, exhaustive: bool = False, small: bool = True, prune: bool = False) -> list[PipeEval]:
    """Homogeneous pipelines on one island, each costed with worst-case in-flight memory, plain
    and interleaved (v chunks per stage). On a large fleet (`small` False) an interleaved option
    keeps its plain twin's layer split and recompute modes (`interleaved_twin`) instead of being
    costed afresh: they are most of the options and the search must stay within seconds.

    `prune`: leave out the (TP, stages, DP) whose every variant's lower bound is above the
    fastest option costed so far at every share it could take (those most likely to win are
    costed first): they cannot enter the island's Envelope, which is the same as with them."""
    G, L = cm.train.global_batch, cm.model.layers
    specs: list[tuple[int, int, int]] = []
    for t in tp_choices(cm.model, island):
        p_max = min(L, island.size // t)
        ps = list(range(1, p_max + 1)) if exhaustive else _pipeline_counts(L, p_max)
        for p in ps:
            d_max = min(island.size // (t * p), G // b)
            if d_max < 1:
                continue
            dps = range(1, d_max + 1) if exhaustive else {d_max, 1 << (d_max.bit_length() - 1)}
            specs.extend((t, p, dp) for dp in sorted(dps) if bounds.layers_fit(island, t, b, dp) * p >= L)
    if not prune:
        return [pe for spec in specs for pe in _spec_options(cm, island, b, spec, stats, small)]
    units = G // b
    variants = [_bound_variants(cm, _spec_bound(cm, bounds, island, b, spec), spec, units) for spec in specs]
    fastest = np.full(units + 1, np.inf)
    costed: dict = {}
    # most likely to win first: the lowest bound on the whole batch
    for k in sorted(range(len(specs)), key=lambda j: float(variants[j][0][1][-1])):
        if all((steps > fastest[u] * (1 + 1e-9)).all() for u, steps in variants[k]):
            stats["dp_pruned"] = stats.get("dp_pruned", 0) + 1
            continue
        costed[k] = _spec_options(cm, island, b, specs[k], stats, small)
        for pe in costed[k]:
            ms = _micro_batch_counts(pe, units)
            np.minimum.at(fastest, ms * pe.dp, (ms - 1) * pe.cycle + pe.fill)
    return [pe for k in sorted(costed) for pe in costed[k]]


def _spec_options(cm: CostModel, island: IslandSpec, b: int, spec: tuple, stats: dict, small: bool) -> list:
    """One (TP, stages, DP) costed plain and interleaved (twins of the plain one on large fleets)."""
    G, L = cm.train.global_batch, cm.model.layers
    t, p, dp = spec
    layout = stage_layout([(island, t, p)], dp)
    out = []
    plain = None
    for v in range(1, cm.train.max_virtual_stages + 1):
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
            out.append(shortened(cm, pe) if p == 1 else pe)
    return out


def _spec_bound(cm: CostModel, bounds: Bounds, island: IslandSpec, b: int, spec: tuple) -> tuple[float, float]:
    """(cycle, fill) lower bounds of a homogeneous pipeline: every layer at the island's fastest
    mode, the embedding on the first stage and the head on the last, no host costs, hops or tail."""
    t, p, _dp = spec
    tau = bounds.layer(island, t, b)
    e_first, e_last = bounds.first[(island.name, t, b)], bounds.last[(island.name, t, b)]
    fill = cm.model.layers * tau + e_first + e_last
    cycle = fill if p == 1 else max(fill / p, tau + e_first, tau + e_last)
    return cycle, fill


def _bound_variants(cm: CostModel, line: tuple, spec: tuple, units: int) -> list:
    """[(shares, step lower bounds there)] for each way the spec runs (`_spec_options`): plain 1F1B
    at every micro-batch count, v chunks per stage at the multiples of its stages."""
    L = cm.model.layers
    _t, p, dp = spec
    cycle, fill = line
    ms = np.arange(1, units // dp + 1)
    out = [(dp * ms, (ms - 1) * cycle + fill)]
    for v in range(2, cm.train.max_virtual_stages + 1):
        if interleavable(p, v, L) and p * dp <= units:
            ms = np.arange(p, units // dp + 1, p)
            out.append((dp * ms, interleaved_bound(ms, cycle, fill, 0.0, v)))
    return out


def _micro_batch_counts(pe: PipeEval, units: int, b: int | None = None) -> np.ndarray:
    """The micro-batch counts per replica this pipeline can run within `units` micro-batches of `b`
    samples (its own micro-batch by default; interleaved: multiples of its stages)."""
    step = len(pe.layout) if pe.v > 1 else 1
    b = pe.b if b is None else b
    return np.arange(step, units * b // (pe.dp * pe.b) + 1, step)


class BatchSplit(NamedTuple):
    """A split of the global batch between pipelines or islands."""

    step: float                      # the slowest one's step
    shares: list                     # units of the batch each takes (micro-batches of b; samples when b = 1)


def shares_and_steps(pe: PipeEval, units: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(shares, steps): every share of `units` units of b samples this pipeline can take (all its replicas
    together) and its step there. With b = 1 (shares in samples) a one-stage pipeline that `shortens`
    takes any whole number of samples per replica, its last micro-batch smaller (`_short_shares`)."""
    if b == 1 and pe.shortens:
        return _short_shares(pe, units)
    ms = _micro_batch_counts(pe, units, b)
    return ms * pe.dp * pe.b // b, (ms - 1) * pe.cycle + pe.fill


def _short_shares(pe: PipeEval, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """shares_and_steps of a one-stage pipeline at every whole number of samples per replica up to
    `samples` in all: its whole micro-batches, then one of the rest (PipeEval.step with last_b)."""
    k = np.arange(1, samples // pe.dp + 1)
    m = -(-k // pe.b)
    rest = k - (m - 1) * pe.b
    last = np.array(pe.short_times + (pe.stage_times[0],))[rest - 1]
    return k * pe.dp, (m - 1) * pe.stage_times[0] + last + pe.tail


def at_share(pe: PipeEval, u: int, b: int) -> PipeEval:
    """The pipeline on a share of u units of b samples (one of `shares_and_steps`' shares)."""
    if b == 1 and pe.shortens:
        return pe.with_samples(u // pe.dp)
    return pe.with_micro_batches(u * b // (pe.dp * pe.b))


def best_batch_split(pes: list[PipeEval], units: int, b: int | None = None) -> BatchSplit | None:
    """Split `units` units of `b` samples of the global batch (each pipeline's own micro-batch by
    default; b = 1 when they differ: samples) between pipelines (each >= 1 micro-batch per replica) to
    minimise the slowest pipeline's step. Exact; returns (step, [units each takes]) or None."""
    f = np.full(units + 1, np.inf)
    f[0] = 0.0
    back = []
    for pe in pes:
        shares, tm = shares_and_steps(pe, units, b or pe.b)
        if shares.size == 0:
            return None
        u = np.arange(units + 1)[:, None]
        prev = u - shares[None, :]
        valid = prev >= 0
        cand = np.maximum(np.where(valid, f[np.where(valid, prev, 0)], np.inf), tm[None, :])
        arg = np.argmin(cand, axis=1)
        f = cand[np.arange(units + 1), arg]
        back.append(shares[arg])
    if not np.isfinite(f[units]):
        return None
    taken = []
    left = units
    for k in range(len(pes) - 1, -1, -1):
        share = int(back[k][left])
        taken.append(share)
        left -= share
    taken.reverse()
    return BatchSplit(float(f[units]), taken)


def replica_candidate(cm: CostModel, pes: list) -> Candidate:
    """Replicas with their micro-batch counts set: the slowest one plus the bridge reduction."""
    links = min(pe.island.nodes_spanned(0, pe.chips) for pe in pes)
    cross = cm.cross_island_reduce_s([pe.island for pe in pes], links, [(pe.island, pe.chips) for pe in pes])
    step = max(p.step() for p in pes) + cross
    return Candidate("replicas", pes, step, cross, replica_label(pes))


def combine_replicas(cm: CostModel, options_by_island: dict, b: int, keep: int):
    """Every combination of one option per island, each with its exact batch split (brute force). The
    options run micro-batches of `b` samples, or b = 1: each its own (the split then counts samples)."""
    G = cm.train.global_batch
    units = G // b
    names = [n for n in options_by_island if options_by_island[n]]
    out = []
    for k in range(2, len(names) + 1):
        for subset in itertools.combinations(names, k):
            for combo in itertools.product(*[options_by_island[n] for n in subset]):
                res = best_batch_split(list(combo), units, b)
                if res is None:
                    continue
                pes = [at_share(pe, u, b) for pe, u in zip(combo, res.shares)]
                out.append(replica_candidate(cm, pes))
    out.sort(key=lambda c: c.step)
    return out[:keep]


@dataclass
class Envelope:
    """One island's best replica step at every share of the batch (or a hybrid group's best pipeline
    over its islands: partitioner/hybrid.py; `island` is then the group's first).

    step[u]: the fastest option (TP, stages, DP) that takes exactly u micro-batches of b samples of
    the global batch (u a multiple of its DP), inf where none does; pick[u]: which.
    Keeping every option until the batch is split is the point: a few options cut by
    steady-state throughput cannot serve every share (issue #20). With b = 1 the options may
    run different micro-batches (`by_samples`): u counts samples."""

    island: IslandSpec
    b: int
    options: list
    step: np.ndarray
    pick: np.ndarray

    def replica(self, u: int) -> PipeEval:
        return at_share(self.options[int(self.pick[u])], u, self.b)


def envelope(island: IslandSpec, b: int, options: list, units: int) -> Envelope:
    """The fastest option at every share (`shares_and_steps`: with b = 1, in samples, a one-stage option
    may take a share that is not a multiple of its micro-batch, its last micro-batch smaller)."""
    step = np.full(units + 1, np.inf)
    pick = np.full(units + 1, -1, dtype=np.int64)
    for k, pe in enumerate(options):
        u, t = shares_and_steps(pe, units, b)
        better = t < step[u]
        step[u[better]] = t[better]
        pick[u[better]] = k
    return Envelope(island, b, options, step, pick)


def _reach(envs: list, units: int, cap: float) -> list:
    """reach[k][u]: can the first k islands take exactly u micro-batches, each at least one,
    with every step <= cap. Boolean convolutions, by FFT (counts are small integers); the first
    is the first island's own shares (a convolution with reach[0], the single share 0)."""
    size = 1 << (2 * units + 1).bit_length()
    reach = [np.zeros(units + 1, dtype=bool)]
    reach[0][0] = True
    for k, env in enumerate(envs):
        ok = _within(env, units, cap)
        if k == 0:
            reach.append(ok)
            continue
        conv = np.fft.irfft(np.fft.rfft(reach[-1], size) * np.fft.rfft(ok, size), size)[:units + 1]
        reach.append(conv > 0.5)
    return reach


def _feasible(envs: list, units: int, cap: float) -> bool:
    """_reach(envs, units, cap)[-1][units] without its last convolution: some share v of the last
    island within cap with the others taking units - v."""
    before = _reach(envs[:-1], units, cap)[-1]
    return bool(np.any(before[::-1] & _within(envs[-1], units, cap)))


def _within(env, units: int, cap: float) -> np.ndarray:
    """ok[u]: the envelope takes u micro-batches (u = 0..units) within cap."""
    ok = np.zeros(units + 1, dtype=bool)
    step = env.step[:units + 1]
    ok[:step.size] = step <= cap
    return ok


def split_batch(envs: list, units: int) -> BatchSplit | None:
    """The split of `units` micro-batches over the islands (each >= 1) that minimises the
    slowest island's step: binary search over the envelopes' values, exact feasibility."""
    values = np.unique(np.concatenate([e.step[np.isfinite(e.step)] for e in envs]))
    if values.size == 0 or not _feasible(envs, units, values[-1]):
        return None
    lo = int(np.searchsorted(values, max(float(np.min(e.step)) for e in envs)))
    hi = values.size - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _feasible(envs, units, values[mid]):
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
    return BatchSplit(cap, shares)


def island_envelopes(cm, fleet, limits, bounds, stats, progress=None) -> dict:
    """{micro-batch: {island name: Envelope}} with every replica option kept."""
    G = cm.train.global_batch
    out: dict = {}
    bs = cm.train.micro_batch_choices()
    for k, b in enumerate(bs):
        out[b] = {}
        for island in fleet.islands:
            small = fleet.total_chips <= limits.small_fleet_chips
            pes = replica_options(cm, island, b, limits, bounds, stats, small=small, prune=not small)
            if pes:
                out[b][island.name] = envelope(island, b, pes, G // b)
        if progress:
            progress(k + 1, len(bs), "replica options")
    return out


def by_samples(envelopes: dict, global_batch: int) -> dict:
    """{island name: Envelope over samples}: at every share of the batch, in samples, the island's
    fastest option at any micro-batch (each island may run the micro-batch it is fastest at, and the
    batch splits in samples rather than in one micro-batch shared by all; a one-stage option may end on a
    smaller micro-batch). {} with one micro-batch and no option that `shortens`."""
    if len(envelopes) < 2 and not any(pe.shortens for by_island in envelopes.values()
                                      for env in by_island.values() for pe in env.options):
        return {}
    names = {n for by_island in envelopes.values() for n in by_island}
    out = {}
    for name in sorted(names):
        found = [by_island[name] for by_island in envelopes.values() if name in by_island]
        options = [pe for env in found for pe in env.options]
        out[name] = envelope(found[0].island, 1, options, global_batch)
    return out


def _subsets(names: list, limit: int = 5):
    """Island subsets of two or more for hetero-DP: all of them when few islands, else the whole fleet."""
    if len(names) > limit:
        return [tuple(names)]
    return [c for k in range(2, len(names) + 1) for c in itertools.combinations(names, k)]


def search_replicas(cm, envelopes: dict, keep: int, stats) -> list:
    """The best hetero-DP plans: at every micro-batch every island on it, then each island on its own
    (the batch split in samples over `by_samples` envelopes)."""
    G = cm.train.global_batch
    out = []
    splits = [(G // b, by_island) for b, by_island in envelopes.items()]
    mixed = by_samples(envelopes, G)
    if mixed:
        splits.append((G, mixed))
    for units, by_island in splits:
        for subset in _subsets(list(by_island)):
            envs = [by_island[n] for n in subset]
            res = split_batch(envs, units)
            stats["dp_splits"] = stats.get("dp_splits", 0) + 1
            if res is None:
                continue
            pes = [env.replica(u) for env, u in zip(envs, res.shares)]
            if by_island is mixed and len({pe.b for pe in pes}) == 1 and not any(pe.last_b for pe in pes):
                continue    # one micro-batch for all: the split at that micro-batch has it
            out.append(replica_candidate(cm, pes))
    out.sort(key=lambda c: c.step)
    return out[:keep]


def alone_candidates(envelopes: dict, name: str) -> list:
    """The island alone as one homogeneous pipeline on the whole batch (from its envelope)."""
    out = []
    for by_island in envelopes.values():
        env = by_island.get(name)
        if env is None or not np.isfinite(env.step[-1]):
            continue
        pe = env.replica(len(env.step) - 1)
        out.append(Candidate("pipeline", [pe], pe.step(), 0.0, label_pp(pe)))
    return out
