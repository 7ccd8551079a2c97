"""Mixed precision: bf16/fp16 parameters with fp32 master weights and moments; fp16's dynamic
loss scale (an overflow step is skipped fleet-wide, the scale backs off and grows back)."""

import contextlib
import dataclasses
import json

import pytest
import torch

import accelerators
from hetero.config import load_job
from hetero.engine.comms import Comms
from hetero.engine.optimizer import AdamW
from hetero.engine.precision import LossScaler
from hetero.engine.solo import single_chip_plan, train_solo
from hetero.engine.topology import Topology
from hetero.engine.trainer import Trainer
from hetero.engine.zero import FlatShard
from hetero.model import LlamaStage
from hetero.model.init import init_full_tensor

from tests.hetero.engine.test_engine_fleet import CONFIG

SMALL_LR = 1e-5      # Adam moves a weight by about lr a step: under half a bf16 step of a 0.02 weight


@pytest.fixture(scope="module")
def job():
    """The engine tests' micro model, smaller still, with the default train settings."""
    loaded = load_job(model=CONFIG, train=CONFIG)
    model = dataclasses.replace(loaded.model, layers=2, hidden=32, ffn_hidden=64)
    train = dataclasses.replace(loaded.train, checkpoint=None, micro_batch=4, lr=SMALL_LR)
    return model, train


def _bf16_stage(model):
    stage = LlamaStage(model, (0, model.layers), dtype=torch.bfloat16, seed=5)
    grads = {n: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
             for i, (n, p) in enumerate(stage.named_parameters())}
    return stage, dict(stage.named_parameters()), grads


def _changed(before: dict, params: dict) -> float:
    """The fraction of the weights of magnitude in [2^-6, 2^-5) (bf16 spacing 2^-13 = 1.2e-4 there)
    that differ from `before`."""
    moved = total = 0
    for name, old in before.items():
        band = (old.abs() >= 2.0 ** -6) & (old.abs() < 2.0 ** -5)
        moved += int((params[name].detach() != old)[band].sum())
        total += int(band.sum())
    assert total > 1000
    return moved / total


def test_small_updates_move_the_master_copy_and_would_round_away_without_it(job):
    model, _ = job
    steps = 20
    # Without a master copy: AdamW straight on the bf16 weights.
    stage, params, grads = _bf16_stage(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    plain = AdamW(stage, params, SMALL_LR, 0.0)
    for _ in range(steps):
        plain.step(grads)
    assert _changed(before, params) == 0.0          # each lr-sized update rounded away
    # With one: the same steps accumulate in fp32 and reach the bf16 weights.
    stage, params, grads = _bf16_stage(model)
    mixed = AdamW(stage, params, SMALL_LR, 0.0, shard=FlatShard(params), master=True)
    mixed.load_master({n: init_full_tensor(model, stage.hf_name(n), 5) for n in params}, lambda t: t, contextlib.nullcontext)
    start = mixed.master.clone()
    flat_grads = FlatShard(params).flatten(grads, torch.float32, "cpu")
    for _ in range(steps):
        mixed.step(flat_grads)
    moved = (mixed.master - start).abs()
    real = moved[:FlatShard(params).numel]
    assert float(real.min()) > 0.5 * steps * SMALL_LR     # every master weight moved ~ steps * lr
    assert _changed(before, params) == 1.0                 # 20 lr > one bf16 step: every one followed


def test_load_master_without_a_master_copy_is_one_clear_error(job):
    """Found by mypy: load_master copied into `self.master` whatever the layout, and an optimizer
    without a master copy (per parameter, or fp32 under ZeRO-1) failed on None ('NoneType' object
    is not subscriptable); it now says what is missing."""
    model, _ = job
    stage, params, _ = _bf16_stage(model)
    full = {n: init_full_tensor(model, stage.hf_name(n), 5) for n in params}
    for optimizer in (AdamW(stage, params, SMALL_LR, 0.0), AdamW(stage, params, SMALL_LR, 0.0, shard=FlatShard(params))):
        assert optimizer.master is None
        with pytest.raises(RuntimeError, match="keeps no fp32 master copy"):
            optimizer.load_master(full, lambda t: t, contextlib.nullcontext)


def _solo_trainer(model, train, run_dir, steps, log=None):
    accel = accelerators.get_accelerator("cpu")
    comms = Comms.solo(Topology(single_chip_plan(model, train)), accel.device(0))
    return Trainer(comms, accel, model, train, str(run_dir), steps=steps, log=log or (lambda line: None))


def _records(run_dir):
    with open(run_dir / "metrics" / "steps.jsonl") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.slow
def test_bf16_with_master_weights_tracks_fp32(job, tmp_path):
    steps, (model, train) = 20, job
    fp32 = [r["loss"] for r in train_solo(accelerators.get_accelerator("cpu"), model, train,
                                          str(tmp_path / "fp32"), steps=steps)]
    trainer = _solo_trainer(model, dataclasses.replace(train, dtype="bf16"), tmp_path / "bf16", steps)
    before = {n: p.detach().clone() for n, p in trainer.params.items()}
    trainer.run()
    bf16 = [r["loss"] for r in _records(tmp_path / "bf16")]
    moved = _changed(before, trainer.params)
    print(f"\nbf16 weights in [2^-6, 2^-5) that moved: {moved:.1%}")
    assert moved > 0.2                      # updates below a bf16 step reached the weights
    table = [(s + 1, a, b, abs(b - a) / a) for s, (a, b) in enumerate(zip(fp32, bf16))]
    print("\nstep  fp32 loss  bf16 loss  rel diff\n" + "\n".join(f"{s:4d} {a:10.6f} {b:10.6f} {r:9.2e}"
                                                            for s, a, b, r in table))
    assert all(r < 0.01 for *_, r in table), table


def test_loss_scaler_backs_off_and_grows():
    scaler = LossScaler(True, scale=1024.0, growth_interval=3)
    scaler.update(True)
    assert (scaler.scale, scaler.skipped_steps) == (512.0, 1)
    for _ in range(2):
        scaler.update(False)
    assert scaler.scale == 512.0
    scaler.update(False)
    assert scaler.scale == 1024.0                          # three good steps in a row
    off = LossScaler(False)
    off.update(True)
    assert (off.scale, off.skipped_steps) == (1.0, 0)


def test_loss_scaler_state_keeps_the_good_step_streak():
    """A resumed fp16 run grows its scale at the same step an uninterrupted one would."""
    first = LossScaler(True, scale=1024.0, growth_interval=3)
    first.update(False)
    first.update(False)
    resumed = LossScaler(True, scale=1.0, growth_interval=3)
    resumed.load(first.state())
    resumed.update(False)
    assert resumed.scale == 2048.0                         # the third good step in a row, across the resume
    older = LossScaler(True, growth_interval=3)
    older.load({"loss_scale": 8.0, "skipped_steps": 0, "good_steps": 3})   # out of range: ignored
    assert older.good_steps == 0


def test_fp16_skips_an_injected_overflow_step_and_recovers(job, tmp_path):
    model, train = job
    train = dataclasses.replace(train, dtype="fp16", lr=1e-3)
    lines = []
    trainer = _solo_trainer(model, train, tmp_path, 5, log=lines.append)
    per_step = train.global_batch // train.micro_batch
    calls, weights_at_step = [0], {}
    loss = trainer.model.loss

    def injected(*args, **kwargs):
        step = calls[0] // per_step + 1
        if calls[0] % per_step == 0:
            weights_at_step[step] = {n: p.detach().clone() for n, p in trainer.params.items()}
        calls[0] += 1
        out = loss(*args, **kwargs)
        return out * 1e6 if step == 2 else out   # step 2's scaled gradients overflow fp16

    trainer.model.loss = injected
    trainer.run()
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1, 1]
    assert [r["loss_scale"] for r in records] == [65536.0, 65536.0, 32768.0, 32768.0, 32768.0]
    assert records[1]["grad_norm"] is None
    assert sum("overflowed at loss scale 65536" in line for line in lines) == 1
    assert trainer.optimizer.steps == 4
    # The skipped step left the weights alone; the others moved them.
    assert all(torch.equal(weights_at_step[2][n], weights_at_step[3][n]) for n in trainer.params)
    assert not all(torch.equal(weights_at_step[3][n], weights_at_step[4][n]) for n in trainer.params)
    assert records[-1]["loss"] < records[0]["loss"]
