"""A rank's part of a checkpoint, written by a background thread: one safetensors file,
streamed from the host copies of the rank's own shard, its sha256 computed as it goes (the
checkpoint is never read back), then a small report (files, sizes, hashes, chunks) beside it
for the seal (hetero.checkpoint.seal).

Training blocks only for the device->host copy that makes the chunks (the caller's, best into a
hetero.checkpoint.staging.Staging reused save after save, which the writer holds until done), or not
even for that when the copy is handed over as a `snapshot` the thread runs first; the trainer
seals once every rank's writer is done (`running()`), and `wait()` joins the thread before the
next save or the end of training. A full disk or quota comes back
from `wait()` as its errno (the trainer agrees on it fleet-wide); any other error is raised there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import struct
import threading
import time
from typing import Any, Callable

import torch

from hetero.atomic import write_atomic
from hetero.checkpoint import format as fmt

BLOCK = 8 << 20                          # bytes per write (and hash update)
KILL_HOOK = "HETERO_TEST_CHECKPOINT_KILL"  # tests: "<marker>:<step>:<rank>" dies mid-write once
_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


def layout(chunks: list[fmt.Chunk]) -> tuple[bytes, list[str]]:
    """The safetensors header for `chunks` in order (8-byte length + JSON, padded to 8) and each
    chunk's key: its tensor's name, `name#k` for the k-th further chunk of the same name."""
    header: dict[str, dict[str, Any]] = {"__metadata__": {"format": "pt"}}
    keys: list[str] = []
    seen: dict[str, int] = {}
    at = 0
    for chunk in chunks:
        count = seen.get(chunk.name, 0)
        seen[chunk.name] = count + 1
        key = chunk.name if count == 0 else f"{chunk.name}#{count}"
        size = chunk.tensor.numel() * chunk.tensor.element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[fmt.dtype_name(chunk.tensor.dtype)],
                       "shape": list(chunk.lengths), "data_offsets": [at, at + size]}
        keys.append(key)
        at += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, keys


def write_safetensors(path: str, chunks: list[fmt.Chunk], hook=None) -> tuple[int, str, list[str]]:
    """Stream `chunks` into a safetensors file at `path`, fsynced; (bytes, sha256, keys).
    Nothing is copied: each tensor's bytes go out as views of its host memory."""
    head, keys = layout(chunks)
    digest, written = hashlib.sha256(head), len(head)
    with open(path, "wb") as handle:
        handle.write(head)
        for chunk in chunks:
            data = chunk.tensor.detach().reshape(-1).view(torch.uint8).numpy().data   # a view, no copy
            for at in range(0, len(data), BLOCK):
                block = data[at:at + BLOCK]
                digest.update(block)
                handle.write(block)
                written += len(block)
            if hook:
                hook()
        handle.flush()
        os.fsync(handle.fileno())
    return written, digest.hexdigest(), keys


def report(directory: str, rank: int, step: int, chunks: list[fmt.Chunk], file: str, size: int, sha: str,
           keys: list[str]) -> None:
    """The rank's report for the seal: its file, size and hash, and every chunk it holds."""
    tensors = [{"name": c.name, "shape": list(c.shape), "dtype": fmt.dtype_name(c.tensor.dtype),
                "offsets": list(c.offsets), "lengths": list(c.lengths), "file": file, "key": key}
               for c, key in zip(chunks, keys)]
    data = {"rank": rank, "step": step, "files": {file: {"bytes": size, "sha256": sha}}, "chunks": tensors}
    write_atomic(os.path.join(directory, fmt.report_file(rank)), json.dumps(data), fsync=True)


class AsyncWrite:
    """One rank's write of one checkpoint, on a thread: `start()`, then `wait()` for its outcome.

    With `snapshot` (a callable returning the chunks: the device->host copy into staging), the thread
    makes the chunks first (CheckFreq's snapshot, Mohan et al., FAST'21): the copy runs while training
    goes on, and `wait_snapshot()` is what training calls before it next modifies what is copied."""

    def __init__(self, directory: str, rank: int, step: int, chunks: list[fmt.Chunk] | None = None, staging=None,
                 snapshot: Callable[[], list[fmt.Chunk]] | None = None):
        self.directory, self.rank, self.step, self.chunks = directory, rank, step, chunks or []
        self.staging = staging        # hetero.checkpoint.staging.Staging the chunks live in, lent while writing
        self.snapshot = snapshot
        self.error: BaseException | None = None
        self.write_s = self.snapshot_s = 0.0
        self.bytes = 0
        self._snapshotted = threading.Event()
        if snapshot is None:
            self._snapshotted.set()
        self._thread = threading.Thread(target=self._run, name=f"checkpoint-{step}", daemon=True)

    def start(self) -> "AsyncWrite":
        if self.staging is not None:
            self.staging.lend()
        self._thread.start()
        return self

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            self._take_snapshot()
            os.makedirs(self.directory, exist_ok=True)
            file = fmt.data_file(self.rank)
            size, sha, keys = write_safetensors(os.path.join(self.directory, file), self.chunks,
                                                _kill_hook(self.step, self.rank, len(self.chunks)))
            report(self.directory, self.rank, self.step, self.chunks, file, size, sha, keys)
            self.bytes = size
        except BaseException as exc:  # handed to the training thread by wait()
            self.error = exc
        finally:
            self.chunks = []          # the host copies go as soon as they are written
            self.write_s = time.perf_counter() - started
            if self.staging is not None:
                self.staging.release()

    def _take_snapshot(self) -> None:
        try:
            if self.snapshot is not None:
                started = time.perf_counter()
                self.chunks, self.snapshot = self.snapshot(), None
                self.snapshot_s = time.perf_counter() - started
        finally:
            self._snapshotted.set()       # a failed snapshot is wait()'s to report; training goes on

    def wait_snapshot(self) -> float:
        """Block until the chunks are in host memory (at once without a snapshot); seconds waited."""
        if self._snapshotted.is_set():
            return 0.0
        started = time.perf_counter()
        self._snapshotted.wait()
        return time.perf_counter() - started

    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self) -> int | None:
        """Join the writer: the errno of a full disk or quota it hit, else None; other errors raise."""
        self._thread.join()
        if self.error is None:
            return None
        if isinstance(self.error, OSError) and self.error.errno in (errno.ENOSPC, errno.EDQUOT):
            return self.error.errno
        raise self.error


def _kill_hook(step: int, rank: int, count: int):
    """Tests only (HETERO_TEST_CHECKPOINT_KILL="<marker>:<step>:<rank>"): SIGKILL this process
    half-way through its file of that step, once (the marker file says it happened)."""
    spec = os.environ.get(KILL_HOOK, "")
    if not spec:
        return None
    marker, at_step, at_rank = spec.rsplit(":", 2)
    if int(at_step) != step or int(at_rank) != rank or os.path.exists(marker):
        return None
    written = []

    def hook() -> None:
        written.append(1)
        if len(written) >= max(1, count // 2):
            with open(marker, "w", encoding="utf-8") as handle:
                handle.write(f"killed rank {rank} writing step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    return hook
