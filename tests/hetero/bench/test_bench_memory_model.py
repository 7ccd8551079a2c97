"""The cost model's memory terms against what the engine's model allocates, one term at a time:
activations a layer keeps for backward (autograd's saved tensors, per recompute mode and dtype),
backward's transient, and the last stage's loss, measured on an emulated chip's device memory."""

from __future__ import annotations

import os

import pytest
import torch

from accelerators.emulated import EmulatedAccelerator
from hetero.config import load_job
from hetero.model import LlamaStage, TensorParallel
from hetero.planning import model_spec
from partitioner.costs import backward_work_bytes, loss_bytes, reference_activation_bytes
from tests.conftest import ROOT

CHIP = {"name": "memory-chip", "tflops": {"fp32": 1000.0, "bf16": 1000.0}, "memory_gb": 1.0,
        "memory_bandwidth_gbps": 1e6, "host_link_gbps": 1e6}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
B = 2


@pytest.fixture(scope="module")
def config():
    return load_job(model=os.path.join(ROOT, "configs", "llama-tiny.yaml")).model


def _stage(config, layers, dtype, mode, first=False, last=False):
    return LlamaStage(config, layers, first=first, last=last, tp=TensorParallel(), dtype=DTYPES[dtype],
                      device="cpu", seed=0, recompute=mode)


def saved_bytes(stage, x) -> int:
    """Bytes of the distinct tensors autograd saves in one forward, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in stage.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stage(x)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_a_layer_keeps_what_the_reference_formula_says(config, dtype, mode):
    """Two layers minus one: one layer's saved tensors (the shared rotary tables drop out)."""
    x = torch.randn(B, config.seq_len, config.hidden, dtype=DTYPES[dtype], requires_grad=True)
    one, two = (saved_bytes(_stage(config, (1, 1 + n), dtype, mode), x) for n in (1, 2))
    predicted = reference_activation_bytes(model_spec(config), 1, B, dtype, mode)
    assert two - one == pytest.approx(predicted, rel=0.002), (two - one, predicted)


def _device_peaks(config, dtype, mode, layers, last=False):
    """(bytes held after forward, peak transient during backward) on an emulated chip, gradients
    allocated beforehand so that backward's own transients are what the peak shows."""
    chip = EmulatedAccelerator(CHIP, strict=False)
    with chip.device_scope():
        stage = _stage(config, layers, dtype, mode, last=last)
        for param in stage.parameters():
            param.grad = torch.zeros_like(param)
        x = torch.randn(B, config.seq_len, config.hidden, dtype=DTYPES[dtype], requires_grad=True)
        labels = torch.randint(0, config.vocab, (B, config.seq_len))
        chip.reset_peak_memory_stats()
        base = chip.memory_allocated()
        out = stage(x)
        if last:
            out = stage.loss(out, labels)
        forward_peak = chip.max_memory_allocated() - base
        grad = torch.ones_like(out)
        chip.reset_peak_memory_stats()
        before = chip.memory_allocated()
        out.backward(grad)
        return forward_peak, chip.max_memory_allocated() - before


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "full"])
def test_backward_s_transient_is_the_work_term(config, dtype, mode):
    _, transient = _device_peaks(config, dtype, mode, (1, 2))
    predicted = backward_work_bytes(model_spec(config), 1, B, dtype, mode, fused=False)
    assert transient == pytest.approx(predicted, rel=0.05), (transient, predicted)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_last_stage_s_loss_is_the_loss_term(config, dtype):
    """A last stage with no layers: the final norm, LM head and loss, forward then backward."""
    forward_peak, backward = _device_peaks(config, dtype, "none", (8, 8), last=True)
    predicted = loss_bytes(model_spec(config), 1, B, dtype)
    assert max(forward_peak, backward) == pytest.approx(predicted, rel=0.05), (forward_peak, backward, predicted)
