"""configs/emulated-small-memory.yaml: emulated chips too small for llama-tiny without
activation recompute, so `hetero plan` and `hetero run` choose recompute, and it trains."""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.conftest import ROOT
from hetero.config import load_job
from hetero.errors import UserError
from hetero.planning import plan_job

CLUSTER = os.path.join(ROOT, "configs", "emulated-small-memory.yaml")
FLAGS = ["--cluster", CLUSTER, "--model", os.path.join(ROOT, "configs", "llama-tiny.yaml"),
         "--train", os.path.join(ROOT, "configs", "train-tiny.yaml")]


def test_no_plan_fits_without_recompute():
    job = load_job(cluster=CLUSTER, model=FLAGS[3], train=FLAGS[5])
    with pytest.raises(UserError, match="no plan fits"):
        plan_job(job, recompute_modes=("none",))


def test_plan_picks_recompute(hetero_cli):
    code, out, err = hetero_cli("plan", *FLAGS, "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["emulated_chips"] == ["emu-fast-9mb", "emu-slow-9mb"]
    assert plan["recompute"] != "none"
    assert all(s["recompute"] in ("none", "selective", "full") for s in plan["stages"])


@pytest.mark.slow
def test_run_trains_with_recompute(hetero_cli, tmp_path):
    out = tmp_path / "run"
    code, _, err = hetero_cli("run", *FLAGS, "--steps", "2", "--out", str(out))
    assert code == 0, err[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["recompute"] != "none"
    records = [json.loads(line) for line in (out / "metrics" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records)
