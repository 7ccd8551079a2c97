"""Stage boundaries inside a layer: after the whole-layer split, each boundary between two stages
may move half a layer either way, to the seam between a layer's attention half and its MLP half
(half-layer blocks: 2k is layer k's attention half, 2k+1 its MLP half; docs/plan-format.md,
`blocks`). With few layers per stage, a whole layer is a coarse grain: 8 layers over two islands
whose speeds ask for 2.34 and 5.66 leave the faster stage 6 % over its share; 2 layers and an
attention half leave it within 1 %.

A half costs its share of the layer's FLOPs (`attention_share`) of the stage's per-layer time in
its recompute mode; the stage's fixed costs (host, hand-offs, embedding or head) do not change.
Memory is counted conservatively: a stage that takes a half from a neighbour must fit the whole
layer it touches in the same recompute mode (its time row is finite there, with the same pick),
and its memory is costed at the layers it touches. The DP reduction and update (the tail) stay
costed at the whole-layer split: half a layer's parameters move between two stages.

The shifts are chosen by an exact min-max dynamic programme over the boundaries (a stage's time
depends on its two boundaries only), the sum of the stage times breaking ties, and kept only where
the pipeline's step is shorter than at whole layers.
"""

from __future__ import annotations

import math
from partitioner.candidates import PipeEval
from partitioner.costs import CostModel, attention_share, pipeline_step_s

SHIFTS = (-1, 0, 1)      # half-layer blocks a boundary moves: -1 gives the left stage's last MLP half away,
#                          +1 takes the right stage's first attention half


def touched(left: int, right: int) -> int:
    """Whole layers a stage touches beyond its own when its boundaries move (left, right)."""
    return int(right == 1) + int(left == -1)


def best_shifts(cm: CostModel, pe: PipeEval, rows, picks) -> tuple[tuple[int, ...], list[float]] | None:
    """The boundary shifts of `pe` (plain 1F1B, whole layers; `rows`/`picks`: its stages' time rows and
    recompute picks, evaluate._time_matrix) that shorten its step, with the stages' times then; None
    where none does. Memory beyond the time rows' is the caller's to check (`touched_counts`)."""
    P = len(pe.layout)
    if pe.v != 1 or P < 2:
        return None
    share = attention_share(cm.model)
    per = [cm.per_layer_s(slot.island.name, slot.tp, pe.b, mode) for slot, mode in zip(pe.layout, pe.modes)]
    moved = {-1: share - 1.0, 0: 0.0, 1: share}     # layers' worth a right edge's shift adds

    def stage_time(i: int, left: int, right: int) -> float:
        n = pe.counts[i]
        if 2 * n + right - left < 1:
            return math.inf
        for k in range(1, touched(left, right) + 1):
            if n + k > len(rows[i]) or not math.isfinite(rows[i][n + k - 1]) \
                    or picks[i][n + k - 1] != picks[i][n - 1]:
                return math.inf
        return pe.stage_times[i] + (moved[right] - moved[left]) * per[i]

    shifts = _min_max_shifts(P, stage_time)
    if not any(shifts):
        return None
    edges = (0, *shifts, 0)
    times = [stage_time(i, edges[i], edges[i + 1]) for i in range(P)]
    if pipeline_step_s(times, pe.boundary, pe.m, pe.tail) >= pe.step():
        return None
    return tuple(shifts), times


def touched_counts(counts, shifts) -> list[int]:
    """The layers each stage touches once its boundaries move by `shifts` (a half taken from a
    neighbour touches one more layer; a half given away leaves the layer touched)."""
    edges = (0, *shifts, 0)
    return [n + touched(edges[i], edges[i + 1]) for i, n in enumerate(counts)]


def stage_blocks(counts, shifts) -> list[tuple[int, int]]:
    """Each stage's half-open range of half-layer blocks: whole-layer boundaries at twice the layer
    index, moved by `shifts` (() for none)."""
    edges = (0, *(shifts or (0,) * (len(counts) - 1)), 0)
    out, start = [], 0
    for i, n in enumerate(counts):
        out.append((2 * start + edges[i], 2 * (start + n) + edges[i + 1]))
        start += n
    return out


def _min_max_shifts(P: int, stage_time) -> list[int]:
    """The boundary shifts minimising the slowest stage, then the stages' sum: a dynamic programme
    over the P - 1 boundaries whose state is the last boundary's shift."""
    best: dict[int, tuple[float, float, tuple]] = {0: (0.0, 0.0, ())}   # left edge of stage 0 never moves
    for i in range(P):
        rights = SHIFTS if i < P - 1 else (0,)
        step: dict[int, tuple[float, float, tuple]] = {}
        for right in rights:
            options = []
            for left, (top, total, path) in best.items():
                t = stage_time(i, left, right)
                if math.isfinite(t):
                    options.append((max(top, t), total + t, path + ((right,) if i < P - 1 else ())))
            if options:
                step[right] = min(options)
        best = step
    return list(best[0][2]) if 0 in best else [0] * (P - 1)
