"""Lower bounds for the hetero-PP search: per (island, TP, micro-batch, DP) layer times, tails
and layer capacity (Bounds); floors under a group of configurations and under one configuration,
plain or interleaved; the whole-layer bottleneck. Bounds only ever undershoot the true step, so
cutting on them never loses the best plan."""

from __future__ import annotations

import math

import numpy as np

from partitioner.costs import CostModel


class Bounds:
    """Cached per-(island, tp, micro-batch, dp) numbers for lower bounds and quick memory checks."""

    def __init__(self, cm: CostModel):
        self.cm = cm
        self.tau: dict = {}
        self.first: dict = {}
        self.last: dict = {}
        self.max_layers: dict = {}
        self.tails: dict = {}
        self.stage_sets: dict = {}       # hybrid groups' stage-count rows by (caps, fits, small)
        self.sizes: dict = {}            # chips per island, by name

    def size(self, island) -> int:
        """The island's chips (memoised: IslandSpec.size sums its nodes at every call)."""
        hit = self.sizes.get(island.name)
        if hit is None:
            hit = self.sizes[island.name] = island.size
        return hit

    def layer(self, island, t, b):
        key = (island.name, t, b)
        hit = self.tau.get(key)
        if hit is None:
            hit = self.cm.best_layer_s(island.name, t, b)
            self.tau[key] = hit
            self.first[key] = self.cm.first_extra_s(island.name, t, b)
            self.last[key] = self.cm.last_extra_s(island.name, t, b)
        return hit

    def layers_fit(self, island, t, b, dp) -> int:
        """Most layers one middle stage could hold (one micro-batch in flight, cheapest mode)."""
        key = (island.name, t, b, dp)
        hit = self.max_layers.get(key)
        if hit is None:
            cm = self.cm
            mode = "full" if "full" in cm.train.recompute_modes else cm.train.recompute_modes[-1]
            one = cm.stage_memory(t, b, dp, 1, first=False, last=False, inflight=1, mode=mode)
            two = cm.stage_memory(t, b, dp, 2, first=False, last=False, inflight=1, mode=mode)
            cap = cm.capacity(island.name)
            per = max(two - one, 1e-9)
            hit = 0 if one > cap else 1 + int((cap - one) // per)
            self.max_layers[key] = hit
        return hit


def interleaved_bound(m, c, fill, other, v):
    """Lower bound on an interleaved step (v chunks) from a bottleneck bound c and a fill bound
    (every layer at its fastest, embedding and head): the fill and drain shrink by v at most
    (costs.interleaved_cycle_fill); `other`: bounds on the rest (bridge hops, DP tail)."""
    return (m - 1) * c + c + (np.maximum(fill, c) - c) / v + other


def group_floors(cm, bounds, order, ts, b: int, dps: np.ndarray, bridge: float, vmax: int = 1) -> np.ndarray:
    """A floor under every configuration of (order, TPs, dp, micro-batch b), one per dp: each
    island holds its most stages (more stages only lower the bound), no DP tail; with
    interleaving allowed (vmax > 1), the lower of plain and interleaved at vmax chunks."""
    L, G = cm.model.layers, cm.train.global_batch
    taus = np.array([bounds.layer(i, t, b) for i, t in zip(order, ts)])
    e_first = bounds.first[(order[0].name, ts[0], b)]
    e_last = bounds.last[(order[-1].name, ts[-1], b)]
    sizes = np.array([bounds.size(i) for i in order])
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
    return np.where(m >= 2, np.minimum(plain, interleaved_bound(m, c, fill, bridge, vmax)), plain)


def integer_bottleneck(c: float, ss, taus, e_first: float, e_last: float, L: int) -> float:
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
