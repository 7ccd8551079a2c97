"""Checkpoint retention: `train.checkpoint.keep` bounds how many sealed checkpoints a run keeps.

Rank 0 calls `prune` after a newer checkpoint is sealed (and `latest` points at it). It only
removes sealed `step-NNNNNNNN` folders older than the newest `keep`: never the one `latest`
names (even if, after a manual edit, it is not among the newest), never a `.partial` folder (a
save in progress, or one a crash left, which loading ignores and the next save of that step
clears), never anything else in the directory. Keeping all is the default (`keep` None).

It reads the folder through hetero.engine.checkpoint's public functions (`sealed_steps`,
`pointed_step`), so it follows the checkpoint format wherever that goes.
"""

from __future__ import annotations

import os
import shutil

from hetero.engine import checkpoint as ckpt


def prune(root: str, keep: int | None) -> list[int]:
    """Remove the sealed checkpoints of `root` beyond the newest `keep`; return their steps, newest first.

    A folder that cannot be removed (a permission, a busy NFS handle) is left for the next
    prune and not reported: retention saves space, it must never stop training."""
    if keep is None:
        return []
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a whole number >= 1 or None, got {keep!r}")
    pointed = ckpt.pointed_step(root)
    if pointed is None:
        return []              # no trusted pointer: which checkpoint a resume needs is unknown; keep all
    removed = []
    for step in ckpt.sealed_steps(root)[keep:]:
        if step == pointed:
            continue
        folder = ckpt.step_dir(root, step)
        shutil.rmtree(folder, ignore_errors=True)
        if not os.path.lexists(folder):
            removed.append(step)
    return removed
