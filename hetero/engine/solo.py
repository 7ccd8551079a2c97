"""The one-process reference: the whole model on one chip, no communication.

It runs the very same Trainer as the fleet, with a one-stage plan, so a mixed
fleet's losses can be compared against it number for number.
"""

from __future__ import annotations

import json
import os

from hetero.engine.comms import Comms
from hetero.engine.topology import Topology
from hetero.engine.trainer import Trainer
from partitioner.plan import PipelinePlan, Plan, RankPlan, StagePlan


def single_chip_plan(model, train, island: str = "solo", chip: str = "cpu") -> Plan:
    micro = train.micro_batch
    stage = StagePlan(index=0, pipeline=0, island=island, chip=chip, tp=1, dp=1, layers=(0, model.layers),
                      recompute="none", offset=0, time_s=0.0, memory_gb=0.0)
    return Plan(kind="pipeline", cluster="solo", model=model.name, dtype=train.dtype, layers=model.layers,
                heads=model.heads, kv_heads=model.kv_heads, global_batch=train.global_batch, micro_batch=micro,
                num_micro_batches=train.global_batch // micro, recompute="none", zero1=False, stages=(stage,),
                pipelines=(PipelinePlan(0, (0,), 1, micro, train.global_batch // micro),),
                ranks=(RankPlan(0, island, 0, 0, 0, 0, 0, 0),), predicted_step_s=0.0, tokens_per_s=0.0, mfu={})


def train_solo(accelerator, model, train, run_dir: str, steps: int | None = None) -> list[dict]:
    """Train on one chip; return the per-step records of metrics/steps.jsonl."""
    topology = Topology(single_chip_plan(model, train))
    comms = Comms.solo(topology, accelerator.device(0))
    Trainer(comms, accelerator, model, train, run_dir, steps=steps, log=lambda message: None).run()
    with open(os.path.join(run_dir, "metrics", "steps.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]
