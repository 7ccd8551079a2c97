"""Message tags, allocated in one place so no two kinds of traffic share one.

Pipeline activations and gradients of micro-batch `mb` use 2*mb (+0 forward, +1
backward); the tied-embedding swap sits above every micro-batch; the fleet-wide
sums and the hetero-DP buckets sit above that (hetero.engine.comms).
"""

FORWARD, BACKWARD = 0, 1
TIED = 1 << 20          # above every micro-batch tag
FLEET_REDUCE = 1 << 24  # bridge tags of fleet-wide sums, above every pipeline tag
FLEET_RESULT = FLEET_REDUCE + 1


def micro_batch(mb: int, kind: str) -> int:
    """The tag of micro-batch `mb`'s activation ("F") or gradient ("B")."""
    return 2 * mb + (FORWARD if kind == "F" else BACKWARD)
