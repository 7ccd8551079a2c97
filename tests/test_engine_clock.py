"""The trainer's metrics are in the chip's time: a dilated emulation's wall times divided by k."""

import pytest

from hetero.engine import trainer as trainer_module
from hetero.engine.trainer import Trainer


class _Time:
    """A fake `time` module: both clocks read the value set."""
    now = 0.0

    def perf_counter(self):
        return self.now

    def time(self):
        return 1_000_000.0 + self.now


@pytest.mark.parametrize("dilation", [1.0, 4.0])
def test_durations_and_stamps_divide_by_the_dilation(monkeypatch, dilation):
    fake = _Time()
    monkeypatch.setattr(trainer_module, "time", fake)
    trainer = Trainer.__new__(Trainer)   # only the clock is under test
    trainer.dilation = dilation
    start, stamp = trainer._clock(), trainer._stamp()
    fake.now = 8.0
    assert trainer._clock() - start == pytest.approx(8.0 / dilation)
    assert trainer._stamp() - stamp == pytest.approx(8.0 / dilation)
