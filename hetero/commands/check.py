"""`hetero check --cluster C`: preflight every chip and link before a job."""

from __future__ import annotations

import json

from hetero.check.storage import DEFAULT_WAIT_S
from hetero.commands.flags import add_job_files, number
from hetero.config import load_job
from hetero.report.units import flops_text


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "check",
        help="preflight: time a matmul on every chip and every link, flag slow ones",
        description=(
            "Run a short matmul on each chip of this machine's nodes (in parallel, one process per chip) "
            "against the catalog's peak x the planner's efficiency, then each link: an all-reduce between "
            "two chips of a node, between nodes of an island, and a comm_bridge transfer between each pair "
            "of islands, against the cluster file's bandwidth and latency. Verdict per item: ok, slow or "
            "failed; exit 0 when all are ok, 1 otherwise, 2 for bad input. Items on other hosts are not "
            "contacted: run 'hetero check --node HOST' on each node. Clusters on documentation addresses "
            "(192.0.2.x, 198.51.100.x, 203.0.113.x), or --simulate, get an estimate of how long the real "
            "check would take instead. A cluster of more than one host also gets a shared-storage item: "
            "every node writes a probe file into the checkpoint folder (--storage, default runs/, where "
            "hetero run makes its run directories) and the head (the coordinator host) must read them all, "
            "since a multi-node job's checkpoints must be one folder every node mounts at the same path."
        ),
    )
    add_job_files(parser, ("cluster",))
    parser.add_argument("--node", metavar="HOST", help="this machine is HOST of the cluster file (default: "
                                                       "loopback addresses and this host's name)")
    parser.add_argument("--simulate", action="store_true", help="do not measure; estimate the real check's duration")
    parser.add_argument("--storage", metavar="DIR",
                        help="check that DIR (the checkpoint or runs folder of the job) is one folder shared by "
                             "every node: each node's probe must reach the head through it (default for a "
                             "multi-host cluster: runs/; a one-host cluster checks it only when given)")
    parser.add_argument("--storage-wait", type=number(0.0, 3600.0, low_open=True), default=DEFAULT_WAIT_S,
                        metavar="S", help=f"how long the head waits for the other nodes' probes "
                                          f"(default {DEFAULT_WAIT_S:g} s)")
    parser.add_argument("--storage-only", action="store_true",
                        help="check only the shared storage (no chip or link probes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args) -> int:
    from hetero import check

    cluster = load_job(cluster=args.cluster).require_cluster()
    progress = None if args.json else _print_item
    if not args.json:
        print(f"check {cluster.name}: {cluster.total_chips} chips, "
              f"{sum(len(i.nodes) for i in cluster.islands)} nodes, {len(cluster.islands)} islands", flush=True)
    result = check.check(cluster, this_node=args.node, simulate_only=args.simulate, progress=progress,
                         storage_dir=args.storage, storage_wait_s=args.storage_wait, storage_only=args.storage_only)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for line in summary(result):
            print(line)
    return result["exit_code"]


def _print_item(item, outcome) -> None:
    from hetero.check import verdict

    got, error = outcome
    judged = verdict.judge(item, got, error)
    print("  " + item_line(item.kind, item.name, item.expected, got, judged,
                           item.spec.get("chip", {}).get("emulated", False)), flush=True)


def item_line(kind: str, name: str, expected: dict, got: dict | None, judged: dict, emulated: bool = False) -> str:
    head = f"{kind:<10} {name:<28}"
    if got is None:
        return f"{head} {judged['verdict'].upper():<6} {judged['why']}"
    if kind == "storage":
        what = f"{len(got['seen'])} of {expected['nodes']} nodes read back through {got['dir']}"
    elif kind == "chip":
        what = (f"{flops_text(got['flops_per_s'])} vs {flops_text(expected['flops_per_s'])} expected"
                f"{' (EMULATED)' if emulated else ''}, {got['dtype']} {got['n']}^3")
    else:
        what = (f"{got['bandwidth'] / 1e9:.2f} GB/s vs {expected['bandwidth'] / 1e9:.2f}, "
                f"{got['latency_s'] * 1e6:.0f} us vs {expected['latency_s'] * 1e6:.0f} us")
    return f"{head} {judged['verdict'].upper():<6} {what}" + ("" if judged["verdict"] == "ok" else f": {judged['why']}")


def summary(result: dict) -> list[str]:
    est = result["estimate"]
    phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in est["phases"].items() if seconds)
    goal = "within" if est["within_goal"] else "OVER"
    if result["simulated"]:
        return [f"simulated ({result['why_simulated']})",
                f"  model: {est['model']}",
                f"  phases: {phases}",
                f"  the real check of {est['chips']} chips on {est['nodes']} nodes would take about "
                f"{est['total_s']:.0f} s ({goal} the {est['goal_s']:.0f} s goal)"]
    counts = result["counts"]
    bad = counts["slow"] + counts["failed"]
    verdict = "OK" if not bad else ("FAILED" if counts["failed"] else "SLOW")
    lines = [f"verdict: {verdict}: {counts['ok']} ok, {counts['slow']} slow, {counts['failed']} failed"
             + (f", {counts['not checked']} on other hosts not checked" if counts["not checked"] else "")
             + f" (exit {result['exit_code']})",
             f"  took {result['elapsed_s']:.1f} s here; the model estimates {est['total_s']:.0f} s for this "
             f"cluster with every node on its own machine"]
    return lines
