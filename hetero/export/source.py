"""Which checkpoint a path names, and the run it came from.

CHECKPOINT may be a step folder (holding state.json), a checkpoint directory (holding `latest`) or a
`hetero run` directory (holding checkpoints/latest); the last two mean the checkpoint `latest` names.
The model description comes from state.json itself, so a checkpoint exports without its run's files;
everything else about it is checked by hetero.checkpoint.reader.Checkpoint (one reader, one set of checks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hetero.checkpoint import format as fmt
from hetero.checkpoint.reader import Checkpoint, CorruptCheckpoint, latest, read_state
from hetero.config.model import ModelConfig
from hetero.errors import UserError

CHECKPOINTS = "checkpoints"        # where `hetero run` keeps a run's checkpoints
TRAIN_FILE = "train.yaml"          # the train file a run directory keeps


@dataclass
class Source:
    checkpoint: Checkpoint
    config: ModelConfig
    run_dir: str | None             # the `hetero run` directory it belongs to, when it is in one


def open_source(path: str) -> Source:
    """The checkpoint `path` names, opened and its metadata checked; UserError (one line) otherwise."""
    directory, run_dir = resolve(path)
    config = model_config(directory)
    return Source(Checkpoint(directory, config), config, run_dir)


def resolve(path: str) -> tuple[str, str | None]:
    """(step folder, run directory or None) that `path` names."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such directory (expected a checkpoint, a checkpoint directory or a run "
                        "directory)")
    if os.path.isfile(os.path.join(path, fmt.STATE)):
        return path, _run_dir(os.path.dirname(os.path.dirname(path)))
    if os.path.lexists(os.path.join(path, fmt.LATEST)):
        return _latest(path), _run_dir(os.path.dirname(path))
    root = os.path.join(path, CHECKPOINTS)
    if os.path.lexists(os.path.join(root, fmt.LATEST)):
        return _latest(root), _run_dir(path)
    if os.path.isdir(root):
        raise UserError(f"{path}: the run has no checkpoint yet ({root} has no '{fmt.LATEST}'; "
                        "train.checkpoint sets how often a run saves)")
    raise UserError(f"{path}: not a checkpoint (no {fmt.STATE}), a checkpoint directory (no {fmt.LATEST}) "
                    f"or a run directory (no {CHECKPOINTS}/{fmt.LATEST})")


def _latest(root: str) -> str:
    """The step folder root's `latest` names (the caller saw the pointer; it may vanish meanwhile)."""
    folder = latest(root)
    if folder is None:
        raise UserError(f"{root}: its '{fmt.LATEST}' pointer disappeared while being read (a run still saving?)")
    return folder


def model_config(directory: str) -> ModelConfig:
    """The ModelConfig state.json records (the checkpoint describes its own model)."""
    model = read_state(directory).get("model")
    if not isinstance(model, dict):
        raise CorruptCheckpoint(os.path.join(directory, fmt.STATE), "it records no model description")
    try:
        return ModelConfig(**model)
    except TypeError as exc:
        raise CorruptCheckpoint(os.path.join(directory, fmt.STATE),
                                f"its model description is unreadable ({exc})") from None


def _run_dir(candidate: str) -> str | None:
    return candidate if os.path.isfile(os.path.join(candidate, TRAIN_FILE)) else None
