"""The 1F1B pipeline schedule (PipeDream-flush), per stage.

Stage i of p runs min(p - i - 1, m) warm-up forwards, then alternates one
forward and one backward, then drains the remaining backwards. The last stage
therefore never holds more than one micro-batch's activations, and stage i holds
at most min(p - i, m), which is what the partitioner's memory model assumes.

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


def max_in_flight(actions: list[Action]) -> int:
    """The most micro-batches whose activations a stage holds at once."""
    held = peak = 0
    for action in actions:
        held += 1 if action.kind == "F" else -1
        peak = max(peak, held)
    return peak
