"""Worker entry point: `python -m hetero.engine.worker --plan P --cluster C --model M --train T`.

`hetero run` starts one per rank through the launcher, which provides the
island-local torchrun environment and HETERO_* (global rank, coordinator, token).

A failure that every restart would repeat (a hetero.errors.UserError such as
JobFatalError: a corrupt checkpoint with no good one left, a plan for another
model; or a full disk: ENOSPC, EDQUOT, EROFS) stops the worker with one line on
stderr, `hetero: rank R on HOST: <what, naming the file>`, the same line in
<run dir>/fatal/rankNNNNN.txt, and exit code FATAL_EXIT_CODE, on which the
launcher stops the job instead of restarting it. Anything else is a traceback
and exit 1: the launcher restarts the job from its last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import os
import sys

import torch

import accelerators
from hetero.config import load_job
from hetero.engine.comms import Comms
from hetero.engine.topology import Topology
from hetero.engine.trainer import Trainer
from hetero.errors import FATAL_EXIT_CODE, UserError
from hetero.launch.logs import fatal_path
from hetero.plan_check import load_checked_plan

# A disk that is full, over quota or read-only fails the same way on every attempt.
FATAL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetero.engine.worker", description=__doc__)
    parser.add_argument("--plan", required=True, help="plan JSON written by hetero plan --out")
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--run-dir", default=os.environ.get("HETERO_RUN_DIR"))
    parser.add_argument("--checkpoint-dir", help="override train.checkpoint.dir (hetero run: <run dir>/checkpoints)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    comms = None
    try:
        job = load_job(cluster=args.cluster, model=args.model, train=args.train).require("cluster", "model", "train")
        train = job.train
        if args.checkpoint_dir and train.checkpoint:
            train = dataclasses.replace(train, checkpoint=dataclasses.replace(train.checkpoint,
                                                                              dir=args.checkpoint_dir))
        plan = load_checked_plan(args.plan, job)   # the launcher checked it too; this rank's copy may differ
        topology = Topology(plan)
        accelerator = accelerators.get_accelerator()
        if accelerator.device_type == "cpu":
            _share_host_cores(topology, job.cluster)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = accelerator.device(local % max(1, accelerator.device_count()))
        comms = Comms.start(topology, accelerator, device, job.cluster)

        def log(message: str) -> None:
            print(message, flush=True)

        trainer = Trainer(comms, accelerator, job.model, train, args.run_dir, steps=args.steps, log=log)
        trainer.run()
        comms.finish()
    except (UserError, OSError) as exc:
        message = fatal_message(exc)
        if message is None:
            raise
        report_fatal(message, args.run_dir)
        return FATAL_EXIT_CODE
    finally:
        if comms is not None:
            with contextlib.suppress(OSError):   # what it carried and refused, however the worker ends
                comms.record_bridge_stats(args.run_dir)
            comms.close()
    return 0


def fatal_message(exc: BaseException) -> str | None:
    """What to say about a failure every restart would repeat, or None for one a restart may cure."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in FATAL_ERRNOS:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or os.strerror(exc.errno)}"
    return None


def report_fatal(message: str, run_dir: str | None) -> str:
    """Print `hetero: rank R on HOST: message` to stderr and keep it in <run dir>/fatal/rankNNNNN.txt
    (where the launcher reads it); returns the line. A file that cannot be written (the very disk
    that is full) is skipped: the line on stderr is in the rank's log either way."""
    rank = int(os.environ.get("HETERO_GLOBAL_RANK", "0"))
    host = os.environ.get("HETERO_NODE", "this host")
    line = f"hetero: rank {rank} on {host}: {' '.join(message.split())}"
    print(line, file=sys.stderr, flush=True)
    if run_dir:
        path = fatal_path(run_dir, rank)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(line + "\n")
        except OSError:
            pass
    return line


def _share_host_cores(topology, cluster) -> None:
    """Host-run chips (cpu, emulated) split this host's cores instead of oversubscribing them."""
    def host(entry):
        return cluster.island(entry.island).nodes[entry.node].host
    me = host(topology.by_rank[int(os.environ.get("HETERO_GLOBAL_RANK", "0"))])
    neighbours = sum(1 for entry in topology.plan.ranks if host(entry) == me)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // neighbours))


if __name__ == "__main__":
    raise SystemExit(main())
