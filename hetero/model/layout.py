"""Names, full shapes and TP split dims of every parameter, by Hugging Face name.

One table for init, checkpoints and HF loading, so they cannot disagree about
which dim a tensor is split on. Names use GLOBAL layer indices.
"""

from __future__ import annotations

import re

from hetero.config.model import ModelConfig

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

# Per-layer suffix -> TP split dim (0: output rows / column-parallel,
# 1: input columns / row-parallel, None: replicated on every TP rank).
LAYER_SPLIT_DIMS = {
    "self_attn.q_proj.weight": 0,
    "self_attn.k_proj.weight": 0,
    "self_attn.v_proj.weight": 0,
    "self_attn.o_proj.weight": 1,
    "mlp.gate_proj.weight": 0,
    "mlp.up_proj.weight": 0,
    "mlp.down_proj.weight": 1,
    "input_layernorm.weight": None,
    "post_attention_layernorm.weight": None,
}
# Half-layer blocks (a stage may begin or end at the seam inside a layer): block 2k holds layer
# k's ATTENTION_HALF, block 2k+1 the rest of its suffixes (post-attention norm and MLP).
ATTENTION_HALF = ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                  "self_attn.v_proj.weight", "self_attn.o_proj.weight")


def block_names(block: int) -> list[str]:
    """The HF names of half-layer block `block`: layer block // 2's attention half when even,
    its MLP half when odd."""
    index, mlp = divmod(block, 2)
    return [layer_name(index, suffix) for suffix in LAYER_SPLIT_DIMS if (suffix in ATTENTION_HALF) != bool(mlp)]


# Output projections: Megatron scales their init by 1/sqrt(2 * layers).
OUTPUT_PROJECTIONS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")

_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


def layer_name(index: int, suffix: str) -> str:
    return f"model.layers.{index}.{suffix}"


def split_layer_name(name: str) -> tuple[int, str] | None:
    """'model.layers.3.mlp.up_proj.weight' -> (3, 'mlp.up_proj.weight'); else None."""
    match = _LAYER_NAME.fullmatch(name)
    return (int(match.group(1)), match.group(2)) if match else None


def split_dim(name: str) -> int | None:
    if name in (EMBED, LM_HEAD):
        return 0
    if name == FINAL_NORM:
        return None
    parsed = split_layer_name(name)
    if parsed is None or parsed[1] not in LAYER_SPLIT_DIMS:
        raise KeyError(f"not a Llama parameter name: {name!r}")
    return LAYER_SPLIT_DIMS[parsed[1]]


def full_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    """The shape of the whole (unsplit) parameter."""
    hidden, head_dim = config.hidden, config.head_dim
    if name in (EMBED, LM_HEAD):
        return (config.vocab, hidden)
    if name == FINAL_NORM:
        return (hidden,)
    parsed = split_layer_name(name)
    if parsed is None:
        raise KeyError(f"not a Llama parameter name: {name!r}")
    index, suffix = parsed
    if not 0 <= index < config.layers:
        raise KeyError(f"{name!r}: layer {index} is outside the model's {config.layers} layers")
    shapes = {
        "self_attn.q_proj.weight": (config.heads * head_dim, hidden),
        "self_attn.k_proj.weight": (config.kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (config.kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, config.heads * head_dim),
        "mlp.gate_proj.weight": (config.ffn_hidden, hidden),
        "mlp.up_proj.weight": (config.ffn_hidden, hidden),
        "mlp.down_proj.weight": (hidden, config.ffn_hidden),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }
    if suffix not in shapes:
        raise KeyError(f"not a Llama parameter name: {name!r}")
    return shapes[suffix]


def model_names(config: ModelConfig) -> list[str]:
    """Every parameter of the whole model, as a Hugging Face checkpoint names them."""
    names = [EMBED]
    for index in range(config.layers):
        names += [layer_name(index, suffix) for suffix in LAYER_SPLIT_DIMS]
    names.append(FINAL_NORM)
    if not config.tie_embeddings:
        names.append(LM_HEAD)
    return names
