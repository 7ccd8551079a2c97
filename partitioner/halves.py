"""Stage boundaries inside a layer: after the whole-layer split, the planner may cut a pipeline at
half-layer blocks instead, so a boundary can sit at the seam between a layer's attention half and
its MLP half (block 2k is layer k's attention half, 2k+1 its MLP half; docs/plan-format.md,
`blocks`). With few layers per stage a whole layer is a coarse grain: 8 layers over two islands
whose speeds ask for 2.34 and 5.66 leave the faster stage 6 % over its share, and a deep pipeline
of 2 and 3 layers per stage runs at its 3-layer stages' pace.

A stage keeps the recompute mode of its whole-layer split; it may hold a number of blocks whose
layers (every layer it touches, whole) fit in that mode: its time row is finite there and picks
that mode or a lighter one (so memory is counted conservatively, and the caller costs the chosen
split's memory at the layers touched). A half costs its share of the layer's FLOPs
(`attention_share`) of the stage's per-layer time in that mode; the stage's fixed costs (host,
hand-offs, embedding or head) do not change. The DP reduction and update (the tail) stay costed
at the whole-layer split.

Two cuts are tried, the better kept where it shortens the step: each whole-layer boundary moved
by at most half a layer (an exact min-max programme over the boundaries, the stages' sum breaking
ties), and the min-max split over all blocks (bisection on the slowest stage's time, each bound
checked greedily: every stage takes as many blocks as fit under it, which is exact when a stage's
time grows with its blocks).
"""

from __future__ import annotations

import itertools
import math

from partitioner.candidates import PipeEval
from partitioner.costs import CostModel, attention_share, pipeline_step_s
from partitioner.inputs import RECOMPUTE_MODES

SHIFTS = (-1, 0, 1)      # half-layer blocks a whole-layer boundary moves in the first cut
BISECTIONS = 24          # halvings of the slowest stage's bound in the second


def spans(counts, cuts) -> list[tuple[int, int]]:
    """Each stage's half-open range of half-layer blocks: at twice its whole layers' range, or between
    `cuts` (the P - 1 inner boundaries, in blocks) when there are some."""
    starts = [0, *(cuts or (2 * end for end in itertools.accumulate(counts[:-1]))), 2 * sum(counts)]
    return list(zip(starts, starts[1:]))


def touched(a: int, b: int) -> int:
    """The layers half-layer blocks [a, b) touch, a layer held in part counting whole."""
    return (b + 1) // 2 - a // 2


def best_cuts(cm: CostModel, pe: PipeEval, rows, picks) -> tuple[tuple[int, ...], list[float]] | None:
    """Inner stage boundaries of `pe` (plain 1F1B, whole layers; `rows`/`picks`: its stages' time rows
    and recompute picks, evaluate._time_matrix), in half-layer blocks, that shorten its step, with
    the stages' times then; None where no cut does. The caller checks the memory of the layers the
    stages touch (`spans`, `touched`)."""
    P = len(pe.layout)
    if pe.v != 1 or P < 2:
        return None
    stages = _Stages(cm, pe, rows, picks)
    best, found = pe.step(), None
    for cuts in (_shifted(pe, stages), _min_max(pe, stages)):
        if cuts is None:
            continue
        times = [stages.time(i, a, b) for i, (a, b) in enumerate(spans(pe.counts, cuts))]
        step = pipeline_step_s(times, pe.boundary, pe.m, pe.tail)
        if all(math.isfinite(t) for t in times) and step < best * (1 - 1e-12):
            best, found = step, (tuple(cuts), times)
    return found


class _Stages:
    """Each stage's time over half-layer blocks, in its whole-layer split's recompute mode: its
    fixed part plus the blocks' layers' worth at its per-layer time; inf beyond the layers it may
    touch."""

    def __init__(self, cm: CostModel, pe: PipeEval, rows, picks):
        self.share = attention_share(cm.model)
        self.blocks = 2 * cm.model.layers
        self.per = [cm.per_layer_s(s.island.name, s.tp, pe.b, mode) for s, mode in zip(pe.layout, pe.modes)]
        self.fixed = [t - n * p for t, n, p in zip(pe.stage_times, pe.counts, self.per)]
        self.most = []                       # per stage, the most layers it may touch in its mode
        for i, mode in enumerate(pe.modes):
            limit, row, pick = RECOMPUTE_MODES.index(mode), rows[i], picks[i]
            n = 0
            while n < len(row) and math.isfinite(row[n]) and pick[n] <= limit:
                n += 1
            self.most.append(n)

    def worth(self, k: int) -> float:
        """Layers' worth of compute in the model's first k blocks."""
        return k // 2 + (self.share if k % 2 else 0.0)

    def time(self, i: int, a: int, b: int) -> float:
        if b <= a or touched(a, b) > self.most[i]:
            return math.inf
        return self.fixed[i] + (self.worth(b) - self.worth(a)) * self.per[i]

    def furthest(self, i: int, a: int, cap: float, last_allowed: int) -> int:
        """The last block boundary b <= last_allowed with stage i's blocks [a, b) within `cap`."""
        y = self.worth(a) + (cap - self.fixed[i]) / self.per[i] + 1e-12
        if y < self.worth(a):
            return a
        whole = math.floor(y)
        b = 2 * whole + (1 if y - whole >= self.share else 0)
        return max(a, min(b, 2 * (a // 2 + self.most[i]), last_allowed))


def _shifted(pe: PipeEval, stages: _Stages) -> list[int] | None:
    """Each whole-layer boundary moved by at most one block: an exact min-max dynamic programme over
    the boundaries (a stage's time depends on its two only), the stages' sum breaking ties."""
    P = len(pe.layout)
    edge = [0, *(end for _, end in spans(pe.counts, ()))]
    best: dict[int, tuple[float, float, tuple]] = {0: (0.0, 0.0, ())}
    for i in range(P):
        step: dict[int, tuple[float, float, tuple]] = {}
        for right in (SHIFTS if i < P - 1 else (0,)):
            options = []
            for left, (top, total, path) in best.items():
                t = stages.time(i, edge[i] + left, edge[i + 1] + right)
                if math.isfinite(t):
                    options.append((max(top, t), total + t, path + ((right,) if i < P - 1 else ())))
            if options:
                step[right] = min(options)
        best = step
    if 0 not in best or not any(best[0][2]):
        return None
    return [w + s for w, s in zip(edge[1:-1], best[0][2])]


def _min_max(pe: PipeEval, stages: _Stages) -> list[int] | None:
    """The cut over all blocks minimising the slowest stage: bisection on its time between the
    continuous balance and the whole-layer split's, each bound checked greedily."""
    P, n = len(pe.layout), stages.blocks
    hi = max(pe.stage_times)
    rate = sum(1.0 / p for p in stages.per)
    lo = min(hi, (n / 2 + sum(f / p for f, p in zip(stages.fixed, stages.per))) / rate)
    best = _greedy(stages, P, hi)
    if best is None:
        return None
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        cuts = _greedy(stages, P, mid)
        if cuts is None:
            lo = mid
        else:
            hi, best = mid, cuts
    return best


def _greedy(stages: _Stages, P: int, cap: float) -> list[int] | None:
    """Inner boundaries where every stage takes as many blocks as fit under `cap` (and leaves at
    least one to each later stage); None where the last stage's blocks do not fit."""
    a, cuts, n = 0, [], stages.blocks
    for i in range(P - 1):
        b = stages.furthest(i, a, cap, n - (P - 1 - i))
        if b <= a:
            return None
        cuts.append(b)
        a = b
    return cuts if stages.time(P - 1, a, n) <= cap else None
