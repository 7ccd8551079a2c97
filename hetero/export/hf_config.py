"""config.json and generation_config.json for an exported model, from hetero's model description.

What hetero.model.hf.read_hf_config reads back into the same ModelConfig: Llama, SwiGLU, no biases,
unscaled RoPE. rope_theta is written both ways transformers has read it (on top for 4.x, in
rope_parameters for 5.x), and the dtype as `dtype` (5.x) and `torch_dtype` (4.x).
"""

from __future__ import annotations

from hetero.config.model import ModelConfig

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def config_json(model: ModelConfig, dtype: str, tokens: dict) -> dict:
    """config.json: `dtype` a DTYPE_NAMES key; `tokens` the bos/eos ids known (bos_token_id, eos_token_id)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": model.hidden,
        "intermediate_size": model.ffn_hidden,
        "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads,
        "num_key_value_heads": model.kv_heads,
        "head_dim": model.head_dim,
        "vocab_size": model.vocab,
        "max_position_embeddings": model.seq_len,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta},
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": model.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": DTYPE_NAMES[dtype],
        "torch_dtype": DTYPE_NAMES[dtype],
        **tokens,
    }


def generation_config_json(tokens: dict) -> dict:
    """generation_config.json: what transformers' GenerationConfig.from_model_config writes."""
    return {"_from_model_config": True, **tokens, "use_cache": True}
