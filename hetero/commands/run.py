"""`hetero run`: plan -> launch -> train, with live progress. The main job."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time

from hetero.config import load_job
from hetero.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULTS = {"cluster": "emulated-mixed.yaml", "model": "llama-tiny.yaml", "train": "train-tiny.yaml"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="plan, launch and train on the fleet, with live progress",
        description=(
            "Plan the job (or take --plan), launch one worker per planned chip across every island, "
            "and train, printing step, loss, tokens/s and ETA. Without files it runs the embedded "
            "default: configs/emulated-mixed.yaml, llama-tiny.yaml and train-tiny.yaml. The run "
            "directory holds plan.json, logs/ and metrics/steps.jsonl (one line per step) plus "
            "metrics/rank*.jsonl (per-rank timing of every micro-batch)."
        ),
    )
    for kind, default in DEFAULTS.items():
        parser.add_argument(f"--{kind}", metavar="FILE", help=f"{kind} YAML (default configs/{default})")
    parser.add_argument("--plan", metavar="FILE", help="use this plan JSON instead of searching")
    parser.add_argument("--steps", type=int, metavar="N", help="train N steps (default: the train file's)")
    parser.add_argument("--out", metavar="DIR", help="run directory (default runs/<cluster>-<time>)")
    parser.add_argument("--max-restarts", type=int, default=1, metavar="N",
                        help="restart the job from its last checkpoint at most N times (default 1)")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    parser.set_defaults(func=run)


def run(args) -> int:
    from hetero.launch.fleet import launch_fleet
    from hetero.planning import plan_job

    paths = {kind: getattr(args, kind) or os.path.join(ROOT, "configs", default) for kind, default in DEFAULTS.items()}
    job = load_job(**paths).require("cluster", "model", "train")
    steps = args.steps or job.train.steps
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if args.max_restarts < 0:
        raise UserError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    run_dir = os.path.abspath(args.out or os.path.join("runs", f"{job.cluster.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    os.makedirs(os.path.join(run_dir, "metrics"), exist_ok=True)
    if os.path.exists(os.path.join(run_dir, "metrics", "steps.jsonl")):
        raise UserError(f"{run_dir} already holds a run; pass another --out")

    plan_path = os.path.join(run_dir, "plan.json")
    if args.plan:
        shutil.copyfile(args.plan, plan_path)
        with open(plan_path, encoding="utf-8") as handle:
            predicted = json.load(handle).get("predicted_step_s")
    else:
        # The engine runs 1F1B pipelines without activation recompute so far.
        result = plan_job(job, modes=("pipeline",), recompute_modes=("none",))
        with open(plan_path, "w", encoding="utf-8") as handle:
            handle.write(result.best.to_json())
        predicted = result.best.predicted_step_s
        _say(f"plan: {_describe(result.best)}; predicted {predicted:.3f} s/step")
    for kind, path in paths.items():
        shutil.copyfile(path, os.path.join(run_dir, f"{kind}.yaml"))
    _say(f"run directory: {run_dir}")

    # Checkpoints live in the run directory, so a run only ever resumes its own.
    worker_args = ["--plan", plan_path, "--steps", str(steps), "--checkpoint-dir", os.path.join(run_dir, "checkpoints")]
    worker_args += [arg for kind in DEFAULTS for arg in (f"--{kind}", os.path.abspath(paths[kind]))]
    log_path = os.path.join(run_dir, "launcher.log")
    # The launcher keeps the main thread (it owns SIGINT/SIGTERM and stops every
    # island on them); a follower thread prints progress from metrics/steps.jsonl.
    stop = threading.Event()
    records: list[dict] = []
    follower = threading.Thread(target=_follow, args=(os.path.join(run_dir, "metrics", "steps.jsonl"), steps,
                                                      stop, records), name="hetero-progress", daemon=True)
    follower.start()
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            code = launch_fleet(job.cluster, plan_path, "-m hetero.engine.worker", worker_args,
                                max_restarts=args.max_restarts, run_dir=run_dir, stdout=log, stderr=log)
    finally:
        stop.set()
        follower.join()
    summary = _summary(records, steps, predicted, run_dir, code)
    if args.json:
        print(json.dumps(summary, indent=2))
    if code != 0:
        _say(f"training failed (exit {code}); see {log_path}:")
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            for line in handle.readlines()[-15:]:
                sys.stderr.write("  " + line)
        return 1
    _say(f"done: {len(records)} steps, final loss {summary['final_loss']:.4f}, "
         f"{summary['tokens_per_s']:.0f} tokens/s, measured/predicted step time {summary['measured_over_predicted']:.2f}")
    return 0


def _follow(path: str, steps: int, stop: threading.Event, records: list) -> None:
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
                    eta = (time.monotonic() - started) / record["step"] * (steps - record["step"])
                    text = (f"step {record['step']}/{steps}  loss {record['loss']:.4f}  "
                            f"{record['tokens_per_s']:.0f} tokens/s  {record['step_s']:.2f} s/step  ETA {eta:.0f}s")
                    print(("\r" + text.ljust(78)) if tty else text, end="" if tty else "\n",
                          file=sys.stderr, flush=True)
        if finished:
            if tty and records:
                print(file=sys.stderr)
            return
        time.sleep(0.2)


def _summary(records, steps, predicted, run_dir, code) -> dict:
    # The first step includes start-up (allocation, first-touch): leave it out of the steady rate.
    steady = records[1:] or records
    step_s = sum(r["step_s"] for r in steady) / max(len(steady), 1) if steady else None
    return {
        "ok": code == 0, "run_dir": run_dir, "steps": len(records), "requested_steps": steps,
        "final_loss": records[-1]["loss"] if records else None,
        "losses": [r["loss"] for r in records],
        "step_s": step_s, "predicted_step_s": predicted,
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady) if steady else None,
        "measured_over_predicted": (step_s / predicted) if step_s and predicted else None,
    }


def _describe(plan) -> str:
    parts = [f"{s.island}(tp{s.tp} dp{s.dp} layers {s.layers[0]}-{s.layers[1]})" for s in plan.stages]
    return " -> ".join(parts) + f", {plan.num_micro_batches} x micro-batch {plan.micro_batch}"


def _say(message: str) -> None:
    print(f"hetero run: {message}", file=sys.stderr, flush=True)
