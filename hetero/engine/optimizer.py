"""AdamW over one stage's parameters, through the fused `accelerators.ops.adamw_step`."""

from __future__ import annotations

import torch

from accelerators import ops


class AdamW:
    def __init__(self, params: dict, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = params                       # {module name: parameter}
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.exp_avg = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self.steps = 0

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        self.steps += 1
        for name, param in self.params.items():
            if param.grad is None:
                continue
            ops.adamw_step(param, param.grad, self.exp_avg[name], self.exp_avg_sq[name], step=self.steps,
                           lr=self.lr if lr is None else lr, beta1=self.betas[0], beta2=self.betas[1],
                           eps=self.eps, weight_decay=self.weight_decay)

    def zero_grad(self) -> None:
        for param in self.params.values():
            param.grad = None
