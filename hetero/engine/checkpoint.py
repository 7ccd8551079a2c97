"""Plan-independent checkpoints, written atomically, checked before they are trusted.

Layout of `<dir>/step-NNNNNNNN/`:
  model-stage{k}.safetensors       full tensors by Hugging Face name (any plan can load them)
  model.safetensors.index.json     Hugging Face's weight_map over those files
  optimizer-stage{k}.safetensors   AdamW moments: exp_avg.<name>, exp_avg_sq.<name>
  state.json                       step, model, the SHA-256 of every file
`<dir>/latest` names the newest complete checkpoint.

Every stage writes its files into `step-N.partial/`; after a fleet barrier, rank 0
writes the index and state.json, renames the folder into place and only then
updates `latest`. A crash at any point leaves either the previous checkpoint or
a `.partial` folder that loading never reads; a failed write (a full disk)
removes what it left, so `latest` keeps naming the previous checkpoint.

Loading (`load`) trusts nothing it reads: `latest` must name a step folder inside
the checkpoint directory; state.json's step must be the folder's; every file's
hash must match; every tensor must be one the model has, with its shape, a
float dtype and finite values. A checkpoint that fails is skipped for the one
before it, with one line on the log; none left is a JobFatalError.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hetero.errors import JobFatalError, UserError
from hetero.model import layout

LATEST = "latest"
STATE = "state.json"
MODEL_INDEX = "model.safetensors.index.json"
FORMAT = "hetero-checkpoint"
MAX_STEP = 1 << 30                      # train.steps' own upper bound
_STEP_DIR = re.compile(r"step-(\d{8,})")
_STAGE_FILE = re.compile(r"(model|optimizer)-stage\d+\.safetensors")
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MOMENT_KINDS = ("exp_avg", "exp_avg_sq")


class CorruptCheckpoint(UserError):
    """A checkpoint (or the `latest` pointer) that fails a check; `reason` says which, naming the file."""

    def __init__(self, where: str, reason: str):
        self.where, self.reason = where, reason
        super().__init__(f"{where}: {reason}")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


# -- writing -----------------------------------------------------------------------

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
    discard(root, step)


def discard(root: str, step: int) -> None:
    """Remove what an unfinished save of `step` left (its partial folder, a pointer being written)."""
    shutil.rmtree(step_dir(root, step) + ".partial", ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(root, LATEST + ".tmp"))


def commit(root: str, step: int, model_config, extra: dict) -> str:
    """Seal the checkpoint once every stage has written (rank 0, after a barrier).

    On any OSError (ENOSPC while writing state.json or the pointer, say) nothing
    of this step is left behind and `latest` still names the previous checkpoint."""
    partial = step_dir(root, step) + ".partial"
    final = step_dir(root, step)
    moved = False
    try:
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
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        moved = True
        _fsync_dir(root)
        _write_json(os.path.join(root, LATEST + ".tmp"), {"step": step, "dir": os.path.basename(final)})
        os.replace(os.path.join(root, LATEST + ".tmp"), os.path.join(root, LATEST))
    except OSError:
        discard(root, step)
        if moved and pointed_step(root) != step:
            shutil.rmtree(final, ignore_errors=True)
        raise
    _fsync_dir(root)
    return final


# -- finding ---------------------------------------------------------------------------

def latest(root: str | None) -> str | None:
    """The step folder `latest` names, checked to lie inside root; None when there is no pointer.

    Raises CorruptCheckpoint for a pointer that is unreadable or names anything but
    a step folder of root (`../x`, an absolute path, a symbolic link)."""
    if not root or not os.path.lexists(os.path.join(root, LATEST)):
        return None
    path = os.path.join(root, LATEST)
    try:
        with open(path, encoding="utf-8") as handle:
            pointer = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(path, f"corrupt checkpoint pointer ({_one_line(exc)})") from None
    if not isinstance(pointer, dict) or not {"dir", "step"} <= set(pointer):
        raise CorruptCheckpoint(path, 'corrupt checkpoint pointer (expected {"step": N, "dir": "step-NNNNNNNN"})')
    name, step = pointer["dir"], pointer["step"]
    if not isinstance(name, str):
        raise CorruptCheckpoint(path, f"corrupt checkpoint pointer (dir is {name!r}, not a folder name)")
    if os.path.isabs(name):
        raise CorruptCheckpoint(path, f"names an absolute path {name!r}, outside the checkpoint directory")
    if "/" in name or os.sep in name or name in (".", ".."):
        raise CorruptCheckpoint(path, f"names {name!r}, outside the checkpoint directory")
    if not _STEP_DIR.fullmatch(name):
        raise CorruptCheckpoint(path, f"names {name!r}, not a step-NNNNNNNN folder")
    if not _is_step(step) or name != os.path.basename(step_dir(root, step)):
        raise CorruptCheckpoint(path, f"corrupt checkpoint pointer (step {step!r} does not match {name})")
    directory = os.path.join(root, name)
    problem = _escapes(root, directory)
    if problem:
        raise CorruptCheckpoint(path, f"names {name}, which {problem}")
    return directory


def pointed_step(root: str) -> int | None:
    """The step `latest` names, or None (no pointer, or one that fails its checks)."""
    try:
        found = latest(root)
    except CorruptCheckpoint:
        return None
    return None if found is None else _step_of(found)


def sealed_steps(root: str) -> list[int]:
    """The steps of root's sealed step folders (step-NNNNNNNN, no `.partial`), newest first."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    steps = [int(m.group(1)) for m in map(_STEP_DIR.fullmatch, names) if m]
    return sorted((s for s in steps if _is_step(s) and os.path.lexists(step_dir(root, s))), reverse=True)


def load(root: str | None, model_config, *, log=print, agree=None) -> "Checkpoint | None":
    """The newest good checkpoint under root: the one `latest` names, or failing that
    the newest older one that passes every check. None when root has no `latest`.

    Each checkpoint that is skipped gets one line on `log`. `agree(bad) -> bool`
    makes the decision fleet-wide (True when any rank found the checkpoint bad), so
    every rank resumes from the same step; without it the decision is this rank's.
    Raises JobFatalError when no good checkpoint is left, naming each and what is wrong."""
    agree = agree or (lambda bad: bad)
    if not root or not os.path.lexists(os.path.join(root, LATEST)):
        return None
    skipped = []                        # (what, verdict, why) of each rejected pointer or checkpoint
    try:
        newest = latest(root)
        steps = [s for s in sealed_steps(root) if s < _step_of(newest)]
        candidates = [newest] + [step_dir(root, s) for s in steps]
    except CorruptCheckpoint as exc:
        skipped.append((f"checkpoint pointer {exc.where}", "is invalid", exc.reason))
        candidates = [step_dir(root, s) for s in sealed_steps(root)]
    for directory in candidates:
        try:
            saved, problem = _open(root, directory, model_config), None
        except CorruptCheckpoint as exc:
            saved, problem = None, exc
        if agree(problem is not None):
            why = _relative(directory, problem) if problem else "another rank found it corrupt"
            skipped.append((f"checkpoint {os.path.basename(directory)}", "is corrupt", why))
            continue
        for what, verdict, why in skipped:
            log(f"{what} {verdict} ({why}); resuming from {os.path.basename(directory)}")
        return saved
    details = "; ".join(f"{what} {verdict} ({why})" for what, verdict, why in skipped[:4])
    more = f"; and {len(skipped) - 4} more" if len(skipped) > 4 else ""
    raise JobFatalError(f"{root}: no good checkpoint left to resume from: {details}{more}; "
                        f"remove {os.path.join(root, LATEST)} to start afresh")


# -- reading ---------------------------------------------------------------------------

class Checkpoint:
    """A sealed checkpoint, verified (hashes, step, tensor names, shapes, dtypes, finite
    values) before any tensor is handed out. Raises CorruptCheckpoint for a damaged one,
    JobFatalError for one of another model."""

    def __init__(self, directory: str, model_config):
        self.directory = directory
        state_path = os.path.join(directory, STATE)
        try:
            with open(state_path, encoding="utf-8") as handle:
                self.state = json.load(handle)
        except (OSError, ValueError) as exc:
            raise CorruptCheckpoint(state_path, f"not a readable checkpoint ({_one_line(exc)})") from None
        if not isinstance(self.state, dict) or self.state.get("format") != FORMAT:
            raise CorruptCheckpoint(state_path, "not a hetero checkpoint")
        self.step = self._check_step(state_path)
        expected = dataclasses.asdict(model_config)
        if self.state.get("model") != expected:
            saved_model = self.state.get("model") if isinstance(self.state.get("model"), dict) else {}
            diff = sorted(k for k in expected if saved_model.get(k) != expected[k])
            raise JobFatalError(f"{directory}: checkpoint is for another model (differs in {', '.join(diff)})")
        self.optimizer_steps = self._check_optimizer_steps(state_path)
        files = self.state.get("files")
        if not isinstance(files, dict) or not files:
            raise CorruptCheckpoint(state_path, "lists no files")
        for file, digest in files.items():
            if not isinstance(file, str) or not _STAGE_FILE.fullmatch(file):
                raise CorruptCheckpoint(state_path, f"lists {file!r}, not a model-/optimizer-stageK.safetensors")
            path = os.path.join(directory, file)
            if not os.path.isfile(path):
                raise CorruptCheckpoint(path, "missing")
            try:
                actual = _sha256(path)
            except OSError as exc:
                raise CorruptCheckpoint(path, f"unreadable ({_one_line(exc)})") from None
            if actual != digest:
                raise CorruptCheckpoint(path, "checksum mismatch (corrupt or edited)")
        self._where = self._check_tensors(model_config, sorted(files))

    def _check_step(self, state_path: str) -> int:
        step = self.state.get("step")
        if not _is_step(step):
            raise CorruptCheckpoint(state_path, f"step is {step!r}, not an integer from 1 to {MAX_STEP}")
        name = os.path.basename(os.path.normpath(self.directory))
        if _STEP_DIR.fullmatch(name) and name != os.path.basename(step_dir("", step)):
            raise CorruptCheckpoint(state_path, f"step {step} does not match its folder {name}")
        return step

    def _check_optimizer_steps(self, state_path: str) -> int:
        value = self.state.get("optimizer_steps", self.step)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.step:
            raise CorruptCheckpoint(state_path, f"optimizer_steps is {value!r}, not an integer from 0 to "
                                                f"{self.step}")
        return value

    def _check_tensors(self, model_config, files: list[str]) -> dict:
        """{tensor name: file}, after checking every tensor against the model."""
        names = layout.model_names(model_config)
        shapes = {name: layout.full_shape(model_config, name) for name in names}
        moments = {f"{kind}.{name}": shape for kind in MOMENT_KINDS for name, shape in shapes.items()}
        where, seen = {}, {"model": set(), "optimizer": set()}
        for file in files:
            kind = file.split("-", 1)[0]
            expected = shapes if kind == "model" else moments
            path = os.path.join(self.directory, file)
            try:
                with safe_open(path, framework="pt") as handle:
                    for name in handle.keys():
                        if name not in expected:
                            raise CorruptCheckpoint(path, f"holds {name!r}, which the model does not have")
                        _check_tensor(path, name, handle.get_tensor(name), expected[name],
                                      MODEL_DTYPES if kind == "model" else (torch.float32,))
                        where[name] = file
                        seen[kind].add(name)
            except CorruptCheckpoint:
                raise
            except Exception as exc:  # safetensors' own error type for a damaged header
                raise CorruptCheckpoint(path, f"unreadable safetensors ({_one_line(exc)})") from None
        for kind, expected in (("model", shapes), ("optimizer", moments)):
            missing = sorted(set(expected) - seen[kind])
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise CorruptCheckpoint(self.directory, f"has no tensor {missing[0]}{more}")
        return where

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise UserError(f"{self.directory}: checkpoint has no tensor {name}")
        with safe_open(os.path.join(self.directory, self._where[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def tensors(self, names) -> dict:
        return {name: self.tensor(name) for name in names}


def _check_tensor(path: str, name: str, tensor: torch.Tensor, shape: tuple, dtypes: tuple) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise CorruptCheckpoint(path, f"{name} has shape {tuple(tensor.shape)}, the model needs {tuple(shape)}")
    if tensor.dtype not in dtypes:
        raise CorruptCheckpoint(path, f"{name} is {tensor.dtype}, expected {' or '.join(map(str, dtypes))}")
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise CorruptCheckpoint(path, f"{name} holds {bad} non-finite value{'s' if bad > 1 else ''} (nan or inf)")


# -- helpers ---------------------------------------------------------------------------

def _is_step(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= MAX_STEP


def _step_of(directory: str) -> int:
    return int(_STEP_DIR.fullmatch(os.path.basename(directory)).group(1))


def _escapes(root: str, directory: str) -> str | None:
    """Why `directory` (a child of root) is not a real step folder inside root, or None."""
    if os.path.islink(directory):
        return f"is a symbolic link (to {os.readlink(directory)})"
    if os.path.realpath(directory) != os.path.join(os.path.realpath(root), os.path.basename(directory)):
        return "resolves outside the checkpoint directory"
    if not os.path.isdir(directory):
        return "does not exist"
    return None


def _open(root: str, directory: str, model_config) -> "Checkpoint":
    """Checkpoint(directory), once directory is known to be a real folder inside root."""
    problem = _escapes(root, directory)
    if problem:
        raise CorruptCheckpoint(directory, problem)
    return Checkpoint(directory, model_config)


def _relative(directory: str, error: CorruptCheckpoint) -> str:
    """The error's reason, naming its file relative to the checkpoint folder (state.json: ...)."""
    where = os.path.relpath(error.where, directory)
    return error.reason if where == "." else f"{where}: {error.reason}"


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 160 else text[:157] + "..."


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
