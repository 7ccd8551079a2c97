"""`hetero bench memory`: the matrix it runs, its plans (built by the cost model, the shape each
cell asks for), and end to end on two cells: every stage's measured peak within 10% of the plan's
memory_gb, in the JSON shape the report promises."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from hetero.bench import memory
from hetero.config import load_job
from partitioner.costs import CostModel
from partitioner.inputs import RECOMPUTE_MODES
from tests.conftest import ROOT



def test_the_matrix_is_dtype_x_recompute_x_zero1_x_tp():
    cells = memory.cells()
    assert len(cells) == len({c.name for c in cells}) == 2 * 3 * 2 * 2
    assert {c.dtype for c in cells} == {"fp32", "bf16"}
    assert {c.recompute for c in cells} == set(RECOMPUTE_MODES)
    assert {(c.zero1, c.tp) for c in cells} == {(False, 1), (False, 2), (True, 1), (True, 2)}
    # ZeRO-1 needs DP 2 inside an island; TP 1 keeps DP 2 with ZeRO-1 off, so only ZeRO-1 differs
    assert all(c.dp == 2 for c in cells if c.zero1 or c.tp == 1)
    assert [c.name for c in memory.cells(["bf16/full/zero1-on", "fp32/none/zero1-off/tp2"])] == [
        "fp32/none/zero1-off/tp2", "bf16/full/zero1-on/tp1", "bf16/full/zero1-on/tp2"]


@pytest.mark.parametrize("name", ["bf16/selective/zero1-on/tp2", "fp32/full/zero1-off/tp1"])
def test_a_cell_s_plan_is_the_shape_asked_with_the_cost_model_s_memory(tmp_path, name):
    cell, = memory.cells([name])
    paths = {"cluster": os.path.join(memory.CONFIGS, "emulated-mixed.yaml"),
             "train": os.path.join(memory.CONFIGS, "train-tiny.yaml")}
    job = load_job(cluster=memory._cell_cluster(paths["cluster"], cell, str(tmp_path)),
                   model=os.path.join(memory.CONFIGS, "llama-tiny.yaml"),
                   train=memory._cell_train(paths["train"], cell, str(tmp_path)))
    assert job.train.dtype == cell.dtype
    assert all(i.nodes[0].chips == max(2, cell.tp * cell.dp) for i in job.cluster.islands)
    plan = memory.cell_plan(job, cell)
    assert plan.dtype == cell.dtype and plan.zero1 == cell.zero1
    assert [(s.island, s.tp, s.dp, s.recompute) for s in plan.stages] == [
        ("fast", cell.tp, cell.dp, cell.recompute), ("slow", cell.tp, cell.dp, cell.recompute)]
    # memory_gb is the cost model's, not the bench's own arithmetic
    from hetero.planning import fleet_spec, model_spec, train_spec
    cm = CostModel(fleet_spec(job.cluster), model_spec(job.model),
                   train_spec(job.train, zero1=cell.zero1))
    m = plan.num_micro_batches
    for pos, s in enumerate(plan.stages):
        expected = cm.stage_memory(s.tp, plan.micro_batch, s.dp, s.num_layers, pos == 0, pos == 1,
                                   min(2 - pos, m), s.recompute, island=s.island, micro_batches=m)
        assert s.memory_gb * 1e9 == pytest.approx(expected, rel=1e-12)


def test_an_unknown_cell_is_refused_in_one_line():
    out = subprocess.run([sys.executable, "-m", "hetero", "bench", "memory", "--only", "fp64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "no cell matches" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_cells_measured_within_ten_percent_of_the_plan(tmp_path, capsys):
    args = argparse.Namespace(cluster=None, model=None, train=None, steps=2, json=True, out=str(tmp_path),
                              only=["bf16/full/zero1-on/tp1", "fp32/none/zero1-off/tp2"])
    code = memory.run(args)
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert report["emulated"] is True and report["ratio_goal"] == [0.9, 1.1]
    rows = report["cells"]
    assert [(r["cell"], r["stage"]) for r in rows] == [
        ("fp32/none/zero1-off/tp2", 0), ("fp32/none/zero1-off/tp2", 1),
        ("bf16/full/zero1-on/tp1", 0), ("bf16/full/zero1-on/tp1", 1)]
    for r in rows:
        assert set(r) >= {"cell", "dtype", "recompute", "zero1", "tp", "dp", "stage", "island", "layers",
                          "predicted_mb", "measured_mb", "ratio"}
        assert r["measured_mb"] > 1.0 and r["predicted_mb"] > 1.0
        assert r["ratio"] == pytest.approx(r["measured_mb"] / r["predicted_mb"])
        assert 0.9 <= r["ratio"] <= 1.1, r
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1.0))
    assert report["worst_ratio"] == worst["ratio"] and report["ok"] is True
