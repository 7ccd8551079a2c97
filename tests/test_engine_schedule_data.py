"""The 1F1B schedule and the deterministic sample stream."""

import itertools

import numpy as np
import pytest
import torch

from hetero.config.train import DataConfig
from hetero.engine.data import SampleSource
from hetero.engine.schedule import Action, max_in_flight, one_f_one_b
from hetero.errors import UserError


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


def test_token_file_windows(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    source = SampleSource(DataConfig("tokens", str(path), "uint16"), vocab=1000, seq_len=8, seed=0, global_batch=2)
    sample = source.sample(1, 1)   # window (1*2 + 1) * 8 = 24
    assert sample.tolist() == list(range(24, 33))


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
