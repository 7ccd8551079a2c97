"""Time of one step of a pipeline from its stages' times: plain 1F1B, interleaved 1F1B, and the
tail after the last backward, where the DP gradient reduction overlaps the backward as the engine
runs it (hetero/engine/gradients.py, buckets.StageBuckets). Split from partitioner/costs.py (which
re-exports these names): costs.py prices operations, this module composes them along the schedule.

Overlap (`exposed_reduce_s`): the engine starts a model chunk's DP reduction as soon as its last
backward of the step has run, and waits for all of them only before the fleet-wide norm. With
E the end of the pipeline's compute (stage 0's last backward), B_i = BACKWARD_SHARE * T_i stage
i's backward of one micro-batch (all chunks) and v chunks per stage:
- stage i's last backward ends W_i = sum_{j<i} (B_j / v + hop_j) before E (its predecessors'
  drain: each still runs the backward of one chunk of the last micro-batch);
- chunk c of stage i ends c*p backwards of B_i/v each before the stage's last (interleaved
  1F1B drains the chunks p actions apart, chunk v-1 first; the drain runs no forwards);
- a stage's reduction of R_i seconds is v buckets of R_i/v on one DP communicator, run in
  order, so they finish at max_c (release_c + (c+1) R_i/v); only what lies beyond E is exposed.
The engine starts chunks early in fp32 only (bf16/fp16 reduce an fp32 copy made at collection,
hetero/engine/gradients.py): there a stage's v buckets all start at its last backward.
Under ZeRO-1 half of R_i (the reduce-scatter) overlaps; the other half (the all-gather of the
updated parameters) follows the update. The fleet-wide norm joins the stages, so the tail is the
slowest stage's exposed reduction plus the slowest stage's update. Every gap is a lower bound of
the time the stage has (waits only lengthen it), so the exposed part is an upper bound.
"""

from __future__ import annotations

def pipeline_step_s(stage_times, boundary_times, m: int, tail: float) -> float:
    """1F1B with heterogeneous stages: (m-1)*max_i T_i + sum_i T_i, where a boundary
    slower than every stage throttles the steady state, and fill/drain cross each
    boundary once forward and once backward; plus the tail (DP reduction, optimizer)."""
    cycle = max(stage_times)
    if boundary_times:
        cycle = max(cycle, max(boundary_times))
    return (m - 1) * cycle + sum(stage_times) + 2.0 * sum(boundary_times) + tail


BACKWARD_SHARE = 2.0 / 3.0     # of a stage's forward + backward time: backward is twice the forward


def interleaved_cycle_fill(stage_times, inner_hops, wrap_hop: float, v: int) -> tuple[float, float]:
    """(cycle, fill) of interleaved 1F1B with v chunks per stage: the step is
    (m-1)*cycle + fill + tail, m a multiple of the p stages; v == 1 is `pipeline_step_s`.

    stage_times T_i: stage i's forward + backward of one micro-batch, all its chunks; inner_hops:
    one crossing of each stage boundary, wrap_hop: stage p-1 back to stage 0 (the bridge when
    the pipeline ends on another island than it starts); H = the sum of all p hops. Derived from
    the schedule (partitioner/interleave.py) with uneven stages, and checked against running it
    op by op (tests/partitioner/test_interleave_costs.py: within a few per cent):
    - steady state, per micro-batch, the slowest of: the slowest stage; each boundary's link,
      crossed v times each way (the wrap-around v-1 times); and the ring -- in 1F1B order a
      backward of chunk c on stage p-1 waits for chunk c+1's backward of the same micro-batch
      to come back round from stage 0, so p chunk slots must cover every stage's backward of
      one chunk plus every hop: (BACKWARD_SHARE * sum T + v*H)/p;
    - fill and drain: the first chunk reaches the slowest stage, the last leaves it, after the
      other stages' work on one chunk, 1/v of plain 1F1B's (Megatron's (p-1)/(v m) bubble),
      plus one crossing of each boundary each way, plus the ring's hops once per extra chunk;
      never less than one micro-batch's chain: the whole model forward and backward with every
      hop v times (m = p: nothing hides the ring's latency)."""
    p = len(stage_times)
    top, total = max(stage_times), sum(stage_times)
    if v == 1:
        cycle = max(top, max(inner_hops, default=0.0))
        return cycle, total + 2.0 * sum(inner_hops)
    hops = sum(inner_hops) + wrap_hop
    cycle = max(top, v * max(inner_hops, default=0.0), (v - 1) * wrap_hop, (BACKWARD_SHARE * total + v * hops) / p)
    fill = top + (total - top) / v + 2.0 * sum(inner_hops) + (v - 1) * hops
    chain = total + 2.0 * (v * sum(inner_hops) + (v - 1) * wrap_hop)
    return cycle, max(fill, chain - (p - 1) * cycle)


def exposed_reduce_s(stage_times, boundary_times, v: int, reduce_s, chunked: bool = True) -> float:
    """The slowest stage's DP reduction time (overlappable part `reduce_s[i]`) left after the end of
    the pipeline's compute, its buckets started at their chunks' last backwards (module docstring);
    `chunked` False: all of a stage's at its last backward (the engine under bf16/fp16)."""
    p = len(stage_times)
    buckets = v if chunked else 1
    exposed, before = 0.0, 0.0        # before: W_i, how long before E stage i's last backward ends
    for i, (time_s, reduce) in enumerate(zip(stage_times, reduce_s)):
        backward = BACKWARD_SHARE * time_s / v
        if reduce > 0.0:
            done = max((c + 1) * reduce / buckets - c * p * backward for c in range(buckets))
            exposed = max(exposed, done - before)
        before += backward + (boundary_times[i] if i < len(boundary_times) else 0.0)
    return exposed
