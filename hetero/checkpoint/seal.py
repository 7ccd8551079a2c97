"""Sealing a checkpoint: once every writing rank has reported its file (hetero.checkpoint.writer),
rank 0 merges the reports into state.json (the one metadata of the checkpoint: every tensor's
HF name, global shape, dtype and chunks; every file's size and sha256), renames
`step-N.partial/` into place and only then points `latest` at it.

A crash or kill at any point leaves either the previous checkpoint as `latest` or a `.partial`
folder that loading never reads (the next save of that step, or a resume, removes it); a failed
write (a full disk) removes what it left, so `latest` keeps naming the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
from typing import Any

from hetero.atomic import write_atomic
from hetero.checkpoint import format as fmt
from hetero.errors import JobFatalError


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def partial_dir(root: str, step: int) -> str:
    return step_dir(root, step) + ".partial"


def prepare(root: str, step: int) -> None:
    """Before any rank writes step `step`: clear a stale partial folder of it, make a fresh one (rank 0)."""
    os.makedirs(root, exist_ok=True)
    discard(root, step)
    os.makedirs(partial_dir(root, step))


def discard(root: str, step: int) -> None:
    """Remove what an unfinished save of `step` left (its partial folder, a pointer being written)."""
    shutil.rmtree(partial_dir(root, step), ignore_errors=True)
    for pointer in glob.glob(glob.escape(os.path.join(root, fmt.LATEST)) + ".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(pointer)


def discard_partials(root: str | None) -> None:
    """Remove every `.partial` folder under root: saves that a crash or kill cut short (rank 0, at resume,
    before any rank writes)."""
    if root is None:
        return
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            if name.endswith(".partial") and fmt.STEP_DIR.fullmatch(name.removesuffix(".partial")):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def seal(root: str, step: int, model_config, extra: dict, writers: list[int]) -> str:
    """Merge the reports of ranks `writers` into state.json and make the checkpoint `latest` (rank 0,
    after every rank's writer finished). On any OSError (ENOSPC while writing state.json or the
    pointer, say) nothing of this step is left and `latest` still names the previous checkpoint."""
    partial, final = partial_dir(root, step), step_dir(root, step)
    moved = False
    try:
        files, tensors = merge_reports(partial, writers)
        state = {"format": fmt.FORMAT, "version": fmt.VERSION, "step": step,
                 "model": dataclasses.asdict(model_config), "files": files, "tensors": tensors, **extra}
        write_json(os.path.join(partial, fmt.STATE), state)
        for rank in writers:
            os.remove(os.path.join(partial, fmt.report_file(rank)))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        moved = True
        fsync_dir(root)
        write_json(os.path.join(root, fmt.LATEST), {"step": step, "dir": os.path.basename(final)})
    except OSError:
        discard(root, step)
        if moved and _pointed(root) != step:
            shutil.rmtree(final, ignore_errors=True)
        raise
    fsync_dir(root)
    return final


def merge_reports(partial: str, writers: list[int]) -> tuple[dict, dict]:
    """({file: {bytes, sha256}}, {name: {shape, dtype, chunks: [{offsets, lengths, file, key}]}}) from
    the writers' reports. A report missing means the checkpoint folder is not the one every rank writes
    to (it must be storage every node sees): JobFatalError naming it."""
    files: dict[str, Any] = {}
    tensors: dict[str, dict[str, Any]] = {}
    for rank in writers:
        path = os.path.join(partial, fmt.report_file(rank))
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            raise JobFatalError(f"{path}: rank {rank} wrote its part of the checkpoint, but its report is not "
                                "here: the checkpoint directory must be storage every node sees") from None
        files.update(data["files"])
        for chunk in data["chunks"]:
            entry = tensors.setdefault(chunk["name"], {"shape": chunk["shape"], "dtype": chunk["dtype"],
                                                       "chunks": []})
            entry["chunks"].append({k: chunk[k] for k in ("offsets", "lengths", "file", "key")})
    return files, dict(sorted(tensors.items()))


def _pointed(root: str) -> int | None:
    try:
        with open(os.path.join(root, fmt.LATEST), encoding="utf-8") as handle:
            return json.load(handle).get("step")
    except (OSError, ValueError, AttributeError):
        return None


def write_json(path: str, data: dict) -> None:
    """`data` as `path`, durable (fsynced) and whole or not at all."""
    write_atomic(path, json.dumps(data, indent=1), fsync=True)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
