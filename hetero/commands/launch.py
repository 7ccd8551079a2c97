"""`hetero launch`: run a script over the fleet, one torch elastic world per island."""

from __future__ import annotations

import argparse
import os

from hetero.commands.flags import add_job_files, add_recovery_flags, number, whole
from hetero.launch.targets import parse_target

MAX_RESTARTS = 1000
MAX_WAIT_S = 7 * 24 * 3600.0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="start a script's workers on every island of the fleet (torchrun-style)",
        description=(
            "Start SCRIPT on every chip of the fleet (or on those the plan uses), torchrun-style: each "
            "island is its own torch.distributed world (RANK, WORLD_SIZE, MASTER_ADDR... are island-local), "
            "and every worker also gets HETERO_* variables (global rank, island, plan, coordinator, job "
            "token, restart count). Without --node the whole fleet runs on this host; with --node HOST, "
            "run one launcher per host; the coordinator's host also runs the job's coordinator. When any "
            "island fails, every island stops and the whole job restarts, up to --max-restarts times. "
            "Island i's rendezvous port is the coordinator port + 1 + i. With --on ray, one command starts "
            "every host's agents in Ray actors."
        ),
    )
    add_job_files(parser, optional=("model", "train"),
                  notes={"model": "; with --train, lets the head re-plan the job on the chips that remain when a "
                                  "node is lost (the worker script gets its own arguments)",
                         "train": "; see --model"})
    parser.add_argument("--plan", metavar="FILE", help="plan JSON from 'hetero plan --out'")
    parser.add_argument("--node", metavar="HOST", help="the host this launcher runs, as in the cluster file")
    parser.add_argument("--on", type=parse_target, metavar="ray[=ADDRESS]|slurm",
                        help="ray: start every island's agents on a Ray cluster (ADDRESS as ray.init takes it; default "
                             "RAY_ADDRESS or a local Ray), one placement group per island, one bundle per chip; "
                             "slurm: inside an allocation, one launcher per node under srun")
    parser.add_argument("--slurm-by", choices=("name", "order"), default="name",
                        help="--on slurm: match Slurm nodes to the cluster's hosts by name (default) or by order")
    parser.add_argument("--max-restarts", type=whole(0, MAX_RESTARTS), default=0, metavar="N",
                        help="restart the whole job at most N times after a failure (default 0)")
    parser.add_argument("--run-dir", metavar="DIR", help="run directory: per-rank logs, HETERO_RUN_DIR")
    parser.add_argument("--token-file", metavar="FILE",
                        help="file with the job token (else HETERO_JOB_TOKEN; the head node makes one)")
    parser.add_argument("--rdzv-timeout", type=number(0, MAX_WAIT_S, low_open=True), default=300.0, metavar="S",
                        help="seconds an island waits for all its nodes (default 300)")
    add_recovery_flags(parser)
    parser.add_argument("-m", "--module", action="store_true", help="SCRIPT is a module name (python -m)")
    parser.add_argument("script", metavar="SCRIPT", help="the worker script (or module, with -m)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for SCRIPT")
    parser.set_defaults(func=run)


def run(args) -> int:
    from hetero.launch.fleet import launch_fleet
    from hetero.launch.targets import launcher_for

    entrypoint = f"-m {args.script}" if args.module else args.script
    if args.on is not None and args.on.engine == "slurm":
        return _on_slurm(args, entrypoint)
    launch = launch_fleet if args.on is None else launcher_for(args.on, None)
    return launch(args.cluster, args.plan, entrypoint, args.args, node=args.node,
                  max_restarts=args.max_restarts, run_dir=args.run_dir, token_file=args.token_file,
                  rdzv_timeout=args.rdzv_timeout, hang_timeout=args.hang_timeout,
                  rejoin_timeout=args.rejoin_timeout, elastic=args.elastic, replan=_replanner(args))


def _replanner(args):
    """The elastic re-plan's planner, from --model and --train (both, or neither: no re-plan)."""
    from hetero.config import load_job
    from hetero.errors import UserError
    from hetero.launch.elastic import Replanner

    if (args.model is None) != (args.train is None):
        raise UserError("--model and --train go together (the elastic re-plan needs both)")
    if args.model is None:
        return None
    return Replanner(load_job(cluster=args.cluster, model=args.model, train=args.train))


def _on_slurm(args, entrypoint: str) -> int:
    """In the batch script: this command again under srun, once per node; in the step: this node's launcher."""
    from hetero.launch.slurm import allocation, run_under_srun, slurm_launcher

    _, index = allocation(dict(os.environ))
    if index is None:
        return run_under_srun(_argv(args), dict(os.environ))
    return slurm_launcher(args.slurm_by)(args.cluster, args.plan, entrypoint, args.args,
                                         max_restarts=args.max_restarts, run_dir=args.run_dir,
                                         token_file=args.token_file, rdzv_timeout=args.rdzv_timeout,
                                         hang_timeout=args.hang_timeout, rejoin_timeout=args.rejoin_timeout,
                                         elastic=args.elastic)


def _argv(args) -> list[str]:
    """`hetero launch` arguments that repeat this command (for srun)."""
    argv = ["launch", "--on", "slurm", "--slurm-by", args.slurm_by, "--cluster", os.path.abspath(args.cluster),
            "--max-restarts", str(args.max_restarts), "--rdzv-timeout", str(args.rdzv_timeout)]
    for flag, value in (("--plan", args.plan), ("--run-dir", args.run_dir), ("--token-file", args.token_file)):
        if value:
            argv += [flag, os.path.abspath(value)]
    for flag, value in (("--hang-timeout", args.hang_timeout), ("--rejoin-timeout", args.rejoin_timeout)):
        if value is not None:
            argv += [flag, repr(value)]
    if not args.elastic:
        argv.append("--no-elastic")
    return argv + (["-m", args.script] if args.module else [os.path.abspath(args.script)]) + list(args.args)
