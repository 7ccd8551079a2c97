"""Worker entry point: `python -m hetero.engine.worker --plan P --cluster C --model M --train T`.

`hetero run` starts one per rank through the launcher, which provides the
island-local torchrun environment and HETERO_* (global rank, coordinator, token).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

import accelerators
from hetero.config import load_job
from hetero.engine.comms import Comms
from hetero.engine.topology import Topology
from hetero.engine.trainer import Trainer
from partitioner.plan import Plan


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
    job = load_job(cluster=args.cluster, model=args.model, train=args.train).require("cluster", "model", "train")
    train = job.train
    if args.checkpoint_dir and train.checkpoint:
        train = dataclasses.replace(train, checkpoint=dataclasses.replace(train.checkpoint, dir=args.checkpoint_dir))
    with open(args.plan, encoding="utf-8") as handle:
        plan = Plan.from_json(handle.read())
    topology = Topology(plan)
    accelerator = accelerators.get_accelerator()
    if accelerator.device_type == "cpu":
        _share_host_cores(topology, job.cluster)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = accelerator.device(local % max(1, accelerator.device_count()))
    comms = Comms.start(topology, accelerator, device, job.cluster)
    try:
        def log(message: str) -> None:
            print(message, flush=True)

        trainer = Trainer(comms, accelerator, job.model, train, args.run_dir, steps=args.steps, log=log)
        trainer.run()
        comms.record_bridge_stats(args.run_dir)
        comms.finish()
    finally:
        comms.close()
    return 0


def _share_host_cores(topology, cluster) -> None:
    """Host-run chips (cpu, emulated) split this host's cores instead of oversubscribing them."""
    def host(entry):
        return cluster.island(entry.island).nodes[entry.node].host
    me = host(topology.by_rank[int(os.environ.get("HETERO_GLOBAL_RANK", "0"))])
    neighbours = sum(1 for entry in topology.plan.ranks if host(entry) == me)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // neighbours))


if __name__ == "__main__":
    raise SystemExit(main())
