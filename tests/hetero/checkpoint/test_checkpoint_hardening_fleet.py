"""Every rank resumes from the same checkpoint, even when only one rank finds the newest
one corrupt: two processes (one gloo island on loopback, one stage with DP 2) build a
real Trainer, each over its own copy of the checkpoints, rank 1's newest damaged."""

import dataclasses
import json
import multiprocessing
import os
import shutil

import accelerators
from hetero.config import load_job
from hetero.config.train import CheckpointConfig
from hetero.engine.solo import train_solo
from partitioner.plan import PipelinePlan, Plan, RankPlan, StagePlan
from tests.conftest import FIXTURES, free_port

CONFIG = os.path.join(FIXTURES, "engine", "two-islands.yaml")
TIMEOUT_S = 60


def dp2_plan(job) -> Plan:
    """One stage of the whole model on island `wide`, DP 2."""
    model, train = job.model, job.train
    micro = train.micro_batch
    m = train.global_batch // (2 * micro)
    stage = StagePlan(0, 0, "wide", "cpu", 1, 2, (0, model.layers), "none", 0, 0.1, 0.0)
    return Plan(kind="pipeline", cluster=job.cluster.name, model=model.name, dtype="fp32", layers=model.layers,
                heads=model.heads, kv_heads=model.kv_heads, global_batch=train.global_batch, micro_batch=micro,
                num_micro_batches=m, recompute="none", zero1=False, stages=(stage,),
                pipelines=(PipelinePlan(0, (0,), 2, micro, m),),
                ranks=tuple(RankPlan(r, "wide", r, 0, 0, 0, 0, r) for r in range(2)),
                predicted_step_s=1.0, tokens_per_s=1.0, mfu={})


def resume_on_rank(rank: int, port: int, plan_json: str, roots: list, results) -> None:
    """Child: join a gloo world of 2 on loopback, build a Trainer over roots[rank], report
    (start step, log lines). The island's groups are made as Comms.start makes them."""
    import datetime

    import torch.distributed as dist

    from hetero.engine.comms import Comms
    from hetero.engine.topology import Topology
    from hetero.engine.trainer import Trainer

    job = load_job(cluster=CONFIG, model=CONFIG, train=CONFIG)
    train = dataclasses.replace(job.train, checkpoint=CheckpointConfig(roots[rank], 1))
    accel = accelerators.get_accelerator("cpu")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        comms = Comms(Topology(Plan.from_json(plan_json)), rank, accel.device(0))
        comms._make_groups()
        lines = []
        made = Trainer(comms, accel, job.model, train, None, steps=4, log=lines.append)
        results.put((rank, made.start_step, lines))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_when_only_one_finds_the_newest_checkpoint_corrupt(tmp_path):
    job = load_job(cluster=CONFIG, model=CONFIG, train=CONFIG)
    sound = tmp_path / "rank0"
    train = dataclasses.replace(job.train, checkpoint=CheckpointConfig(str(sound), 1))
    train_solo(accelerators.get_accelerator("cpu"), job.model, train, str(tmp_path / "run"), steps=3)
    damaged = tmp_path / "rank1"
    shutil.copytree(sound, damaged)
    state = damaged / "step-00000003" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "step": "three"}))

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    args = (free_port(), dp2_plan(job).to_json(), [str(sound), str(damaged)], results)
    workers = [context.Process(target=resume_on_rank, args=(rank, *args)) for rank in range(2)]
    for worker in workers:
        worker.start()
    try:
        got = dict((rank, (step, lines)) for rank, step, lines in (results.get(timeout=TIMEOUT_S) for _ in workers))
    finally:
        for worker in workers:
            worker.join(timeout=TIMEOUT_S)
            if worker.is_alive():
                worker.kill()
    assert [w.exitcode for w in workers] == [0, 0]
    assert got[0][0] == got[1][0] == 2
    # rank 0 saw nothing wrong itself, yet skipped step 3 with the fleet and said so
    assert got[0][1] == ["checkpoint step-00000003 is corrupt (another rank found it corrupt); "
                         "resuming from step-00000002",
                         f"resumed from {sound / 'step-00000002'} (step 2)"]
    assert got[1][1] == []          # one voice for the job: rank 0's
