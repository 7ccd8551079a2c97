"""`hetero bench runtime`: the engine on the emulated mixed fleet against the planner.

Two numbers: measured step time over the partitioner's predicted step time
(goal <= 1.10), and the bridge time left exposed on the critical path as a share
of the step (goal <= 5%), split into its two parts: the pipeline hops (a pipeline
plan's goal: <= 2%, `--kind pipeline`) and the hetero-DP gradient sum. Exposed bridge time of one receive = when the data
arrived minus when the sender handed it over (or when the receiver started
waiting, if later): the transfer time nobody overlapped. Per step we take the
receiving rank with the most of it, plus, for hetero-DP plans, the whole
cross-island gradient sum (nothing overlaps it).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile

from hetero.config import load_job
from hetero.runner import add_job_arguments, default_paths, train_fleet

HELP = "measured vs predicted step time and exposed bridge time on the emulated mixed fleet"
RATIO_GOAL = 1.10
BRIDGE_SHARE_GOAL = 0.05
PIPELINE_HOPS_GOAL = 0.02   # a pipeline plan's exposed bridge hops, share of the step (issue 13)


def add_arguments(parser) -> None:
    add_job_arguments(parser)
    parser.add_argument("--steps", type=int, default=8, help="steps to train; the first two are warm-up (default 8)")
    parser.add_argument("--out", metavar="DIR", help="run directory (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    paths = default_paths(cluster=args.cluster, model=args.model, train=args.train)
    job = load_job(**paths).require("cluster", "model", "train")
    run_dir = args.out or tempfile.mkdtemp(prefix="hetero-bench-runtime-")
    say = (lambda message: None) if args.json else (lambda message: print(f"bench runtime: {message}", flush=True))
    result = train_fleet(job, paths, os.path.join(run_dir, "run"), args.steps, progress=not args.json, say=say,
                         kind=args.kind)
    if result.code != 0:
        print(f"bench runtime: the run failed (exit {result.code}); see {result.run_dir}/launcher.log")
        return 1
    report = analyse(result.run_dir, result.plan.to_dict(), warmup=min(2, args.steps - 1))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["ratio_ok"] and report["bridge_ok"] else 1


def analyse(run_dir: str, plan: dict, warmup: int = 2) -> dict:
    steps = [json.loads(line) for line in open(os.path.join(run_dir, "metrics", "steps.jsonl"), encoding="utf-8")]
    by_step = {r["step"]: r for r in steps}
    steady = [by_step[s] for s in sorted(by_step) if s > warmup] or list(by_step.values())
    measured = statistics.median(r["step_s"] for r in steady)
    exposed = exposed_bridge_per_step(run_dir, plan)
    hops = [exposed.get(r["step"], 0.0) for r in steady]
    reduce = [r.get("cross_island_reduce_s", 0.0) for r in steady]
    # hetero-DP's gradient sum over the bridge sits on the critical path whole.
    exposed_steady = [h + c for h, c in zip(hops, reduce)]
    share = statistics.median(e / r["step_s"] for e, r in zip(exposed_steady, steady))
    hops_share = statistics.median(h / r["step_s"] for h, r in zip(hops, steady))
    predicted = plan["predicted_step_s"]
    pipeline = plan["kind"] == "pipeline"
    return {
        "cluster": plan["cluster"], "model": plan["model"], "kind": plan["kind"], "emulated": True,
        "run_dir": run_dir,
        "steps_measured": len(steady), "measured_step_s": measured, "predicted_step_s": predicted,
        "ratio": measured / predicted, "ratio_goal": RATIO_GOAL, "ratio_ok": measured / predicted <= RATIO_GOAL,
        "exposed_bridge_s": statistics.median(exposed_steady), "exposed_bridge_share": share,
        "bridge_share_goal": BRIDGE_SHARE_GOAL, "bridge_ok": share <= BRIDGE_SHARE_GOAL,
        # The two parts: pipeline hops (activations and their gradients between islands) and
        # the hetero-DP gradient sum; the pipeline plan's goal is on the hops alone.
        "exposed_hops_s": statistics.median(hops), "exposed_hops_share": hops_share,
        "cross_island_reduce_s": statistics.median(reduce),
        "cross_island_reduce_share": statistics.median(c / r["step_s"] for c, r in zip(reduce, steady)),
        "pipeline_hops_goal": PIPELINE_HOPS_GOAL if pipeline else None,
        "pipeline_hops_ok": hops_share <= PIPELINE_HOPS_GOAL if pipeline else None,
    }


def exposed_bridge_per_step(run_dir: str, plan: dict) -> dict:
    """{step: seconds of un-overlapped bridge transfer on the worst receiving rank}, from the
    run directory's timing files."""
    from hetero.report import timeline

    records = {}
    for entry in plan["ranks"]:
        path = os.path.join(run_dir, "metrics", f"rank{entry['rank']:05d}.jsonl")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as handle:
                records[entry["rank"]] = [json.loads(line) for line in handle]
    return timeline.exposed_per_step(plan, records)


def print_report(report: dict) -> None:
    print(f"runtime on {report['cluster']} x {report['model']} (EMULATED chips), {report['kind']} plan, "
          f"{report['steps_measured']} steady steps")
    print(f"  measured step   {report['measured_step_s']:.3f} s (median)")
    print(f"  predicted step  {report['predicted_step_s']:.3f} s (partitioner, same plan)   <- anchor")
    verdict = "met" if report["ratio_ok"] else "MISSED"
    print(f"  measured / predicted = {report['ratio']:.3f} (goal <= {RATIO_GOAL}: {verdict})")
    verdict = "met" if report["bridge_ok"] else "MISSED"
    print(f"  exposed bridge  {report['exposed_bridge_s'] * 1e3:.1f} ms/step = "
          f"{report['exposed_bridge_share'] * 100:.2f}% of the step (goal <= {BRIDGE_SHARE_GOAL:.0%}: {verdict})")
    print(f"    of which hops {report['exposed_hops_s'] * 1e3:.1f} ms = {report['exposed_hops_share'] * 100:.2f}%"
          + (f" (pipeline plan, goal <= {PIPELINE_HOPS_GOAL:.0%}: {'met' if report['pipeline_hops_ok'] else 'MISSED'})"
             if report["pipeline_hops_goal"] is not None else "")
          + f", cross-island gradient sum {report['cross_island_reduce_s'] * 1e3:.1f} ms"
            f" = {report['cross_island_reduce_share'] * 100:.2f}%")
    print(f"  run directory   {report['run_dir']}")
