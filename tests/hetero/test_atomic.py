"""hetero.atomic (a file written whole or not at all) and what hetero.resume builds on it: the
plan a re-planned run replaced, kept as plan-until-step-N.json."""

import os

import pytest

from hetero import resume, runner
from hetero.atomic import atomic_file, temporary_path, write_atomic
from partitioner.plan import Plan
from tests.conftest import FIXTURES

PLAN = os.path.join(FIXTURES, "report-run", "plan.json")


def test_write_atomic_replaces_whole_and_a_failed_write_leaves_the_old_file(tmp_path):
    path = str(tmp_path / "state.json")
    write_atomic(path, "old")
    write_atomic(path, b"new bytes", fsync=True)
    assert open(path, "rb").read() == b"new bytes"
    with pytest.raises(OSError, match="disk full"):
        with atomic_file(path, "w") as handle:
            handle.write("half")
            raise OSError("disk full")
    assert open(path, "rb").read() == b"new bytes"
    assert os.listdir(tmp_path) == ["state.json"]          # no temporary file left behind
    assert temporary_path(path).startswith(path + ".") and temporary_path(path).endswith(".tmp")


def test_keep_replaced_plan_keeps_the_file_or_the_given_text(tmp_path):
    run_dir = str(tmp_path)
    assert resume.keep_replaced_plan(run_dir, 4) is None                # no plan yet: nothing to keep
    resume.write_plan(run_dir, "first")
    assert resume.keep_replaced_plan(run_dir, 4) == "plan-until-step-4.json"
    assert resume.keep_replaced_plan(run_dir, 9, text="held") == "plan-until-step-9.json"
    assert (tmp_path / "plan-until-step-4.json").read_text() == "first"
    assert (tmp_path / "plan-until-step-9.json").read_text() == "held"
    assert (tmp_path / "plan.json").read_text() == "first"


def test_a_replan_keeps_the_old_plan_and_says_both(tmp_path):
    with open(PLAN, encoding="utf-8") as handle:
        old = Plan.from_json(handle.read())
    resume.write_plan(str(tmp_path), old.to_json())
    new = Plan.from_dict({**old.to_dict(), "num_micro_batches": 1, "micro_batch": 2,
                          "pipelines": [{**old.to_dict()["pipelines"][0], "micro_batch": 2, "num_micro_batches": 1}]})
    line = runner._replace_plan(str(tmp_path), new, 6)
    assert Plan.from_json((tmp_path / "plan.json").read_text()) == new
    assert Plan.from_json((tmp_path / "plan-until-step-6.json").read_text()) == old
    assert line == (f"re-planned from step 6: {new.summary()}; predicted {new.predicted_step_s:.3f} s/step "
                    f"(the run had {old.summary()}; its plan kept as plan-until-step-6.json)")
