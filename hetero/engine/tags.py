"""Message tags, allocated in one place so no two kinds of traffic share one.

Pipeline activations and gradients of micro-batch `mb` use 2*mb (+0 forward, +1
backward); interleaved (v chunks per stage), 2*(mb*v + c) with c the chunk that takes the
activation in forward, so two messages of one micro-batch between two stages never share a tag; the tied-embedding swap sits above every micro-batch; the fleet-wide
sums and the hetero-DP buckets sit above that (hetero.engine.comms).
"""

FORWARD, BACKWARD = 0, 1
TIED = 1 << 20          # above every micro-batch tag
FLEET_REDUCE = 1 << 24  # bridge tags of fleet-wide sums, above every pipeline tag
FLEET_RESULT = FLEET_REDUCE + 1


def micro_batch(mb: int, kind: str, chunk: int = 0, chunks: int = 1) -> int:
    """The tag of micro-batch `mb`'s activation ("F") or gradient ("B") across the boundary into
    `chunk` (the receiving chunk in forward) of a pipeline with `chunks` chunks per stage."""
    return 2 * (mb * chunks + chunk) + (FORWARD if kind == "F" else BACKWARD)
