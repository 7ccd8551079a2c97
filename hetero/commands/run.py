"""`hetero run`: plan -> launch -> train, with live progress. The main job."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from hetero.commands.flags import add_recovery_flags, whole
from hetero.config import load_job
from hetero.launch.targets import parse_target
from hetero.errors import UserError
from hetero.runner import MAX_STEPS, RunResult, add_job_arguments, default_paths, resume_fleet, train_fleet

MAX_RESTARTS = 1000


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="plan, launch and train on the fleet, with live progress",
        description=(
            "Plan the job (or take --plan), launch one worker per planned chip across every island, "
            "and train, printing step, loss, tokens/s and ETA. Without files it runs the embedded "
            "default: configs/emulated-mixed.yaml, llama-tiny.yaml and train-tiny.yaml. The run "
            "directory holds plan.json, launcher.log, logs/, checkpoints/, metrics/steps.jsonl (one "
            "line per step: step, loss, tokens_per_s, step_s, grad_norm, peak_memory_gb per stage) and metrics/rank*.jsonl "
            "(per rank, every micro-batch: compute, p2p wait, bridge). Every island starts on this "
            "machine, so a cluster file naming other hosts is refused. --resume RUN_DIR continues a stopped "
            "or crashed run from its latest checkpoint with the run directory's own cluster, model and "
            "train files and plan (--kind or --plan re-plans the rest; --steps sets the new total), "
            "appending to its metrics and logs; its steps.jsonl then holds each step once."
        ),
    )
    add_job_arguments(parser)
    parser.set_defaults(kind=None)      # --resume keeps the run's plan unless --kind is given
    parser.add_argument("--plan", metavar="FILE", help="use this plan JSON instead of searching")
    parser.add_argument("--steps", type=whole(1, MAX_STEPS), metavar="N",
                        help=f"train N steps, 1 to {MAX_STEPS} (default: the train file's)")
    parser.add_argument("--out", metavar="DIR", help="run directory (default runs/<cluster>-<time>)")
    parser.add_argument("--max-restarts", type=whole(0, MAX_RESTARTS), default=1, metavar="N",
                        help="after a failure, restart the job from its last checkpoint at most N times (default 1)")
    parser.add_argument("--on", type=parse_target, metavar="ray[=ADDRESS]|slurm",
                        help="start the workers on a Ray cluster (ADDRESS as ray.init takes it; default RAY_ADDRESS "
                             "or a local Ray), or, from a Slurm batch script, on the allocation's nodes under srun "
                             "(cluster hosts named as Slurm names its nodes), instead of this machine")
    add_recovery_flags(parser)
    parser.add_argument("--node", metavar="HOST",
                        help="start the job host by host: on the coordinator's host (the head) with --model and "
                             "--train, on every other host with only --cluster and --token-file; the head plans and "
                             "hands the members the plan, the job files and the run settings")
    parser.add_argument("--token-file", metavar="FILE",
                        help="with --node: the file holding the job token (the same on every host; the head makes "
                             "one in its run directory when not given)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its latest checkpoint, with its own cluster/model/"
                             "train files and plan (not with --cluster/--model/--train/--out); --kind or --plan "
                             "re-plans, --steps N sets the new total (more than the checkpoint's step; default: "
                             "the run's own). The records after the checkpoint are dropped from its "
                             "metrics/steps.jsonl before training goes on. With a decaying lr_schedule a new "
                             "total stretches the schedule from the resumed step on")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    parser.set_defaults(func=run)


def run(args) -> int:
    if args.node and _is_member(args):
        return _member(args)
    if args.resume:
        if args.node:
            raise UserError("--resume with --node: not supported yet (resume on one machine, or start afresh)")
        job, result, steps = _resume(args)
    else:
        paths = default_paths(cluster=args.cluster, model=args.model, train=args.train)
        job = load_job(**paths).require("cluster", "model", "train")
        steps = job.train.steps if args.steps is None else args.steps
        run_dir = args.out or os.path.join("runs", f"{job.cluster.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        result = train_fleet(job, paths, run_dir, steps, plan_file=args.plan, max_restarts=args.max_restarts,
                             progress=not args.json, kind=args.kind or "auto", target=args.on, node=args.node,
                             token_file=args.token_file, **_timeouts(args))
    summary = _summary(job, result, steps)
    if args.resume:
        summary["resumed_from_step"] = result.resumed_from
    if args.json:
        print(json.dumps(summary, indent=2))
    if result.code != 0:
        log_path = os.path.join(result.run_dir, "launcher.log")
        print(f"hetero run: training failed (exit {result.code}); the end of {log_path}:", file=sys.stderr)
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            for line in handle.readlines()[-15:]:
                sys.stderr.write("  " + line)
        return 1
    if not args.json and not result.records:
        print(f"hetero run: done, but no step was recorded in {result.run_dir}/metrics/steps.jsonl", file=sys.stderr)
    elif not args.json:
        ratio = summary["measured_over_predicted"]
        versus = (f"predicted {summary['predicted_step_s']:.3f} s, ratio {ratio:.2f}" if ratio
                  else "no prediction in the plan")
        print(f"hetero run: done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
              f"{summary['tokens_per_s']:.0f} tokens/s, step time {summary['step_s']:.3f} s ({versus})",
              file=sys.stderr)
    return 0


def _summary(job, result: RunResult, steps: int) -> dict[str, Any]:
    """What `--json` prints (and the closing line reads): the losses, the measured step time and tokens/s,
    and the measured step against the plan's prediction."""
    predicted = result.plan.predicted_step_s
    step_s = result.steady_step_s
    return {
        "ok": result.code == 0, "run_dir": result.run_dir, "steps": len(result.records), "requested_steps": steps,
        "final_loss": result.records[-1]["loss"] if result.records else None,
        "losses": [r["loss"] for r in result.records],
        "step_s": step_s, "predicted_step_s": predicted,
        "tokens_per_s": job.train.global_batch * job.model.seq_len / step_s if step_s else None,
        "measured_over_predicted": step_s / predicted if step_s and predicted else None,
    }


def _is_member(args) -> bool:
    """--node names a host other than the coordinator's: a member, which takes the job from the head."""
    if not args.cluster:
        raise UserError("--node needs --cluster (the cluster file names the coordinator's host, the head)")
    return load_job(cluster=args.cluster).require_cluster().coordinator.host != args.node


def _member(args) -> int:
    """`hetero run --node HOST --cluster C --token-file F [--out RUN]` on a member host."""
    from hetero.launch.join import run_member

    given = [flag for flag in ("model", "train", "plan", "resume", "steps", "on") if getattr(args, flag)]
    if given:
        raise UserError(f"--node {args.node} is a member host: the head hands it the job; drop --{given[0]}")
    if not args.token_file:
        raise UserError(f"--node {args.node}: give the head's job token with --token-file")
    run_dir = args.out or os.path.join("runs", f"{args.node}-{time.strftime('%Y%m%d-%H%M%S')}")
    code = run_member(args.cluster, args.node, args.token_file, run_dir,
                      say=lambda line: print(f"hetero run: {line}", file=sys.stderr, flush=True))
    print(f"hetero run: {'done' if code == 0 else f'failed (exit {code})'}; this host's logs: {run_dir}",
          file=sys.stderr)
    return 0 if code == 0 else 1


def _resume(args):
    """(job, RunResult, total steps) of `--resume RUN_DIR`."""
    from hetero.resume import open_run

    clashing = [flag for flag in ("cluster", "model", "train", "out") if getattr(args, flag)]
    if clashing:
        raise UserError(f"--resume uses the run directory's own files and writes into it; drop --{clashing[0]} "
                        "(or start a new run without --resume)")
    stopped = open_run(args.resume)
    result = resume_fleet(stopped, args.steps, plan_file=args.plan, max_restarts=args.max_restarts,
                          progress=not args.json, kind=args.kind, target=args.on, **_timeouts(args))
    return stopped.job, result, stopped.total(args.steps)


def _timeouts(args) -> dict:
    """--hang-timeout, --rejoin-timeout (absent: the launcher's defaults) and --no-elastic."""
    return {"hang_timeout": args.hang_timeout, "rejoin_timeout": args.rejoin_timeout, "elastic": args.elastic}
