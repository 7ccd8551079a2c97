"""Sharded checkpoints on the emulated fleet (strict device memory, hetero-strict): a TP 2 x DP 2
ZeRO-1 pipeline writes its checkpoints rank by rank; one rank is SIGKILLed half-way through its
file of step 4 (the writer's test hook): the job restarts from step 2, never from the partial step
4, and finishes; then a hetero-DP replicas plan (TP 1, no ZeRO-1, the model over two stages on one
island and whole on the other) resumes from its step 6. The losses equal one process's."""

import dataclasses
import os

import pytest

from hetero.checkpoint.writer import KILL_HOOK
from hetero.engine import checkpoint as ckpt
from tests.hetero.engine.test_engine_fleet import fleet_job, last_attempt, make_plan, make_replicas_plan, run_fleet, solo_losses

pytestmark = pytest.mark.slow


def assert_matches(records, reference):
    losses = [r["loss"] for r in records]
    assert len(losses) == len(reference)
    for got, want in zip(losses, reference):
        assert abs(got - want) <= 1e-5 * abs(want), (losses, reference)


def test_kill_mid_save_then_resume_under_another_plan(tmp_path, monkeypatch):
    cluster, job = fleet_job(tmp_path)
    checkpoints = tmp_path / "zero" / "checkpoints"    # the launcher's default: it names the restart's step
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_HOOK, f"{marker}:4:1")      # rank 1 dies writing step 4, once
    zero = dataclasses.replace(make_plan(job, [("wide", 2, 2, (0, 3), 0)]), zero1=True)
    records, _, log = run_fleet(tmp_path, zero, steps=6, max_restarts=1, name="zero", cluster_path=cluster)
    assert marker.exists() and "restarting the whole job from step 2" in log
    assert "resumed from" in log and "(step 2)" in log
    assert "(step 4)" not in log                               # the partial step 4 was never loaded
    assert ckpt.pointed_step(str(checkpoints)) == 6
    assert not [n for n in os.listdir(checkpoints) if n.endswith(".partial")]
    saved = ckpt.Checkpoint(ckpt.latest(str(checkpoints)), job.model)
    assert sorted(saved.files) == [ckpt.data_file(r) for r in range(4)]      # every ZeRO-1 rank wrote its part
    reference = solo_losses(tmp_path, job, steps=8)
    assert_matches(last_attempt(records), reference[:6])

    monkeypatch.delenv(KILL_HOOK)
    replicas = make_replicas_plan(job, [("wide", [(1, (0, 2)), (1, (2, 3))], 4), ("narrow", [(1, (0, 3))], 4)])
    records, _, log = run_fleet(tmp_path, replicas, steps=8, name="replicas", checkpoints=checkpoints,
                                cluster_path=cluster)
    assert "(step 6)" in log
    resumed = last_attempt(records)
    assert [r["step"] for r in resumed] == [7, 8]
    assert_matches(resumed, reference[6:])
