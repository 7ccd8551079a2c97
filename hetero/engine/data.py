"""Deterministic training samples: the same (seed, step, sample) gives the same tokens
on every rank and under every plan, so a mixed fleet and one process see one stream.

Each sample is `seq_len + 1` tokens; inputs are the first `seq_len`, labels the last.
A step's `global_batch` samples are numbered 0..global_batch-1; the plan decides
which rank trains which (see `sample_range`).

Token and text data: the file is cut into windows of seq_len + 1 tokens that start
seq_len apart (each window's last token is the next one's first), and each epoch
visits every window once in an order shuffled from (seed, epoch). Sample g of the
run (g = step * global_batch + index) is window permute(g mod N) of epoch g div N:
every rank computes it alone, in O(1), without a table, so resuming at a step
(checkpoints keep data_position.next_step) restores the stream exactly.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from hetero.data.sidecar import SIDECAR_SUFFIX, read_sidecar
from hetero.errors import UserError

# Synthetic samples are arithmetic progressions modulo the vocabulary (a random
# start and one of a few strides): learnable, so the loss curve means something.
SYNTHETIC_STRIDES = (1, 2, 3, 5, 7)

_MASK64 = (1 << 64) - 1
_FEISTEL_ROUNDS = 4


class SampleSource:
    def __init__(self, data, vocab: int, seq_len: int, seed: int, global_batch: int):
        self.kind = data.kind
        self.vocab, self.seq_len, self.seed, self.global_batch = vocab, seq_len, seed, global_batch
        self.tokens = None
        self._epoch_keys: dict[int, int] = {}
        if data.kind == "tokens":
            self.tokens = _tokens_with_vocab(data.path, data.token_dtype, vocab, seq_len)
        elif data.kind == "text":
            if vocab < 256:
                raise UserError(f"text data is read as bytes and needs vocab >= 256; the model has {vocab}")
            self.tokens = _map_tokens(data.path, np.dtype(np.uint8), seq_len)
        if self.tokens is not None:
            self.windows = (len(self.tokens) - 1) // seq_len   # samples per epoch

    def sample(self, step: int, index: int) -> torch.Tensor:
        """Tokens (seq_len + 1,) int64 of sample `index` of step `step`."""
        if self.tokens is None:
            seed = int(np.random.SeedSequence([self.seed, step, index]).generate_state(1)[0])
            generator = torch.Generator().manual_seed(seed)
            start = int(torch.randint(self.vocab, (1,), generator=generator))
            stride = SYNTHETIC_STRIDES[int(torch.randint(len(SYNTHETIC_STRIDES), (1,), generator=generator))]
            return (start + stride * torch.arange(self.seq_len + 1)) % self.vocab
        position = self.window(step * self.global_batch + index) * self.seq_len
        return torch.from_numpy(self.tokens[position:position + self.seq_len + 1].astype(np.int64))

    def window(self, sample: int) -> int:
        """The window (0..windows-1) that global sample number `sample` reads."""
        epoch, slot = divmod(sample, self.windows)
        if epoch not in self._epoch_keys:
            self._epoch_keys = {epoch: _epoch_key(self.seed, epoch)}   # epochs advance; keep one
        return permute(slot, self.windows, self._epoch_keys[epoch])

    def batch(self, step: int, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels, each (count, seq_len), of samples first..first+count-1."""
        samples = torch.stack([self.sample(step, first + i) for i in range(count)])
        return samples[:, :-1].contiguous(), samples[:, 1:].contiguous()


def permute(index: int, size: int, key: int) -> int:
    """A bijection of [0, size) chosen by `key`: a balanced Feistel network over the
    smallest even-bit power of two >= size, walking the cycle until it lands back in
    range (at most 4x the domain, so a few rounds on average). Why not a permutation
    table: a table of a 100-billion-token corpus is gigabytes on every rank."""
    if size <= 1:
        return 0
    half = max(1, ((size - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    value = index
    while True:
        left, right = value >> half, value & mask
        for round_ in range(_FEISTEL_ROUNDS):
            left, right = right, left ^ (_mix(key ^ (round_ << 56) ^ right) & mask)
        value = (left << half) | right
        if value < size:
            return value


def _mix(value: int) -> int:
    """splitmix64's finaliser: every input bit moves about half the output bits."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _epoch_key(seed: int, epoch: int) -> int:
    words = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 32) | int(words[1])


def _tokens_with_vocab(path: str, token_dtype: str, vocab: int, seq_len: int) -> np.ndarray:
    """The token file, its ids checked against the model's vocab: from the sidecar when
    there is one (no scan: every rank would read the whole file), else by a scan."""
    meta = read_sidecar(path)
    if meta is None:
        tokens = _map_tokens(path, np.dtype(token_dtype), seq_len)
        if int(tokens.max(initial=0)) >= vocab:
            raise UserError(f"{path}: token id {int(tokens.max())} is outside the model's vocab ({vocab})")
        return tokens
    tokens = _map_tokens(path, np.dtype(meta["token_dtype"]), seq_len)
    if len(tokens) != meta["tokens"]:
        raise UserError(f"{path}: holds {len(tokens)} tokens, its sidecar {path + SIDECAR_SUFFIX} says "
                        f"{meta['tokens']}; prepare the data again")
    if meta["vocab_size"] > vocab:
        raise UserError(f"{path}: its tokenizer's vocabulary ({meta['vocab_size']}) is larger than the "
                        f"model's vocab ({vocab}); use a model with vocab >= {meta['vocab_size']}")
    return tokens


def _map_tokens(path: str, dtype: np.dtype, seq_len: int) -> np.ndarray:
    size = os.path.getsize(path)
    if size % dtype.itemsize:
        raise UserError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    if len(tokens) < seq_len + 2:
        raise UserError(f"{path}: {len(tokens)} tokens; a sample needs seq_len + 1 = {seq_len + 1} and more")
    return tokens
