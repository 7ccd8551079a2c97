"""train.lr_schedule: warm-up, then constant (the default) or cosine / linear decay to min_lr."""

import dataclasses
import math

import pytest

from hetero.config import load_job
from hetero.config.train import TrainConfig
from hetero.engine.lr_schedule import learning_rate
from hetero.errors import ConfigError

BASE = TrainConfig(global_batch=8, micro_batch=2, steps=10, lr=1e-3)


def rates(steps=10, **fields):
    train = dataclasses.replace(BASE, steps=steps, **fields)
    return [learning_rate(train, s, steps) for s in range(steps)]


def test_constant_is_the_default_and_keeps_the_warm_up():
    assert rates() == [1e-3] * 10
    assert rates(warmup_steps=4)[:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_cosine_decays_from_lr_to_min_lr_after_the_warm_up():
    got = rates(warmup_steps=2, lr_schedule="cosine", min_lr=1e-4)
    assert got[:2] == pytest.approx([5e-4, 1e-3])
    assert got[2] == pytest.approx(1e-3) and got[-1] == pytest.approx(1e-4)
    middle = 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 7))
    assert got[5] == pytest.approx(middle)
    assert all(a >= b for a, b in zip(got[2:], got[3:]))


def test_linear_decays_evenly_to_min_lr():
    got = rates(steps=5, lr_schedule="linear", min_lr=0.0)
    assert got == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0])


def _train_file(tmp_path, extra: str):
    path = tmp_path / "train.yaml"
    path.write_text("global_batch: 8\nmicro_batch: 2\nsteps: 10\nlr: 1.0e-3\n" + extra)
    return str(path)


def test_the_train_file_reads_the_schedule(tmp_path):
    train = load_job(train=_train_file(tmp_path, "lr_schedule: cosine\nmin_lr: 1.0e-5\n")).train
    assert (train.lr_schedule, train.min_lr) == ("cosine", 1e-5)
    assert load_job(train=_train_file(tmp_path, "")).train.lr_schedule == "constant"


@pytest.mark.parametrize("extra, message", [
    ("lr_schedule: cosin\n", "lr_schedule.*expected one of constant, cosine, linear.*did you mean 'cosine'"),
    ("lr_schedule: linear\nmin_lr: 0.01\n", "min_lr.*must not exceed lr"),
    ("min_lr: 1.0e-5\n", "min_lr.*applies only to lr_schedule: cosine or linear"),
    ("lr_schedule: cosine\nmin_lr: -1\n", "min_lr.*at least 0"),
])
def test_a_bad_schedule_is_refused_in_one_line(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_job(train=_train_file(tmp_path, extra))
    assert "\n" not in str(caught.value)
