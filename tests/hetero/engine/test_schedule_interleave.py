"""The interleaved (virtual-stage) 1F1B schedule: plain 1F1B unchanged at v == 1, exactly the
planner's chunk_order at v > 1, and runnable: across all stages every receive is eventually
satisfied, and between any two stages messages are sent in the order the receiver posts them
(the native transport matches messages in issue order, tags carry no meaning there)."""

from __future__ import annotations

import itertools

import pytest

from hetero.engine.schedule import max_in_flight, one_f_one_b, stage_schedule
from partitioner.interleave import chunk_order, peak_in_flight

GRID = [(p, v, m) for p, v in itertools.product((2, 3, 4), (2, 3)) for m in (p, 2 * p, 3 * p)]


@pytest.mark.parametrize("stages,micro_batches", list(itertools.product([1, 2, 3, 5], [1, 2, 4, 7])))
def test_one_chunk_is_plain_one_f_one_b(stages, micro_batches):
    for stage in range(stages):
        assert stage_schedule(stage, stages, micro_batches) == one_f_one_b(stage, stages, micro_batches)
        assert all(a.chunk == 0 for a in stage_schedule(stage, stages, micro_batches))


@pytest.mark.parametrize("p,v,m", GRID)
def test_interleaved_is_the_planners_chunk_order(p, v, m):
    for s in range(p):
        actions = stage_schedule(s, p, m, v)
        assert [(a.kind, a.chunk, a.micro_batch) for a in actions] == chunk_order(p, s, v, m)
        assert max_in_flight(actions) == peak_in_flight(p, s, v, m)
        assert all(max_in_flight(actions, c) >= 1 for c in range(v))
        # every chunk runs every micro-batch once each way
        assert sorted((a.kind, a.chunk, a.micro_batch) for a in actions) == sorted(
            (k, c, mb) for k in "BF" for c in range(v) for mb in range(m))


def _neighbours(p: int, v: int, s: int, chunk: int) -> tuple:
    """(previous, next) (stage, chunk) of a chunk; the last stage's chunk c feeds the first's c+1."""
    prev = (s - 1, chunk) if s > 0 else ((p - 1, chunk - 1) if chunk > 0 else None)
    nxt = (s + 1, chunk) if s < p - 1 else ((0, chunk + 1) if chunk < v - 1 else None)
    return prev, nxt


def _traffic(p: int, v: int, m: int) -> tuple[dict, dict, list]:
    """Per (sender, receiver): messages in the sender's order and in the receiver's order."""
    schedules = [stage_schedule(s, p, m, v) for s in range(p)]
    sent: dict = {}
    received: dict = {}
    for s, actions in enumerate(schedules):
        for a in actions:
            prev, nxt = _neighbours(p, v, s, a.chunk)
            source, target = (prev, nxt) if a.kind == "F" else (nxt, prev)
            if target is not None:    # what this action sends, named by the receiving chunk
                sent.setdefault((s, target[0]), []).append((a.kind, target[1], a.micro_batch))
            if source is not None:    # what it waits for
                received.setdefault((source[0], s), []).append((a.kind, a.chunk, a.micro_batch))
    return sent, received, schedules


@pytest.mark.parametrize("p,v,m", GRID + [(2, 1, 4), (4, 1, 6)])
def test_messages_between_two_stages_arrive_in_the_order_they_are_awaited(p, v, m):
    sent, received, _ = _traffic(p, v, m)
    assert sent == received
    if v > 1:
        assert (p - 1, 0) in sent      # the wrap-around hop exists


@pytest.mark.parametrize("p,v,m", GRID)
def test_interleaved_pipeline_never_deadlocks(p, v, m):
    """All stages' schedules against each other: an action runs once its input has been sent
    (sends never block); every stage must reach its end."""
    _, _, schedules = _traffic(p, v, m)
    position, done = [0] * p, set()
    progressed = True
    while progressed:
        progressed = False
        for s in range(p):
            if position[s] == len(schedules[s]):
                continue
            a = schedules[s][position[s]]
            prev, nxt = _neighbours(p, v, s, a.chunk)
            needs = [("F", prev, a.micro_batch)] if a.kind == "F" else [("F", (s, a.chunk), a.micro_batch),
                                                                        ("B", nxt, a.micro_batch)]
            if all(dep is None or (kind, dep, mb) in done for kind, dep, mb in needs):
                done.add((a.kind, (s, a.chunk), a.micro_batch))
                position[s] += 1
                progressed = True
    assert position == [len(s) for s in schedules]


def test_bad_interleaved_arguments():
    with pytest.raises(ValueError, match="multiple of the stages"):
        stage_schedule(0, 2, 3, 2)
    with pytest.raises(ValueError, match="at least 2 stages"):
        stage_schedule(0, 1, 2, 2)
