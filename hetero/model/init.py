"""Plan-independent initialisation: the same seed gives the same FULL model
whatever the pipeline split, TP degree, dtype or device.

Every full parameter is drawn on the CPU in fp32 from its own generator, seeded
from (seed, Hugging Face name), and each TP rank keeps only its slice. So a
parameter never depends on which other parameters a stage holds, or in what
order they were created. Weights: normal(0, std), with the output projections
(o_proj, down_proj) scaled by 1/sqrt(2 * layers) as in Megatron/GPT-2 so the
residual stream does not grow with depth. Norm weights: ones.
"""

from __future__ import annotations

import hashlib
import math

import torch

from hetero.config.model import ModelConfig
from hetero.model import layout

DEFAULT_STD = 0.02


def parameter_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed for one parameter (not Python's salted hash())."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_full_tensor(config: ModelConfig, name: str, seed: int, std: float = DEFAULT_STD) -> torch.Tensor:
    """The whole parameter `name` (HF name, global layer index), fp32 on the CPU."""
    shape = layout.full_shape(config, name)
    if len(shape) == 1:  # RMSNorm weights
        return torch.ones(shape)
    parsed = layout.split_layer_name(name)
    if parsed is not None and parsed[1] in layout.OUTPUT_PROJECTIONS:
        std = std / math.sqrt(2 * config.layers)
    generator = torch.Generator(device="cpu").manual_seed(parameter_seed(seed, name))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_stage(stage, seed: int, std: float = DEFAULT_STD) -> None:
    """Fill every parameter of a LlamaStage with its slice of the full init."""
    for module_name, param in stage.named_parameters():
        name = stage.hf_name(module_name)
        full = init_full_tensor(stage.config, name, seed, std)
        param.copy_(stage.tp.shard(full, layout.split_dim(name)))
