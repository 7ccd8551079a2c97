"""`hetero bench runtime`'s analysis: the exposed bridge time split into pipeline hops and the
hetero-DP gradient sum, each as a share of the step; a pipeline plan is held to 2% on the hops."""

import json
import os
import shutil
import statistics

import pytest

from hetero.bench import runtime
from hetero.report import timeline
from tests.conftest import FIXTURES

RUN = os.path.join(FIXTURES, "report-run")


def load(run_dir):
    with open(os.path.join(run_dir, "plan.json"), encoding="utf-8") as handle:
        return json.load(handle)


def test_the_pipeline_plan_reports_its_exposed_hops_against_two_percent():
    plan = load(RUN)
    report = runtime.analyse(RUN, plan, warmup=0)
    steps = [json.loads(line) for line in open(os.path.join(RUN, "metrics", "steps.jsonl"), encoding="utf-8")]
    per_step = runtime.exposed_bridge_per_step(RUN, plan)
    assert any(per_step.values())                                   # the fixture has exposed hops
    assert report["exposed_hops_share"] == pytest.approx(
        statistics.median(per_step.get(s["step"], 0.0) / s["step_s"] for s in steps))
    assert report["cross_island_reduce_s"] == 0.0 and report["exposed_bridge_s"] == report["exposed_hops_s"]
    assert report["pipeline_hops_goal"] == runtime.PIPELINE_HOPS_GOAL == 0.02
    assert report["pipeline_hops_ok"] == (report["exposed_hops_share"] <= 0.02)
    for kept in ("measured_step_s", "predicted_step_s", "ratio", "exposed_bridge_share", "bridge_ok"):
        assert kept in report


def test_a_replicas_plan_counts_its_gradient_sum_apart_from_the_hops(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    plan = dict(load(run), kind="replicas")
    steps_file = run / "metrics" / "steps.jsonl"
    steps = [json.loads(line) for line in steps_file.read_text().splitlines()]
    steps_file.write_text("".join(json.dumps(dict(s, cross_island_reduce_s=0.25 * s["step_s"])) + "\n" for s in steps))
    report = runtime.analyse(str(run), plan, warmup=0)
    assert report["cross_island_reduce_share"] == pytest.approx(0.25)
    assert report["exposed_bridge_share"] > report["exposed_hops_share"]
    assert report["pipeline_hops_goal"] is None and report["pipeline_hops_ok"] is None
    assert timeline.exposed_per_step(plan, {}) == {}
