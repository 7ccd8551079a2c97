"""partitioner/interleave.py: the interleaved 1F1B formulas against a brute-force run of the schedule."""

from __future__ import annotations

import pytest

from partitioner.interleave import (bubble_fraction, chunk_order, peak_in_flight, simulate,
                                    warmup_forwards)

CASES = [(p, v, m) for p in range(1, 5) for v in range(1, 5) for m in (p, 2 * p, 3 * p)]


def plain_1f1b(p: int, s: int, m: int) -> list:
    """Today's 1F1B, written independently: p - s - 1 warm-up forwards, then F/B pairs, then drain."""
    w = min(m, p - s - 1)
    out = [("F", 0, j) for j in range(w)]
    for j in range(m - w):
        out += [("F", 0, w + j), ("B", 0, j)]
    return out + [("B", 0, j) for j in range(m - w, m)]


@pytest.mark.parametrize("p,m", [(1, 1), (2, 1), (3, 2), (4, 4), (4, 9), (5, 3)])
def test_v1_is_plain_1f1b(p, m):
    for s in range(p):
        assert warmup_forwards(p, s, 1, m) == min(m, p - s - 1)
        assert peak_in_flight(p, s, 1, m) == min(m, p - s)
        assert chunk_order(p, s, 1, m) == plain_1f1b(p, s, m)


@pytest.mark.parametrize("p,v,m", CASES)
def test_every_chunk_runs_once_forward_before_backward(p, v, m):
    for s in range(p):
        order = chunk_order(p, s, v, m)
        want = {(k, c, j) for k in "FB" for c in range(v) for j in range(m)}
        assert len(order) == len(want) and set(order) == want
        for c in range(v):
            for j in range(m):
                assert order.index(("F", c, j)) < order.index(("B", c, j))


@pytest.mark.parametrize("p,v,m", CASES)
def test_simulated_peak_and_bubble_match_the_formulas(p, v, m):
    """Equal stages, no communication: the schedule never deadlocks, each stage's peak is
    peak_in_flight, and the idle time is exactly (p - 1) / (v m) of the ideal (backward 2x forward)."""
    run = simulate(p, v, m, [1.0] * p, [2.0] * p)
    assert run.peak == [peak_in_flight(p, s, v, m) for s in range(p)]
    ideal = m * v * 3.0
    assert (run.makespan - ideal) / ideal == pytest.approx(bubble_fraction(p, v, m), abs=1e-12)


def test_interleaving_cuts_the_bubble_and_costs_memory():
    p, m = 4, 8
    plain = simulate(p, 1, m, [4.0] * p, [8.0] * p).makespan
    inter = simulate(p, 2, m, [2.0] * p, [4.0] * p).makespan
    assert inter < plain
    assert peak_in_flight(p, 0, 2, m) / 2 > peak_in_flight(p, 0, 1, m)


def test_schedule_survives_uneven_stages_and_hops():
    run = simulate(4, 3, 8, [1.0, 2.0, 0.5, 1.5], [2.0, 4.0, 1.0, 3.0], hops=[0.3, 1.0, 0.1], wrap=2.0)
    assert run.makespan > 8 * 3 * 6.0     # the slowest stage's work plus some bubble


@pytest.mark.parametrize("args", [(4, 0, 2, 6), (0, 0, 1, 1), (2, 2, 1, 2), (2, 0, 0, 2)])
def test_bad_shapes_raise(args):
    with pytest.raises(ValueError):
        chunk_order(*args)
