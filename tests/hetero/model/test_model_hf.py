"""hetero.model against transformers' LlamaForCausalLM, on tiny random models
made here and saved to tmp_path (nothing is downloaded)."""

import json
import os

import pytest
import torch
import transformers  # test-only dependency (pyproject: dev)
from safetensors.torch import load_file, save_file

from hetero.errors import UserError
from hetero.model import LlamaStage, load_hf_checkpoint, load_hf_stage, read_hf_config

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_theta=5000.0)


def save_tiny_llama(directory, seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**TINY, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF inits norms to ones: perturb them so a mix-up would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(directory), safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    return directory, save_tiny_llama(directory)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(3))


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_config_json_maps_to_model_config(tiny):
    config = read_hf_config(str(tiny[0]))
    assert (config.layers, config.hidden, config.heads, config.kv_heads) == (3, 64, 4, 2)
    assert (config.ffn_hidden, config.vocab, config.seq_len) == (128, 128, 64)
    assert config.rope_theta == 5000.0 and config.norm_eps == 1e-5 and not config.tie_embeddings


def test_full_stage_matches_transformers_logits(tiny, tokens):
    directory, model = tiny
    stage = load_hf_stage(str(directory))
    assert stage.first and stage.last and stage.layer_range == (0, 3)
    with torch.no_grad():
        ours = stage(tokens)
    torch.testing.assert_close(ours, hf_logits(model, tokens), atol=1e-5, rtol=1e-5)
    # The loss is plain cross-entropy of the (pre-shifted) labels.
    labels = tokens.roll(-1, dims=1)
    expected = torch.nn.functional.cross_entropy(ours.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(stage.loss(ours, labels), expected)


def test_tied_embeddings_match_transformers(tmp_path, tokens):
    model = save_tiny_llama(tmp_path, seed=1, tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))
    stage = load_hf_stage(str(tmp_path))
    assert stage.lm_head.weight is stage.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(stage(tokens), hf_logits(model, tokens), atol=1e-5, rtol=1e-5)
    # A last stage without the embedding gets its own copy of it as the LM head.
    tail = load_hf_stage(str(tmp_path), (2, 3))
    assert tail.tied_lm_head
    torch.testing.assert_close(tail.lm_head.weight, model.model.embed_tokens.weight, rtol=0, atol=0)


def test_chained_stages_match_the_full_model(tiny, tokens):
    directory, model = tiny
    head, tail = load_hf_stage(str(directory), (0, 1)), load_hf_stage(str(directory), (1, 3))
    assert head.first and not head.last and tail.last and not tail.first
    assert [n for n, _ in tail.named_parameters()][0] == "model.layers.1.input_layernorm.weight"
    with torch.no_grad():
        hidden = head(tokens)
        assert hidden.shape == (2, 11, 64)
        torch.testing.assert_close(tail(hidden), hf_logits(model, tokens), atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_loads(tmp_path, tokens):
    torch.manual_seed(2)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    model.save_pretrained(str(tmp_path), safe_serialization=True, max_shard_size="50KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    stage = load_hf_stage(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(stage(tokens), hf_logits(model, tokens), atol=1e-5, rtol=1e-5)


def test_bf16_stage_loads_and_runs(tiny, tokens):
    directory, model = tiny
    stage = load_hf_stage(str(directory), dtype=torch.bfloat16)
    assert stage.lm_head.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = stage(tokens)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), hf_logits(model, tokens), atol=0.1, rtol=0.05)


# -- errors ------------------------------------------------------------------------

def edit_config(directory, **changes):
    path = directory / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


@pytest.fixture
def copy_of_tiny(tiny, tmp_path):
    for name in os.listdir(tiny[0]):
        (tmp_path / name).write_bytes((tiny[0] / name).read_bytes())
    return tmp_path


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        load_hf_stage(str(tmp_path / "absent"))
    with pytest.raises(UserError, match="config.json: missing"):
        load_hf_stage(str(tmp_path))


def test_missing_safetensors(copy_of_tiny):
    os.remove(copy_of_tiny / "model.safetensors")
    with pytest.raises(UserError, match=r"expected model\.safetensors.*found none.*\.bin"):
        load_hf_stage(str(copy_of_tiny))


@pytest.mark.parametrize("changes, match", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, r"config\.json: rope_scaling: scaled RoPE"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, r"rope_type: 'llama3' is not supported"),
    ({"attention_bias": True}, r"config\.json: attention_bias: biases are not supported"),
    ({"mlp_bias": True}, r"mlp_bias: biases are not supported"),
    ({"hidden_act": "gelu"}, r"hidden_act: 'gelu' is not supported"),
    ({"model_type": "mistral"}, r"model_type: 'mistral' is not supported"),
    ({"head_dim": 32}, r"head_dim: 32 != hidden_size / num_attention_heads"),
    ({"num_hidden_layers": None}, r"num_hidden_layers: missing"),
    ({"vocab_size": "128"}, r"vocab_size: must be a positive integer, got '128'"),
])
def test_unsupported_config_is_a_clear_error(copy_of_tiny, changes, match):
    edit_config(copy_of_tiny, **changes)
    with pytest.raises(UserError, match=match):
        load_hf_stage(str(copy_of_tiny))


def test_missing_tensor_is_named(copy_of_tiny):
    path = str(copy_of_tiny / "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing tensor\(s\) model\.layers\.2\.mlp\.up_proj\.weight"):
        load_hf_stage(str(copy_of_tiny))
    load_hf_stage(str(copy_of_tiny), (0, 2))  # a stage that does not need it still loads


def test_wrong_shape_is_named(copy_of_tiny):
    path = str(copy_of_tiny / "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"k_proj\.weight has shape \(64, 64\), the model needs \(32, 64\)"):
        load_hf_stage(str(copy_of_tiny))


def test_checkpoint_of_another_model_is_refused(tiny):
    config = read_hf_config(str(tiny[0]))
    other = type(config)(**{**config.__dict__, "kv_heads": 4})
    stage = LlamaStage(other, seed=None)
    with pytest.raises(UserError, match="describes another model.*kv_heads 2 vs 4"):
        load_hf_checkpoint(stage, str(tiny[0]))


def test_sharded_index_naming_a_missing_file(tmp_path):
    torch.manual_seed(2)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(
        str(tmp_path), safe_serialization=True, max_shard_size="50KB")
    victim = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    os.remove(victim)
    with pytest.raises(UserError, match=f"index.json: names {victim.name}, which is missing"):
        load_hf_stage(str(tmp_path))


def test_explicit_positions_match_transformers_position_ids(tiny, tokens):
    directory, model = tiny
    stage = load_hf_stage(str(directory))
    # Gapped positions (a uniform shift would change nothing: RoPE is relative).
    steps = torch.arange(tokens.shape[1])
    positions = torch.stack([3 * steps, 2 * steps + 5])
    with torch.no_grad():
        expected = model(tokens, position_ids=positions).logits
        torch.testing.assert_close(stage(tokens, positions), expected, atol=1e-5, rtol=1e-5)
        same_for_all = model(tokens, position_ids=positions[:1].expand(2, -1)).logits
        torch.testing.assert_close(stage(tokens, positions[0]), same_for_all, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(stage(tokens), expected, atol=1e-3)  # positions matter
