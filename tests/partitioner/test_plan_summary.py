"""Plan.summary() and Plan.label: the one line every message uses for a plan, and the planner's name
for a candidate (issue 21 item 3: one of each)."""

import dataclasses
import os

from partitioner import explain
from partitioner.plan import Plan
from tests.conftest import FIXTURES


def plan() -> Plan:
    with open(os.path.join(FIXTURES, "report-run", "plan.json"), encoding="utf-8") as handle:
        return Plan.from_json(handle.read())


def test_summary_names_each_stage_in_pipeline_order_then_the_micro_batches():
    assert plan().summary() == "slow(tp1 dp1 layers 0-2) -> fast(tp1 dp1 layers 2-8), 2 x micro-batch 1"


def test_label_is_the_planners_name_or_the_kind_without_one():
    assert plan().label == "pipeline slow(tp1) -> fast(tp1), micro-batch 1 x 2"
    assert dataclasses.replace(plan(), provenance={}).label == "pipeline"


def test_explain_names_both_plans_by_their_labels():
    best = plan()
    other = dataclasses.replace(best, predicted_step_s=best.predicted_step_s * 2, provenance={})
    lines = explain.compare(best, other)
    assert lines[0].startswith(f"chosen:    {best.label}: ")
    assert lines[1].startswith("runner-up: pipeline: ")

