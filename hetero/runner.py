"""Plan -> launch -> train, as a function: what `hetero run` and the runtime and
efficiency benchmarks share.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field

from hetero.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {"cluster": "emulated-mixed.yaml", "model": "llama-tiny.yaml", "train": "train-tiny.yaml"}
MAX_STEPS = 10 ** 9
KINDS = {"auto": ("pipeline", "replicas"), "pipeline": ("pipeline",), "replicas": ("replicas",)}


@dataclass
class RunResult:
    code: int
    run_dir: str
    plan: dict
    records: list = field(default_factory=list)    # metrics/steps.jsonl, last attempt per step

    @property
    def steady_step_s(self) -> float | None:
        """Mean step time without the first step (start-up: allocation, first touch).
        In the chips' time: a dilated emulation's workers record it so."""
        steady = self.records[1:] or self.records
        return sum(r["step_s"] for r in steady) / len(steady) if steady else None


def add_job_arguments(parser, train_default: str = DEFAULTS["train"]) -> None:
    """--cluster/--model/--train (defaults: the embedded example) and --kind, shared by
    `hetero run` and the benchmarks that train."""
    defaults = dict(DEFAULTS, train=train_default)
    for kind, name in defaults.items():
        parser.add_argument(f"--{kind}", metavar="FILE", help=f"{kind} YAML (default configs/{name})")
    parser.add_argument("--kind", choices=sorted(KINDS), default="auto",
                        help="plan hetero-PP (pipeline across islands), hetero-DP (replicas, one per island) "
                             "or let the planner pick (auto, the default)")


def default_paths(**given) -> dict:
    return {kind: given.get(kind) or os.path.join(ROOT, "configs", name) for kind, name in DEFAULTS.items()}


def search_plan(job, kind: str = "auto", profile=None):
    """The planner's best plan among those this engine runs (hetero.engine.support: every
    recompute mode it implements; ZeRO-1 only once it has it); `kind` narrows hetero-PP vs
    hetero-DP."""
    from hetero.engine import support
    from hetero.planning import plan_job

    return plan_job(job, profile=profile, modes=KINDS[kind], recompute_modes=support.RECOMPUTE_MODES,
                    zero1=None if support.ZERO1 else False).best


def train_fleet(job, paths: dict, run_dir: str, steps: int, plan_file: str | None = None, max_restarts: int = 0,
                progress: bool = True, say=None, kind: str = "auto", target=None) -> RunResult:
    """Plan (unless given a plan file), launch every planned worker, train `steps` steps.

    `target`: a hetero.launch.targets.Target (`--on ray`), or None: every island on this
    machine, which refuses a cluster file naming other hosts. Every input is checked (the plan
    file against the job: hetero.plan_check) before the run directory is made; a UserError
    raised before any worker starts leaves nothing behind."""
    from hetero.launch.targets import launcher_for

    launch = launcher_for(target, job.cluster)
    say = say or (lambda message: print(f"hetero run: {message}", file=sys.stderr, flush=True))
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise UserError(f"--steps must be a whole number from 1 to {MAX_STEPS}, got {steps!r}")
    if max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {max_restarts}")
    run_dir = os.path.abspath(run_dir)
    check_run_dir(run_dir)
    if plan_file:
        from hetero.plan_check import load_checked_plan

        plan = load_checked_plan(plan_file, job, engine=True)
        if plan.kind not in KINDS[kind]:
            raise UserError(f"--kind {kind}: the plan {plan_file} is a '{plan.kind}' plan")
    else:
        from hetero.plan_check import check_supported

        # What the search cannot choose around (the train file's dtype) is the train file's to fix.
        plan = check_supported(search_plan(job, kind), dict(job.sources).get("train", "the train file"))
        say(f"plan: {describe(plan)}; predicted {plan.predicted_step_s:.3f} s/step")
    try:
        made = RunDir(run_dir)
    except OSError as exc:
        raise UserError(f"--out {run_dir}: cannot make the run directory: {exc.strerror or exc}") from None
    try:
        made.folder("metrics")
        made.write("plan.json", plan.to_json())
        for part, path in paths.items():
            made.copy(path, f"{part}.yaml")
    except OSError as exc:
        made.undo()
        raise UserError(f"--out {run_dir}: cannot write the run directory: {exc.strerror or exc}") from None
    plan_path = os.path.join(run_dir, "plan.json")
    plan_data = plan.to_dict()
    say(f"run directory: {run_dir}")

    # Checkpoints live in the run directory, so a run only ever resumes its own.
    worker_args = ["--plan", plan_path, "--steps", str(steps), "--checkpoint-dir", os.path.join(run_dir, "checkpoints")]
    worker_args += [arg for kind in DEFAULTS for arg in (f"--{kind}", os.path.abspath(paths[kind]))]
    # The launcher keeps the main thread (it owns SIGINT/SIGTERM and stops every
    # island on them); a follower thread prints progress from metrics/steps.jsonl.
    stop = threading.Event()
    records: list[dict] = []
    follower = threading.Thread(target=_follow, name="hetero-progress", daemon=True,
                                args=(os.path.join(run_dir, "metrics", "steps.jsonl"), steps, stop, records, progress))
    follower.start()
    try:
        with open(made.claim("launcher.log"), "a", encoding="utf-8") as log:
            code = launch(job.cluster, plan_path, "-m hetero.engine.worker", worker_args,
                          max_restarts=max_restarts, run_dir=run_dir, stdout=log, stderr=log)
    except UserError:
        if made.only_ours():
            made.undo()      # refused before any worker started: leave nothing behind
        raise
    finally:
        stop.set()
        follower.join()
    return RunResult(code, run_dir, plan_data, records)


def check_run_dir(run_dir: str) -> None:
    """A UserError unless `run_dir` can become a fresh run directory."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"--out {run_dir}: is a file, not a directory; pass another --out")
    if os.path.exists(os.path.join(run_dir, "metrics", "steps.jsonl")):
        raise UserError(f"{run_dir} already holds a run; pass another --out")
    parent = run_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"--out {run_dir}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {run_dir}: cannot write in {parent}")


class RunDir:
    """The run directory this invocation fills, and how to take back what it made (folders it
    created, files it wrote) when the run is refused before any worker starts."""

    def __init__(self, path: str):
        self.path = path
        self.made: list[str] = []
        missing = path
        while not os.path.exists(missing):
            self.made.insert(0, missing)      # outermost first: undo removes it whole
            missing = os.path.dirname(missing)
        os.makedirs(path, exist_ok=True)
        self.before = set(os.listdir(path))

    def claim(self, relative: str) -> str:
        """The path of `relative`, which this invocation is about to make (unless it exists)."""
        target = os.path.join(self.path, relative)
        if not os.path.lexists(target):
            self.made.append(target)
        return target

    def folder(self, relative: str) -> None:
        os.makedirs(self.claim(relative), exist_ok=True)

    def write(self, relative: str, text: str) -> None:
        with open(self.claim(relative), "w", encoding="utf-8") as handle:
            handle.write(text)

    def copy(self, source: str, relative: str) -> None:
        shutil.copyfile(source, self.claim(relative))

    def only_ours(self) -> bool:
        """Nothing but what this invocation made has appeared (no worker logs, no metrics)."""
        ours = {os.path.basename(p) for p in self.made if os.path.dirname(p) == self.path}
        metrics = os.path.join(self.path, "metrics")
        return (set(os.listdir(self.path)) <= self.before | ours
                and (not os.path.isdir(metrics) or not os.listdir(metrics)))

    def undo(self) -> None:
        for target in reversed(self.made):
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            elif os.path.lexists(target):
                try:
                    os.remove(target)
                except OSError:
                    pass
        self.made.clear()


def describe(plan) -> str:
    parts = [f"{s.island}(tp{s.tp} dp{s.dp} layers {s.layers[0]}-{s.layers[1]})" for s in plan.stages]
    return " -> ".join(parts) + f", {plan.num_micro_batches} x micro-batch {plan.micro_batch}"


def _follow(path: str, steps: int, stop: threading.Event, records: list, show: bool) -> None:
    """Print a progress line per finished step until `stop`; collect the records."""
    offset = 0
    started = time.monotonic()
    tty = sys.stderr.isatty()
    while True:
        finished = stop.is_set()
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                handle.seek(offset)
                for line in handle:
                    if not line.endswith("\n"):
                        break
                    offset += len(line.encode())
                    record = json.loads(line)
                    records[:] = [r for r in records if r["step"] < record["step"]] + [record]  # a restart rewinds
                    if show:
                        eta = (time.monotonic() - started) / record["step"] * (steps - record["step"])
                        text = (f"step {record['step']}/{steps}  loss {record['loss']:.4f}  "
                                f"{record['tokens_per_s']:.0f} tokens/s  {record['step_s']:.2f} s/step  ETA {eta:.0f}s")
                        if record.get("time_dilation"):
                            text += f"  (chip time; wall x{record['time_dilation']:g})"
                        print(("\r" + text.ljust(78)) if tty else text, end="" if tty else "\n",
                              file=sys.stderr, flush=True)
        if finished:
            if show and tty and records:
                print(file=sys.stderr)
            return
        time.sleep(0.2)
