"""End to end: a mixed fleet trains the same numbers as one process.

Two islands of emulated chips under the device contract (strict device memory, each island
its own hetero-strict world: NCCL/HCCL's rules on gloo), different TP degrees, an uneven layer
split, activations and gradients crossing the bridge; the losses must equal a one-process run
of the same model, data and seed on the host CPU within 1e-5 relative (fp32).
"""

import dataclasses
import json
import os
import re
import signal
import threading
import time

import pytest
from tests.conftest import FIXTURES, free_port

import accelerators
from hetero.config import load_job
from hetero.engine.solo import train_solo
from hetero.launch.fleet import launch_fleet
from partitioner.plan import PipelinePlan, Plan, RankPlan, StagePlan

HERE = os.path.join(FIXTURES, "engine")
CONFIG = os.path.join(HERE, "two-islands.yaml")                 # model and train (and a cpu cluster)
EMULATED = os.path.join(HERE, "emulated-islands.yaml")          # the fleet: same islands, emulated chips
STEPS = 5


def make_plan(job, stages_spec, micro_batch=2):
    """stages_spec: [(island, tp, dp, (start, end), offset)] in pipeline order."""
    model, train = job.model, job.train
    stages, ranks_by_island = [], {}
    for index, (island, tp, dp, layers, offset) in enumerate(stages_spec):
        stages.append(StagePlan(index, 0, island, job.cluster.island(island).chip, tp, dp, layers, "none",
                                offset, 0.1, 0.0))
        for d in range(dp):
            for t in range(tp):
                ranks_by_island.setdefault(island, []).append((offset + d * tp + t, index, t, d))
    ranks = []
    for island in [i.name for i in job.cluster.islands]:
        for local, stage, t, d in sorted(ranks_by_island.get(island, [])):
            ranks.append(RankPlan(len(ranks), island, local, 0, 0, stage, t, d))
    dp = stages_spec[0][2]
    m = train.global_batch // (dp * micro_batch)
    return Plan(kind="pipeline", cluster=job.cluster.name, model=model.name, dtype="fp32", layers=model.layers,
                heads=model.heads, kv_heads=model.kv_heads, global_batch=train.global_batch,
                micro_batch=micro_batch, num_micro_batches=m, recompute="none", zero1=False,
                stages=tuple(stages), pipelines=(PipelinePlan(0, tuple(range(len(stages))), dp, micro_batch, m),),
                ranks=tuple(ranks), predicted_step_s=1.0, tokens_per_s=1.0, mfu={})


def fleet_cluster(tmp_path, network: str = "") -> str:
    """The emulated fleet's cluster file on a free coordinator port (another run of these tests
    may hold the file's), with an optional `network:` section (YAML flow text)."""
    with open(EMULATED) as handle:
        text = handle.read().replace("port: 29731", f"port: {free_port()}")
    path = tmp_path / "emulated-islands.yaml"
    path.write_text(text + (f"network: {network}\n" if network else ""))
    return str(path)


def fleet_job(tmp_path, job_path=CONFIG):
    """The job on the emulated fleet: (cluster file, job)."""
    cluster = fleet_cluster(tmp_path)
    return cluster, load_job(cluster=cluster, model=job_path, train=job_path)


def run_fleet(tmp_path, plan, job_path=CONFIG, max_restarts=0, steps=STEPS, name="run", checkpoints=None,
              during=None, cluster_path=None):
    """Launch the worker over the fleet (`cluster_path`, default the cluster in `job_path`);
    `during(run_dir)` runs beside it (e.g. to kill a worker)."""
    cluster_path = cluster_path or job_path
    plan_path = tmp_path / f"{name}-plan.json"
    plan_path.write_text(plan.to_json())
    run_dir = tmp_path / name
    checkpoints = checkpoints or run_dir / "checkpoints"
    args = ["--plan", str(plan_path), "--cluster", cluster_path, "--model", job_path, "--train", job_path,
            "--steps", str(steps), "--checkpoint-dir", str(checkpoints)]
    outcome = {}
    with open(tmp_path / f"{name}.log", "w") as log:
        def launch():
            outcome["code"] = launch_fleet(cluster_path, str(plan_path), "-m hetero.engine.worker", args,
                                           run_dir=str(run_dir), max_restarts=max_restarts,
                                           stdout=log, stderr=log)
        thread = threading.Thread(target=launch)
        thread.start()
        if during:
            during(run_dir, thread)
        thread.join(timeout=240)
    code = outcome.get("code")
    log_text = (tmp_path / f"{name}.log").read_text()
    assert code == 0, log_text[-3000:]
    with open(run_dir / "metrics" / "steps.jsonl") as handle:
        records = [json.loads(line) for line in handle]
    return records, run_dir, log_text


def solo_losses(tmp_path, job, steps=STEPS):
    train = dataclasses.replace(job.train, checkpoint=None)
    records = train_solo(accelerators.get_accelerator("cpu"), job.model, train, str(tmp_path / "solo"), steps=steps)
    return [r["loss"] for r in records]


def last_attempt(records):
    """A restart rewinds: keep the last record of every step."""
    by_step = {}
    for record in records:
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


@pytest.fixture
def emulated_fleet(tmp_path):
    """(cluster file, job) of the emulated fleet."""
    return fleet_job(tmp_path)


def test_mixed_fleet_matches_one_process(tmp_path, emulated_fleet):
    cluster, job = emulated_fleet
    # wide: TP2 over layers [0, 2) -> bridge -> narrow: TP1 over layer [2, 3)
    plan = make_plan(job, [("wide", 2, 1, (0, 2), 0), ("narrow", 1, 1, (2, 3), 0)])
    records, run_dir, log = run_fleet(tmp_path, plan, cluster_path=cluster)
    fleet = [r["loss"] for r in last_attempt(records)]
    reference = solo_losses(tmp_path, job)
    assert len(fleet) == STEPS
    for got, want in zip(fleet, reference):
        assert abs(got - want) <= 1e-5 * abs(want), (fleet, reference)
    assert fleet[-1] < fleet[0]                       # it learns
    # per-rank timing lines for every micro-batch of every step
    timing = [json.loads(line) for line in open(run_dir / "metrics" / "rank00002.jsonl")]
    assert len(timing) == STEPS * 2 * 4
    assert {"compute_s", "p2p_wait_s", "phase"} <= set(timing[0])
    assert "[wide:0]" in log or "[narrow:0]" in log


def test_dp_and_reverse_order_and_tp_mismatch_3_stages(tmp_path, emulated_fleet):
    cluster, job = emulated_fleet
    # narrow first (TP1), then wide with two stages: TP2 x DP... all DP replicas must match.
    plan = make_plan(job, [("narrow", 1, 1, (0, 1), 0), ("wide", 2, 1, (1, 2), 0), ("wide", 1, 1, (2, 3), 2)])
    records, _, _ = run_fleet(tmp_path, plan, cluster_path=cluster)
    fleet = [r["loss"] for r in last_attempt(records)]
    reference = solo_losses(tmp_path, job)
    for got, want in zip(fleet, reference):
        assert abs(got - want) <= 1e-5 * abs(want), (fleet, reference)


def test_resume_under_another_plan_continues_the_same_losses(tmp_path, emulated_fleet):
    cluster, job = emulated_fleet
    checkpoints = tmp_path / "shared-checkpoints"
    first = make_plan(job, [("wide", 2, 1, (0, 2), 0), ("narrow", 1, 1, (2, 3), 0)])
    run_fleet(tmp_path, first, steps=4, name="first", checkpoints=checkpoints, cluster_path=cluster)
    # Another layout entirely: one island, TP1 + TP1 stages with DP 2 on the first.
    second = make_plan(job, [("wide", 1, 2, (0, 1), 0), ("wide", 1, 2, (1, 3), 2)])
    records, _, log = run_fleet(tmp_path, second, steps=6, name="second", checkpoints=checkpoints,
                               cluster_path=cluster)
    assert "resumed from" in log and "(step 4)" in log
    resumed = [r["loss"] for r in last_attempt(records)]
    assert [r["step"] for r in last_attempt(records)] == [5, 6]
    reference = solo_losses(tmp_path, job, steps=6)[4:]
    for got, want in zip(resumed, reference):
        assert abs(got - want) <= 1e-5 * abs(want), (resumed, reference)


def _worker_pids(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    cmdline = handle.read().decode(errors="replace")
            except OSError:
                continue
            if "hetero.engine.worker" in cmdline and marker in cmdline and "island_agent" not in cmdline:
                pids.append(int(entry))
    return pids


def test_killed_worker_restarts_job_from_last_checkpoint(tmp_path, emulated_fleet):
    cluster, job = emulated_fleet
    plan = make_plan(job, [("wide", 2, 1, (0, 2), 0), ("narrow", 1, 1, (2, 3), 0)])
    steps, every = 7, job.train.checkpoint.every
    killed = {}

    def kill_one_worker(run_dir, thread):
        steps_file = run_dir / "metrics" / "steps.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and thread.is_alive():
            if steps_file.exists() and len(steps_file.read_text().splitlines()) >= 3:
                pids = _worker_pids(str(tmp_path))
                if pids:
                    killed["at_step"] = len(steps_file.read_text().splitlines())
                    os.kill(pids[-1], signal.SIGKILL)
                    return
            time.sleep(0.05)

    records, _, log = run_fleet(tmp_path, plan, steps=steps, max_restarts=1, during=kill_one_worker,
                                cluster_path=cluster)
    assert killed, "no worker was killed"
    assert "restarting the whole job" in log
    resumed_at = int(re.search(r"resumed from \S+ \(step (\d+)\)", log).group(1))
    assert killed["at_step"] - resumed_at <= every          # steps lost <= the checkpoint interval
    final = last_attempt(records)
    assert [r["step"] for r in final] == list(range(1, steps + 1))
    reference = solo_losses(tmp_path, job, steps=steps)
    for got, want in zip([r["loss"] for r in final], reference):
        assert abs(got - want) <= 1e-5 * abs(want)


def make_replicas_plan(job, replicas, micro_batch=2):
    """replicas: [(island, [(tp, (start, end)), ...], samples[, its micro-batch])]: one whole-model pipeline
    per island, each of `micro_batch` samples unless it names its own."""
    stages, pipelines, ranks_by_island = [], [], {}
    for p, (island, stage_specs, samples, *own) in enumerate(replicas):
        indices, offset = [], 0
        for tp, layers in stage_specs:
            index = len(stages)
            stages.append(StagePlan(index, p, island, job.cluster.island(island).chip, tp, 1, layers, "none",
                                    offset, 0.1, 0.0))
            for t in range(tp):
                ranks_by_island.setdefault(island, []).append((offset + t, index, p, t))
            indices.append(index)
            offset += tp
        mb = own[0] if own else micro_batch
        m = -(-samples // mb)            # a smaller last micro-batch where samples is not a multiple
        pipelines.append(PipelinePlan(p, tuple(indices), 1, mb, m, last_micro_batch=samples - (m - 1) * mb
                                      if samples % mb else 0))
    ranks = []
    for island in [i.name for i in job.cluster.islands]:
        for local, stage, p, t in sorted(ranks_by_island.get(island, [])):
            ranks.append(RankPlan(len(ranks), island, local, 0, p, stage, t, 0))
    return Plan(kind="replicas", cluster=job.cluster.name, model=job.model.name, dtype="fp32",
                layers=job.model.layers, heads=job.model.heads, kv_heads=job.model.kv_heads,
                global_batch=job.train.global_batch, micro_batch=pipelines[0].micro_batch,
                num_micro_batches=pipelines[0].num_micro_batches, recompute="none", zero1=False,
                stages=tuple(stages), pipelines=tuple(pipelines), ranks=tuple(ranks),
                predicted_step_s=1.0, tokens_per_s=1.0, mfu={})


@pytest.mark.parametrize("replicas", [
    # unequal islands (3 ranks vs 1): buckets rotate over the wide island's ranks; uneven batch split 6 / 2
    [("wide", [(2, (0, 2)), (1, (2, 3))], 6), ("narrow", [(1, (0, 3))], 2)],
    # one rank per island: the island-aware bridge ring; uneven split 2 / 6
    [("wide", [(1, (0, 3))], 2), ("narrow", [(1, (0, 3))], 6)],
    # each island its own micro-batch (plan version 3): 2 x 3 samples through a pipeline of two, 2 x 1 alone
    [("wide", [(2, (0, 2)), (1, (2, 3))], 6, 3), ("narrow", [(1, (0, 3))], 2, 1)],
    # a smaller last micro-batch (plan version 5): 5 samples as 2 + 2 + 1 through a pipeline of two (the
    # boundary's receive sized per micro-batch), 3 as 2 + 1 alone
    [("wide", [(2, (0, 2)), (1, (2, 3))], 5, 2), ("narrow", [(1, (0, 3))], 3, 2)],
], ids=["unequal", "ring", "micro-batches", "short-last"])
def test_hetero_dp_replicas_match_one_process(tmp_path, emulated_fleet, replicas, monkeypatch):
    cluster, job = emulated_fleet
    # 20 kB buckets: the ~0.5 MB of gradients stream through the bridge in ~26 of them
    monkeypatch.setenv("HETERO_GRAD_BUCKET_MB", "0.02")
    plan = make_replicas_plan(job, replicas)
    assert plan.problems() == [] and plan.version == (5 if any(p.last_micro_batch for p in plan.pipelines) else
                                                      3 if len({p.micro_batch for p in plan.pipelines}) > 1 else 1)
    records, _, _ = run_fleet(tmp_path, plan, steps=3, cluster_path=cluster)
    fleet = [r["loss"] for r in last_attempt(records)]
    reference = solo_losses(tmp_path, job, steps=3)
    for got, want in zip(fleet, reference):
        assert abs(got - want) <= 1e-5 * abs(want), (fleet, reference)


@pytest.mark.parametrize("transport", ["zmq", "auto"])
def test_bridge_transport_from_the_cluster_file_is_honoured(tmp_path, transport):
    """zmq keeps the bridge on the zmq data plane (no direct stream); auto puts these
    same-host peers' traffic on the stream (shared-memory doorbells ride it)."""
    path = fleet_cluster(tmp_path, network=f"{{bridge: {{transport: {transport}}}}}")
    job = load_job(cluster=path, model=CONFIG, train=CONFIG)
    assert job.cluster.network.bridge.transport == transport
    plan = make_replicas_plan(job, [("wide", [(1, (0, 3))], 2), ("narrow", [(1, (0, 3))], 6)])
    records, run_dir, _ = run_fleet(tmp_path, plan, steps=2, cluster_path=path)
    reference = solo_losses(tmp_path, job, steps=2)
    for got, want in zip([r["loss"] for r in last_attempt(records)], reference):
        assert abs(got - want) <= 1e-5 * abs(want)
    for rank in (0, 1):
        with open(run_dir / "metrics" / f"bridge-rank{rank:05d}.json") as handle:
            stats = json.load(handle)
        assert stats["bytes_received"] > 0
        # streams ever joined: the peer may have closed its stream before these stats were written
        assert (stats["streams_joined"] == 0) == (transport == "zmq"), stats


@pytest.mark.slow
def test_bf16_on_the_wire_halves_the_gradient_sum_and_tracks_fp32(tmp_path):
    """network.bridge.grad_dtype: bf16 moves the hetero-DP sum in bf16 (accumulated in fp32): about
    half the bridge bytes, losses within 1e-3 of one process, and not bit-equal to the fp32 wire
    (the option really took effect). Unequal islands: the lane path (holders ring, then broadcast)."""
    replicas = [("wide", [(2, (0, 2)), (1, (2, 3))], 6), ("narrow", [(1, (0, 3))], 2)]
    runs = {}
    for wire in ("fp32", "bf16"):
        (tmp_path / wire).mkdir()
        path = fleet_cluster(tmp_path / wire, network=f"{{bridge: {{grad_dtype: {wire}}}}}")
        job = load_job(cluster=path, model=CONFIG, train=CONFIG)
        assert job.cluster.network.bridge.grad_dtype == wire
        records, run_dir, _ = run_fleet(tmp_path / wire, make_replicas_plan(job, replicas), steps=3, cluster_path=path)
        received = sum(json.loads(f.read_text()).get("bytes_received", 0)
                       for f in (run_dir / "metrics").glob("bridge-rank*.json"))
        runs[wire] = ([r["loss"] for r in last_attempt(records)], received)
    reference = solo_losses(tmp_path, job, steps=3)
    (fp32, fp32_bytes), (bf16, bf16_bytes) = runs["fp32"], runs["bf16"]
    assert all(abs(got - want) <= 1e-5 * abs(want) for got, want in zip(fp32, reference)), (fp32, reference)
    assert all(abs(got - want) <= 1e-3 * abs(want) for got, want in zip(bf16, reference)), (bf16, reference)
    assert bf16 != fp32
    assert bf16_bytes < 0.6 * fp32_bytes, (bf16_bytes, fp32_bytes)


def test_tied_embeddings_split_over_islands_match_one_process(tmp_path):
    """The embedding on one island, its tied LM head on the other: their gradients are summed."""
    path = os.path.join(HERE, "two-islands-tied.yaml")
    cluster, tied = fleet_job(tmp_path, path)
    plan = make_plan(tied, [("wide", 2, 1, (0, 2), 0), ("narrow", 1, 1, (2, 3), 0)])
    records, _, _ = run_fleet(tmp_path, plan, job_path=path, steps=3, cluster_path=cluster)
    fleet = [r["loss"] for r in last_attempt(records)]
    reference = solo_losses(tmp_path, tied, steps=3)
    for got, want in zip(fleet, reference):
        assert abs(got - want) <= 1e-5 * abs(want), (fleet, reference)


def with_blocks(plan, blocks):
    """`plan` with its stages cut at half-layer blocks [(a, b)] (2k: layer k's attention half, 2k+1 its
    MLP half): `layers` the layers each touches, `blocks` where an end falls inside a layer."""
    stages = tuple(dataclasses.replace(s, layers=(a // 2, (b + 1) // 2), blocks=(a, b) if a % 2 or b % 2 else ())
                   for s, (a, b) in zip(plan.stages, blocks))
    return dataclasses.replace(plan, stages=stages)


def test_stage_boundaries_inside_a_layer_match_one_process_and_resume_under_another_cut(tmp_path, emulated_fleet):
    cluster, job = emulated_fleet
    checkpoints = tmp_path / "shared-checkpoints"
    # wide TP2 holds layer 0 and layer 1's attention -> bridge -> narrow TP1 holds layer 1's MLP and layer 2
    across = with_blocks(make_plan(job, [("wide", 2, 1, (0, 2), 0), ("narrow", 1, 1, (1, 3), 0)]), [(0, 3), (3, 6)])
    assert across.version == 4 and across.problems() == []
    assert "wide(tp2 dp1 layers 0-1.5) -> narrow(tp1 dp1 layers 1.5-3)" in across.summary()
    records, _, _ = run_fleet(tmp_path, across, steps=4, name="across", checkpoints=checkpoints,
                              cluster_path=cluster)
    # then on one island, DP 2 with ZeRO-1, cut after layer 2's attention: the checkpoint loads into any cut
    inside = with_blocks(make_plan(job, [("wide", 1, 2, (0, 3), 0), ("wide", 1, 2, (2, 3), 2)]), [(0, 5), (5, 6)])
    inside = dataclasses.replace(inside, zero1=True)
    assert inside.problems() == []
    resumed, _, log = run_fleet(tmp_path, inside, steps=6, name="inside", checkpoints=checkpoints,
                                cluster_path=cluster)
    assert "resumed from" in log and "(step 4)" in log
    fleet = [r["loss"] for r in last_attempt(records)] + [r["loss"] for r in last_attempt(resumed)]
    reference = solo_losses(tmp_path, job, steps=6)
    assert len(fleet) == 6
    for got, want in zip(fleet, reference):
        assert abs(got - want) <= 1e-5 * abs(want), (fleet, reference)
