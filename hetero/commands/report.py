"""`hetero report RUN_DIR`: where a run's time went, as an HTML page and a short summary."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="turn a run directory into an HTML report (timeline, MFU, bubble, bridge, memory, loss)",
        description=(
            "Read a run directory written by 'hetero run' (plan.json, cluster.yaml, model.yaml, "
            "metrics/steps.jsonl, metrics/rank*.jsonl) and write one self-contained HTML page with PNG "
            "figures: the pipeline timeline per rank, achieved TFLOPS and MFU per chip type, bubble share, "
            "exposed communication (bridge and p2p receives, sends, DP reductions), predicted vs measured step "
            "time and peak memory per stage, the loss curve, the "
            "connections and calls refused during the run (metrics/coordinator.json, metrics/bridge-rank*.json), and "
            "the efficiency E when the run came from 'hetero bench efficiency' (give its --out directory "
            "or its mixed/ run). Prints a short summary."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (or a 'bench efficiency' output directory)")
    parser.add_argument("--out", metavar="FILE", help="HTML file to write (default RUN_DIR/report.html); "
                                                      "the PNGs go beside it")
    parser.add_argument("--json", action="store_true", help="print the computed numbers as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    from hetero import report

    numbers, _ = report.build(args.run_dir, args.out)
    if args.json:
        print(json.dumps(numbers, indent=2))
    else:
        print("\n".join(report.summary_lines(numbers)))
    return 0
