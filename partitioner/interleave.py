"""Interleaved (virtual-stage) 1F1B: the schedule's formulas, shared by the planner and the engine.

Megatron-LM's interleaved 1F1B (Narayanan et al. 2021, section 2.2): p stages, each holding
v model chunks, m micro-batches (m a multiple of p when v > 1). The model is cut into p*v
consecutive pieces; the stage at position s holds pieces s, s+p, ..., s+(v-1)p, so a
micro-batch goes round the pipeline v times (virtual stage g = chunk*p + s). Per stage the
work is m*v chunk forwards and as many backwards: `warmup_forwards` forwards first, then
one forward and one backward alternately, then the remaining backwards. v == 1 is plain
1F1B exactly (warm-up p - s - 1, peak min(m, p - s)).

Pure functions, no torch: the engine's schedule (hetero/engine/schedule.py) must produce
exactly `chunk_order`, and the cost model (partitioner/costs.py) takes its memory from
`peak_in_flight` and its bubble from `bubble_fraction`. `simulate` runs the schedule
op by op with given times; it is the reference the formulas and the cost model's step
time are checked against (tests/partitioner/test_interleave_costs.py).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

Op = tuple[str, int, int]      # ("F" | "B", chunk, micro-batch)


def _check(p: int, s: int, v: int, m: int) -> None:
    if p < 1 or v < 1 or m < 1 or not 0 <= s < p:
        raise ValueError(f"interleaved 1F1B needs p, v, m >= 1 and 0 <= s < p (p={p}, s={s}, v={v}, m={m})")
    if v > 1 and m % p:
        raise ValueError(f"interleaved 1F1B needs micro-batches ({m}) to be a multiple of the stages ({p})")


def warmup_forwards(p: int, s: int, v: int, m: int) -> int:
    """Forwards stage s runs before its first backward."""
    _check(p, s, v, m)
    if v == 1:
        return min(m, p - s - 1)
    return min(m * v, (p - s - 1) * 2 + (v - 1) * p)


def peak_in_flight(p: int, s: int, v: int, m: int) -> int:
    """Most chunk activations stage s holds at once (chunk units: one chunk of one micro-batch)."""
    return min(m * v, warmup_forwards(p, s, v, m) + 1)


def forward_op(p: int, v: int, k: int) -> tuple[int, int]:
    """(chunk, micro-batch) of a stage's k-th forward."""
    return (k // p) % v, (k // (p * v)) * p + k % p


def backward_op(p: int, v: int, k: int) -> tuple[int, int]:
    """(chunk, micro-batch) of a stage's k-th backward: the chunks in reverse order."""
    return v - 1 - (k // p) % v, (k // (p * v)) * p + k % p


def chunk_order(p: int, s: int, v: int, m: int) -> list[Op]:
    """Stage s's ops in the order it runs them."""
    w = warmup_forwards(p, s, v, m)
    total = m * v
    out: list[Op] = [("F", *forward_op(p, v, k)) for k in range(w)]
    for k in range(total - w):
        out.append(("F", *forward_op(p, v, w + k)))
        out.append(("B", *backward_op(p, v, k)))
    out.extend(("B", *backward_op(p, v, k)) for k in range(total - w, total))
    return out


def bubble_fraction(p: int, v: int, m: int) -> float:
    """Idle time over the ideal time for equal stages: (p - 1) / (v * m) (Megatron's paper)."""
    return (p - 1) / (v * m)


# ----------------------------------------------------------------------------- reference simulation

class Simulated(NamedTuple):
    """What `simulate` measured: the step's makespan and each stage's most chunks in flight."""

    makespan: float
    peak: list[int]


def simulate(p: int, v: int, m: int, forward: Sequence[float], backward: Sequence[float],
             hops: Sequence[float] = (), wrap: float = 0.0) -> Simulated:
    """Run every stage's `chunk_order` with each op as early as its inputs allow.

    forward[s] / backward[s]: one chunk's time on stage s; hops[s]: stage s -> s+1 (and back)
    per chunk crossing; wrap: stage p-1 -> stage 0 (the round trip of v > 1). Raises
    RuntimeError if the order deadlocks (it must not: that is one of the checks)."""
    hops = list(hops) or [0.0] * (p - 1)
    orders = [chunk_order(p, s, v, m) for s in range(p)]
    done: dict = {}            # (kind, virtual stage, micro-batch) -> finish time
    free = [0.0] * p
    nxt = [0] * p
    held = [0] * p
    peak = [0] * p
    last = p * v - 1

    def link(g_from: int, g_to: int) -> float:
        a, z = g_from % p, g_to % p
        if a == p - 1 and z == 0:
            return wrap
        return hops[min(a, z)]

    def ready(s: int, op: Op):
        kind, chunk, mb = op
        g = chunk * p + s
        if kind == "F":
            if g == 0:
                return 0.0
            dep = done.get(("F", g - 1, mb))
            return None if dep is None else dep + link(g - 1, g)
        own = done.get(("F", g, mb))
        if own is None:
            return None
        if g == last:
            return own
        dep = done.get(("B", g + 1, mb))
        return None if dep is None else max(own, dep + link(g + 1, g))

    remaining = sum(len(o) for o in orders)
    while remaining:
        moved = False
        for s in range(p):
            while nxt[s] < len(orders[s]):
                op = orders[s][nxt[s]]
                at = ready(s, op)
                if at is None:
                    break
                start = max(free[s], at)
                kind, chunk, mb = op
                free[s] = start + (forward[s] if kind == "F" else backward[s])
                done[(kind, chunk * p + s, mb)] = free[s]
                held[s] += 1 if kind == "F" else -1
                peak[s] = max(peak[s], held[s])
                nxt[s] += 1
                remaining -= 1
                moved = True
        if not moved:
            raise RuntimeError(f"interleaved schedule deadlocks (p={p}, v={v}, m={m})")
    return Simulated(max(free), peak)
