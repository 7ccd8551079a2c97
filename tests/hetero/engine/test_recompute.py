"""Activation recompute (hetero.model.recompute) on one process: the same numbers as no
recompute, fewer activations kept for backward, and on an emulated chip the second
forward is device work (charged to the clock, counted by the memory ledger, clean in
strict mode)."""

from __future__ import annotations

import pytest
import torch

import accelerators
from hetero.config.model import ModelConfig
from hetero.errors import UserError
from hetero.model import LlamaStage

CONFIG = ModelConfig(layers=3, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab=128, seq_len=32)
BATCH = 2
MODES = ("none", "selective", "full")
CHIP = {"name": "recompute-chip", "tflops": {"fp32": 0.001}, "memory_gb": 1.0, "memory_bandwidth_gbps": 1.0}


def tokens_and_labels(seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CONFIG.vocab, (BATCH, CONFIG.seq_len), generator=generator)
    return tokens, torch.roll(tokens, -1, dims=1)


def loss_of(stage: LlamaStage, tokens, labels) -> torch.Tensor:
    return stage.loss(stage(tokens), labels)


def saved_bytes(stage: LlamaStage, tokens, labels) -> int:
    """Bytes of the distinct storages autograd keeps from forward for backward (what
    checkpointed regions keep inside themselves is not saved, only their inputs)."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_of(stage, tokens, labels)
    loss.backward()
    return sum(storages.values())


@pytest.fixture
def chip():
    accelerators.reset_accelerator()
    accel = accelerators.get_accelerator("emulated", chip=CHIP, strict=True)
    yield accel
    accelerators.reset_accelerator()


def test_every_mode_trains_the_same_numbers():
    tokens, labels = tokens_and_labels()
    results = {}
    for mode in MODES:
        stage = LlamaStage(CONFIG, seed=3, recompute=mode)
        loss = loss_of(stage, tokens, labels)
        loss.backward()
        results[mode] = (loss.detach(), {n: p.grad.clone() for n, p in stage.named_parameters()})
    want_loss, want_grads = results["none"]
    for mode in ("selective", "full"):
        loss, grads = results[mode]
        assert torch.allclose(loss, want_loss, rtol=0, atol=1e-7), mode
        for name, grad in want_grads.items():
            assert torch.allclose(grads[name], grad, rtol=1e-6, atol=1e-8), (mode, name)


def test_recompute_keeps_fewer_activations_for_backward():
    tokens, labels = tokens_and_labels()
    kept = {mode: saved_bytes(LlamaStage(CONFIG, seed=3, recompute=mode), tokens, labels) for mode in MODES}
    # Selective drops at least each layer's attention probabilities (batch x heads x seq x seq fp32).
    probabilities = CONFIG.layers * BATCH * CONFIG.heads * CONFIG.seq_len ** 2 * 4
    assert kept["none"] - kept["selective"] >= probabilities, kept
    # Full keeps each layer's input and little else: a fraction of selective's.
    assert kept["full"] < kept["selective"] / 2, kept


def test_recompute_runs_on_the_emulated_device(chip):
    """Strict mode (host tensors refused) holds through the second forward; the device keeps
    fewer bytes after forward, and backward is charged the recomputed forwards."""
    tokens, labels = tokens_and_labels()
    held, forward_s, backward_s = {}, {}, {}
    for mode in ("none", "full"):
        with chip.device_scope():
            stage = LlamaStage(CONFIG, seed=3, recompute=mode)
            x, y = chip.to_device(tokens), chip.to_device(labels)
            before, started = chip.ledger.allocated, chip.clock.busy_seconds
            loss = loss_of(stage, x, y)
            held[mode] = chip.ledger.allocated - before
            forward_s[mode] = chip.clock.busy_seconds - started
            loss.backward()
            backward_s[mode] = chip.clock.busy_seconds - started - forward_s[mode]
        del stage, loss, x, y
    assert held["full"] < held["none"] / 2, held
    assert forward_s["full"] == pytest.approx(forward_s["none"], rel=1e-6)
    # The decoder layers are most of a forward; full recompute runs them again in backward.
    assert backward_s["full"] - backward_s["none"] > 0.5 * forward_s["none"], (forward_s, backward_s)


def test_unknown_mode_is_refused():
    with pytest.raises(UserError, match="recompute must be one of none, selective, full, got 'some'"):
        LlamaStage(CONFIG, seed=3, recompute="some")
