"""`hetero bench planner`'s per-fleet row: search time, tokens/s, the islands' sum and the ratio."""

from __future__ import annotations

import os

import pytest

from hetero.bench import planner
from hetero.config import load_job
from hetero.planning import plan_job
from partitioner.search import search


def a800_910b_7b():
    """Llama 2 7B on the 32-chip A800 + Ascend example: a fleet the search plans in a second."""
    cfg = planner.CONFIGS
    return load_job(cluster=os.path.join(cfg, "a800-910b-32.yaml"), model=os.path.join(cfg, "llama2-7b.yaml"),
                    train=os.path.join(cfg, "train-llama2.yaml"))


def test_fleet_row_reports_the_ratio_to_the_islands_and_the_goals():
    job = a800_910b_7b()
    row = planner.fleet_row(plan_job(job, top=2))
    alone = row["islands_alone_tokens_per_s"]
    assert set(alone) == {"a800", "ascend", "sum"}
    assert row["ratio_vs_islands"] == pytest.approx(row["tokens_per_s"] / alone["sum"])
    assert 0 < row["ratio_vs_islands"] <= 1.0      # each island alone gets the whole batch: a ceiling
    assert row["ratio_ok"] == (row["ratio_vs_islands"] >= planner.RATIO_GOAL)
    assert row["meets_lower_bounds"] and row["stats"]["pp_evaluated"] >= 1
    line = planner.fleet_line({**row, "search_cpu_s": 0.5})
    assert "islands alone sum" in line and f"ratio {row['ratio_vs_islands']:.3f}" in line and "0.50 s of CPU" in line
    assert row["kind"] in ("pipeline", "replicas", "hybrid") and f"{row['kind']} plan won: {row['plan']}" in line


def test_brute_force_cases_include_one_a_hybrid_plan_wins():
    names = [name for name, *_ in planner.small_cases(quick=True)]
    assert any("hold it only together" in name for name in names)
    name, fleet, model, train = next(c for c in planner.small_cases(quick=True) if "together" in c[0])
    assert len(fleet.islands) == 3 and fleet.total_chips <= 16
    assert search(fleet, model, train).best.kind == "hybrid", name


def test_the_bench_plans_both_fleets_of_issue_20():
    clusters = {cluster for _key, cluster, _train in planner.FLEETS}
    assert clusters == {"a800-910b-kunlun-1024.yaml", "mixed-8192.yaml"}
    for _key, cluster, train in planner.FLEETS:
        job = load_job(cluster=os.path.join(planner.CONFIGS, cluster), train=os.path.join(planner.CONFIGS, train))
        assert job.cluster.total_chips in (1024, 8192)
    assert job.train.global_batch == 4096 and job.cluster.total_chips == 8192
    assert {i.chip for i in job.cluster.islands} == {"A800-80G", "H100-SXM", "Ascend-910B", "Kunlun-P800"}


def test_interleaving_row_searches_the_same_fleet_with_chunks():
    job = a800_910b_7b()
    plain = plan_job(job, top=2)
    row = planner.interleaving_row(job, plain)
    assert row["max_virtual_stages"] == planner.INTERLEAVE_V
    assert row["ratio_vs_islands"] == pytest.approx(row["tokens_per_s"] / row["islands_alone_tokens_per_s"]["sum"])
    assert row["tokens_per_s"] >= plain.best.tokens_per_s * (1 - 1e-9)     # a wider space never loses
    assert row["meets_lower_bounds"] and all(1 <= v <= planner.INTERLEAVE_V for v in row["virtual_stages"])
    assert f"ratio {row['ratio_vs_islands']:.3f}" in planner.interleaving_line(row)


def test_gap_rows_say_where_the_ratio_goes():
    job = a800_910b_7b()
    result = plan_job(job, top=2)
    rows = planner.gap_rows(result)
    assert {r["island"] for r in rows} == {"a800", "ascend"}
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    for r in rows:
        assert 0 < r["tail_s"] <= r["fixed_s"] < r["step_s"]
        assert r["at_alone_rate_s"] > 0 and "fixed per step" in planner.gap_line(r)


def test_homogeneous_row_plans_the_fleet_with_one_chip_everywhere():
    job = a800_910b_7b()
    mixed = plan_job(job, top=2)
    row = planner.homogeneous_row(job, mixed)
    fastest = min(mixed.islands_alone, key=lambda name: mixed.islands_alone[name].step)
    assert row["chip"] == next(i.chip for i in job.cluster.islands if i.name == fastest)
    alone = row["islands_alone_tokens_per_s"]
    assert set(alone) == {"a800", "ascend", "sum"}
    assert alone["a800"] == pytest.approx(alone["ascend"])      # the same chip everywhere: equal islands
    assert row["ratio_vs_islands"] == pytest.approx(row["tokens_per_s"] / alone["sum"])
    assert f"ratio {row['ratio_vs_islands']:.3f}" in planner.homogeneous_line(row)
