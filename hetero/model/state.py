"""Full Hugging Face-named tensors <-> one stage's TP shards.

Checkpoints hold FULL tensors by HF name, so any plan can load them: each rank
slices what it holds (shard_state_dict / load_full_state_dict), and saving
gathers the slices back over the TP group (full_state_dict).
"""

from __future__ import annotations

from typing import Mapping

import torch

from hetero.errors import UserError
from hetero.model import layout


def stage_hf_names(stage) -> dict[str, str]:
    """{module parameter name: HF name of the full tensor it is a slice of}."""
    return {name: stage.hf_name(name) for name, _ in stage.named_parameters()}


def shard_state_dict(stage, full: Mapping[str, torch.Tensor], *,
                     source: str = "state dict") -> dict[str, torch.Tensor]:
    """This stage's slices of `full` (HF names -> full tensors; may be lazy),
    keyed by module parameter name. Extra entries in `full` are ignored (other
    stages' layers). Raises UserError naming `source` for missing tensors or
    wrong shapes."""
    names = stage_hf_names(stage)
    missing = sorted({hf for hf in names.values() if hf not in full})
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"{source}: missing tensor(s) {shown}")
    shards = {}
    for module_name, hf in names.items():
        tensor = full[hf]
        expected = layout.full_shape(stage.config, hf)
        if tuple(tensor.shape) != expected:
            raise UserError(f"{source}: {hf} has shape {tuple(tensor.shape)}, the model needs {expected}")
        shards[module_name] = stage.tp.shard(tensor, layout.split_dim(hf))
    return shards


@torch.no_grad()
def load_full_state_dict(stage, full: Mapping[str, torch.Tensor], *, source: str = "state dict") -> None:
    """Copy this stage's slices of `full` into its parameters (casting dtype,
    moving device)."""
    params = dict(stage.named_parameters())
    for module_name, shard in shard_state_dict(stage, full, source=source).items():
        params[module_name].copy_(shard)


@torch.no_grad()
def full_state_dict(stage, *, grads: bool = False, accelerator=None) -> dict[str, torch.Tensor]:
    """{HF name: full tensor} of this stage's parameters (or, with grads, their
    gradients), gathered over the TP group: a collective every TP rank must
    call. Tensors come back in host memory, copied through `accelerator`'s copy
    API (`to_host`: an emulated chip charges its host link) or `.to("cpu")`
    without one; never the live tensor. With tie_embeddings, a last-only stage
    reports its LM head as model.embed_tokens.weight."""
    out = {}
    for module_name, param in stage.named_parameters():
        hf = stage.hf_name(module_name)
        tensor = param.grad if grads else param
        if tensor is None:
            raise RuntimeError(f"{module_name} has no gradient")
        dim = layout.split_dim(hf)
        whole = tensor.detach() if dim is None else stage.tp.all_gather(tensor.detach(), dim)
        out[hf] = _host_copy(whole, accelerator)
    return out


def _host_copy(tensor: torch.Tensor, accelerator) -> torch.Tensor:
    """`tensor` in host memory, a copy (on the CPU with tp 1 a plain move would hand out the live
    parameter)."""
    to_host = getattr(accelerator, "to_host", None)
    host = to_host(tensor) if to_host is not None else tensor.to("cpu")
    if host.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr():
        host = host.clone()
    return host
