"""`hetero bench efficiency`'s TP probes: a TP degree a candidate plan gives an island that its run
alone did not use is measured by a short run of that island alone, and the layer times at that degree
fitted to it (hetero.bench.calibration)."""

import dataclasses
import json
import os

import pytest
import yaml

from hetero.bench import calibration
from hetero.config import load_job
from hetero.errors import UserError
from hetero.plan_check import check_plan, check_supported
from hetero.runner import search_plan
from tests.conftest import CONFIGS


@pytest.fixture(scope="module")
def three():
    """emulated-three in chip time at dilation 5, as the bench plans it."""
    from hetero.bench.efficiency import in_chip_time

    job = load_job(cluster=os.path.join(CONFIGS, "emulated-three.yaml"), model=os.path.join(CONFIGS, "llama-tiny.yaml"),
                   train=os.path.join(CONFIGS, "train-efficiency.yaml"))
    return in_chip_time(job, 5.0)


def _alone(job, slowdown: float = 1.0) -> dict:
    """Each island's run alone as the bench records it (every island of emulated-three plans TP 1 alone);
    steps as predicted times `slowdown`, the gap charged as host costs."""
    subfleets = {}
    for island in job.cluster.islands:
        plan = search_plan(calibration.alone(job, island))
        step = slowdown * plan.predicted_step_s
        subfleets[island.name] = {
            "step_s": step, "predicted_step_s": plan.predicted_step_s,
            "host_cost": dataclasses.asdict(calibration.island_host_cost(json.loads(plan.to_json()), step)),
            "plan": {"stages": [{"tp": s.tp} for s in plan.stages], "micro_batch": plan.micro_batch}}
        assert {s.tp for s in plan.stages} == {1}
    return subfleets


def test_a_probe_is_one_stage_of_the_island_alone_at_its_tp_on_a_quarter_of_the_batch(three):
    mid = three.cluster.island("mid")
    plan = calibration.probe_plan(three, mid, 2, 2)
    assert [(s.island, s.tp, s.dp, s.layers) for s in plan.stages] == [("mid", 2, 1, (0, three.model.layers))]
    assert (plan.global_batch, plan.micro_batch, plan.pipelines[0].num_micro_batches) == (16, 2, 8)
    job = calibration.probe_job(three, mid, 2, 2)
    assert job.cluster.islands == (mid,) and job.train.global_batch == 16
    check_supported(check_plan(plan, job, "probe"), "probe")       # what the launcher and the workers check
    # at least two micro-batches a replica, however large the micro-batch
    wide = calibration.probe_plan(three, three.cluster.island("big"), 1, 16)
    assert (wide.pipelines[0].dp, wide.pipelines[0].num_micro_batches, wide.global_batch) == (2, 2, 64)
    with pytest.raises(UserError, match="TP 3 does not divide its 2 chips"):
        calibration.probe_plan(three, mid, 3, 2)


def test_the_tp_degrees_no_run_measured_are_probed_once_each(three):
    subfleets = _alone(three)
    at_tp2 = [calibration.probe_plan(three, three.cluster.island(name), 2, b) for name, b in (("mid", 2), ("fast", 4))]
    at_tp1 = calibration.probe_plan(three, three.cluster.island("big"), 1, 4)
    assert calibration.missing_tps(at_tp2 + [at_tp1] + at_tp2, subfleets) == [("mid", 2, 2), ("fast", 2, 4)]
    subfleets["mid"]["tp_probes"] = [{"tp": 2}]
    assert calibration.missing_tps(at_tp2 + [at_tp1], subfleets) == [("fast", 2, 4)]


@pytest.mark.parametrize("slower", [1.0, 1.08])
def test_a_probe_fits_the_layer_times_at_its_tp_and_leaves_the_island_s_own_alone(three, slower):
    subfleets = _alone(three, 1.03)
    mid = three.cluster.island("mid")
    before = calibration.calibration_profile(three, subfleets)
    plan = calibration.probe_plan(three, mid, 2, 2, profile=before)
    span = calibration.compute_span(plan.to_dict())
    tail = plan.predicted_step_s - span        # the probe's update, as predicted
    subfleets["mid"]["tp_probes"] = [calibration.probe_record(plan, 2, 2, span * slower + tail, tail, "probe-run")]
    assert subfleets["mid"]["tp_probes"][0]["compute_s"] == pytest.approx(span * slower)
    after = calibration.calibration_profile(three, subfleets)
    refit = calibration.probe_plan(three, mid, 2, 2, profile=after)
    assert calibration.compute_span(refit.to_dict()) == pytest.approx(span * slower, rel=0.003)
    # the island's own plan alone is predicted as measured still, and its TP-1 layers are untouched
    for island in three.cluster.islands:
        assert search_plan(calibration.alone(three, island), "auto", after).predicted_step_s == pytest.approx(
            subfleets[island.name]["step_s"], rel=0.005)
    from hetero.planning import fleet_spec, model_spec, train_spec
    from partitioner.costs import CostModel

    specs = fleet_spec(three.cluster), model_spec(three.model), train_spec(three.train)
    was, now = CostModel(*specs, before), CostModel(*specs, after)
    assert now.layer_cost("mid", 1, 1).forward_s == pytest.approx(was.layer_cost("mid", 1, 1).forward_s)
    # the probe's TP degree at another micro-batch (a short last one) takes the probe's scale
    ratio = now.layer_cost("mid", 2, 1).forward_s / was.layer_cost("mid", 2, 1).forward_s
    assert ratio == pytest.approx(now.layer_cost("mid", 2, 2).forward_s / was.layer_cost("mid", 2, 2).forward_s)
    assert (ratio > 1.05) == (slower > 1.0)


def test_a_slower_tp_probe_moves_samples_off_that_island(three):
    """What the probe is for: the hetero-DP split between islands at TP 2 (the bench's plan on
    emulated-three) follows the TP degree's measured cost."""
    from hetero.planning import fleet_spec, model_spec, train_spec
    from partitioner.candidates import stage_layout
    from partitioner.costs import CostModel
    from partitioner.evaluate import evaluate_pipeline, shortened
    from partitioner.replicas import best_batch_split

    subfleets = _alone(three, 1.03)
    mid = three.cluster.island("mid")
    specs = fleet_spec(three.cluster), model_spec(three.model), train_spec(three.train)
    shares = {}
    for slower in (1.0, 1.15):
        plan = calibration.probe_plan(three, mid, 2, 2, profile=calibration.calibration_profile(three, subfleets))
        span = calibration.compute_span(plan.to_dict())
        tail = plan.predicted_step_s - span
        probes = [calibration.probe_record(plan, 2, 2, span * slower + tail, tail, "")]
        profile = calibration.calibration_profile(three, dict(subfleets, mid=dict(subfleets["mid"], tp_probes=probes)))
        cm = CostModel(*specs, profile)
        pes = [shortened(cm, evaluate_pipeline(cm, stage_layout([(specs[0].island(name), 2, 1)], 1), 1, b, 64))
               for name, b in (("fast", 4), ("mid", 2), ("big", 8))]
        shares[slower] = best_batch_split(pes, three.train.global_batch, 1).shares
    assert sum(shares[1.0]) == sum(shares[1.15]) == 64
    assert shares[1.15][1] < shares[1.0][1]          # mid's
    assert shares[1.15][0] > shares[1.0][0] or shares[1.15][2] > shares[1.0][2]


def test_the_probe_s_train_file_keeps_every_other_field(tmp_path):
    from hetero.bench.efficiency import _write_train

    combined = tmp_path / "all.yaml"
    combined.write_text(yaml.safe_dump({"model": {"name": "x"}, "train": {
        "global_batch": 64, "micro_batch": 1, "lr": 0.01, "seed": 7, "steps": 4}}))

    class Plan:
        global_batch, micro_batch = 16, 2

    path = _write_train(str(combined), Plan, str(tmp_path / "probe" / "train.yaml"))
    assert yaml.safe_load(open(path, encoding="utf-8")) == {"global_batch": 16, "micro_batch": 2, "lr": 0.01,
                                                            "seed": 7, "steps": 4}


@pytest.mark.parametrize("no_tp_probes,unfit", [(False, ""), (True, ""), (False, "mid")])
def test_the_bench_probes_each_missing_tp_once_then_plans_with_it(three, tmp_path, monkeypatch, no_tp_probes, unfit):
    """The bench's loop (hetero.bench.efficiency._calibrated_plans), the runs faked: each probe's files
    pass the launcher's checks, each missing TP degree is probed once, and the plans it returns leave
    none unmeasured."""
    from types import SimpleNamespace

    from hetero.bench import efficiency
    from hetero.plan_check import load_checked_plan

    paths = {"cluster": os.path.join(CONFIGS, "emulated-three.yaml"), "model": os.path.join(CONFIGS, "llama-tiny.yaml"),
             "train": os.path.join(CONFIGS, "train-efficiency.yaml")}
    for island in three.cluster.islands:
        efficiency._write_subfleet(paths["cluster"], island.name, str(tmp_path))
    trained = []

    def train(job, sub_paths, run_dir, args, say, plan_file=None):
        plan = load_checked_plan(plan_file, load_job(**sub_paths), engine=True)
        assert job.train.global_batch == plan.global_batch and len(job.cluster.islands) == 1
        trained.append((job.cluster.islands[0].name, plan.stages[0].tp))
        return SimpleNamespace(steady_step_s=1.1 * plan.predicted_step_s, run_dir=run_dir)

    monkeypatch.setattr(efficiency, "_train", train)
    monkeypatch.setattr(efficiency, "after_compute", lambda run_dir: None)
    fitting = efficiency.fitting_probe_plan
    monkeypatch.setattr(efficiency, "fitting_probe_plan",     # `unfit`: no probe fits that island
                        lambda job, island, *rest: None if island.name == unfit else fitting(job, island, *rest))
    subfleets = _alone(three, 1.03)
    args = SimpleNamespace(kind="replicas", no_tp_probes=no_tp_probes)
    plans = efficiency._calibrated_plans(three, paths, subfleets, str(tmp_path), args, lambda message: None)
    probed = {(name, p["tp"]) for name, sub in subfleets.items() for p in sub.get("tp_probes", ())}
    if no_tp_probes:
        assert not trained and not probed
        return
    assert (trained or unfit) and len(set(trained)) == len(trained) and set(trained) == probed
    assert all(name != unfit for name, _ in trained)
    assert all(name == unfit for name, _, _ in calibration.missing_tps(plans, subfleets))
    assert bool(calibration.missing_tps(plans, subfleets)) == bool(unfit)


def test_a_probe_that_does_not_fit_at_the_candidate_s_micro_batch_takes_a_smaller_one(three):
    """A candidate's stage at TP t may hold a few layers where the probe holds them all."""
    mid = three.cluster.island("mid")
    with pytest.raises(UserError, match="no one-stage plan at TP 2, micro-batch 32"):
        calibration.probe_plan(three, mid, 2, 32)
    plan = calibration.fitting_probe_plan(three, mid, 2, 32)
    assert (plan.micro_batch, plan.stages[0].tp) == (16, 2)
    assert calibration.fitting_probe_plan(three, mid, 1, 4) is None       # the whole model never fits one chip
    assert calibration.fitting_probe_plan(three, mid, 3, 4) is None
