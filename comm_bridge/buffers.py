"""Zero-copy byte views of CPU tensors: what every lane reads from and writes into."""

from __future__ import annotations

import ctypes

import numpy as np
import torch


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor's bytes (no copy).

    numpy does the reshaping: a torch call costs several times a numpy one, and
    this runs for every message."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.dtype is torch.bfloat16:  # numpy has no bfloat16; the bytes are what count
        tensor = tensor.view(torch.int16)
    return tensor.numpy().reshape(-1).view(np.uint8)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable flat byte view of a contiguous CPU tensor's memory, for copying into it.
    It does not keep the tensor alive: use it while holding the tensor."""
    nbytes = tensor.nbytes
    if not nbytes:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")
