"""`hetero data prepare`: documents -> token ids -> one flat token file + JSON sidecar.

Each document is encoded with the tokenizer's own special-token template (a Llama
tokenizer adds its BOS, as in pre-training) and followed by the end-of-document
token (hetero.data.tokenizer says which) unless the template already ended it so.
The token file is the ids end to end, uint16 when the vocabulary fits, else uint32;
the sidecar (DATA.json) lets training skip scanning the file (hetero.engine.data).

Encoding runs in batches of about 1 MB through encode_batch, which the Rust library
already spreads over the host's cores; `workers` > 1 adds processes on top, each with
its own tokenizer (what was measured on each is in the README).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from typing import Iterator

import numpy as np

from hetero.atomic import atomic_file
from hetero.data import documents as docs
from hetero.data.tokenizer import TokenizerInfo, describe, load_tokenizer
from hetero.data.sidecar import sidecar_path, write_sidecar
from hetero.errors import UserError


def prepare(tokenizer_dir: str, inputs: list[str], out: str, *, eos: str | None = None, workers: int = 1,
            progress: "Progress | None" = None) -> dict:
    """Write `out` and `out`.json; return the summary (what the sidecar holds, plus timing)."""
    docs.check_inputs(inputs)
    tokenizer, info = describe(tokenizer_dir, eos)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UserError(f"--out {out}: no such directory {folder}")
    dtype = np.dtype(np.uint16 if info.vocab_size <= 1 << 16 else np.uint32)
    total_bytes = sum(os.path.getsize(path) for path in inputs)
    progress = progress or Progress(total_bytes, stream=None)
    counts = {"tokens": 0, "documents": 0, "bytes": 0}
    start = time.perf_counter()
    with atomic_file(out, "wb") as handle:
        for ids, documents, size in _encoded(tokenizer, info, inputs, workers):
            ids.astype(dtype).tofile(handle)
            counts["tokens"] += len(ids)
            counts["documents"] += documents
            counts["bytes"] += size
            progress.update(counts["bytes"], counts["tokens"])
        if not counts["documents"]:
            raise UserError(f"{', '.join(inputs)}: no documents (empty or only blank lines)")
    seconds = time.perf_counter() - start
    progress.finish(counts["bytes"], counts["tokens"])
    sidecar = _write_sidecar(out, info, dtype, counts, inputs)
    return {**sidecar, "out": os.path.abspath(out), "sidecar": os.path.abspath(sidecar_path(out)),
            "bytes": counts["bytes"], "seconds": seconds, "workers": workers,
            "tokens_per_s": counts["tokens"] / seconds if seconds > 0 else None}


def encode(tokenizer, texts: list[str], eos_id: int) -> np.ndarray:
    """The ids of `texts` end to end, each document closed by eos_id (int64)."""
    fast = getattr(tokenizer, "encode_batch_fast", None)     # tokenizers >= 0.20: no character offsets
    encodings = fast(texts, add_special_tokens=True) if fast else tokenizer.encode_batch(texts)
    flat: list[int] = []
    for encoding in encodings:
        ids = encoding.ids
        flat.extend(ids)
        if not ids or ids[-1] != eos_id:
            flat.append(eos_id)
    return np.array(flat, dtype=np.int64)


def _encoded(tokenizer, info: TokenizerInfo, inputs: list[str], workers: int) -> Iterator[tuple[np.ndarray, int, int]]:
    """(ids, documents, UTF-8 bytes) per batch, in input order."""
    if workers <= 1:
        for batch, size in docs.batches(inputs):
            yield encode(tokenizer, batch, info.eos_id), len(batch), size
        return
    # spawn, not fork: a forked child of a process that used the Rust thread pool runs single-threaded.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(info.path, info.eos_id)) as pool:
        yield from pool.imap(_encode_in_worker, docs.batches(inputs))


_WORKER: dict = {}


def _start_worker(path: str, eos_id: int) -> None:
    _WORKER.update(tokenizer=load_tokenizer(path), eos_id=eos_id)


def _encode_in_worker(item: tuple[list[str], int]) -> tuple[np.ndarray, int, int]:
    batch, size = item
    return encode(_WORKER["tokenizer"], batch, _WORKER["eos_id"]), len(batch), size


def _write_sidecar(out: str, info: TokenizerInfo, dtype: np.dtype, counts: dict, inputs: list[str]) -> dict:
    return write_sidecar(out, {
        "tokens": counts["tokens"], "documents": counts["documents"],
        "vocab_size": info.vocab_size, "token_dtype": dtype.name,
        "tokenizer": info.directory, "tokenizer_sha256": info.sha256,
        "eos_token": info.eos_token, "eos_id": info.eos_id, "eos_source": info.eos_source,
        "add_special_tokens": True, "inputs": [os.path.abspath(path) for path in inputs],
    })


class Progress:
    """Bytes read and tokens/s: one line redrawn in place on a terminal, a plain line every
    few seconds otherwise (a log file), nothing when stream is None."""

    def __init__(self, total_bytes: int, stream=sys.stderr):
        self.total, self.stream = max(1, total_bytes), stream
        self.tty = bool(stream is not None and stream.isatty())
        self.interval = 0.2 if self.tty else 5.0
        self.start = self.last = time.perf_counter()

    def update(self, done: int, tokens: int) -> None:
        now = time.perf_counter()
        if self.stream is None or now - self.last < self.interval:
            return
        self.last = now
        self._emit(done, tokens, now)

    def finish(self, done: int, tokens: int) -> None:
        if self.stream is None:
            return
        self._emit(done, tokens, time.perf_counter())
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _emit(self, done: int, tokens: int, now: float) -> None:
        rate = tokens / max(now - self.start, 1e-9)
        line = (f"prepare: {done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB ({100 * done / self.total:.0f}%), "
                f"{tokens:,} tokens, {rate:,.0f} tokens/s")
        self.stream.write(f"\r{line:<78}" if self.tty else line + "\n")
        self.stream.flush()
