"""End to end: a mixed fleet with activation recompute trains the numbers of one process
without it (fp32, within 1e-5 relative, 5 steps), each stage in the plan's own mode.

The wide island's stage is TP 2: under `full` its row-parallel all-reduces run again in
backward on both TP ranks, so a mismatch would hang or diverge, not pass.
"""

import dataclasses

import pytest
from tests.hetero.engine.test_engine_fleet import CONFIG, STEPS, last_attempt, make_plan, run_fleet, solo_losses

from hetero.config import load_job


@pytest.fixture(scope="module")
def job():
    return load_job(cluster=CONFIG, model=CONFIG, train=CONFIG)


def with_recompute(plan, modes):
    stages = tuple(dataclasses.replace(stage, recompute=mode) for stage, mode in zip(plan.stages, modes))
    return dataclasses.replace(plan, stages=stages, recompute=modes[0] if len(set(modes)) == 1 else "mixed")


@pytest.mark.slow
@pytest.mark.parametrize("modes", [("full", "selective"), ("selective", "full")], ids=["tp2-full", "tp2-selective"])
def test_recompute_matches_one_process_without_it(tmp_path, job, modes):
    plan = make_plan(job, [("wide", 2, 1, (0, 2), 0), ("narrow", 1, 1, (2, 3), 0)])
    records, _, log = run_fleet(tmp_path, with_recompute(plan, modes))
    fleet = [r["loss"] for r in last_attempt(records)]
    reference = solo_losses(tmp_path, job)
    assert len(fleet) == STEPS
    for got, want in zip(fleet, reference):
        assert abs(got - want) <= 1e-5 * abs(want), (modes, fleet, reference)
