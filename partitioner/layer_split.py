"""The uneven layer split: contiguous layers per stage, slowest stage as fast as possible.

Input: a P x L matrix `times`, times[i, n-1] = time of stage i (one micro-batch,
forward + backward) when it holds n layers, inf where n layers do not fit in its
memory. Each row must be nondecreasing in n (more layers never make a stage
faster or smaller).

`split_layers` is exact: it finds the smallest bottleneck C for which every
stage can take at least one layer and the stages together can take all L
(the L-th smallest entry, or the largest first entry if larger: O(P*L)), then,
among splits whose every stage is within C, the one with the smallest sum of stage
times (a min-plus dynamic program, O(P*L*W) vectorised, W the most layers a stage
holds within C).
So it minimises (max_i T_i, sum_i T_i) lexicographically: the 1F1B step time
(m-1)*max + sum for m >= 2, up to ties that only m = 1 would break.
"""

from __future__ import annotations

import itertools
import math
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


def min_sum_split(times: np.ndarray, cap: float) -> Split | None:
    """Among splits with every stage time <= cap, the one with the smallest total.

    A min-plus dynamic program over the stages: best_i[k], the least total of the first i stages
    holding k layers, is min over n of best_{i-1}[k - n] + times[i, n - 1] for the n within cap
    (at most W, the most any stage holds within cap: one shifted add per n, no L x L matrix).
    The choices are recovered walking back from k = L, each stage taking the smallest n that
    attains its minimum (the same sums, so the same split as costing every n of every stage)."""
    P, L = times.shape
    ok = np.logical_and.accumulate(times <= cap, axis=1)
    caps = ok.sum(axis=1).tolist()
    W = max([1] + caps)
    cost = np.where(ok[:, :W], times[:, :W], np.inf).tolist()
    # B[i, W + k] = best_i[k]; the W leading infs stand for k < 0
    B = np.full((P + 1, W + L + 1), np.inf)
    B[0, W] = 0.0
    for i in range(P):
        prev, out, row = B[i], B[i + 1, W:], cost[i]
        np.add(prev[W - 1:W + L], row[0], out=out)
        for j in range(1, caps[i]):
            np.minimum(out, prev[W - 1 - j:W + L - j] + row[j], out=out)
    if not B[P, W + L] < np.inf:
        return None
    counts = []
    k = L
    for i in range(P - 1, -1, -1):
        prev, row = B[i, k:W + k].tolist(), cost[i]        # prev[W - n] = best_{i-1}[k - n]
        best, pick = math.inf, 1
        for n in range(1, min(W, k) + 1):
            total = prev[W - n] + row[n - 1]
            if total < best:
                best, pick = total, n
        counts.append(pick)
        k -= pick
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
