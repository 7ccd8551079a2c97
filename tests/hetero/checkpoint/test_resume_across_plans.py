"""Resume under another plan (issue 15), end to end on the emulated fleet: where the two plans do
the same floating-point arithmetic the run continues bit for bit, so nothing a checkpoint holds
(weights, moments, optimizer step count, learning rate, data position) is lost or rounded by
resharding. Where they do not (TP 2 -> 1 splits every row-parallel matmul's sum; replicas regroup the
batch's gradient sum) the losses agree within fp32 parity only: test_checkpoint_shards_fleet.

- pipeline (TP 1, two stages, each rank writes its stage's part) -> one chip: a pipeline's arithmetic
  is one chip's (activations and gradients cross stages unchanged), so the resumed losses equal an
  uninterrupted one-chip run's exactly.
- ZeRO-1 on -> off over DP 2: the reduce-scatter and the all-reduce both add the same two gradients
  (a + b, commutative) and AdamW is elementwise, so the losses equal the ZeRO-1 run's exactly; only
  the recorded gradient norm may differ in its last float64 bit (its squares are summed per shard
  with ZeRO-1, per parameter without).
"""

import dataclasses
import os
import shutil

import pytest

import accelerators
from hetero.checkpoint.seal import write_json
from hetero.config.train import CheckpointConfig
from hetero.engine import checkpoint as ckpt
from hetero.engine.solo import train_solo
from tests.hetero.engine.test_engine_fleet import fleet_job, last_attempt, make_plan, run_fleet

pytestmark = pytest.mark.slow


def one_chip(job, tmp_path, name, steps, checkpoints=None):
    train = dataclasses.replace(job.train, checkpoint=CheckpointConfig(str(checkpoints), 2) if checkpoints else None)
    return train_solo(accelerators.get_accelerator("cpu"), job.model, train, str(tmp_path / name), steps=steps)


def rewound(checkpoints, step, to):
    """A copy of checkpoint folder `checkpoints` holding only its checkpoint `step`, as `latest`."""
    name = os.path.basename(ckpt.step_dir(str(checkpoints), step))
    os.makedirs(to)
    shutil.copytree(os.path.join(checkpoints, name), os.path.join(to, name))
    write_json(os.path.join(to, ckpt.LATEST), {"step": step, "dir": name})
    return to


def test_a_pipelines_checkpoint_resumes_on_one_chip_bit_for_bit(tmp_path):
    cluster, job = fleet_job(tmp_path)
    pipeline = make_plan(job, [("wide", 1, 1, (0, 2), 0), ("wide", 1, 1, (2, 3), 1)])
    records, _, _ = run_fleet(tmp_path, pipeline, steps=2, name="pipeline", cluster_path=cluster)
    checkpoints = tmp_path / "pipeline" / "checkpoints"
    saved = ckpt.Checkpoint(ckpt.latest(str(checkpoints)), job.model)
    assert saved.step == 2 and sorted(saved.files) == [ckpt.data_file(0), ckpt.data_file(1)]   # a part per stage
    whole = [r["loss"] for r in one_chip(job, tmp_path, "uninterrupted", 4)]
    assert [r["loss"] for r in last_attempt(records)] == whole[:2]          # the same arithmetic
    resumed = one_chip(job, tmp_path, "resumed", 4, checkpoints)
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == whole[2:]


def test_zero1_on_to_off_continues_bit_for_bit(tmp_path):
    cluster, job = fleet_job(tmp_path)
    zero = dataclasses.replace(make_plan(job, [("wide", 1, 2, (0, 3), 0)]), zero1=True)
    records, _, _ = run_fleet(tmp_path, zero, steps=4, name="zero", cluster_path=cluster)
    uninterrupted = last_attempt(records)
    at_two = rewound(tmp_path / "zero" / "checkpoints", 2, str(tmp_path / "at-two"))
    assert sorted(ckpt.Checkpoint(ckpt.latest(at_two), job.model).files) == [ckpt.data_file(0), ckpt.data_file(1)]
    plain = dataclasses.replace(zero, zero1=False)
    records, _, log = run_fleet(tmp_path, plain, steps=4, name="plain", checkpoints=at_two, cluster_path=cluster)
    assert "(step 2)" in log
    resumed = last_attempt(records)
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in uninterrupted[2:]]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in uninterrupted[2:]]
    for got, want in zip(resumed, uninterrupted[2:]):
        assert abs(got["grad_norm"] - want["grad_norm"]) <= 1e-12 * want["grad_norm"]
