"""The uneven layer split: contiguous layers per stage, slowest stage as fast as possible.

Input: a P x L matrix `times`, times[i, n-1] = time of stage i (one micro-batch,
forward + backward) when it holds n layers, inf where n layers do not fit in its
memory. Each row must be nondecreasing in n (more layers never make a stage
faster or smaller).

`split_layers` is exact: it finds the smallest bottleneck C for which every
stage can take at least one layer and the stages together can take all L
(binary search over the distinct finite entries; feasibility is a row-wise
count, O(P*L)), then, among splits whose every stage is within C, the one with
the smallest sum of stage times (a min-plus dynamic program, O(P*L^2) vectorised).
So it minimises (max_i T_i, sum_i T_i) lexicographically: the 1F1B step time
(m-1)*max + sum for m >= 2, up to ties that only m = 1 would break.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    counts: tuple[int, ...]       # layers per stage, in order
    bottleneck: float             # max stage time
    total: float                  # sum of stage times

    def ranges(self) -> list[tuple[int, int]]:
        out, start = [], 0
        for n in self.counts:
            out.append((start, start + n))
            start += n
        return out


def _capacities(times: np.ndarray, cap: float) -> np.ndarray:
    """Largest n each stage can hold within time `cap` (its leading run of entries <= cap)."""
    ok = np.logical_and.accumulate(times <= cap, axis=1)
    return ok.sum(axis=1)


_INDEX_CACHE: dict = {}


def _shift_index(L: int):
    hit = _INDEX_CACHE.get(L)
    if hit is None:
        k = np.arange(L + 1)[:, None]
        n = np.arange(1, L + 1)[None, :]
        prev = k - n
        valid = prev >= 0
        hit = (np.where(valid, prev, 0), valid)
        _INDEX_CACHE[L] = hit
    return hit


def min_sum_split(times: np.ndarray, cap: float) -> Split | None:
    """Among splits with every stage time <= cap, the one with the smallest total.

    Only the first W columns can be taken (W: the most layers any stage holds within cap; the
    rest are inf), so the dynamic program runs on those: the same sums and the same first-minimum
    choices as over all L, at a fraction of the work on long pipelines."""
    P, L = times.shape
    ok = np.logical_and.accumulate(times <= cap, axis=1)
    width = max(1, int(ok.sum(axis=1).max()))
    cost = np.where(ok[:, :width], times[:, :width], np.inf)
    prev_index, valid = _shift_index(L)
    prev_index, valid = prev_index[:, :width], valid[:, :width]
    rows = np.arange(L + 1)
    best = np.full(L + 1, np.inf)
    best[0] = 0.0
    choices = []
    for i in range(P):
        cand = np.where(valid, best[prev_index], np.inf) + cost[i][None, :]
        arg = np.argmin(cand, axis=1)
        best = cand[rows, arg]
        choices.append(arg)
    if not np.isfinite(best[L]):
        return None
    counts = []
    k = L
    for i in range(P - 1, -1, -1):
        n = int(choices[i][k]) + 1
        counts.append(n)
        k -= n
    counts.reverse()
    stage = [float(times[i, n - 1]) for i, n in enumerate(counts)]
    return Split(tuple(counts), max(stage), float(sum(stage)))


def min_bottleneck(times: np.ndarray) -> float | None:
    """The smallest achievable max stage time, or None if no split fits.

    Rows nondecreasing (the module's contract): a stage holds within C exactly its entries <= C,
    so C is feasible once every first entry and L entries in all are <= C, and the answer is the
    larger of the first column's max and the L-th smallest entry. Rows that break the contract
    get the binary search over leading runs (`_min_bottleneck_search`)."""
    P, L = times.shape
    if P == 0 or P > L:
        return None
    if L > 1 and not (times[:, 1:] >= times[:, :-1]).all():
        return _min_bottleneck_search(times)
    finite = times[np.isfinite(times)]
    if finite.size < L or not np.isfinite(times[:, 0]).all():
        return None
    return float(max(np.partition(finite, L - 1)[L - 1], times[:, 0].max()))


def _min_bottleneck_search(times: np.ndarray) -> float | None:
    """min_bottleneck for any rows: binary search over the distinct finite entries, a stage holding
    its leading run of entries within the bound."""
    P, L = times.shape
    finite = times[np.isfinite(times)]
    if finite.size == 0:
        return None
    values = np.unique(finite)

    def feasible(c: float) -> bool:
        caps = _capacities(times, c)
        return bool(caps.min() >= 1 and caps.sum() >= L)

    if not feasible(values[-1]):
        return None
    # Every stage holds at least one layer, so the bottleneck is at least max_i times[i, 0].
    lo = int(np.searchsorted(values, times[:, 0].max()))
    hi = len(values) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(values[mid]):
            hi = mid
        else:
            lo = mid + 1
    return float(values[lo])


def split_layers(times: np.ndarray) -> Split | None:
    """Exact (min max, then min sum) split of L layers over P stages; None if none fits."""
    times = np.asarray(times, dtype=np.float64)
    cap = min_bottleneck(times)
    if cap is None:
        return None
    return min_sum_split(times, cap)


def brute_force_split(times: np.ndarray) -> Split | None:
    """Every composition of L into P positive parts (for tests on small cases)."""
    times = np.asarray(times, dtype=np.float64)
    P, L = times.shape
    best = None
    for cuts in itertools.combinations(range(1, L), P - 1):
        bounds = (0, *cuts, L)
        counts = tuple(bounds[i + 1] - bounds[i] for i in range(P))
        stage = [times[i, n - 1] for i, n in enumerate(counts)]
        if not all(np.isfinite(stage)):
            continue
        key = (max(stage), sum(stage))
        if best is None or key < (best.bottleneck, best.total):
            best = Split(counts, float(key[0]), float(key[1]))
    return best


def compositions(L: int, P: int) -> np.ndarray:
    """All compositions of L into P positive parts, one per row (small L only)."""
    rows = []
    for cuts in itertools.combinations(range(1, L), P - 1):
        bounds = (0, *cuts, L)
        rows.append([bounds[i + 1] - bounds[i] for i in range(P)])
    return np.array(rows, dtype=np.int64).reshape(-1, P)
