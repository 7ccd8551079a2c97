"""Deterministic training samples: the same (seed, step, sample) gives the same tokens
on every rank and under every plan, so a mixed fleet and one process see one stream.

Each sample is `seq_len + 1` tokens; inputs are the first `seq_len`, labels the last.
A step's `global_batch` samples are numbered 0..global_batch-1; the plan decides
which rank trains which (see `sample_range`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from hetero.errors import UserError

# Synthetic samples are arithmetic progressions modulo the vocabulary (a random
# start and one of a few strides): learnable, so the loss curve means something.
SYNTHETIC_STRIDES = (1, 2, 3, 5, 7)


class SampleSource:
    def __init__(self, data, vocab: int, seq_len: int, seed: int, global_batch: int):
        self.kind = data.kind
        self.vocab, self.seq_len, self.seed, self.global_batch = vocab, seq_len, seed, global_batch
        self.tokens = None
        if data.kind == "tokens":
            self.tokens = _map_tokens(data.path, np.dtype(data.token_dtype), seq_len)
        elif data.kind == "text":
            if vocab < 256:
                raise UserError(f"text data is read as bytes and needs vocab >= 256; the model has {vocab}")
            self.tokens = _map_tokens(data.path, np.dtype(np.uint8), seq_len)
        if self.tokens is not None and int(self.tokens.max(initial=0)) >= vocab:
            raise UserError(f"{data.path}: token id {int(self.tokens.max())} is outside the model's vocab ({vocab})")

    def sample(self, step: int, index: int) -> torch.Tensor:
        """Tokens (seq_len + 1,) int64 of sample `index` of step `step`."""
        if self.tokens is None:
            seed = int(np.random.SeedSequence([self.seed, step, index]).generate_state(1)[0])
            generator = torch.Generator().manual_seed(seed)
            start = int(torch.randint(self.vocab, (1,), generator=generator))
            stride = SYNTHETIC_STRIDES[int(torch.randint(len(SYNTHETIC_STRIDES), (1,), generator=generator))]
            return (start + stride * torch.arange(self.seq_len + 1)) % self.vocab
        windows = len(self.tokens) - self.seq_len
        position = ((step * self.global_batch + index) * self.seq_len) % windows
        return torch.from_numpy(self.tokens[position:position + self.seq_len + 1].astype(np.int64))

    def batch(self, step: int, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels, each (count, seq_len), of samples first..first+count-1."""
        samples = torch.stack([self.sample(step, first + i) for i in range(count)])
        return samples[:, :-1].contiguous(), samples[:, 1:].contiguous()


def _map_tokens(path: str, dtype: np.dtype, seq_len: int) -> np.ndarray:
    size = os.path.getsize(path)
    if size % dtype.itemsize:
        raise UserError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if len(tokens) < seq_len + 2:
        raise UserError(f"{path}: {len(tokens)} tokens; a sample needs seq_len + 1 = {seq_len + 1} and more")
    return tokens
