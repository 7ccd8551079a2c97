"""The trainer's metrics are in the chip's time: a dilated emulation's wall times divided by k."""

import pytest

from hetero.engine import metrics as metrics_module
from hetero.engine.metrics import ChipClock


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
    monkeypatch.setattr(metrics_module, "time", fake)
    clock = ChipClock(dilation)
    start, stamp = clock.now(), clock.stamp()
    fake.now = 8.0
    assert clock.now() - start == pytest.approx(8.0 / dilation)
    assert clock.stamp() - stamp == pytest.approx(8.0 / dilation)
