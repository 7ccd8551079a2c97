"""The reference model: a Llama-style decoder built one pipeline stage at a time.

    from hetero.model import LlamaStage, TensorParallel, load_hf_stage
    tp = TensorParallel.from_group(tp_group)              # or TensorParallel() for no TP
    stage = LlamaStage(config, (start, end), tp=tp, seed=1234)   # plan-independent init
    out = stage(tokens_or_hidden)                         # hidden, or vocab-split logits
    loss = stage.loss(out, labels)                        # last stage only

parallel.py  TP group + Megatron column/row linears, vocab-parallel embedding and loss
llama.py     LlamaStage: blocks [start, end) (+ embedding / + norm and LM head)
layout.py    HF names, full shapes and TP split dims of every parameter
init.py      per-parameter seeded init: same full model whatever the plan
state.py     full HF-named tensors <-> a stage's TP shards (checkpoints)
hf.py        local Hugging Face Llama checkpoints (config.json + safetensors)
"""

from hetero.model.hf import SafetensorsCheckpoint, load_hf_checkpoint, load_hf_stage, read_hf_config
from hetero.model.init import init_full_tensor, init_stage, parameter_seed
from hetero.model.llama import LlamaStage
from hetero.model.parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
    copy_to_tensor_parallel,
    gather_from_tensor_parallel,
    reduce_from_tensor_parallel,
    vocab_parallel_cross_entropy,
)
from hetero.model.state import full_state_dict, load_full_state_dict, shard_state_dict, stage_hf_names

__all__ = [
    "ColumnParallelLinear", "LlamaStage", "RowParallelLinear", "SafetensorsCheckpoint", "TensorParallel",
    "VocabParallelEmbedding", "copy_to_tensor_parallel", "full_state_dict", "gather_from_tensor_parallel",
    "init_full_tensor", "init_stage", "load_full_state_dict", "load_hf_checkpoint", "load_hf_stage",
    "parameter_seed", "read_hf_config", "reduce_from_tensor_parallel", "shard_state_dict",
    "stage_hf_names", "vocab_parallel_cross_entropy",
]
