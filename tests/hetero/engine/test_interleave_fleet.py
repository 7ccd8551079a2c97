"""Interleaved 1F1B end to end: a two-island pipeline with two chunks per stage (every boundary a
bridge hop, the wrap-around from the last stage's chunk 0 to the first stage's chunk 1 included)
trains the same losses as one process (1e-5 relative, fp32), and its checkpoint resumes under a
plain plan (v == 1): the checkpoint's HF names do not depend on the chunking."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tests.hetero.engine.test_engine_fleet import CONFIG, fleet_cluster, last_attempt, make_plan, run_fleet, solo_losses

from hetero.config import load_job
from hetero.model import LlamaStage
from partitioner.plan import interleaved

pytestmark = pytest.mark.timeout(600)


def four_layer_job(tmp_path):
    """tests/fixtures/engine/two-islands.yaml with 4 layers (2 stages x 2 chunks), on the emulated fleet."""
    path = tmp_path / "job.yaml"
    path.write_text(open(CONFIG, encoding="utf-8").read().replace("layers: 3", "layers: 4"))
    cluster = fleet_cluster(tmp_path)
    return cluster, str(path), load_job(cluster=cluster, model=str(path), train=str(path))


def test_chunks_of_one_stage_are_the_model_in_pieces():
    """A stage holding chunks runs each alone; with the pieces in between it is the whole model."""
    config = dataclasses.replace(load_job(model=CONFIG).model, layers=4)
    whole = LlamaStage(config, seed=3)
    mine = LlamaStage(config, seed=3, chunks=((0, 1), (2, 3)))
    other = LlamaStage(config, seed=3, chunks=((1, 2), (3, 4)), first=False)
    assert set(mine.state_dict()) | set(other.state_dict()) == set(whole.state_dict())
    tokens = torch.randint(0, config.vocab, (2, config.seq_len), generator=torch.Generator().manual_seed(0))
    x = tokens
    for stage, chunk in ((mine, 0), (other, 0), (mine, 1), (other, 1)):
        x = stage(x, chunk=chunk)
    assert torch.allclose(x, whole(tokens), atol=1e-6)
    with pytest.raises(ValueError, match="say which one"):
        mine(tokens)


@pytest.fixture(scope="module")
def interleaved_run(tmp_path_factory):
    """4 steps of a wide (TP2) + narrow (TP1) pipeline at v = 2, checkpointed; the one-process losses."""
    tmp_path = tmp_path_factory.mktemp("interleaved")
    cluster, job_path, job = four_layer_job(tmp_path)
    plan = interleaved(make_plan(job, [("wide", 2, 1, (0, 2), 0), ("narrow", 1, 1, (2, 4), 0)]), 2)
    assert [s.chunks for s in plan.stages] == [((0, 1), (2, 3)), ((1, 2), (3, 4))]
    records, run_dir, _ = run_fleet(tmp_path, plan, job_path=job_path, cluster_path=cluster, steps=4,
                                    checkpoints=tmp_path / "checkpoints", name="interleaved")
    return tmp_path, (cluster, job_path, job), records, run_dir, solo_losses(tmp_path, job, steps=6)


@pytest.mark.slow        # with its fixture's run: 30-40 s on a loaded 2-core host
def test_two_islands_interleaved_match_one_process(interleaved_run):
    _, _, records, run_dir, reference = interleaved_run
    fleet = [r["loss"] for r in last_attempt(records)]
    assert len(fleet) == 4
    for got, want in zip(fleet, reference):
        assert abs(got - want) <= 1e-5 * abs(want), (fleet, reference)
    timing = [json.loads(line) for line in open(run_dir / "metrics" / "rank00000.jsonl", encoding="utf-8")]
    assert len(timing) == 4 * 2 * 2 * 4 and {t["chunk"] for t in timing} == {0, 1}


@pytest.mark.slow
def test_interleaved_checkpoint_resumes_under_a_plain_plan(interleaved_run):
    tmp_path, (cluster, job_path, job), _, _, reference = interleaved_run
    plain = make_plan(job, [("wide", 1, 1, (0, 3), 0), ("narrow", 1, 1, (3, 4), 0)])
    resumed, _, log = run_fleet(tmp_path, plain, job_path=job_path, cluster_path=cluster, steps=6,
                                checkpoints=tmp_path / "checkpoints", name="plain")
    assert "(step 4)" in log
    tail = [r["loss"] for r in last_attempt(resumed)]
    assert len(tail) == 2
    for got, want in zip(tail, reference[4:]):
        assert abs(got - want) <= 1e-5 * abs(want), (tail, reference)


def test_one_island_interleaved_match_one_process(tmp_path):
    """Both stages on one island: every hop, the wrap-around included, on the island's strict
    (NCCL-rule) point-to-point."""
    cluster, job_path, job = four_layer_job(tmp_path)
    plan = interleaved(make_plan(job, [("wide", 1, 1, (0, 2), 0), ("wide", 1, 1, (2, 4), 1)]), 2)
    records, _, _ = run_fleet(tmp_path, plan, job_path=job_path, cluster_path=cluster, steps=2, name="island")
    reference = solo_losses(tmp_path, job, steps=2)
    fleet = [r["loss"] for r in last_attempt(records)]
    for got, want in zip(fleet, reference):
        assert abs(got - want) <= 1e-5 * abs(want), (fleet, reference)
