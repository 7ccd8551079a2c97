"""What one forward and backward of one batch leaves behind, recorded the same way on
hetero's model and on transformers' LlamaForCausalLM: both keep Hugging Face's module
and parameter names (model.embed_tokens, model.layers.N, model.norm, lm_head), so one
set of forward hooks and one grouping of gradients serves both."""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

FINAL_NORM = "final norm"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class Trace:
    hidden: dict[str, torch.Tensor] = field(default_factory=dict)   # "embed", "layer N", "final norm", "logits" (fp32)
    loss: float = math.nan
    grad_norms: dict[str, float] = field(default_factory=dict)      # "embed", "layer N", "final norm", "lm_head"


def record(model: torch.nn.Module, logits_of: Callable[[torch.Tensor], torch.Tensor],
           loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           tokens: torch.Tensor, labels: torch.Tensor) -> Trace:
    """Forward `tokens` (hidden states after the embedding, each decoder layer and the
    final norm; the logits; the loss against `labels`), then backward (each group's
    gradient norm, in fp64)."""
    trace = Trace()
    model.zero_grad(set_to_none=True)
    with _hooks(model, trace.hidden):
        logits = logits_of(tokens)
        loss = loss_of(logits, labels)
    trace.hidden["logits"] = logits.detach().float().clone()
    trace.loss = float(loss.detach())
    loss.backward()
    trace.grad_norms = grad_norms(model)
    return trace


def grad_norms(model: torch.nn.Module) -> dict[str, float]:
    squares: dict[str, float] = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            group = group_of(name)
            squares[group] = squares.get(group, 0.0) + float(param.grad.double().pow(2).sum())
    return {group: math.sqrt(total) for group, total in sorted(squares.items(), key=lambda kv: _order(kv[0]))}


def group_of(name: str) -> str:
    """The row a parameter's gradient counts in: "layer N", "embed", "final norm" or "lm_head"."""
    match = _LAYER.match(name)
    if match:
        return f"layer {match.group(1)}"
    if name.startswith("model.embed_tokens."):
        return "embed"
    if name.startswith("model.norm."):
        return FINAL_NORM
    return "lm_head"


def _order(row: str) -> tuple[int, int]:
    if row.startswith("layer "):
        return 1, int(row.split()[1])
    return {"embed": (0, 0), FINAL_NORM: (2, 0), "lm_head": (3, 0), "logits": (3, 0)}[row]


@contextlib.contextmanager
def _hooks(model: torch.nn.Module, into: dict[str, torch.Tensor]):
    """Forward hooks that copy each watched module's output into `into`, in forward order."""
    inner: Any = model.model          # a transformers model or a hetero stage: both name their parts alike
    watched = [("embed", inner.embed_tokens)] if hasattr(inner, "embed_tokens") else []
    layers = inner.layers.items() if isinstance(inner.layers, torch.nn.ModuleDict) else enumerate(inner.layers)
    watched += [(f"layer {index}", layer) for index, layer in layers]
    watched += [(FINAL_NORM, inner.norm)] if hasattr(inner, "norm") else []
    handles = [module.register_forward_hook(_keep(name, into)) for name, module in watched]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _keep(name: str, into: dict[str, torch.Tensor]):
    def hook(_module, _inputs, output):
        tensor = output[0] if isinstance(output, (tuple, list)) else output   # transformers 4.x: a tuple
        into[name] = tensor.detach().float().clone()
    return hook
