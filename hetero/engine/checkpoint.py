"""The engine's view of checkpoints (hetero.checkpoint): one import for the trainer, the launcher
and the tests."""

from __future__ import annotations

from hetero.checkpoint.format import (FORMAT, LATEST, MAX_STEP, MODEL_DTYPES, MOMENT_KINDS, STATE, Chunk,
                                      data_file)
from hetero.checkpoint.reader import (Checkpoint, CorruptCheckpoint, latest, load, pointed_step, read_all,
                                      sealed_steps)
from hetero.checkpoint.seal import discard, discard_partials, partial_dir, prepare, seal, step_dir
from hetero.checkpoint.staging import Staging, StagingBusy
from hetero.checkpoint.writer import AsyncWrite
from hetero.digest import file_sha256 as sha256

__all__ = ["FORMAT", "LATEST", "MAX_STEP", "MODEL_DTYPES", "MOMENT_KINDS", "STATE", "AsyncWrite", "Checkpoint",
           "Chunk", "CorruptCheckpoint", "data_file", "discard", "discard_partials", "latest", "load",
           "partial_dir", "pointed_step", "prepare", "read_all", "seal", "sealed_steps", "sha256", "Staging",
           "StagingBusy", "step_dir"]
