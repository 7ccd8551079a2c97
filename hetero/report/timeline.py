"""Where each rank's time went, micro-batch by micro-batch, from its timing lines.

Every timing line is one 1F1B action: wait for the input (p2p_wait_s, from
posted_at to received_at), then compute (compute_s, which includes handing the
output to the next stage: from sent_at to the action's end). A wait splits in
two: until the sender handed the data over the rank waited for its neighbour
(pipeline bubble); after that it waited for the transfer itself (exposed
transfer: over the bridge, the definition hetero.bench.runtime uses, or over
the island's native p2p).

Interleaved 1F1B (the plan's `virtual_stages` v > 1): a line also names its
`chunk`, and a stage runs each micro-batch once per chunk, so an action is
(step, micro-batch, phase, chunk); the chunk before the first stage's chunk c > 0
is the last stage's chunk c - 1 (the wrap-around), and likewise backwards.
A plain run's lines have no chunk: chunk 0.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, NamedTuple

FORWARD, BACKWARD, BRIDGE, WAIT, TAIL = "forward", "backward", "bridge", "wait", "tail"
KINDS = (FORWARD, BACKWARD, BRIDGE, WAIT, TAIL)
# Exposed communication (exposed_comm): what a rank spent on messages and not on compute.
BRIDGE_RECV, P2P_RECV, SEND = "bridge_recv", "p2p_recv", "send"
COMM_KINDS = (BRIDGE_RECV, P2P_RECV, SEND)

Record = dict[str, Any]              # one timing line (hetero.engine.metrics.MetricsRecorder.action)
Ranks = dict[int, list[Record]]      # global rank -> its timing lines
ActionKey = tuple[int, int, int, str, int]   # (stage, step, micro-batch, phase, chunk)


class Place(NamedTuple):
    """A stage's place in its pipeline: the pipeline's stages in order, its position, the chunks."""

    stages: list[int]
    position: int
    virtual_stages: int


def chunk_of(record: Record) -> int:
    """The model chunk a line's action ran (0 for a plain run's lines, which name none)."""
    return int(record.get("chunk") or 0)


def places(plan: dict) -> dict[int, Place]:
    """{stage: its Place} for every stage of every pipeline."""
    out = {}
    for pipeline in plan["pipelines"]:
        stages = list(pipeline["stages"])
        for position, stage in enumerate(stages):
            out[stage] = Place(stages, position, int(pipeline.get("virtual_stages") or 1))
    return out


def source(place: Place, phase: str, chunk: int) -> tuple[int, int] | None:
    """(stage, chunk) whose output this action receives: the piece before it in forward, the one
    after it in backward, wrapping round the pipeline one chunk over; None where the model starts
    (forward) or ends (backward)."""
    step = -1 if phase == FORWARD else 1
    position = place.position + step
    if position in (-1, len(place.stages)):          # the interleaved wrap-around
        position, chunk = position % len(place.stages), chunk + step
    if not 0 <= chunk < place.virtual_stages:
        return None
    return place.stages[position], chunk


def handoffs(plan: dict, ranks: Ranks) -> dict[ActionKey, float]:
    """{(stage, step, mb, phase, chunk): when the stage's last TP piece of that output was handed over}."""
    stage_of = {r["rank"]: r["stage"] for r in plan["ranks"]}
    sent: dict[ActionKey, float] = defaultdict(float)
    for rank, records in ranks.items():
        for r in records:
            if r.get("sent_at"):
                key = (stage_of[rank], r["step"], r["mb"], r["phase"], chunk_of(r))
                sent[key] = max(sent[key], r["sent_at"])
    return dict(sent)


class Pairing:
    """Pairs each receive with the send it waited for: the plan's pipelines and every hand-over."""

    def __init__(self, plan: dict, ranks: Ranks):
        self.places = places(plan)
        self.sent = handoffs(plan, ranks)
        self.stage_of = {r["rank"]: r["stage"] for r in plan["ranks"]}

    def transfer(self, record: Record, rank: int) -> tuple[float, float]:
        """(start, seconds) of the transfer this receive waited for after its sender handed the data
        over, over any link; (received_at, 0) where it received nothing or the sender's line is missing."""
        if not record.get("recv_link"):
            return record["received_at"], 0.0
        came_from = source(self.places[self.stage_of[rank]], record["phase"], chunk_of(record))
        if came_from is None:
            return record["received_at"], 0.0
        handed = self.sent.get((came_from[0], record["step"], record["mb"], record["phase"], came_from[1]))
        if handed is None:
            return record["received_at"], 0.0
        start = max(handed, record["posted_at"])
        return start, max(0.0, record["received_at"] - start)

    def bridge(self, record: Record, rank: int) -> tuple[float, float]:
        """(start, seconds) of the exposed bridge transfer of this receive; (received_at, 0) if none."""
        if record.get("recv_link") != "bridge":
            return record["received_at"], 0.0
        return self.transfer(record, rank)


def send_seconds(record: Record) -> float:
    """Seconds the action spent handing its output over (from sent_at to the action's end: the
    send and the receives posted with it), inside its compute_s; 0 when it sent nothing."""
    if not record.get("sent_at"):
        return 0.0
    done = record["received_at"] + record["compute_s"]
    return min(record["compute_s"], max(0.0, done - record["sent_at"]))


def exposed_per_step(plan: dict, ranks: Ranks) -> dict[int, float]:
    """{step: seconds of un-overlapped bridge transfer on the worst receiving rank}."""
    pairing = Pairing(plan, ranks)
    exposed: dict[int, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for rank, records in ranks.items():
        for record in records:
            _, seconds = pairing.bridge(record, rank)
            if seconds:
                exposed[record["step"]][rank] += seconds
    return {step: max(per_rank.values()) for step, per_rank in exposed.items()}


def exposed_comm(plan: dict, ranks: Ranks) -> dict[int, dict[int, dict[str, float]]]:
    """{step: {rank: {bridge_recv, p2p_recv, send: seconds}}}: communication the rank did not
    hide behind compute. Receives: the wait after the sender handed the data over (over the
    bridge, or the island's native p2p); sends: the time an action spent handing its output over."""
    pairing = Pairing(plan, ranks)
    out: dict[int, dict[int, dict[str, float]]] = defaultdict(dict)
    for rank, records in ranks.items():
        for record in records:
            cell = out[record["step"]].setdefault(rank, dict.fromkeys(COMM_KINDS, 0.0))
            _, seconds = pairing.transfer(record, rank)
            cell[BRIDGE_RECV if record.get("recv_link") == "bridge" else P2P_RECV] += seconds
            cell[SEND] += send_seconds(record)
    return dict(out)


def segments(plan: dict, ranks: Ranks, step: int, step_start: float, step_s: float) -> dict[int, list]:
    """{rank: [(kind, start_s, seconds)]} for one step, times from the step's start."""
    pairing = Pairing(plan, ranks)
    out = {}
    for rank, records in ranks.items():
        parts: list[tuple[str, float, float]] = []
        last_end = 0.0
        for r in (r for r in records if r["step"] == step):
            posted = r["posted_at"] - step_start
            bridge_at, bridge_s = pairing.bridge(r, rank)
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


def breakdown(plan: dict, ranks: Ranks, steps: list[dict]) -> dict[int, dict[int, dict[str, float]]]:
    """{rank: {step: {kind: seconds}}}: forward and backward compute, exposed bridge, waiting
    for a neighbour, and the tail (step time left after the last action: gradient reduction,
    optimizer, waiting for the slowest rank). The five add up to the step time."""
    pairing = Pairing(plan, ranks)
    step_s = {s["step"]: s["step_s"] for s in steps}
    out = {}
    for rank, records in ranks.items():
        per_step = {s: dict.fromkeys(KINDS, 0.0) for s in step_s}
        for r in records:
            if r["step"] not in per_step:
                continue
            cell = per_step[r["step"]]
            _, bridge_s = pairing.bridge(r, rank)
            cell[r["phase"]] += r["compute_s"]
            cell[BRIDGE] += bridge_s
            cell[WAIT] += max(0.0, r["p2p_wait_s"] - bridge_s)
        for step, cell in per_step.items():
            cell[TAIL] = max(0.0, step_s[step] - sum(cell.values()))
        out[rank] = per_step
    return out
