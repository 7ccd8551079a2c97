"""ZeRO-1 end to end: optimizer state sharded over each stage's DP group, gradients
reduce-scattered and parameters all-gathered on the island's backend; the losses equal the
one-process reference (fp32, within 1e-5), and its checkpoints (full tensors under HF names)
resume under ZeRO-1 and without it."""

import dataclasses
import math

import pytest
import torch

from tests.conftest import free_port
from hetero.config import load_job
from hetero.engine import checkpoint as ckpt
from hetero.engine.zero import FlatShard
from partitioner.plan import PipelinePlan, Plan, RankPlan, StagePlan
from tests.hetero.engine.test_engine_fleet import CONFIG, HERE, last_attempt, make_plan, run_fleet, solo_losses

pytestmark = pytest.mark.slow


def _job_file(tmp_path, source=CONFIG, strict_wide=False):
    """The engine tests' cluster on a free port; `strict_wide`: the wide island is emulated chips on
    the hetero-strict backend (NCCL's rules: device tensors only)."""
    with open(source) as handle:
        text = handle.read().replace("port: 29731", f"port: {free_port()}")
    if strict_wide:
        text = text.replace("- name: wide\n      accelerator: cpu\n      chip: cpu",
                            "- name: wide\n      accelerator: emulated\n      chip: emu-fast\n"
                            "      backend: hetero-strict", 1)
    path = tmp_path / f"{'strict-' if strict_wide else ''}{source.rsplit('/', 1)[-1]}"
    path.write_text(text)
    return str(path)


def _zero1(plan, chips=None):
    stages = tuple(dataclasses.replace(s, chip=chips.get(s.island, s.chip)) for s in plan.stages) \
        if chips else plan.stages
    return dataclasses.replace(plan, zero1=True, stages=stages)


def mixed_replicas_plan(job):
    """hetero-DP: a whole replica on the wide island at DP 2 (ZeRO-1 shards there), another on the
    narrow island at DP 1; gradients summed across the islands over the bridge."""
    stages = (StagePlan(0, 0, "wide", "cpu", 1, 2, (0, job.model.layers), "none", 0, 0.1, 0.0),
              StagePlan(1, 1, "narrow", "cpu", 1, 1, (0, job.model.layers), "none", 0, 0.1, 0.0))
    pipelines = (PipelinePlan(0, (0,), 2, 2, 1), PipelinePlan(1, (1,), 1, 2, 2))
    ranks = (RankPlan(0, "wide", 0, 0, 0, 0, 0, 0), RankPlan(1, "wide", 1, 0, 0, 0, 0, 1),
             RankPlan(2, "narrow", 0, 0, 1, 1, 0, 0))
    return Plan(kind="replicas", cluster=job.cluster.name, model=job.model.name, dtype="fp32",
                layers=job.model.layers, heads=job.model.heads, kv_heads=job.model.kv_heads,
                global_batch=job.train.global_batch, micro_batch=2, num_micro_batches=1, recompute="none",
                zero1=True, stages=stages, pipelines=pipelines, ranks=ranks, predicted_step_s=1.0,
                tokens_per_s=1.0, mfu={})


def assert_matches(fleet_records, reference):
    fleet = [r["loss"] for r in last_attempt(fleet_records)]
    assert len(fleet) == len(reference)
    for got, want in zip(fleet, reference):
        assert abs(got - want) <= 1e-5 * abs(want), (fleet, reference)


def test_flat_shards_are_equal_padded_and_cover_every_parameter():
    params = {"a": torch.zeros(3, 2), "b": torch.zeros(5), "c": torch.zeros(2, 2)}   # 15 elements
    shards = [FlatShard(params, 4, r) for r in range(4)]
    assert {s.shard_numel for s in shards} == {4} and shards[0].padded == 16
    covered = sorted((p.name, i) for s in shards for p in s.pieces() for i in range(p.start, p.stop))
    assert covered == sorted((n, i) for n, t in params.items() for i in range(t.numel()))
    assert [tuple(p) for p in shards[1].pieces()] == [("a", 4, 6, 0), ("b", 0, 2, 2)]


def test_mixed_fleet_with_zero1_matches_one_process_and_its_checkpoints_resume_anywhere(tmp_path):
    path = _job_file(tmp_path, strict_wide=True)
    job = load_job(cluster=path, model=path, train=path)
    checkpoints = tmp_path / "checkpoints"
    # DP 2 with ZeRO-1 inside the (emulated, hetero-strict) wide island, hetero-DP with the narrow one.
    plan = _zero1(mixed_replicas_plan(job), chips={"wide": "emu-fast"})
    records, _, log = run_fleet(tmp_path, plan, job_path=path, steps=5, name="zero1", checkpoints=checkpoints)
    assert "stage 0: ZeRO-1 over DP 2" in log
    reference = solo_losses(tmp_path, job, steps=7)
    assert_matches(records, reference[:5])
    # ZeRO-1 again, another layout (two stages, DP 2 each, one island), from the step-5 checkpoint
    plain_path = _job_file(tmp_path)
    plain_job = load_job(cluster=plain_path, model=plain_path, train=plain_path)
    again = _zero1(make_plan(plain_job, [("wide", 1, 2, (0, 1), 0), ("wide", 1, 2, (1, 3), 2)]))
    records, _, log = run_fleet(tmp_path, again, job_path=plain_path, steps=7, name="again",
                                checkpoints=checkpoints)
    assert "(step 5)" in log
    assert_matches(records, reference[5:])
    # ... and without ZeRO-1 (TP 2 then TP 1 over the bridge), from the same checkpoint folder
    # (now at step 7: rewind `latest` to step 5 by resuming a copy)
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(checkpoints / "step-00000005", copy / "step-00000005")
    (copy / "latest").write_text('{"step": 5, "dir": "step-00000005"}')
    plain = make_plan(plain_job, [("wide", 2, 1, (0, 2), 0), ("narrow", 1, 1, (2, 3), 0)])
    records, _, log = run_fleet(tmp_path, plain, job_path=plain_path, steps=7, name="plain", checkpoints=copy)
    assert "(step 5)" in log
    assert_matches(records, reference[5:])


def test_zero1_with_tied_embeddings_split_over_stages_matches_one_process(tmp_path):
    path = _job_file(tmp_path, source=f"{HERE}/two-islands-tied.yaml")
    job = load_job(cluster=path, model=path, train=path)
    plan = _zero1(make_plan(job, [("wide", 1, 2, (0, 1), 0), ("wide", 1, 2, (1, 3), 2)]))
    records, _, log = run_fleet(tmp_path, plan, job_path=path, steps=3)
    assert "stage 0: ZeRO-1 over DP 2" in log and "stage 1: ZeRO-1 over DP 2" in log
    assert_matches(records, solo_losses(tmp_path, job, steps=3))
    assert math.isfinite(last_attempt(records)[-1]["grad_norm"])


def test_bf16_with_zero1_keeps_fp32_master_shards_and_saves_them_whole(tmp_path):
    path = _job_file(tmp_path)
    job = load_job(cluster=path, model=path, train=path)
    job = dataclasses.replace(job, train=dataclasses.replace(job.train, dtype="bf16"))
    path_bf16 = tmp_path / "bf16.yaml"
    path_bf16.write_text(open(path).read().replace("  steps: 5\n", "  steps: 5\n  dtype: bf16\n"))
    plan = dataclasses.replace(_zero1(make_plan(job, [("wide", 1, 2, (0, 1), 0), ("wide", 1, 2, (1, 3), 2)])),
                               dtype="bf16")
    checkpoints = tmp_path / "bf16-checkpoints"
    records, _, _ = run_fleet(tmp_path, plan, job_path=str(path_bf16), steps=3, checkpoints=checkpoints)
    reference = solo_losses(tmp_path, job, steps=3)
    fleet = [r["loss"] for r in last_attempt(records)]
    # bf16 compute: the DP split changes rounding, not the step
    assert all(abs(got - want) <= 1e-3 * want for got, want in zip(fleet, reference)), (fleet, reference)
    saved = ckpt.Checkpoint(ckpt.latest(str(checkpoints)), job.model)
    embed = saved.tensor("model.embed_tokens.weight")
    assert embed.dtype == torch.float32 and embed.shape == (job.model.vocab, job.model.hidden)
    # the master weights, not their bf16 rounding
    assert not torch.equal(embed, embed.to(torch.bfloat16).float())
