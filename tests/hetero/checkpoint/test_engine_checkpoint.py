"""Checkpoints: atomic, verified, plan-independent; bad ones give a clear error."""

import dataclasses
import os

import pytest
import torch

import accelerators
from hetero.config import load_job
from hetero.config.train import CheckpointConfig
from hetero.engine import checkpoint as ckpt
from hetero.engine.solo import train_solo
from hetero.errors import UserError
from hetero.model import layout
from tests.conftest import FIXTURES

CONFIG = os.path.join(FIXTURES, "engine", "two-islands.yaml")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A solo run of 3 steps checkpointing every step."""
    root = tmp_path_factory.mktemp("ckpt")
    job = load_job(model=CONFIG, train=CONFIG)
    train = dataclasses.replace(job.train, checkpoint=CheckpointConfig(str(root / "checkpoints"), 1))
    train_solo(accelerators.get_accelerator("cpu"), job.model, train, str(root / "run"), steps=3)
    return job, root / "checkpoints"


def test_layout_and_pointer(saved):
    job, root = saved
    assert sorted(os.listdir(root)) == ["latest", "step-00000001", "step-00000002", "step-00000003"]
    newest = ckpt.latest(str(root))
    assert newest.endswith("step-00000003")
    loaded = ckpt.Checkpoint(newest, job.model)
    assert loaded.step == 3 and loaded.state["data_position"] == {"next_step": 3}
    assert loaded.optimizer_steps == 3 and loaded.state["optimizer_steps"] == 3
    # full tensors under Hugging Face names, plus the AdamW moments
    names = layout.model_names(job.model)
    embed = loaded.tensor("model.embed_tokens.weight")
    assert embed.shape == (job.model.vocab, job.model.hidden)
    assert all(isinstance(loaded.tensor(n), torch.Tensor) for n in names)
    assert loaded.tensor("exp_avg_sq.lm_head.weight").abs().sum() > 0


def test_corrupt_file_is_refused(saved, tmp_path):
    job, root = saved
    copy = tmp_path / "copy"
    import shutil
    shutil.copytree(ckpt.latest(str(root)), copy)
    target = copy / "rank-00000.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    opened = ckpt.Checkpoint(str(copy), job.model)        # the metadata is sound; the data is checked as read
    with pytest.raises(UserError, match="rank-00000.safetensors: checksum mismatch"):
        ckpt.read_all(opened)


def test_other_model_is_refused(saved):
    job, root = saved
    other = dataclasses.replace(job.model, hidden=128)
    with pytest.raises(UserError, match="another model .*hidden"):
        ckpt.Checkpoint(ckpt.latest(str(root)), other)


def test_crash_mid_write_keeps_previous_checkpoint(saved, tmp_path):
    job, root = saved
    import shutil
    work = tmp_path / "ck"
    shutil.copytree(root, work)
    # A writer finished its file and report, but the job died before the seal.
    ckpt.prepare(str(work), 4)
    chunk = ckpt.Chunk(layout.FINAL_NORM, (job.model.hidden,), (0,), (job.model.hidden,), torch.zeros(job.model.hidden))
    assert ckpt.AsyncWrite(ckpt.partial_dir(str(work), 4), 0, 4, [chunk]).start().wait() is None
    assert ckpt.latest(str(work)).endswith("step-00000003")
    assert ckpt.load(str(work), job.model, log=print).step == 3
    # A broken pointer is reported, not silently ignored.
    (work / "latest").write_text("{not json")
    with pytest.raises(UserError, match="corrupt checkpoint pointer"):
        ckpt.latest(str(work))


def test_missing_state_is_refused(tmp_path, saved):
    job, _ = saved
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a readable checkpoint"):
        ckpt.Checkpoint(str(tmp_path / "empty"), job.model)


def test_keep_prunes_older_checkpoints_once_a_newer_one_is_sealed(tmp_path):
    """train.checkpoint.keep: the trainer prunes after each seal, so only the newest stay."""
    job = load_job(model=CONFIG, train=CONFIG)
    root = tmp_path / "checkpoints"
    train = dataclasses.replace(job.train, checkpoint=CheckpointConfig(str(root), 1, keep=2))
    train_solo(accelerators.get_accelerator("cpu"), job.model, train, str(tmp_path / "run"), steps=4)
    assert sorted(os.listdir(root)) == ["latest", "step-00000003", "step-00000004"]
    assert ckpt.latest(str(root)).endswith("step-00000004")


@pytest.mark.parametrize("dtype", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_resume_under_the_same_plan_is_bit_exact(tmp_path, dtype):
    """Stopped at step 2 and resumed, a run's later steps and its final checkpoint equal an
    uninterrupted run's bit for bit: weights (bf16: the fp32 master, not its rounding), moments,
    optimizer step count, learning-rate schedule (warm-up, cosine) and data position are all restored."""
    job = load_job(model=CONFIG, train=CONFIG)
    train = dataclasses.replace(job.train, dtype=dtype, warmup_steps=2, lr_schedule="cosine", min_lr=0.001)

    def run(name, steps):
        config = dataclasses.replace(train, checkpoint=CheckpointConfig(str(tmp_path / name / "checkpoints"), 2))
        return train_solo(accelerators.get_accelerator("cpu"), job.model, config,
                          str(tmp_path / name / f"to-{steps}"), steps=steps)

    whole = run("whole", 3)
    assert [r["step"] for r in run("stopped", 2)] == [1, 2]
    resumed = run("stopped", 3)                               # the same checkpoints, the same total
    assert [r["step"] for r in resumed] == [3]
    for got, want in zip(resumed, whole[2:]):
        assert (got["loss"], got["grad_norm"], got["lr"]) == (want["loss"], want["grad_norm"], want["lr"])
    a = ckpt.Checkpoint(ckpt.latest(str(tmp_path / "whole" / "checkpoints")), job.model)
    b = ckpt.Checkpoint(ckpt.latest(str(tmp_path / "stopped" / "checkpoints")), job.model)
    assert a.step == b.step == 3 and a.optimizer_steps == b.optimizer_steps == 3
    for name in a.names():
        assert torch.equal(a.tensor(name), b.tensor(name)), name
