"""What a run directory keeps so that `hetero run --resume RUN_DIR` can continue it, and how a
resume reopens it before any worker starts.

Every `hetero run` keeps, beside plan.json and checkpoints/: cluster.yaml, model.yaml and
train.yaml (the files it ran with, a relative data path made absolute so the copies stand on
their own) and run.json (the total number of steps asked for, and each resume). While it runs
it holds the lock on RUN_DIR/.lock, so a second `hetero run` cannot write the same directory.

A resume (`open_run`, then `reopen`):
- loads the run directory's own files and reads the step `latest` names (through
  hetero.engine.checkpoint's latest/pointed_step, whatever the checkpoint format);
- drops every record after that step from metrics/steps.jsonl and metrics/rank*.jsonl, so that
  once the workers write again each step is there once, from its last attempt;
- moves the per-rank logs of earlier invocations (logs/attempt_K, which the launcher numbers
  from 0 again and would overwrite) to logs/previous-N/.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import yaml

from hetero.atomic import write_atomic
from hetero.engine import checkpoint as ckpt
from hetero.errors import UserError

if TYPE_CHECKING:
    from hetero.config.load import FullJob

PARTS = ("cluster", "model", "train")
RUN_JSON = "run.json"
PLAN_JSON = "plan.json"
LOCK = ".lock"


@dataclass
class Stopped:
    """A run directory reopened for --resume."""

    run_dir: str
    paths: dict          # {part: RUN_DIR/<part>.yaml}
    job: FullJob         # the job those files make
    step: int            # the checkpoint step the workers resume from
    steps: int           # the total the run was asked for

    def total(self, steps: int | None) -> int:
        """The new total number of steps: `steps` (--steps), else the run's own; a UserError unless
        it is past the checkpoint."""
        if steps is None:
            if self.step >= self.steps:
                raise UserError(f"{self.run_dir} already reached its {self.steps} steps (checkpoint step "
                                f"{self.step}); pass --steps N (more than {self.step}) to train further")
            return self.steps
        if steps <= self.step:
            raise UserError(f"--steps {steps}: the new total must be more than the checkpoint's step {self.step} "
                            f"({self.run_dir})")
        return steps


def open_run(run_dir: str) -> Stopped:
    """The stopped run in `run_dir`; a UserError (one line) for a directory that is not one, or has no
    checkpoint to resume from."""
    from hetero.config import load_job

    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise UserError(f"--resume {run_dir}: no such run directory")
    paths = {part: os.path.join(run_dir, f"{part}.yaml") for part in PARTS}
    missing = [os.path.basename(p) for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise UserError(f"--resume {run_dir}: not a run directory of `hetero run` (no {', '.join(missing)})")
    job = load_job(**paths).require("cluster", "model", "train")
    step = checkpoint_step(run_dir)
    recorded = read_record(run_dir).get("steps")
    steps = recorded if isinstance(recorded, int) and not isinstance(recorded, bool) else job.train.steps
    return Stopped(run_dir, paths, job, step, steps)


def checkpoint_step(run_dir: str) -> int:
    """The step a resume starts from: the one `latest` names. A pointer that fails its checks
    leaves the trainer to fall back on the newest good sealed checkpoint; so does this."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.lexists(os.path.join(root, ckpt.LATEST)):
        raise UserError(f"--resume {run_dir}: no checkpoint to resume from ({root} has no 'latest'; "
                        "train.checkpoint sets how often a run saves)")
    step = ckpt.pointed_step(root)
    if step is None:
        sealed = ckpt.sealed_steps(root)
        if not sealed:
            raise UserError(f"--resume {run_dir}: {os.path.join(root, ckpt.LATEST)} names no usable checkpoint "
                            "and none other is sealed")
        step = sealed[0]
    return step


def reopen(stopped: Stopped) -> int:
    """Before the workers start: drop the metrics after the checkpoint step and set aside the earlier
    logs. Returns the byte length of metrics/steps.jsonl afterwards (where new records begin)."""
    metrics = os.path.join(stopped.run_dir, "metrics")
    os.makedirs(metrics, exist_ok=True)
    for path in sorted(glob.glob(os.path.join(metrics, "rank*.jsonl"))):
        keep_until(path, stopped.step)
    keep_until(os.path.join(metrics, "steps.jsonl"), stopped.step)
    set_aside_logs(stopped.run_dir)
    steps_path = os.path.join(metrics, "steps.jsonl")
    return os.path.getsize(steps_path) if os.path.exists(steps_path) else 0


def keep_until(path: str, step: int) -> None:
    """Rewrite a JSON-lines metrics file without the records of steps after `step` (and without a
    torn last line); atomically, so a crash leaves the old file or the new one."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break                        # torn by the kill
            try:
                record_step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                continue
            if isinstance(record_step, int) and record_step <= step:
                kept.append(line)
    write_atomic(path, "".join(kept))


def last_attempts(path: str) -> None:
    """Rewrite metrics/steps.jsonl with each step once, its last attempt, in step order (a restart
    during the resumed run, or a fallback to an older checkpoint, appends a step again)."""
    if not os.path.exists(path):
        return
    by_step = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.endswith("\n"):
                with contextlib.suppress(ValueError, AttributeError):
                    by_step[json.loads(line).get("step")] = line
    lines = [by_step[s] for s in sorted(s for s in by_step if isinstance(s, int))]
    write_atomic(path, "".join(lines))


def set_aside_logs(run_dir: str) -> str | None:
    """Move logs/attempt_* to logs/previous-N/ (N: the first free number); returns that folder."""
    logs = os.path.join(run_dir, "logs")
    attempts = sorted(glob.glob(os.path.join(logs, "attempt_*")))
    if not attempts:
        return None
    number = 1
    while os.path.exists(os.path.join(logs, f"previous-{number}")):
        number += 1
    target = os.path.join(logs, f"previous-{number}")
    os.makedirs(target)
    for attempt in attempts:
        os.replace(attempt, os.path.join(target, os.path.basename(attempt)))
    return target


# -- what every run keeps ----------------------------------------------------------------

def read_record(run_dir: str) -> dict:
    """run.json, or {} for a run directory made before it existed."""
    try:
        with open(os.path.join(run_dir, RUN_JSON), encoding="utf-8") as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_record(run_dir: str, record: dict) -> None:
    write_atomic(os.path.join(run_dir, RUN_JSON), json.dumps(record, indent=1))


# -- a re-planned run's plans ------------------------------------------------------------

def kept_plan_name(step: int) -> str:
    """The name a plan replaced at checkpoint `step` keeps in the run directory."""
    return f"plan-until-step-{step}.json"


def keep_replaced_plan(run_dir: str, step: int, text: str | None = None) -> str | None:
    """Keep the plan that trained a run until checkpoint `step` as RUN_DIR/plan-until-step-<step>.json,
    before a new plan.json replaces it: `text` (the plan a launcher holds), else the run's plan.json as
    it is. Returns that file's name; None when there was no plan to keep."""
    if text is None:
        try:
            with open(os.path.join(run_dir, PLAN_JSON), encoding="utf-8") as handle:
                text = handle.read()
        except FileNotFoundError:
            return None
    kept = kept_plan_name(step)
    write_atomic(os.path.join(run_dir, kept), text)
    return kept


def write_plan(run_dir: str, text: str) -> str:
    """Make `text` the run's plan.json (whole or not at all: a launcher on another node may read it);
    returns its path."""
    path = os.path.join(run_dir, PLAN_JSON)
    write_atomic(path, text)
    return path


def portable_text(source: str, data_path: str | None) -> str:
    """The text of a job file to keep in the run directory: as it is, unless its train section
    names a data file by a relative path, which would not resolve from the copy; then the same
    document with that path made absolute (comments are not kept in that case)."""
    with open(source, encoding="utf-8") as handle:
        text = handle.read()
    if data_path is None:
        return text
    raw = yaml.safe_load(text)
    section = raw.get("train") if isinstance(raw, dict) and isinstance(raw.get("train"), dict) else raw
    data = section.get("data") if isinstance(section, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("path"), str) or os.path.isabs(data["path"]):
        return text
    data["path"] = data_path
    return (f"# {os.path.abspath(source)}, kept by hetero run with data.path made absolute\n"
            + yaml.safe_dump(raw, sort_keys=False))


class RunLock:
    """RUN_DIR/.lock, held (flock) while a `hetero run` writes the directory: a second one on the same
    directory is refused in one line. The kernel drops it when the process ends, however it ends."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.handle: TextIO | None = None

    def __enter__(self) -> "RunLock":
        handle = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise UserError(f"{os.path.dirname(self.path)} is in use by another hetero run (pid {holder}); "
                            "wait for it to end or stop it first") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()          # closing drops the flock
            self.handle = None
