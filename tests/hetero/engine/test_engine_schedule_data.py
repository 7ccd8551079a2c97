"""The 1F1B schedule and the deterministic sample stream."""

import dataclasses
import itertools
import os

import numpy as np
import pytest
import torch

import accelerators
from hetero.config import load_job
from hetero.config.train import CheckpointConfig, DataConfig
from hetero.engine.data import SampleSource, permute
from hetero.engine.solo import train_solo
from hetero.engine.schedule import Action, max_in_flight, one_f_one_b
from hetero.errors import UserError
from tests.conftest import FIXTURES

CPU = accelerators.get_accelerator("cpu")
ENGINE_CONFIG = os.path.join(FIXTURES, "engine", "two-islands.yaml")


@pytest.mark.parametrize("stages,micro_batches", list(itertools.product([1, 2, 3, 5], [1, 2, 4, 7])))
def test_one_f_one_b_is_complete_and_bounded(stages, micro_batches):
    for stage in range(stages):
        actions = one_f_one_b(stage, stages, micro_batches)
        forwards = [a.micro_batch for a in actions if a.kind == "F"]
        backwards = [a.micro_batch for a in actions if a.kind == "B"]
        assert forwards == list(range(micro_batches)) and backwards == list(range(micro_batches))
        # a backward never comes before its forward
        assert all(actions.index(Action("F", mb)) < actions.index(Action("B", mb)) for mb in range(micro_batches))
        # the memory bound the partitioner assumes
        assert max_in_flight(actions) == min(stages - stage, micro_batches)


def test_one_f_one_b_simulated_pipeline_never_deadlocks():
    """Run all stages' schedules against each other with blocking sends/receives."""
    stages, micro_batches = 4, 6
    schedules = [one_f_one_b(s, stages, micro_batches) for s in range(stages)]
    position = [0] * stages
    done_forward = [set() for _ in range(stages)]
    done_backward = [set() for _ in range(stages)]
    progressed = True
    while progressed:
        progressed = False
        for s in range(stages):
            if position[s] == len(schedules[s]):
                continue
            kind, mb = schedules[s][position[s]]
            ready = (kind == "F" and (s == 0 or mb in done_forward[s - 1])) or \
                    (kind == "B" and (s == stages - 1 or mb in done_backward[s + 1]) and mb in done_forward[s])
            if ready:
                (done_forward if kind == "F" else done_backward)[s].add(mb)
                position[s] += 1
                progressed = True
    assert position == [len(s) for s in schedules]


def test_bad_schedule_arguments():
    with pytest.raises(ValueError):
        one_f_one_b(3, 3, 2)
    with pytest.raises(ValueError):
        one_f_one_b(0, 3, 0)


def test_synthetic_samples_are_deterministic_and_learnable():
    source = SampleSource(DataConfig("synthetic"), vocab=100, seq_len=16, seed=7, global_batch=4)
    a = source.sample(3, 2)
    assert torch.equal(a, SampleSource(DataConfig("synthetic"), 100, 16, 7, 4).sample(3, 2))
    assert not torch.equal(a, source.sample(3, 1)) or not torch.equal(a, source.sample(4, 2))
    stride = (a[1] - a[0]) % 100
    assert torch.equal((a[1:] - a[:-1]) % 100, torch.full((16,), int(stride)))
    inputs, labels = source.batch(3, 1, 2)
    assert inputs.shape == labels.shape == (2, 16)
    assert torch.equal(inputs[1], source.sample(3, 2)[:-1]) and torch.equal(labels[1], source.sample(3, 2)[1:])


def token_source(tmp_path, tokens, seq_len, seed=0, global_batch=2, name="tokens.bin"):
    path = tmp_path / name
    np.asarray(tokens, dtype=np.uint16).tofile(path)
    return SampleSource(DataConfig("tokens", str(path), "uint16"), vocab=1000, seq_len=seq_len, seed=seed,
                        global_batch=global_batch)


def test_token_file_epochs_visit_every_window_once_in_a_seeded_order(tmp_path):
    source = token_source(tmp_path, np.arange(1000), seq_len=8)      # windows start 8 apart: 124 of them
    assert source.windows == 124
    starts = [int(source.sample(step, index)[0]) for step in range(124) for index in range(2)]
    first, second = starts[:124], starts[124:]
    assert sorted(first) == sorted(second) == list(range(0, 124 * 8, 8))
    assert first != second and first != sorted(first)               # shuffled, anew each epoch
    assert source.sample(5, 1).tolist() == list(range(starts[11], starts[11] + 9))
    # The stream is a function of (seed, global sample index): the global batch does not matter.
    other = token_source(tmp_path, np.arange(1000), seq_len=8, global_batch=5, name="again.bin")
    assert torch.equal(other.sample(2, 1), source.sample(5, 1))
    reseeded = token_source(tmp_path, np.arange(1000), seq_len=8, seed=1, name="seeded.bin")
    assert [int(reseeded.sample(0, i)[0]) for i in range(2)] != starts[:2] or \
        [int(reseeded.sample(1, i)[0]) for i in range(2)] != starts[2:4]


@pytest.mark.parametrize("size", [1, 2, 3, 17, 64, 1000, 4097])
def test_permute_is_a_bijection(size):
    assert sorted(permute(i, size, key=12345) for i in range(size)) == list(range(size))


def test_resume_restores_the_shuffled_stream_exactly(tmp_path):
    """4 steps straight vs 2 steps, stop, resume to 4: the same losses, bit for bit, with the
    data wrapping into its third epoch (12 windows, 8 samples a step)."""
    job = load_job(model=ENGINE_CONFIG, train=ENGINE_CONFIG)
    path = tmp_path / "tokens.bin"
    rng = np.random.default_rng(0)
    (np.cumsum(rng.integers(1, 4, 12 * job.model.seq_len + 1)) % job.model.vocab).astype(np.uint16).tofile(path)

    def run(name, steps, checkpoints):
        train = dataclasses.replace(job.train, data=DataConfig("tokens", str(path)),
                                    checkpoint=CheckpointConfig(str(tmp_path / checkpoints), 2))
        records = train_solo(CPU, job.model, train, str(tmp_path / name), steps=steps)
        return {r["step"]: r["loss"] for r in records}

    straight = run("straight", 4, "ckpt-straight")
    first = run("first", 2, "ckpt-resumed")
    resumed = run("resumed", 4, "ckpt-resumed")
    assert sorted(first) == sorted(straight)[:2] and sorted(resumed) == sorted(straight)[2:]
    assert {**first, **resumed} == straight
    assert straight[max(straight)] < straight[min(straight)]     # it trains


def test_token_file_errors(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    with pytest.raises(UserError, match="outside the model's vocab"):
        SampleSource(DataConfig("tokens", str(path), "uint16"), vocab=50, seq_len=8, seed=0, global_batch=2)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x00" * 21)
    with pytest.raises(UserError, match="whole number"):
        SampleSource(DataConfig("tokens", str(odd), "uint16"), vocab=50, seq_len=4, seed=0, global_batch=2)
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 10)
    with pytest.raises(UserError, match="vocab >= 256"):
        SampleSource(DataConfig("text", str(text)), vocab=100, seq_len=4, seed=0, global_batch=2)
