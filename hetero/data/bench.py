"""How fast `hetero data prepare` is beside the tokenizers library's own encode_batch
on the same documents (the library alone: documents already in memory, same batches,
nothing converted or written). The goal is a ratio of 0.8 or more. prepare itself
calls encode_batch_fast (no character offsets), whose rate alone is printed too."""

from __future__ import annotations

import os
import tempfile
import time

from hetero.data import documents as docs
from hetero.data.prepare import prepare
from hetero.data.tokenizer import describe


def bench(tokenizer_dir: str, inputs: list[str], *, workers: int = 1, eos: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="hetero-data-bench-") as scratch:
        summary = prepare(tokenizer_dir, inputs, os.path.join(scratch, "tokens.bin"), eos=eos, workers=workers)
    tokenizer, _ = describe(tokenizer_dir, eos)
    batches = [batch for batch, _ in docs.batches(inputs)]
    library_s = _timed(tokenizer.encode_batch, batches)
    fast = getattr(tokenizer, "encode_batch_fast", None)
    fast_s = _timed(fast, batches) if fast else None
    return {
        "bytes": summary["bytes"], "documents": summary["documents"], "tokens": summary["tokens"],
        "workers": workers, "prepare_s": summary["seconds"], "encode_batch_s": library_s,
        "prepare_tokens_per_s": summary["tokens"] / summary["seconds"],
        "encode_batch_tokens_per_s": summary["tokens"] / library_s,
        "ratio": library_s / summary["seconds"],
        "encode_batch_fast_tokens_per_s": summary["tokens"] / fast_s if fast_s else None,
    }


def _timed(encode, batches: list[list[str]]) -> float:
    start = time.perf_counter()
    for batch in batches:
        encode(batch)
    return time.perf_counter() - start
