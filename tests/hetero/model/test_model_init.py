"""Plan-independent initialisation and full <-> shard state dicts (no communication:
building and slicing a TP shard needs no process group)."""

import math

import pytest
import torch

from hetero.config.model import ModelConfig
from hetero.errors import UserError
from hetero.model import (
    LlamaStage,
    TensorParallel,
    full_state_dict,
    init_full_tensor,
    load_full_state_dict,
    parameter_seed,
    shard_state_dict,
)
from hetero.model.layout import model_names, split_dim

CONFIG = ModelConfig(layers=4, hidden=64, heads=8, kv_heads=4, ffn_hidden=128, vocab=128, seq_len=32)


def params(stage):
    return {stage.hf_name(n): p.detach() for n, p in stage.named_parameters()}


def test_full_model_holds_every_hf_parameter_once():
    assert sorted(params(LlamaStage(CONFIG))) == sorted(model_names(CONFIG))


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tp_shards_concatenate_to_the_tp1_model(tp_size):
    full = params(LlamaStage(CONFIG, seed=7))
    ranks = [params(LlamaStage(CONFIG, tp=TensorParallel(tp_size, r), seed=7)) for r in range(tp_size)]
    for name, tensor in full.items():
        dim = split_dim(name)
        if dim is None:
            for shards in ranks:
                assert torch.equal(shards[name], tensor), name
        else:
            assert ranks[0][name].shape[dim] == tensor.shape[dim] // tp_size
            assert torch.equal(torch.cat([shards[name] for shards in ranks], dim), tensor), name


def test_later_stage_has_the_full_models_layers():
    full, tail = params(LlamaStage(CONFIG, seed=7)), params(LlamaStage(CONFIG, (2, 4), seed=7))
    assert tail and all(name.startswith(("model.layers.2.", "model.layers.3.", "model.norm", "lm_head"))
                        for name in tail)
    for name, tensor in tail.items():
        assert torch.equal(tensor, full[name]), name
    middle = params(LlamaStage(CONFIG, (1, 3), tp=TensorParallel(2, 1), seed=7))
    assert set(middle) == {n for n in full if n.startswith(("model.layers.1.", "model.layers.2."))}


def test_seed_and_name_decide_each_tensor():
    a, b, c = (params(LlamaStage(CONFIG, seed=s)) for s in (7, 7, 8))
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(a[q0], b[q0])
    assert not torch.equal(a[q0], c[q0])          # another seed, another model
    assert not torch.equal(a[q0], a[q1])          # every tensor has its own stream
    assert parameter_seed(7, q0) == parameter_seed(7, q0) != parameter_seed(7, q1)


def test_init_statistics():
    big = ModelConfig(layers=8, hidden=256, heads=8, kv_heads=4, ffn_hidden=512, vocab=1024, seq_len=32)
    up = init_full_tensor(big, "model.layers.0.mlp.up_proj.weight", seed=0)
    down = init_full_tensor(big, "model.layers.0.mlp.down_proj.weight", seed=0)
    assert abs(up.std().item() - 0.02) < 0.001
    assert abs(down.std().item() - 0.02 / math.sqrt(16)) < 0.0003
    assert torch.equal(init_full_tensor(big, "model.norm.weight", seed=0), torch.ones(256))


def test_dtype_casts_the_same_fp32_draw():
    fp32, bf16 = LlamaStage(CONFIG, seed=3), LlamaStage(CONFIG, seed=3, dtype=torch.bfloat16)
    name = "model.layers.1.mlp.gate_proj.weight"
    assert torch.equal(params(bf16)[name], params(fp32)[name].to(torch.bfloat16))


def test_tied_stages_draw_the_head_from_the_embedding():
    tied = ModelConfig(**{**CONFIG.__dict__, "tie_embeddings": True})
    whole = LlamaStage(tied, seed=5)
    assert "lm_head.weight" not in params(whole)
    tail = LlamaStage(tied, (3, 4), tp=TensorParallel(2, 1), seed=5)
    assert tail.tied_lm_head
    assert torch.equal(tail.lm_head.weight, whole.model.embed_tokens.weight[64:])


def test_full_state_dict_round_trips_into_another_plan():
    source = LlamaStage(CONFIG, seed=11)
    full = full_state_dict(source)
    assert set(full) == set(model_names(CONFIG))
    full["model.layers.3.mlp.up_proj.weight"].zero_()  # a copy, not the live parameter
    assert source.model.layers["3"].mlp.up_proj.weight.abs().sum() > 0

    target = LlamaStage(CONFIG, (3, 4), tp=TensorParallel(2, 1), seed=None)
    load_full_state_dict(target, full)
    assert target.model.layers["3"].mlp.up_proj.weight.abs().sum() == 0
    assert torch.equal(target.model.layers["3"].mlp.down_proj.weight,
                       source.model.layers["3"].mlp.down_proj.weight[:, 64:])
    shards = shard_state_dict(target, full)
    assert set(shards) == {n for n, _ in target.named_parameters()}


def test_load_full_state_dict_names_what_is_wrong():
    full = full_state_dict(LlamaStage(CONFIG, seed=11))
    stage = LlamaStage(CONFIG, (0, 2), seed=None)
    broken = {k: v for k, v in full.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(UserError, match=r"ckpt-7: missing tensor\(s\) model\.layers\.1\.mlp\.up_proj"):
        load_full_state_dict(stage, broken, source="ckpt-7")
    broken = {**full, "model.embed_tokens.weight": torch.zeros(100, 64)}
    with pytest.raises(UserError, match=r"embed_tokens\.weight has shape \(100, 64\), the model needs \(128, 64\)"):
        load_full_state_dict(stage, broken)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tp=TensorParallel(8, 0)), r"tensor-parallel size 8 must divide the model's kv_heads \(4\)"),
    (dict(layer_range=(3, 6)), r"layer range \[3, 6\) does not fit a model of 4 layers"),
    (dict(layer_range=(1, 3), first=True), "a first stage must start at layer 0"),
    (dict(layer_range=(2, 2)), r"stage \[2, 2\) holds nothing"),
])
def test_impossible_stages_are_refused(kwargs, match):
    with pytest.raises(UserError, match=match):
        LlamaStage(CONFIG, **kwargs)


def test_embedding_only_first_stage_is_allowed():
    stage = LlamaStage(CONFIG, (0, 0), first=True)
    assert [n for n, _ in stage.named_parameters()] == ["model.embed_tokens.weight"]
    assert stage(torch.tensor([[1, 2, 3]])).shape == (1, 3, 64)


def test_full_state_dict_copies_an_emulated_chip_s_tensors_to_host_memory_over_its_link():
    from accelerators.emulated import EmulatedAccelerator

    chip = EmulatedAccelerator({"name": "state-chip", "tflops": {"fp32": 1.0}, "memory_gb": 1.0,
                                "memory_bandwidth_gbps": 100.0, "host_link_gbps": 1.0}, strict=True)
    stage = LlamaStage(CONFIG, seed=11)
    for param in stage.parameters():
        chip.track(param)                                   # the weights live on the chip
    before = chip.clock.busy_seconds
    with chip.device_scope():
        full = full_state_dict(stage, accelerator=chip)
    assert not any(chip.is_device_memory(tensor) for tensor in full.values())
    nbytes = sum(tensor.nbytes for tensor in full.values())
    assert chip.clock.busy_seconds - before == pytest.approx(nbytes / 1e9)   # every byte over the 1 GB/s link
    assert all(torch.equal(full[name], tensor) for name, tensor in params(stage).items())
