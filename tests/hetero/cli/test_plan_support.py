"""No silent ignoring: the engine runs a plan only if it honours every field of it
(hetero.engine.support), checked by `hetero run` before any worker starts and by each
worker again; anything else is one line naming the plan file, the field, the value and
what is supported, exit 2. `hetero run` without --plan searches only what the engine runs.

The refusals asserted unconditionally use values no engine version will run (fields it
does not know, a plan whose summary contradicts its stages); ZeRO-1 and bf16 are refused
exactly while their flags in hetero.engine.support are off.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import tests.hetero.cli.test_hardening_cli_plans as cli_plans
from tests.hetero.cli.test_hardening_cli_plans import CONFIGS, JOB_FLAGS, one_line

from tests.conftest import ROOT
from hetero.config import load_job
from hetero.engine import support
from hetero.plan_check import load_checked_plan
from hetero.runner import search_plan
from partitioner.inputs import RECOMPUTE_MODES as PLANNER_MODES
from partitioner.plan import PipelinePlan, Plan, RankPlan, StagePlan

pytestmark = pytest.mark.timeout(120)

fake_launcher = cli_plans.fake_launcher    # fixtures: the launcher replaced, the default job's plan
good_plan = cli_plans.good_plan
LLAMA2 = {"cluster": "a800-910b-32.yaml", "train": "train-llama2.yaml"}


def edited(good_plan, tmp_path, change, name="plan.json") -> str:
    """A copy of the default job's plan with `change(data)` applied to its JSON object."""
    with open(good_plan, encoding="utf-8") as handle:
        data = json.load(handle)
    change(data)
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=2))
    return str(path)


def llama2_job(model: str):
    return load_job(**{kind: os.path.join(ROOT, "configs", name) for kind, name in
                       {**LLAMA2, "model": f"{model}.yaml"}.items()})


# -- the declaration ---------------------------------------------------------------------------

def test_every_plan_field_has_exactly_one_place(good_plan):
    places = [set(support.FORMAT), set(support.STRUCTURE), set(support.INFORMATIONAL), set(support.CHOICES)]
    assert sum(len(p) for p in places) == len(set().union(*places)), "a field is declared twice"
    with open(good_plan, encoding="utf-8") as handle:
        data = json.load(handle)
    written = set(data) | {f"{name}[].{key}" for name in support.LISTS for key in data[name][0]}
    assert written | set(support.VERSION_2_ONLY) | set(support.VERSION_4_ONLY) | set(support.VERSION_5_ONLY) \
        == support.KNOWN
    for cls, prefix in ((Plan, ""), (StagePlan, "stages[]."), (PipelinePlan, "pipelines[]."), (RankPlan, "ranks[].")):
        for field in dataclasses.fields(cls):
            assert prefix + field.name in support.KNOWN, f"{prefix}{field.name} has no place in hetero.engine.support"


def test_the_engine_runs_the_modes_the_model_implements():
    from hetero.model.recompute import MODES

    assert support.RECOMPUTE_MODES == MODES
    assert set(MODES) <= set(PLANNER_MODES)


# -- refusals ---------------------------------------------------------------------------------------

def _summary_contradicts_stages(data):
    data["recompute"] = "full"
    for stage in data["stages"]:
        stage["recompute"] = "none"


REFUSED = [
    ("schedule", lambda d: d.update(schedule="interleaved-1f1b"), "does not know this field and will not ignore it"),
    ("stages[1].offload", lambda d: d["stages"][1].update(offload=True), "does not know this field"),
    ("recompute", _summary_contradicts_stages, "the plan says 'full' but its stages say 'none'"),
]


@pytest.mark.parametrize("field,change,fragment", REFUSED, ids=[r[0] for r in REFUSED])
def test_run_refuses_what_the_engine_cannot_honour(hetero_cli, fake_launcher, good_plan, tmp_path,
                                                  field, change, fragment):
    path = edited(good_plan, tmp_path, change)
    out = tmp_path / "run"
    one_line(*hetero_cli("run", *JOB_FLAGS, "--plan", path, "--out", str(out)), "run", f"{path}: {field}: ",
             fragment)
    assert not fake_launcher.calls and not out.exists()


@pytest.mark.parametrize("field,change,fragment", REFUSED[:2], ids=[r[0] for r in REFUSED[:2]])
def test_the_worker_refuses_it_and_launch_of_another_script_does_not(good_plan, tmp_path, capsys, monkeypatch,
                                                                      field, change, fragment):
    from hetero.engine import worker
    from hetero.errors import FATAL_EXIT_CODE

    monkeypatch.setenv("HETERO_GLOBAL_RANK", "1")
    monkeypatch.setenv("HETERO_NODE", "127.0.0.1")
    path = edited(good_plan, tmp_path, change)
    args = ["--plan", path, *JOB_FLAGS, "--run-dir", str(tmp_path / "run")]
    assert worker.main(args) == FATAL_EXIT_CODE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hetero: rank 1 on 127.0.0.1: {path}: {field}: "), err
    assert fragment in err[0]
    assert load_checked_plan(path, load_job(**CONFIGS)).stages     # hetero launch SCRIPT: the format only


def test_zero1_runs_only_where_the_engine_has_it(hetero_cli, fake_launcher, good_plan, tmp_path):
    path = edited(good_plan, tmp_path, lambda d: d.update(zero1=True))
    code, out, err = hetero_cli("run", *JOB_FLAGS, "--plan", path, "--out", str(tmp_path / "run"))
    if support.ZERO1:
        assert code == 0, err
    else:
        one_line(code, out, err, "run", f"{path}: zero1: true is not supported by this engine (it runs false)")


def test_a_train_dtype_the_engine_lacks_is_the_train_file_s_to_fix(hetero_cli, fake_launcher, tmp_path):
    train = tmp_path / "train-bf16.yaml"
    with open(CONFIGS["train"], encoding="utf-8") as handle:
        train.write_text(handle.read().replace("dtype: fp32", "dtype: bf16"))
    flags = ["--cluster", CONFIGS["cluster"], "--model", CONFIGS["model"], "--train", str(train)]
    code, out, err = hetero_cli("run", *flags, "--out", str(tmp_path / "run"))
    if support.MIXED_PRECISION:
        assert code == 0, err
    else:
        one_line(code, out, err, "run", f"{train}: dtype: 'bf16' is not supported by this engine (it runs 'fp32')")


# -- what hetero run searches -------------------------------------------------------------------

def test_run_searches_only_what_the_engine_runs():
    job = llama2_job("llama2-7b")
    from hetero.planning import plan_job

    assert plan_job(job).best.zero1                    # the planner alone puts 7B on ZeRO-1 here
    plan = search_plan(job)
    assert plan.zero1 == support.ZERO1
    assert {s.recompute for s in plan.stages} <= set(support.RECOMPUTE_MODES)
    assert [field for field, _ in support.refusals(plan)] == ([] if support.MIXED_PRECISION else ["dtype"])


def test_the_70b_example_plan_is_refused_only_for_what_is_still_missing():
    """`hetero plan` puts llama2-70b on the 16 A800 + 16 Ascend-910B example with selective
    recompute in bf16: the engine refuses it only for a flag still off in support.py."""
    from hetero.planning import plan_job

    plan = plan_job(llama2_job("llama2-70b")).best
    assert "selective" in {s.recompute for s in plan.stages}
    gated = {"dtype": support.MIXED_PRECISION, "zero1": support.ZERO1}
    refused = [field for field, _ in support.refusals(plan, json.loads(plan.to_json()))]
    assert all(field in gated and not gated[field] for field in refused), refused
    if all(gated.values()):
        assert refused == []
