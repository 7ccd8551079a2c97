"""The 1F1B pipeline schedule (PipeDream-flush), per stage, plain or interleaved.

Stage i of p runs min(p - i - 1, m) warm-up forwards, then alternates one
forward and one backward, then drains the remaining backwards. The last stage
therefore never holds more than one micro-batch's activations, and stage i holds
at most min(p - i, m), which is what the partitioner's memory model assumes.

Interleaved (a pipeline with virtual_stages v > 1, docs/plan-format.md): each stage
holds v model chunks and runs Megatron-LM's interleaved 1F1B over them, exactly
partitioner.interleave.chunk_order (the planner costs that order; the formulas are
written there once). Its actions say which chunk they run (`ChunkAction`).

The schedule is a list (compared, indexed, measured as one), but walking it stamps
each action's phase and micro-batch as it is taken (hetero.engine.progress): the
head's hang watchdog sees the loop itself move, not a heartbeat thread.
"""

from __future__ import annotations

from typing import NamedTuple

from hetero.engine import progress

PHASE = {"F": "forward", "B": "backward"}


class Action(NamedTuple):
    kind: str          # "F" (forward) or "B" (backward)
    micro_batch: int

    @property
    def chunk(self) -> int:
        """A plain stage holds one chunk."""
        return 0


class ChunkAction(NamedTuple):
    kind: str          # "F" (forward) or "B" (backward)
    micro_batch: int
    chunk: int         # which of the stage's v model chunks runs it


def stage_schedule(stage: int, num_stages: int, num_micro_batches: int, virtual_stages: int = 1) -> list:
    """The schedule of the stage at position `stage`: plain 1F1B for v == 1, else interleaved."""
    if virtual_stages == 1:
        return one_f_one_b(stage, num_stages, num_micro_batches)
    return interleaved_one_f_one_b(stage, num_stages, num_micro_batches, virtual_stages)


def interleaved_one_f_one_b(stage: int, num_stages: int, num_micro_batches: int,
                            virtual_stages: int) -> list[ChunkAction]:
    """Megatron-LM's interleaved 1F1B for one stage holding `virtual_stages` chunks."""
    p, v, m = num_stages, virtual_stages, num_micro_batches
    if not 0 <= stage < p or v < 1 or m < 1 or (v > 1 and (p < 2 or m % p)):
        raise ValueError(f"interleaved 1F1B needs 0 <= stage < stages, micro-batches a multiple of the stages "
                         f"and at least 2 stages (stage {stage}, {p} stages, {v} chunks, {m} micro-batches)")
    total = m * v
    warmup = min(total, (p - stage - 1) * 2 + (v - 1) * p)

    def forward(k: int) -> ChunkAction:
        return ChunkAction("F", (k // (p * v)) * p + k % p, (k // p) % v)

    def backward(k: int) -> ChunkAction:
        return ChunkAction("B", (k // (p * v)) * p + k % p, v - 1 - (k // p) % v)

    actions = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        actions += [forward(warmup + k), backward(k)]
    actions += [backward(k) for k in range(total - warmup, total)]
    return Schedule(actions)


def one_f_one_b(stage: int, num_stages: int, num_micro_batches: int) -> list[Action]:
    if not 0 <= stage < num_stages:
        raise ValueError(f"stage {stage} is outside 0..{num_stages - 1}")
    if num_micro_batches < 1:
        raise ValueError("a step needs at least one micro-batch")
    warmup = min(num_stages - stage - 1, num_micro_batches)
    actions = [Action("F", mb) for mb in range(warmup)]
    next_forward, next_backward = warmup, 0
    while next_forward < num_micro_batches:
        actions.append(Action("F", next_forward))
        next_forward += 1
        actions.append(Action("B", next_backward))
        next_backward += 1
    actions.extend(Action("B", mb) for mb in range(next_backward, num_micro_batches))
    return Schedule(actions)


class Schedule(list):
    """A stage's actions for one step; iterating stamps each one as it begins."""

    def __iter__(self):
        for action in list.__iter__(self):
            progress.stamp(PHASE[action.kind], action.micro_batch)
            yield action


def max_in_flight(actions: list, chunk: int | None = None) -> int:
    """The most micro-batches whose activations a stage holds at once, in chunk units (one chunk
    of one micro-batch); with `chunk`, those of that chunk only."""
    held = peak = 0
    for action in actions:
        if chunk is None or action.chunk == chunk:
            held += 1 if action.kind == "F" else -1
            peak = max(peak, held)
    return peak
