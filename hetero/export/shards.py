"""Which tensors go in which output file: in model order, a new file whenever the next tensor would
take the current one past the shard size (a tensor larger than it gets a file of its own), named as
transformers' save_pretrained names them."""

from __future__ import annotations

import re

from hetero.errors import UserError

DEFAULT_SHARD_SIZE = "5GB"
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes of a size like 5GB, 500MB, 2GiB or 1000000 (decimal units as transformers' max_shard_size)."""
    match = _SIZE.fullmatch(text)
    if match is None or match.group(2).upper() not in UNITS:
        raise UserError(f"--shard-size {text!r}: expected a size such as 5GB, 500MB, 2GiB or a number of bytes")
    size = int(float(match.group(1)) * UNITS[match.group(2).upper()])
    if size < 1:
        raise UserError(f"--shard-size {text!r}: must be at least one byte")
    return size


def plan_shards(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """[[tensor name]] per output file, from (name, bytes) in the order they are written."""
    shards: list[list[str]] = []
    used = 0
    for name, size in sizes:
        if not shards or (shards[-1] and used + size > limit):
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_file(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"
