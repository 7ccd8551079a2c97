"""Why one plan beat another: the parts of the predicted step time that differ most."""

from __future__ import annotations

from partitioner.plan import Plan

PARTS = (
    ("steady_s", "steady state ((m-1) x slowest stage or link)"),
    ("fill_drain_s", "pipeline fill and drain (sum of stage times)"),
    ("p2p_s", "activation transfers between stages"),
    ("dp_reduce_and_optimizer_s", "DP gradient reduction and optimizer step"),
    ("cross_island_reduce_s", "gradient reduction across islands"),
)


def compare(best: Plan, other: Plan, other_name: str = "runner-up") -> list[str]:
    """Sentences on why `other` predicts a slower step than `best`."""
    gap = other.predicted_step_s - best.predicted_step_s
    rel = gap / best.predicted_step_s if best.predicted_step_s else 0.0
    lines = [
        f"chosen:    {best.label}: {best.predicted_step_s:.4g} s per step",
        f"{other_name + ':':<10} {other.label}: {other.predicted_step_s:.4g} s per step "
        f"({'+' if gap >= 0 else ''}{gap:.3g} s, {100 * rel:+.1f}%)",
    ]
    diffs = []
    for key, text in PARTS:
        a = float(best.breakdown.get(key, 0.0))
        b = float(other.breakdown.get(key, 0.0))
        if abs(b - a) > 1e-12:
            diffs.append((b - a, key, text, a, b))
    diffs.sort(key=lambda d: -d[0])
    for delta, _key, text, a, b in diffs[:3]:
        more = "more" if delta > 0 else "less"
        lines.append(f"  {other_name} spends {abs(delta):.3g} s {more} on {text}: {b:.4g} s vs {a:.4g} s")
    ca, cb = best.breakdown.get("cycle_s", 0.0), other.breakdown.get("cycle_s", 0.0)
    if cb > ca:
        lines.append(f"  its slowest stage takes {cb:.4g} s per micro-batch vs {ca:.4g} s "
                     f"(stage times {_spread(other)} vs {_spread(best)})")
    modes_b = _modes(other)
    modes_a = _modes(best)
    if modes_a != modes_b:
        lines.append(f"  recompute: {modes_b} vs {modes_a}")
    return lines


def _spread(plan: Plan) -> str:
    times = [s.time_s for s in plan.stages]
    return f"{min(times):.3g}..{max(times):.3g} s"


def _modes(plan: Plan) -> str:
    counts: dict = {}
    for s in plan.stages:
        counts[s.recompute] = counts.get(s.recompute, 0) + 1
    return ", ".join(f"{n} stage{'s' if n > 1 else ''} {mode}" for mode, n in sorted(counts.items()))
