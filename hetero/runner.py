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
    """The planner's best plan the engine can run; `kind` narrows hetero-PP vs hetero-DP."""
    from hetero.planning import plan_job

    # The engine does not recompute activations yet.
    return plan_job(job, profile=profile, modes=KINDS[kind], recompute_modes=("none",)).best


def train_fleet(job, paths: dict, run_dir: str, steps: int, plan_file: str | None = None, max_restarts: int = 0,
                progress: bool = True, say=None, kind: str = "auto") -> RunResult:
    """Plan (unless given a plan file), launch every planned worker, train `steps` steps."""
    from hetero.launch.fleet import launch_fleet

    say = say or (lambda message: print(f"hetero run: {message}", file=sys.stderr, flush=True))
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {max_restarts}")
    run_dir = os.path.abspath(run_dir)
    if os.path.exists(os.path.join(run_dir, "metrics", "steps.jsonl")):
        raise UserError(f"{run_dir} already holds a run; pass another --out")
    os.makedirs(os.path.join(run_dir, "metrics"), exist_ok=True)
    plan_path = os.path.join(run_dir, "plan.json")
    if plan_file:
        shutil.copyfile(plan_file, plan_path)
    else:
        plan = search_plan(job, kind)
        with open(plan_path, "w", encoding="utf-8") as handle:
            handle.write(plan.to_json())
        say(f"plan: {describe(plan)}; predicted {plan.predicted_step_s:.3f} s/step")
    with open(plan_path, encoding="utf-8") as handle:
        plan_data = json.load(handle)
    for kind, path in paths.items():
        shutil.copyfile(path, os.path.join(run_dir, f"{kind}.yaml"))
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
        with open(os.path.join(run_dir, "launcher.log"), "a", encoding="utf-8") as log:
            code = launch_fleet(job.cluster, plan_path, "-m hetero.engine.worker", worker_args,
                                max_restarts=max_restarts, run_dir=run_dir, stdout=log, stderr=log)
    finally:
        stop.set()
        follower.join()
    return RunResult(code, run_dir, plan_data, records)


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
