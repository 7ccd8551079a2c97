"""`hetero bench efficiency`: time dilation, the plans it measures, and its whole path on a tiny fleet."""

import dataclasses
import json
import os

import pytest

from hetero.bench.efficiency import time_dilation
from hetero.config import load_job
from hetero.errors import UserError
from tests.conftest import CONFIGS, FIXTURES



@pytest.fixture(scope="module")
def emulated():
    return load_job(cluster=os.path.join(CONFIGS, "emulated-mixed.yaml")).cluster


@pytest.fixture(scope="module")
def half_real(emulated):
    fast, slow = emulated.islands
    return dataclasses.replace(emulated, islands=(fast, dataclasses.replace(slow, accelerator="cpu", chip="cpu")))


@pytest.mark.parametrize("cores, expected", [(1, 4.0), (2, 2.0), (3, 2.0), (4, 1.0), (64, 1.0)])
def test_auto_gives_each_emulated_chip_a_core(emulated, cores, expected):
    k, why = time_dilation(emulated, "auto", cores=cores)
    assert k == expected
    assert f"4 emulated chips share {cores} host core" in why


def test_a_fleet_with_real_chips_is_never_stretched(half_real):
    k, why = time_dilation(half_real, "auto", cores=1)
    assert k == 1.0 and "slow" in why and "real chips" in why
    assert time_dilation(half_real, "1", cores=1)[0] == 1.0
    with pytest.raises(UserError, match="island\\(s\\) slow are real chips"):
        time_dilation(half_real, "2")


def test_given_value_is_used_and_checked(emulated):
    assert time_dilation(emulated, "3.5", cores=64) == (3.5, "as given")
    for bad in ("0.5", "0", "fast", "inf", "nan"):
        with pytest.raises(UserError, match="--time-dilation must be a number >= 1"):
            time_dilation(emulated, bad)


def test_auto_measures_the_best_plan_of_each_kind():
    from hetero.bench.efficiency import candidate_plans

    job = load_job(cluster=os.path.join(CONFIGS, "emulated-mixed.yaml"), model=os.path.join(CONFIGS, "llama-tiny.yaml"),
                   train=os.path.join(CONFIGS, "train-efficiency.yaml"))
    assert [p.kind for p in candidate_plans(job, "auto", None)] == ["pipeline", "replicas"]
    only = candidate_plans(job, "replicas", None)
    assert [p.kind for p in only] == ["replicas"] and sum(p.samples for p in only[0].pipelines) == 64


def test_an_out_dir_that_holds_a_run_is_refused(hetero_cli, tmp_path):
    (tmp_path / "mixed").mkdir()
    code, _, stderr = hetero_cli("bench", "efficiency", "--out", str(tmp_path), "--json")
    assert code != 0 and "already holds an efficiency run" in stderr


def _tiny_job():
    return load_job(cluster=os.path.join(CONFIGS, "emulated-mixed.yaml"), model=os.path.join(CONFIGS, "llama-tiny.yaml"),
                    train=os.path.join(CONFIGS, "train-efficiency.yaml"))


def test_chip_time_network_is_k_times_faster():
    from hetero.bench.efficiency import in_chip_time

    job = _tiny_job()
    assert in_chip_time(job, 1.0) is job
    net, fast = job.cluster.network, in_chip_time(job, 2.0).cluster.network
    assert fast.intra_node_latency_us == net.intra_node_latency_us / 2
    assert fast.intra_node_gbps == net.intra_node_gbps * 2 and fast.inter_node_gbps == net.inter_node_gbps * 2
    assert (fast.bridge.gbps, fast.bridge.latency_us) == (net.bridge.gbps * 2, net.bridge.latency_us / 2)


@pytest.mark.parametrize("slowdown", [{"fast": 0.9, "slow": 1.0}, {"fast": 1.2, "slow": 0.8}])
def test_calibration_reproduces_each_island_s_measured_step(slowdown):
    from hetero.bench.calibration import alone, calibration_profile
    from hetero.runner import search_plan

    job = _tiny_job()
    subfleets = {}
    for island in job.cluster.islands:
        plan = search_plan(alone(job, island))
        subfleets[island.name] = {
            "step_s": slowdown[island.name] * plan.predicted_step_s, "predicted_step_s": plan.predicted_step_s,
            "plan": {"stages": [{"tp": plan.stages[0].tp}], "micro_batch": plan.micro_batch}}
    profile = calibration_profile(job, subfleets)
    for island in job.cluster.islands:
        assert search_plan(alone(job, island), "auto", profile).predicted_step_s == pytest.approx(
            subfleets[island.name]["step_s"], rel=0.005)


@pytest.mark.slow
def test_the_whole_bench_runs_on_a_tiny_fleet_and_writes_its_report(tmp_path):
    """Every step of `hetero bench efficiency` (islands alone, calibration, the mixed
    candidates, the planned-only example) on one chip per island; a defect anywhere
    on the path (like a local name shadowing a function) fails here, not after
    fifteen minutes of a full run."""
    from tests.conftest import hetero_subprocess

    tiny = os.path.join(FIXTURES, "bench", "efficiency-tiny.yaml")
    out = tmp_path / "bench"
    done = hetero_subprocess("bench", "efficiency", "--cluster", tiny, "--model", tiny, "--train", tiny,
                             "--steps", "2", "--kind", "auto", "--out", str(out), "--json", timeout=240)
    assert done.returncode in (0, 1), done.stderr[-2000:]   # 1: goal missed, still a report
    report = json.loads(done.stdout)
    assert report == json.loads((out / "efficiency.json").read_text())
    assert set(report["subfleets"]) == {"fast", "slow"}
    assert all(s["tokens_per_s"] > 0 for s in report["subfleets"].values())
    assert sorted(c["kind"] for c in report["mixed_candidates"]) == ["pipeline", "replicas"]
    combined = sum(s["tokens_per_s"] for s in report["subfleets"].values())
    for candidate in report["mixed_candidates"]:     # E of each kind of plan, the pipeline's included
        assert candidate["efficiency"] == pytest.approx(candidate["tokens_per_s"] / combined)
        assert candidate["predicted_efficiency"] == pytest.approx(candidate["predicted_tokens_per_s"] / combined)
    assert max(c["efficiency"] for c in report["mixed_candidates"]) == pytest.approx(report["efficiency"])
    assert report["efficiency"] == pytest.approx(
        report["mixed"]["tokens_per_s"] / sum(s["tokens_per_s"] for s in report["subfleets"].values()))
    assert report["goal_met"] == (report["efficiency"] >= report["goal"]) == (done.returncode == 0)
    big = report["big_example"]
    assert big["cluster"] == "a800-910b-kunlun-1024" and 0 < big["predicted_efficiency"] <= 1.0
    assert set(big["subfleet_tokens_per_s"]) == {"a800", "ascend", "kunlun"}
    assert (out / "mixed" / "plan.json").is_file()


def test_an_island_s_gap_to_its_prediction_is_spread_over_its_stage_slots():
    from hetero.bench.calibration import island_host_cost

    plan = {"predicted_step_s": 10.0, "pipelines": [{"num_micro_batches": 31, "stages": [0, 1]},
                                                   {"num_micro_batches": 15, "stages": [2]}]}
    assert island_host_cost(plan, 10.64).launch_s == pytest.approx(0.64 / 32)   # m + P - 1 of the longest
    assert island_host_cost(plan, 9.0).launch_s == 0.0                          # faster than predicted: none


def test_what_an_island_spends_after_its_compute_beyond_the_predicted_tail_is_charged_per_step():
    from hetero.bench.calibration import island_host_cost

    plan = {"predicted_step_s": 10.0, "breakdown": {"dp_reduce_and_optimizer_s": 0.05},
            "pipelines": [{"num_micro_batches": 7, "stages": [0]}]}
    cost = island_host_cost(plan, 10.64, after_compute_s=0.25)
    assert cost.optimizer_step_s == pytest.approx(0.20)                   # 0.25 after compute, 0.05 predicted
    assert cost.launch_s == pytest.approx((0.64 - 0.20) / 7)              # the rest per micro-batch
    # the planner then charges it once a step: a plan of 2 micro-batches pays 0.2 s, not 2/7 of it
    assert island_host_cost(plan, 10.64, after_compute_s=0.01).optimizer_step_s == 0.0   # within the prediction


def test_after_compute_reads_the_tail_of_the_rank_that_computes_last(tmp_path, monkeypatch):
    from hetero.bench import calibration

    ranks = [{"seconds": {"forward": 1.0, "backward": 2.0, "tail": 0.4}},
             {"seconds": {"forward": 1.2, "backward": 2.1, "tail": 0.1}}]
    monkeypatch.setattr("hetero.report.load.load_run", lambda path: path)
    monkeypatch.setattr("hetero.report.analysis.analyse", lambda run: {"ranks": ranks})
    assert calibration.after_compute(str(tmp_path)) == 0.1
    monkeypatch.setattr("hetero.report.analysis.analyse", lambda run: {"ranks": []})
    assert calibration.after_compute(str(tmp_path)) is None
    monkeypatch.undo()
    assert calibration.after_compute(str(tmp_path / "no-run-here")) is None    # no run directory: no per-step fit


def test_calibration_with_host_costs_reproduces_each_island_s_step_and_charges_more_stages_more():
    from hetero.bench.calibration import alone, calibration_profile, island_host_cost
    from hetero.bench.efficiency import candidate_plans
    from hetero.runner import search_plan

    job = _tiny_job()
    subfleets = {}
    for island in job.cluster.islands:
        plan = search_plan(alone(job, island))
        step = 1.08 * plan.predicted_step_s
        subfleets[island.name] = {
            "step_s": step, "predicted_step_s": plan.predicted_step_s,
            "host_cost": dataclasses.asdict(island_host_cost(json.loads(plan.to_json()), step)),
            "plan": {"stages": [{"tp": plan.stages[0].tp}], "micro_batch": plan.micro_batch}}
        assert subfleets[island.name]["host_cost"]["launch_s"] > 0
    profile = calibration_profile(job, subfleets)
    assert set(profile.host_costs) == {"emu-fast", "emu-slow"}
    for island in job.cluster.islands:
        assert search_plan(alone(job, island), "auto", profile).predicted_step_s == pytest.approx(
            subfleets[island.name]["step_s"], rel=0.005)
    bare = {p.kind: p.predicted_step_s for p in candidate_plans(job, "auto", None)}
    hosted = {p.kind: p.predicted_step_s for p in candidate_plans(job, "auto", profile)}
    assert all(hosted[kind] > bare[kind] for kind in bare)


def test_the_three_island_example_validates_and_plans_every_kind(hetero_cli):
    from hetero.bench.efficiency import alone, candidate_plans
    from hetero.runner import search_plan

    path = os.path.join(CONFIGS, "emulated-three.yaml")
    code, out, err = hetero_cli("validate", path)
    assert code == 0, err
    assert "6 chips" in out
    job = load_job(cluster=path, model=os.path.join(CONFIGS, "llama-tiny.yaml"),
                   train=os.path.join(CONFIGS, "train-efficiency.yaml"))
    chips = [job.cluster.chip(i.chip) for i in job.cluster.islands]
    assert len({c.name for c in chips}) == 3 and all(c.emulated for c in chips)
    assert len({c.memory_gb for c in chips}) == 3 and len({c.tflops["fp32"] for c in chips}) == 3
    for island in job.cluster.islands:      # each island alone is the anchor: it must train the model
        assert search_plan(alone(job, island)).tokens_per_s > 0
    plans = {p.kind: p for p in candidate_plans(job, "auto", None)}
    assert set(plans) == {"pipeline", "replicas", "hybrid"}      # three islands: hybrid is measured too
    assert len(plans["hybrid"].pipelines) >= 2
    assert {s.island for s in plans["replicas"].stages} == {"fast", "mid", "big"}
    assert sum(p.samples for p in plans["replicas"].pipelines) == 64
