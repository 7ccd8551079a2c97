"""The DP gradient reduction overlaps the backward (GradientSync.after_backward, StageBuckets): an
interleaved stage starts a chunk's reduction right after that chunk's last backward of the step,
while its other chunks still run backwards, and the losses still equal one process's (fp32, 1e-5),
with a plain all-reduce and under ZeRO-1 (a reduce of each rank's part of the chunk's range)."""

from __future__ import annotations

import dataclasses

import pytest
from tests.hetero.engine.test_engine_fleet import last_attempt, make_plan, run_fleet, solo_losses
from tests.hetero.engine.test_interleave_fleet import four_layer_job

from hetero.engine.buckets import StageBuckets, chunk_names
from hetero.engine.gradients import overlap_wanted
from hetero.engine.schedule import stage_schedule
from partitioner.plan import interleaved

pytestmark = pytest.mark.timeout(600)


def test_each_chunk_is_final_after_its_last_backward_and_chunk_0_waits_for_the_end():
    schedule = stage_schedule(0, 2, 4, 2)
    buckets = StageBuckets([["a"], ["b"]], schedule, held=set())
    last_b1 = max(i for i, a in enumerate(schedule) if a.kind == "B" and a.chunk == 1)
    assert any(a.kind == "B" for a in schedule[last_b1 + 1:])       # backwards follow it
    assert [buckets.final_after(i) for i in range(len(schedule))].count(1) == 1
    assert buckets.final_after(last_b1) == 1
    assert buckets.remaining() == [0, 1]
    buckets.start(1, last_b1, [])
    assert buckets.final_after(last_b1) is None and buckets.remaining() == [0]
    # a plain stage's one chunk, and a held (tied) chunk, start with the tail
    assert not StageBuckets([["a"]], stage_schedule(1, 2, 4), held=set()).final_at
    assert not StageBuckets([["a"], ["b"]], schedule, held={1}).final_at


def test_parameters_fall_in_the_chunk_that_holds_them():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight",
             "model.norm.weight", "lm_head.weight"]
    assert chunk_names(names, ((0, 1), (2, 3))) == [names[:2], names[2:]]
    assert chunk_names(names, None) == [names]
    assert overlap_wanted({}) and not overlap_wanted({"HETERO_OVERLAP_GRAD_REDUCE": "0"})


@pytest.mark.parametrize("zero1", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_interleaved_dp_reduction_starts_before_the_backward_ends_and_matches_one_process(tmp_path, zero1):
    """Two stages x 2 chunks, DP 2, one emulated island (hetero-strict collectives)."""
    cluster, job_path, job = four_layer_job(tmp_path)
    plan = interleaved(make_plan(job, [("wide", 1, 2, (0, 2), 0), ("wide", 1, 2, (2, 4), 2)]), 2)
    plan = dataclasses.replace(plan, zero1=zero1)
    records, _, _ = run_fleet(tmp_path, plan, job_path=job_path, cluster_path=cluster, steps=2, name="overlap")
    reference = solo_losses(tmp_path, job, steps=2)
    fleet = last_attempt(records)
    for got, want in zip([r["loss"] for r in fleet], reference):
        assert abs(got - want) <= 1e-5 * abs(want), (fleet, reference)
    # rank 0 (stage 0): chunk 1's reduction was issued right after chunk 1's last backward, before the
    # stage's remaining backwards (chunk 0's); chunk 0's with the tail (null)
    schedule = stage_schedule(0, 2, plan.pipelines[0].num_micro_batches, 2)
    last_b1 = max(i for i, a in enumerate(schedule) if a.kind == "B" and a.chunk == 1)
    for record in fleet:
        assert record["dp_reduce_issued_after"] == [None, last_b1], record
        assert record["dp_reduce_exposed_s"] >= 0.0



@pytest.mark.slow
def test_bf16_starts_no_chunk_early_and_sums_the_same_as_without_the_overlap(tmp_path, monkeypatch):
    """bf16/fp16 reduce an fp32 copy of the gradients the memory model places at collection, so no
    chunk starts during the drain; the sums are those of the run without the overlap, bit for bit."""
    seen = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("HETERO_OVERLAP_GRAD_REDUCE", flag)
        (tmp_path / flag).mkdir()
        cluster, job_path, job = four_layer_job(tmp_path / flag)
        with open(job_path, encoding="utf-8") as handle:
            text = handle.read().replace("  steps: 5\n", "  steps: 5\n  dtype: bf16\n")
        with open(job_path, "w", encoding="utf-8") as handle:
            handle.write(text)
        plan = interleaved(make_plan(job, [("wide", 1, 2, (0, 2), 0), ("wide", 1, 2, (2, 4), 2)]), 2)
        plan = dataclasses.replace(plan, zero1=True, dtype="bf16")
        records, _, _ = run_fleet(tmp_path / flag, plan, job_path=job_path, cluster_path=cluster, steps=2)
        seen[flag] = [(r["loss"], r["grad_norm"], r.get("dp_reduce_issued_after")) for r in last_attempt(records)]
    assert [r[:2] for r in seen["1"]] == [r[:2] for r in seen["0"]]
    assert [r[2] for r in seen["1"]] == [[None, None]] * 2 and [r[2] for r in seen["0"]] == [None, None]
