"""Writing a Hugging Face Llama directory from a hetero checkpoint, tensor by tensor.

The checkpoint is read through hetero.checkpoint.reader (each file hashed against state.json before
anything is read from it, each full tensor assembled from the chunks that hold it, every value checked
finite): whatever plan and sharding wrote it. Output files are filled one at a time by
hetero.checkpoint.writer's streaming safetensors writer, so at most about one output shard of tensors is
in memory. Everything is written into a hidden folder beside OUT_DIR and moved into place at the end: an
export that fails leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import torch

from hetero.checkpoint import format as fmt
from hetero.checkpoint.writer import write_safetensors
from hetero.errors import UserError
from hetero.export import hf_config, shards, tokenizer
from hetero.export.source import open_source
from hetero.model import layout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INDEX_FILE = "model.safetensors.index.json"


def export_hf(checkpoint: str, out: str, *, dtype: str | None = None, shard_size: str = shards.DEFAULT_SHARD_SIZE,
              with_tokenizer: bool = True, progress: bool = False) -> dict:
    """Export `checkpoint` (a step folder, checkpoint directory or run directory) to `out`; return what
    was written (files, bytes, tensors). `progress`: a line redrawn on stderr when it is a terminal."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    limit = shards.parse_size(shard_size)
    out = os.path.abspath(out)
    _check_out(out)
    source = open_source(checkpoint)
    names = layout.model_names(source.config)
    dtype = dtype or _saved_dtype(source.checkpoint, names)
    sizes = [(name, fmt.volume(layout.full_shape(source.config, name)) * DTYPES[dtype].itemsize) for name in names]
    groups = shards.plan_shards(sizes, limit)
    sidecar = tokenizer.run_tokenizer(source.run_dir) if with_tokenizer else None
    tokenizer_dir = tokenizer.check_tokenizer(sidecar) if sidecar else None
    bar = Progress(len(names), sum(size for _, size in sizes), stream=sys.stderr if progress else None)
    staging = _staging_dir(out)
    try:
        files = _write_shards(source.checkpoint, groups, DTYPES[dtype], staging, bar)
        ids = tokenizer.special_ids(tokenizer_dir, sidecar) if tokenizer_dir and sidecar else {}
        files += _write_configs(staging, source.config, dtype, ids, files, sum(size for _, size in sizes))
        copied = tokenizer.copy_tokenizer(tokenizer_dir, staging, sidecar, source.config.seq_len) \
            if tokenizer_dir and sidecar else []
        files += [_entry(staging, name) for name in copied]
        os.replace(staging, out)
    except OSError as exc:            # a full disk, a quota, OUT_DIR filled by someone else meanwhile
        raise UserError(f"--hf {out}: could not write it ({exc.strerror or exc}); nothing was left there") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    bar.finish()
    return {"out": out, "checkpoint": source.checkpoint.directory, "step": source.checkpoint.step, "dtype": dtype,
            "tensors": len(names), "parameters": sum(size for _, size in sizes) // DTYPES[dtype].itemsize,
            "shards": len(groups), "bytes": sum(f["bytes"] for f in files), "files": files,
            "tokenizer": tokenizer_dir, "tokenizer_files": copied}


def _check_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--hf {out}: exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        raise UserError(f"--hf {out}: exists and is not empty; name a new or empty directory")


def _staging_dir(out: str) -> str:
    """A fresh hidden folder beside `out` (same file system: the final move is a rename)."""
    staging = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial-{os.getpid()}")
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    except OSError as exc:
        raise UserError(f"--hf {out}: cannot create it ({exc.strerror or exc})") from None
    return staging


def _saved_dtype(checkpoint, names: list[str]) -> str:
    """The dtype the weights were saved in (fp32 when they differ)."""
    saved = {checkpoint.tensors_meta[name][1] for name in names}
    found = saved.pop() if len(saved) == 1 else torch.float32
    return next(key for key, value in DTYPES.items() if value == found)


def _write_shards(checkpoint, groups: list[list[str]], dtype: torch.dtype, staging: str, progress) -> list[dict]:
    """Each output file in turn: its tensors read whole (from their chunks), cast, streamed out, dropped."""
    files = []
    for index, group in enumerate(groups):
        chunks = []
        for name in group:
            tensor = _cast(checkpoint.tensor(name), dtype, name)
            shape = tuple(tensor.shape)
            chunks.append(fmt.Chunk(name, shape, (0,) * len(shape), shape, tensor))
            progress.update(name, tensor.numel() * tensor.element_size())
        file = shards.shard_file(index, len(groups))
        size, sha, _ = write_safetensors(os.path.join(staging, file), chunks)
        files.append({"name": file, "bytes": size, "sha256": sha, "tensors": group})
        del chunks
    return files


def _cast(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    if tensor.dtype == dtype:
        return tensor
    cast = tensor.to(dtype)
    if not bool(torch.isfinite(cast).all()):
        largest = float(tensor.abs().max())
        raise UserError(f"{name}: values up to {largest:.4g} overflow {fmt.dtype_name(dtype)}; export with --dtype "
                        "bf16 or fp32")
    return cast


def _write_configs(staging: str, model, dtype: str, ids: dict, files: list[dict], tensor_bytes: int) -> list[dict]:
    """model.safetensors.index.json (total_size: the tensors' bytes, as transformers writes it), config.json
    and generation_config.json; their entries."""
    index = {"metadata": {"total_size": tensor_bytes},
             "weight_map": {name: f["name"] for f in files for name in f["tensors"]}}
    written = {INDEX_FILE: index, "config.json": hf_config.config_json(model, dtype, ids),
               "generation_config.json": hf_config.generation_config_json(ids)}
    for name, data in written.items():
        with open(os.path.join(staging, name), "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
    return [_entry(staging, name) for name in written]


def _entry(staging: str, name: str) -> dict:
    return {"name": name, "bytes": os.path.getsize(os.path.join(staging, name))}


class Progress:
    """Tensors and bytes written, one line redrawn in place on a terminal; nothing otherwise."""

    def __init__(self, tensors: int, total_bytes: int, stream=sys.stderr):
        self.tensors, self.total = tensors, max(1, total_bytes)
        self.stream = stream if stream is not None and stream.isatty() else None
        self.done = self.bytes = 0
        self.last = 0.0

    def update(self, name: str, size: int) -> None:
        self.done += 1
        self.bytes += size
        now = time.perf_counter()
        if self.stream is None or (now - self.last < 0.2 and self.done < self.tensors):
            return
        self.last = now
        line = (f"export: {self.done}/{self.tensors} tensors, {self.bytes / 1e9:,.2f}/{self.total / 1e9:,.2f} GB "
                f"({100 * self.bytes / self.total:.0f}%) {name}")
        self.stream.write(f"\r{line[:100]:<100}")
        self.stream.flush()

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()
