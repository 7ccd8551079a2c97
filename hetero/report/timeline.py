"""Where each rank's time went, micro-batch by micro-batch, from its timing lines.

Every timing line is one 1F1B action: wait for the input (p2p_wait_s, from
posted_at to received_at), then compute (compute_s, which includes handing the
output to the next stage). A wait on a bridge link splits in two: until the
sender handed the data over the rank waited for its neighbour (pipeline
bubble); after that it waited for the bridge transfer itself (exposed bridge
time, the definition hetero.bench.runtime uses).
"""

from __future__ import annotations

from collections import defaultdict

FORWARD, BACKWARD, BRIDGE, WAIT, TAIL = "forward", "backward", "bridge", "wait", "tail"
KINDS = (FORWARD, BACKWARD, BRIDGE, WAIT, TAIL)


def neighbours(plan: dict) -> dict:
    """{stage: (stage before, stage after)} along each pipeline."""
    order = {}
    for pipeline in plan["pipelines"]:
        stages = pipeline["stages"]
        for i, stage in enumerate(stages):
            order[stage] = (stages[i - 1] if i else None, stages[i + 1] if i + 1 < len(stages) else None)
    return order


def handoffs(plan: dict, ranks: dict) -> dict:
    """{(stage, step, mb, phase): when the stage's last TP piece of that output was handed over}."""
    stage_of = {r["rank"]: r["stage"] for r in plan["ranks"]}
    sent = defaultdict(float)
    for rank, records in ranks.items():
        for r in records:
            if r.get("sent_at"):
                key = (stage_of[rank], r["step"], r["mb"], r["phase"])
                sent[key] = max(sent[key], r["sent_at"])
    return dict(sent)


def exposed_bridge(record: dict, stage: int, order: dict, sent: dict) -> tuple[float, float]:
    """(start, seconds) of the bridge transfer this receive waited for; (received_at, 0) if none."""
    if record.get("recv_link") != "bridge":
        return record["received_at"], 0.0
    before, after = order[stage]
    source = before if record["phase"] == FORWARD else after
    handed = sent.get((source, record["step"], record["mb"], record["phase"]))
    if handed is None:
        return record["received_at"], 0.0
    start = max(handed, record["posted_at"])
    return start, max(0.0, record["received_at"] - start)


def exposed_per_step(plan: dict, ranks: dict) -> dict:
    """{step: seconds of un-overlapped bridge transfer on the worst receiving rank}."""
    order, sent = neighbours(plan), handoffs(plan, ranks)
    stage_of = {r["rank"]: r["stage"] for r in plan["ranks"]}
    exposed = defaultdict(lambda: defaultdict(float))
    for rank, records in ranks.items():
        for record in records:
            _, seconds = exposed_bridge(record, stage_of[rank], order, sent)
            if seconds:
                exposed[record["step"]][rank] += seconds
    return {step: max(per_rank.values()) for step, per_rank in exposed.items()}


def segments(plan: dict, ranks: dict, step: int, step_start: float, step_s: float) -> dict:
    """{rank: [(kind, start_s, seconds)]} for one step, times from the step's start."""
    order = neighbours(plan)
    sent = handoffs(plan, ranks)
    stage_of = {r["rank"]: r["stage"] for r in plan["ranks"]}
    out = {}
    for rank, records in ranks.items():
        parts = []
        last_end = 0.0
        for r in (r for r in records if r["step"] == step):
            posted = r["posted_at"] - step_start
            bridge_at, bridge_s = exposed_bridge(r, stage_of[rank], order, sent)
            wait_s = max(0.0, r["p2p_wait_s"] - bridge_s)
            if wait_s > 0:
                parts.append((WAIT, posted, wait_s))
            if bridge_s > 0:
                parts.append((BRIDGE, bridge_at - step_start, bridge_s))
            begin = posted + r["p2p_wait_s"]
            parts.append((r["phase"], begin, r["compute_s"]))
            last_end = max(last_end, begin + r["compute_s"])
        if last_end < step_s:
            parts.append((TAIL, last_end, step_s - last_end))
        out[rank] = parts
    return out


def breakdown(plan: dict, ranks: dict, steps: list[dict]) -> dict:
    """{rank: {step: {kind: seconds}}}: forward and backward compute, exposed bridge, waiting
    for a neighbour, and the tail (step time left after the last action: gradient reduction,
    optimizer, waiting for the slowest rank). The five add up to the step time."""
    order = neighbours(plan)
    sent = handoffs(plan, ranks)
    stage_of = {r["rank"]: r["stage"] for r in plan["ranks"]}
    step_s = {s["step"]: s["step_s"] for s in steps}
    out = {}
    for rank, records in ranks.items():
        per_step = {s: dict.fromkeys(KINDS, 0.0) for s in step_s}
        for r in records:
            if r["step"] not in per_step:
                continue
            cell = per_step[r["step"]]
            _, bridge_s = exposed_bridge(r, stage_of[rank], order, sent)
            cell[r["phase"]] += r["compute_s"]
            cell[BRIDGE] += bridge_s
            cell[WAIT] += max(0.0, r["p2p_wait_s"] - bridge_s)
        for step, cell in per_step.items():
            cell[TAIL] = max(0.0, step_s[step] - sum(cell.values()))
        out[rank] = per_step
    return out
