"""Snapshots in the background (hetero.engine.checkpointing, CheckFreq-style): the device->host copy of
checkpoint N runs while step N+1's forward and backward run, and before_update() holds the optimizer
update until it is done. Here each snapshot is held back until step N+1 has reached its update (so the
overlap is certain, not a matter of timing): the checkpoints written so equal, byte for byte, those of
a run that copies synchronously, in fp32 (per-parameter state) and bf16 (fp32 master weights, the
flat layout). A snapshot cut short is never sealed: the resume takes the previous checkpoint."""

import dataclasses
import json
import os
import threading

import pytest

import accelerators
from hetero.config import load_job
from hetero.config.train import CheckpointConfig
from hetero.engine import checkpoint as ckpt
from hetero.engine.checkpointing import Checkpoints
from hetero.engine.solo import train_solo
from tests.conftest import FIXTURES

CONFIG = os.path.join(FIXTURES, "engine", "two-islands.yaml")
CPU = accelerators.get_accelerator("cpu")
STEPS = 3


@pytest.fixture(scope="module")
def job():
    return load_job(model=CONFIG, train=CONFIG)


def files_by_step(root) -> dict:
    """{step: {file: sha256}} of every sealed checkpoint under root."""
    out = {}
    for step in ckpt.sealed_steps(str(root)):
        with open(os.path.join(ckpt.step_dir(str(root), step), ckpt.STATE), encoding="utf-8") as handle:
            out[step] = {name: entry["sha256"] for name, entry in json.load(handle)["files"].items()}
    return out


def hold_snapshots_until_the_update(monkeypatch) -> list:
    """Every snapshot thread's copies wait until the trainer reaches the next optimizer update (or the
    end of training); returns a list that gets, at each such update, whether the snapshot was then
    still in flight."""
    released: dict[int, threading.Event] = {}
    in_flight: list[bool] = []

    def event(step: int) -> threading.Event:
        return released.setdefault(step, threading.Event())

    copy = ckpt.Staging.copy

    def held_copy(self, tensor):
        name = threading.current_thread().name
        if name.startswith("checkpoint-"):
            assert event(int(name.split("-")[1])).wait(60), "the trainer never reached its update"
        return copy(self, tensor)

    before_update, finish = Checkpoints.before_update, Checkpoints.finish

    def held_before_update(self):
        if self._pending is not None and not event(self._pending[0]).is_set():
            in_flight.append(self._in_flight is not None and self._in_flight.running())
            event(self._pending[0]).set()
        before_update(self)

    def released_finish(self):
        if self._pending is not None:
            event(self._pending[0]).set()
        finish(self)

    monkeypatch.setattr(ckpt.Staging, "copy", held_copy)
    monkeypatch.setattr(Checkpoints, "before_update", held_before_update)
    monkeypatch.setattr(Checkpoints, "finish", released_finish)
    return in_flight


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_snapshot_taken_while_the_next_step_ran_equals_a_synchronous_save(job, tmp_path, monkeypatch, dtype):
    saved = {}
    for background in (False, True):
        monkeypatch.setattr(Checkpoints, "background", background)
        in_flight = hold_snapshots_until_the_update(monkeypatch) if background else []
        root = tmp_path / f"background-{background}"
        train = dataclasses.replace(job.train, dtype=dtype, checkpoint=CheckpointConfig(str(root / "ckpt"), 1))
        train_solo(CPU, job.model, train, str(root / "run"), steps=STEPS)
        saved[background] = files_by_step(root / "ckpt")
        monkeypatch.undo()
    assert in_flight == [True] * (STEPS - 1)        # steps 2 and 3 ran their forward and backward beside it
    assert sorted(saved[True]) == list(range(1, STEPS + 1))
    assert saved[True] == saved[False]


def test_a_snapshot_cut_short_is_never_sealed_and_the_resume_takes_the_previous_checkpoint(job, tmp_path,
                                                                                           monkeypatch):
    copy = ckpt.Staging.copy

    def dies_at_step_2(self, tensor):
        if threading.current_thread().name == "checkpoint-2":
            raise RuntimeError("the snapshot of step 2 was cut short")
        return copy(self, tensor)

    monkeypatch.setattr(ckpt.Staging, "copy", dies_at_step_2)
    monkeypatch.setattr(Checkpoints, "background", True)      # plain cpu copies synchronously by default
    root = tmp_path / "ckpt"
    train = dataclasses.replace(job.train, checkpoint=CheckpointConfig(str(root), 1))
    with pytest.raises(RuntimeError, match="cut short"):
        train_solo(CPU, job.model, train, str(tmp_path / "run"), steps=STEPS)
    assert ckpt.pointed_step(str(root)) == 1 and ckpt.sealed_steps(str(root)) == [1]
    assert os.path.isdir(ckpt.partial_dir(str(root), 2))
    monkeypatch.undo()
    records = train_solo(CPU, job.model, train, str(tmp_path / "run"), steps=STEPS)
    assert records[-1]["step"] == STEPS and not os.path.exists(ckpt.partial_dir(str(root), 2))
    assert sorted(ckpt.sealed_steps(str(root))) == [1, 2, 3]
