"""The squared gradient norm every rank contributes: fp64 accuracy, one read of each gradient."""

from __future__ import annotations

import pytest
import torch

import accelerators
from hetero.engine.gradients import GradientSync

CHIP = {"name": "norm-chip", "tflops": {"fp32": 0.001}, "memory_gb": 0.01, "memory_bandwidth_gbps": 1.0}


@pytest.fixture
def chip():
    accelerators.reset_accelerator()
    yield accelerators.get_accelerator("emulated", chip=CHIP)
    accelerators.reset_accelerator()


def test_the_squared_norm_is_fp64_and_reads_each_gradient_once(chip):
    generator = torch.Generator().manual_seed(3)
    grads = [chip.track(torch.randn(shape, generator=generator) * scale)
             for shape, scale in (((1000,), 1e3), ((30, 40), 1e-3), ((7,), 1.0))]
    sync = GradientSync.__new__(GradientSync)       # only the scope is needed to sum squares
    sync.scope = chip.device_scope
    got = sync._squared_sum(grads)  # pylint: disable=protected-access
    expected = sum(float(g.double().pow(2).sum()) for g in grads)
    assert got == pytest.approx(expected, rel=1e-12)
    read = sum(g.nbytes for g in grads)
    # charged at 1 GB/s: the gradients once plus a few scalars (an fp64 copy, squared, then summed: 9x)
    assert read / 1e9 <= chip.clock.busy_seconds < 1.1 * read / 1e9
    assert sync._squared_sum([]) == 0.0  # pylint: disable=protected-access
