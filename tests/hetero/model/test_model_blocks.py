"""A stage may begin or end inside a layer, at the seam between its attention and MLP halves
(half-layer blocks: 2k is layer k's attention half, 2k+1 its MLP half)."""

import pytest
import torch

from hetero.config.model import ModelConfig
from hetero.engine.buckets import held_names
from hetero.errors import UserError
from hetero.model import layout
from hetero.model.llama import LlamaStage
from hetero.model.parallel import TensorParallel

CONFIG = ModelConfig(name="blocks", layers=3, hidden=32, heads=4, kv_heads=2, ffn_hidden=64, vocab=64, seq_len=8)


def names(stage) -> set:
    return {name for name, _ in stage.named_parameters()}


def test_a_cut_inside_a_layer_splits_it_between_its_halves():
    head, tail = LlamaStage(CONFIG, blocks=(0, 3), seed=1), LlamaStage(CONFIG, blocks=(3, 6), seed=1)
    assert (head.first, head.last, tail.first, tail.last) == (True, False, False, True)
    assert head.layer_range == (0, 2) and tail.layer_range == (1, 3)
    assert {n for n in names(head) if n.startswith("model.layers.1.")} == set(layout.block_names(2))
    assert {n for n in names(tail) if n.startswith("model.layers.1.")} == set(layout.block_names(3))
    assert names(head) | names(tail) == set(layout.model_names(CONFIG)) and not names(head) & names(tail)


def test_the_halves_chained_compute_the_whole_model_forward_and_backward():
    whole = LlamaStage(CONFIG, seed=4)
    parts = [LlamaStage(CONFIG, blocks=span, tp=TensorParallel(1, 0), seed=4) for span in ((0, 1), (1, 4), (4, 6))]
    tokens = torch.randint(0, CONFIG.vocab, (2, CONFIG.seq_len))
    labels = torch.randint(0, CONFIG.vocab, (2, CONFIG.seq_len))
    whole.loss(whole(tokens), labels).backward()
    x = tokens
    for part in parts[:-1]:
        x = part(x)
    loss = parts[-1].loss(parts[-1](x), labels)
    loss.backward()
    assert torch.allclose(loss, whole.loss(whole(tokens), labels))
    grads = {n: p.grad for part in parts for n, p in part.named_parameters()}
    for name, param in whole.named_parameters():
        assert torch.allclose(grads[name], param.grad, atol=1e-6), name


def test_block_names_tile_a_layer_and_held_names_follow_blocks():
    for index in range(CONFIG.layers):
        halves = layout.block_names(2 * index) + layout.block_names(2 * index + 1)
        assert sorted(halves) == sorted(layout.layer_name(index, s) for s in layout.LAYER_SPLIT_DIMS)
    held = held_names(CONFIG, [(((0, 3),), True, False)])
    assert layout.layer_name(1, "self_attn.q_proj.weight") in held
    assert layout.layer_name(1, "mlp.up_proj.weight") not in held and layout.EMBED in held


@pytest.mark.parametrize("kwargs,message", [
    ({"blocks": (0, 7)}, "does not fit a model of 3 layers"),
    ({"blocks": (3, 3)}, "holds nothing"),
    ({"blocks": (1, 6), "first": True}, "must start at layer 0, not 0.5"),
    ({"blocks": (0, 5), "last": True}, "must end at layer 3, not 2.5"),
])
def test_bad_block_ranges_are_refused(kwargs, message):
    with pytest.raises(UserError, match=message):
        LlamaStage(CONFIG, **kwargs)


def test_blocks_go_alone():
    with pytest.raises(ValueError, match="blocks alone"):
        LlamaStage(CONFIG, (0, 2), blocks=(0, 3))
