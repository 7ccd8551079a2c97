"""The 'hybrid' plan kind's invariants (issue 20 item 2): several pipelines, each island in one of
them, one at least over several islands."""

import dataclasses
import os

from partitioner.plan import Plan
from tests.conftest import FIXTURES


def two_island_pipeline() -> Plan:
    with open(os.path.join(FIXTURES, "report-run", "plan.json"), encoding="utf-8") as handle:
        return Plan.from_json(handle.read())


def test_a_hybrid_plan_needs_several_pipelines():
    one = dataclasses.replace(two_island_pipeline(), kind="hybrid")
    assert one.problems() == ["a 'hybrid' plan has several pipelines, got 1"]
