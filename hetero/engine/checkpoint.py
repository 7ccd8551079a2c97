"""Plan-independent checkpoints, written atomically.

Layout of `<dir>/step-NNNNNNNN/`:
  model-stage{k}.safetensors       full tensors by Hugging Face name (any plan can load them)
  model.safetensors.index.json     Hugging Face's weight_map over those files
  optimizer-stage{k}.safetensors   AdamW moments: exp_avg.<name>, exp_avg_sq.<name>
  state.json                       step, model, the SHA-256 of every file
`<dir>/latest` names the newest complete checkpoint.

Every stage writes its files into `step-N.partial/`; after a fleet barrier, rank 0
writes the index and state.json, renames the folder into place and only then
updates `latest`. A crash at any point leaves either the previous checkpoint or
a `.partial` folder that loading never reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hetero.errors import UserError

LATEST = "latest"
STATE = "state.json"
MODEL_INDEX = "model.safetensors.index.json"
FORMAT = "hetero-checkpoint"


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def write_stage_files(root: str, step: int, stage_index: int, model: dict, moments: dict) -> None:
    """One stage's full tensors and optimizer moments (called by its tp 0 / dp 0 rank)."""
    partial = step_dir(root, step) + ".partial"
    os.makedirs(partial, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.items()},
              os.path.join(partial, f"model-stage{stage_index}.safetensors"))
    save_file({k: v.contiguous() for k, v in moments.items()},
              os.path.join(partial, f"optimizer-stage{stage_index}.safetensors"))


def prepare(root: str, step: int) -> None:
    """Before any stage writes: clear a stale partial folder of the same step (rank 0)."""
    os.makedirs(root, exist_ok=True)
    shutil.rmtree(step_dir(root, step) + ".partial", ignore_errors=True)


def commit(root: str, step: int, model_config, extra: dict) -> str:
    """Seal the checkpoint once every stage has written (rank 0, after a barrier)."""
    partial = step_dir(root, step) + ".partial"
    files = sorted(f for f in os.listdir(partial) if f.endswith(".safetensors"))
    weight_map = {}
    for file in files:
        if file.startswith("model-"):
            with safe_open(os.path.join(partial, file), framework="pt") as handle:
                weight_map.update({name: file for name in handle.keys()})
    _write_json(os.path.join(partial, MODEL_INDEX), {"metadata": {}, "weight_map": weight_map})
    state = {"format": FORMAT, "version": 1, "step": step, "model": dataclasses.asdict(model_config),
             "files": {f: _sha256(os.path.join(partial, f)) for f in files}, **extra}
    _write_json(os.path.join(partial, STATE), state)
    final = step_dir(root, step)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    _fsync_dir(root)
    _write_json(os.path.join(root, LATEST + ".tmp"), {"step": step, "dir": os.path.basename(final)})
    os.replace(os.path.join(root, LATEST + ".tmp"), os.path.join(root, LATEST))
    _fsync_dir(root)
    return final


def latest(root: str | None) -> str | None:
    """The newest complete checkpoint folder under root, or None."""
    if not root or not os.path.isfile(os.path.join(root, LATEST)):
        return None
    path = os.path.join(root, LATEST)
    try:
        with open(path, encoding="utf-8") as handle:
            name = json.load(handle)["dir"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: corrupt checkpoint pointer ({exc}); remove it to start afresh") from None
    return os.path.join(root, name)


class Checkpoint:
    """A sealed checkpoint, verified before any tensor is read."""

    def __init__(self, directory: str, model_config):
        self.directory = directory
        state_path = os.path.join(directory, STATE)
        try:
            with open(state_path, encoding="utf-8") as handle:
                self.state = json.load(handle)
        except (OSError, ValueError) as exc:
            raise UserError(f"{state_path}: not a readable checkpoint ({exc})") from None
        if self.state.get("format") != FORMAT:
            raise UserError(f"{state_path}: not a hetero checkpoint")
        expected = dataclasses.asdict(model_config)
        if self.state.get("model") != expected:
            diff = sorted(k for k in expected if self.state.get("model", {}).get(k) != expected[k])
            raise UserError(f"{directory}: checkpoint is for another model (differs in {', '.join(diff)})")
        for file, digest in self.state["files"].items():
            path = os.path.join(directory, file)
            if not os.path.isfile(path) or _sha256(path) != digest:
                raise UserError(f"{path}: missing or corrupt (checksum mismatch); "
                                f"remove {directory} to resume from an earlier checkpoint")
        self.step = int(self.state["step"])
        self._where = {}
        for file in self.state["files"]:
            with safe_open(os.path.join(directory, file), framework="pt") as handle:
                self._where.update({name: file for name in handle.keys()})

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise UserError(f"{self.directory}: checkpoint has no tensor {name}")
        with safe_open(os.path.join(self.directory, self._where[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def tensors(self, names) -> dict:
        return {name: self.tensor(name) for name in names}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
