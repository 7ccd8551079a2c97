"""End to end: every step record of an emulated fleet carries each stage's measured peak memory.

A hetero-DP plan on two emulated islands: pipeline 0 splits the model over two stages
(0: layers 0-2 and the embedding, 1: layer 2 and the head), pipeline 1 is the whole model
on one chip (stage 2). `peak_memory_gb` is indexed like plan.json's `memory_gb`, across
pipelines; each stage's peak is at least what its weights, gradients and Adam moments take
(16 bytes per fp32 parameter), and a stage that holds more shows more.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from tests.conftest import free_port
from hetero.config import load_job
from hetero.model import LlamaStage, TensorParallel
from tests.hetero.engine.test_engine_fleet import CONFIG, last_attempt, make_replicas_plan, run_fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CHIP = ("  chips:\n"
        "    peak-chip: {accelerator: emulated, emulated: true, tflops: {fp32: 1.0}, memory_gb: 0.05,\n"
        "                memory_bandwidth_gbps: 100, intra_node_gbps: 10, host_link_gbps: 10}\n"
        "  islands:")
STATE_BYTES_PER_PARAM = 16      # fp32 weight + gradient + exp_avg + exp_avg_sq


def emulated_job(tmp_path) -> str:
    """tests/fixtures/engine/two-islands.yaml with emulated chips in place of the host CPU, on a free port."""
    with open(CONFIG) as handle:
        text = handle.read().replace("port: 29731", f"port: {free_port()}")
    text = text.replace("accelerator: cpu", "accelerator: emulated").replace("chip: cpu", "chip: peak-chip")
    path = tmp_path / "two-emulated-islands.yaml"
    path.write_text(text.replace("  islands:", CHIP, 1))
    return str(path)


def state_bytes(model, layers, first, last) -> int:
    stage = LlamaStage(model, layers, first=first, last=last, tp=TensorParallel(), dtype=torch.float32,
                       device="cpu", seed=0)
    return STATE_BYTES_PER_PARAM * sum(p.numel() for p in stage.parameters())


def test_every_step_records_each_stage_s_peak_memory(tmp_path):
    path = emulated_job(tmp_path)
    job = load_job(cluster=path, model=path, train=path)
    plan = make_replicas_plan(job, [("wide", [(1, (0, 2)), (1, (2, 3))], 4), ("narrow", [(1, (0, 3))], 4)])
    plan = dataclasses.replace(plan, stages=tuple(dataclasses.replace(s, chip="peak-chip") for s in plan.stages))
    records, run_dir, _ = run_fleet(tmp_path, plan, job_path=path, steps=3)
    records = last_attempt(records)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        peaks = record["peak_memory_gb"]
        assert len(peaks) == len(plan.memory_gb) == 3
        assert all(isinstance(p, float) and 0 < p < 0.05 for p in peaks), peaks
    peaks = records[-1]["peak_memory_gb"]
    floors = [state_bytes(job.model, (0, 2), True, False), state_bytes(job.model, (2, 3), False, True),
              state_bytes(job.model, (0, 3), True, True)]
    assert all(peak * 1e9 >= floor for peak, floor in zip(peaks, floors)), (peaks, floors)
    assert peaks[0] > peaks[1]          # two layers and the embedding, vs one layer and the head
    assert peaks[2] > max(peaks[:2])    # the whole model on one chip
    assert os.path.exists(run_dir / "metrics" / "steps.jsonl")
