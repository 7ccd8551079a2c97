"""Finding and reading checkpoints, trusting nothing read.

`latest` must name a step folder inside the checkpoint directory; state.json's step must be the
folder's; its metadata must describe the model (every tensor, its full shape, a float dtype,
chunks that cover it exactly). A rank then reads only the boxes it needs (`Checkpoint.read`,
lazily through safe_open's get_slice), after hashing each whole file it reads from against
state.json, and checks every value it read is finite. A checkpoint that fails anywhere is
skipped for the one before it, with one line on the log; none left is a JobFatalError.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, TypeGuard

import torch
from safetensors import safe_open

from hetero.checkpoint import format as fmt
from hetero.checkpoint.seal import step_dir
from hetero.digest import file_sha256
from hetero.errors import JobFatalError, UserError
from hetero.model import layout


class CorruptCheckpoint(UserError):
    """A checkpoint (or the `latest` pointer) that fails a check; `reason` says which, naming the file."""

    def __init__(self, where: str, reason: str):
        self.where, self.reason = where, reason
        super().__init__(f"{where}: {reason}")


# -- finding ---------------------------------------------------------------------------

def latest(root: str | None) -> str | None:
    """The step folder `latest` names, checked to lie inside root; None when there is no pointer.

    Raises CorruptCheckpoint for a pointer that is unreadable or names anything but
    a step folder of root (`../x`, an absolute path, a symbolic link)."""
    if not root or not os.path.lexists(os.path.join(root, fmt.LATEST)):
        return None
    path = os.path.join(root, fmt.LATEST)
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
    if not fmt.STEP_DIR.fullmatch(name):
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
    steps = [int(m.group(1)) for m in map(fmt.STEP_DIR.fullmatch, names) if m]
    return sorted((s for s in steps if _is_step(s) and os.path.lexists(step_dir(root, s))), reverse=True)


def load(root: str | None, model_config, *, log=print, agree=None, read=None) -> "Checkpoint | None":
    """The newest good checkpoint under root: the one `latest` names, or failing that
    the newest older one that passes every check. None when root has no `latest`.

    `read(checkpoint)` reads what this rank needs (default: everything, `read_all`); what it returns
    is the checkpoint's `part`, and any CorruptCheckpoint it raises rejects the checkpoint.
    Each checkpoint that is skipped gets one line on `log`. `agree(bad) -> bool`
    makes the decision fleet-wide (True when any rank found the checkpoint bad), so
    every rank resumes from the same step; without it the decision is this rank's.
    Raises JobFatalError when no good checkpoint is left, naming each and what is wrong."""
    agree = agree or (lambda bad: bad)
    read = read or read_all
    if not root or not os.path.lexists(os.path.join(root, fmt.LATEST)):
        return None
    skipped = []                        # (what, verdict, why) of each rejected pointer or checkpoint
    try:
        newest = latest(root)
        if newest is None:              # the pointer went away since the check above
            return None
        steps = [s for s in sealed_steps(root) if s < _step_of(newest)]
        candidates = [newest] + [step_dir(root, s) for s in steps]
    except CorruptCheckpoint as exc:
        skipped.append((f"checkpoint pointer {exc.where}", "is invalid", exc.reason))
        candidates = [step_dir(root, s) for s in sealed_steps(root)]
    for directory in candidates:
        try:
            saved, problem = _open(root, directory, model_config), None
            saved.part = read(saved)
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
                        f"remove {os.path.join(root, fmt.LATEST)} to start afresh")


def read_all(saved: "Checkpoint") -> None:
    """Read (and so verify) every tensor of the checkpoint, whole."""
    for name in saved.names():
        saved.tensor(name)


# -- reading ---------------------------------------------------------------------------

class Checkpoint:
    """A sealed checkpoint whose metadata has been checked against the model (step, names, shapes,
    dtypes, chunks covering each tensor exactly, files present). Its data is checked as it is read:
    each file's sha256 (whole, once), each chunk's key, shape and dtype, every value finite.
    Raises CorruptCheckpoint for a damaged one, JobFatalError for one of another model."""

    def __init__(self, directory: str, model_config):
        self.directory = directory
        self.part = None
        self._verified: set[str] = set()
        self._handles: dict = {}
        state_path = os.path.join(directory, fmt.STATE)
        self.state = read_state(directory)
        if self.state.get("version") != fmt.VERSION:
            raise CorruptCheckpoint(state_path, f"format version {self.state.get('version')!r}; this hetero reads "
                                                f"version {fmt.VERSION}")
        self.step = self._check_step(state_path)
        expected = dataclasses.asdict(model_config)
        if self.state.get("model") != expected:
            saved = self.state.get("model")
            saved_model = saved if isinstance(saved, dict) else {}
            diff = sorted(k for k in expected if saved_model.get(k) != expected[k])
            raise JobFatalError(f"{directory}: checkpoint is for another model (differs in {', '.join(diff)})")
        self.optimizer_steps = self._check_optimizer_steps(state_path)
        self.files = self._check_files(state_path)
        self.tensors_meta = self._check_tensors(state_path, model_config)

    def _check_step(self, state_path: str) -> int:
        step = self.state.get("step")
        if not _is_step(step):
            raise CorruptCheckpoint(state_path, f"step is {step!r}, not an integer from 1 to {fmt.MAX_STEP}")
        name = os.path.basename(os.path.normpath(self.directory))
        if fmt.STEP_DIR.fullmatch(name) and name != os.path.basename(step_dir("", step)):
            raise CorruptCheckpoint(state_path, f"step {step} does not match its folder {name}")
        return step

    def _check_optimizer_steps(self, state_path: str) -> int:
        value = self.state.get("optimizer_steps", self.step)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.step:
            raise CorruptCheckpoint(state_path, f"optimizer_steps is {value!r}, not an integer from 0 to "
                                                f"{self.step}")
        return value

    def _check_files(self, state_path: str) -> dict:
        files = self.state.get("files")
        if not isinstance(files, dict) or not files:
            raise CorruptCheckpoint(state_path, "lists no files")
        for file, entry in files.items():
            if not isinstance(file, str) or not fmt.DATA_FILE.fullmatch(file):
                raise CorruptCheckpoint(state_path, f"lists {file!r}, not a rank-NNNNN.safetensors")
            if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
                raise CorruptCheckpoint(state_path, f"lists {file} without its sha256")
            if not os.path.isfile(os.path.join(self.directory, file)):
                raise CorruptCheckpoint(os.path.join(self.directory, file), "missing")
        return files

    def _check_tensors(self, state_path: str, model_config) -> dict:
        """{name: (shape, dtype, [chunk])} after checking the metadata against the model."""
        names = layout.model_names(model_config)
        shapes = {name: layout.full_shape(model_config, name) for name in names}
        shapes.update({f"{kind}.{name}": shape for kind in fmt.MOMENT_KINDS for name, shape in shapes.items()})
        tensors = self.state.get("tensors")
        if not isinstance(tensors, dict):
            raise CorruptCheckpoint(state_path, "has no tensor metadata")
        found = {}
        for name, entry in tensors.items():
            if name not in shapes:
                raise CorruptCheckpoint(state_path, f"lists {name!r}, which the model does not have")
            try:
                shape, dtype = tuple(entry["shape"]), fmt.DTYPES[entry["dtype"]]
                chunks = [({k: c[k] for k in ("file", "key")}, tuple(c["offsets"]), tuple(c["lengths"]))
                          for c in entry["chunks"]]
            except (KeyError, TypeError) as exc:
                raise CorruptCheckpoint(state_path, f"{name}: malformed metadata ({_one_line(exc)})") from None
            if shape != shapes[name]:
                raise CorruptCheckpoint(state_path, f"{name} has shape {shape}, the model needs {shapes[name]}")
            allowed = (torch.float32,) if name.split(".", 1)[0] in fmt.MOMENT_KINDS else fmt.MODEL_DTYPES
            if dtype not in allowed:
                raise CorruptCheckpoint(state_path, f"{name} is {dtype}, expected {' or '.join(map(str, allowed))}")
            if not fmt.covers_exactly(shape, [(o, n) for _, o, n in chunks]):
                raise CorruptCheckpoint(state_path, f"{name}: its chunks do not cover it exactly")
            if any(c["file"] not in self.files for c, _, _ in chunks):
                raise CorruptCheckpoint(state_path, f"{name} has a chunk in a file it does not list")
            found[name] = (shape, dtype, chunks)
        missing = sorted(set(shapes) - set(found))
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CorruptCheckpoint(self.directory, f"has no tensor {missing[0]}{more}")
        return found

    def names(self) -> list[str]:
        return list(self.tensors_meta)

    def read(self, name: str, offsets: tuple, lengths: tuple) -> torch.Tensor:
        """The box [offsets, offsets + lengths) of tensor `name`, from the chunks that overlap it only."""
        if name not in self.tensors_meta:
            raise UserError(f"{self.directory}: checkpoint has no tensor {name}")
        _, dtype, chunks = self.tensors_meta[name]
        out = torch.empty(tuple(lengths), dtype=dtype)
        for where, chunk_offsets, chunk_lengths in chunks:
            narrows = fmt.overlap((chunk_offsets, chunk_lengths), (tuple(offsets), tuple(lengths)))
            if narrows is None:
                continue
            piece = self._slice(where["file"], where["key"], name, chunk_lengths, dtype,
                                tuple(slice(s, s + n) for _, s, _, n in narrows))
            target = out
            for dim, _, at, length in narrows:
                target = target.narrow(dim, at, length)
            target.copy_(piece)
        return out

    def _slice(self, file: str, key: str, name: str, lengths: tuple, dtype, index: tuple) -> torch.Tensor:
        path = os.path.join(self.directory, file)
        handle, keys = self._open_file(file)
        if key not in keys:
            raise CorruptCheckpoint(path, f"has no tensor {key} (state.json lists it)")
        try:
            view = handle.get_slice(key)
            if tuple(view.get_shape()) != tuple(lengths):
                raise CorruptCheckpoint(path, f"{key} has shape {tuple(view.get_shape())}, state.json says "
                                              f"{tuple(lengths)}")
            piece = view[index]
        except CorruptCheckpoint:
            raise
        except Exception as exc:  # safetensors' own error type for a damaged tensor
            raise CorruptCheckpoint(path, f"unreadable safetensors ({_one_line(exc)})") from None
        if piece.dtype != dtype:
            raise CorruptCheckpoint(path, f"{key} is {piece.dtype}, state.json says {dtype}")
        if torch.isfinite(piece.sum()):          # one pass; a nan or inf anywhere makes the sum one too
            return piece
        finite = torch.isfinite(piece)              # (or finite values overflowed it: count exactly)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise CorruptCheckpoint(path, f"{name} holds {bad} non-finite value{'s' if bad > 1 else ''} (nan or inf)")
        return piece

    def _open_file(self, file: str):
        """(safe_open handle, its keys) of `file`, hashed against state.json the first time (kept open:
        a handle parses its header once, and reads only the slices asked for)."""
        if file not in self._handles:
            self._verify(file)
            path = os.path.join(self.directory, file)
            try:
                handle = safe_open(path, framework="pt")
                self._handles[file] = (handle, set(handle.keys()))
            except Exception as exc:  # safetensors' own error type for a damaged header
                raise CorruptCheckpoint(path, f"unreadable safetensors ({_one_line(exc)})") from None
        return self._handles[file]

    def _verify(self, file: str) -> None:
        """Hash the whole file once, against state.json, before anything is read from it."""
        if file in self._verified:
            return
        path = os.path.join(self.directory, file)
        try:
            actual = file_sha256(path)
        except OSError as exc:
            raise CorruptCheckpoint(path, f"unreadable ({_one_line(exc)})") from None
        if actual != self.files[file]["sha256"]:
            raise CorruptCheckpoint(path, "checksum mismatch (corrupt or edited)")
        self._verified.add(file)

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor `name`."""
        shape = self.tensors_meta[name][0] if name in self.tensors_meta else ()
        return self.read(name, (0,) * len(shape), shape)

    def tensors(self, names) -> dict:
        return {name: self.tensor(name) for name in names}


# -- helpers ---------------------------------------------------------------------------

def read_state(directory: str) -> dict:
    """Checkpoint `directory`'s state.json, checked to be a hetero checkpoint's (its other fields are
    checked by Checkpoint); CorruptCheckpoint if it is unreadable or anything else."""
    path = os.path.join(directory, fmt.STATE)
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError) as exc:
        raise CorruptCheckpoint(path, f"not a readable checkpoint ({_one_line(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != fmt.FORMAT:
        raise CorruptCheckpoint(path, "not a hetero checkpoint")
    return state


def _is_step(value: Any) -> TypeGuard[int]:
    return not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= fmt.MAX_STEP


def _step_of(directory: str) -> int:
    match = fmt.STEP_DIR.fullmatch(os.path.basename(directory))
    if match is None:
        raise CorruptCheckpoint(directory, "not a step-NNNNNNNN folder")
    return int(match.group(1))


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
