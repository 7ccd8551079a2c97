"""The cost model counts only the exposed part of the DP gradient reduction
(partitioner/schedule_time.py exposed_reduce_s): the engine starts a chunk's reduction at the
chunk's last backward, so a later stage's hides behind its predecessors' drain, an interleaved
stage's chunks hide behind its own later chunks, and stage 0's last chunk stays exposed."""

from __future__ import annotations

import pytest

from partitioner.costs import BACKWARD_SHARE, exposed_reduce_s


def test_plain_1f1b_hides_a_later_stage_behind_the_drain_of_the_ones_before_it():
    times, hops = [3.0, 3.0, 3.0], [0.1, 0.1]
    assert exposed_reduce_s(times, hops, 1, [0.5, 0.0, 0.0]) == pytest.approx(0.5)   # stage 0: nothing after it
    drain = BACKWARD_SHARE * 3.0 + 0.1                                                 # stage 0's last backward
    assert exposed_reduce_s(times, hops, 1, [0.0, drain + 0.3, 0.0]) == pytest.approx(0.3)
    assert exposed_reduce_s(times, hops, 1, [0.0, 0.0, 1.0]) == 0.0


def test_interleaving_leaves_only_the_last_chunk_exposed_when_backwards_are_long():
    times, hops = [3.0, 3.0], [0.1]
    assert exposed_reduce_s(times, hops, 4, [1.0, 0.0]) == pytest.approx(0.25)
    # a reduction slower than the backwards it overlaps queues up: v buckets in a row on one group
    slow = exposed_reduce_s([0.01, 0.01], hops, 4, [1.0, 0.0])
    assert 0.25 < slow <= 1.0


@pytest.mark.parametrize("v", [1, 2, 4])
def test_exposed_part_is_never_more_than_the_reduction_nor_negative(v):
    times, hops = [2.0, 1.0, 4.0, 0.5], [0.2, 0.0, 0.3]
    for reduce_s in ([0.0] * 4, [0.1, 5.0, 0.3, 9.0], [3.0, 3.0, 3.0, 3.0]):
        got = exposed_reduce_s(times, hops, v, reduce_s)
        assert 0.0 <= got <= max(reduce_s) + 1e-12


def test_unchunked_stages_start_their_whole_reduction_at_their_last_backward():
    """bf16/fp16: the engine starts no chunk early, so only the predecessors' drain hides it."""
    times, hops = [3.0, 3.0], [0.1]
    assert exposed_reduce_s(times, hops, 4, [1.0, 0.0], chunked=False) == pytest.approx(1.0)
    drain = BACKWARD_SHARE * 3.0 / 4 + 0.1
    assert exposed_reduce_s(times, hops, 4, [0.0, 1.0], chunked=False) == pytest.approx(1.0 - drain)
