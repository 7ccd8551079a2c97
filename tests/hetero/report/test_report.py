"""`hetero report` on a recorded run directory (tests/fixtures/report-run, hand-made).

The fixture is a two-stage 1F1B run, one chip per stage (slow: layers 0-2, fast:
layers 2-8 and the head), two micro-batches of one sample, two steps: step 1 is
warm-up (1.5 s), step 2 the steady one (1.1 s). Within each step (seconds from
its start):

  slow (rank 1): F0 0.00-0.10 | F1 0.10-0.20 | B0 waits 0.20-0.64 (grad handed over
                 at 0.61) then 0.20 | B1 waits 0.84-0.99 (handed 0.96) then 0.08
  fast (rank 0): F0 waits 0.00-0.12 (handed 0.09) then 0.20 | B0 0.30 | F1 0.20 | B1 0.15

Peak memory per stage (GB): predicted 0.006 and 0.013 (plan.json); measured 0.0055 and 0.0121
in step 1, 0.0058 and 0.0124 in step 2.
"""

import json
import os
import shutil

import pytest

from hetero.errors import UserError
from hetero.report import analysis, build, load_run, timeline
from tests.conftest import FIXTURES

FIXTURE = os.path.join(FIXTURES, "report-run")

# llama-tiny by hand: N = s = 64 tokens, h = 128, h_kv = 64, f = 352, V = 1024.
LAYER_FWD = 2 * 64 * 128 * (128 + 2 * 64) + 4 * 64 * 64 * 128 + 2 * 64 * 128 * 128 + 6 * 64 * 128 * 352
HEAD_FWD = 2 * 64 * 128 * 1024
SAMPLES = 2
SLOW_FLOPS = SAMPLES * 3 * 2 * LAYER_FWD                 # 2 layers, forward + backward
FAST_FLOPS = SAMPLES * 3 * (6 * LAYER_FWD + HEAD_FWD)    # 6 layers and the LM head
STEP = 1.1


@pytest.fixture
def run_copy(tmp_path):
    path = tmp_path / "run"
    shutil.copytree(FIXTURE, path)
    return path


def test_mfu_and_step_time_match_hand_calculation():
    report = analysis.analyse(load_run(FIXTURE))
    assert report["measured_step_s"] == pytest.approx(STEP)            # warm-up step 1 left out
    assert report["ratio"] == pytest.approx(STEP / 1.0)
    assert report["tokens_per_s"] == pytest.approx(2 * 64 / STEP)
    slow, fast = report["mfu"]["fixture-slow"], report["mfu"]["fixture-fast"]
    assert slow["flops_per_step"] == pytest.approx(SLOW_FLOPS)
    assert fast["flops_per_step"] == pytest.approx(FAST_FLOPS)
    assert slow["mfu"] == pytest.approx(SLOW_FLOPS / (STEP * 0.8e9))
    assert fast["mfu"] == pytest.approx(FAST_FLOPS / (STEP * 2e9))
    assert fast["achieved_tflops"] == pytest.approx(FAST_FLOPS / STEP / 1e12)
    assert slow["emulated"] and fast["emulated"] and report["emulated"]
    assert report["notes"] == []


def test_bubble_and_exposed_bridge_match_hand_calculation():
    report = analysis.analyse(load_run(FIXTURE))
    rows = {row["rank"]: row["seconds"] for row in report["ranks"]}
    # slow: exposed bridge 0.64-0.61 and 0.99-0.96; waits 0.44 and 0.15 in all; tail 1.1 - 0.48 - 0.59.
    assert rows[1] == pytest.approx({"forward": 0.2, "backward": 0.28, "bridge": 0.06, "wait": 0.53, "tail": 0.03})
    # fast: F0 waited 0.12 of which 0.03 after the hand-over; tail 1.1 - 0.85 - 0.12.
    assert rows[0] == pytest.approx({"forward": 0.4, "backward": 0.45, "bridge": 0.03, "wait": 0.09, "tail": 0.13})
    assert report["bubble_share"] == pytest.approx((0.53 + 0.03 + 0.09 + 0.13) / (2 * STEP))
    assert report["predicted_bubble_share"] == pytest.approx(1 - (2 * 0.4 + 2 * 0.45) / 2 / 1.0)
    assert report["exposed_bridge_s"] == pytest.approx(0.06)             # the worst receiving rank
    assert report["exposed_bridge_share"] == pytest.approx(0.06 / STEP)
    assert sum(report["time_split"].values()) == pytest.approx(1.0)


def test_exposed_communication_matches_hand_calculation():
    comm = analysis.analyse(load_run(FIXTURE))["exposed_comm"]
    # slow (rank 1): bridge receives 0.03 + 0.03, its two forwards handed over in their last 0.01 each;
    # fast (rank 0): bridge 0.03 (F0), its two backwards' hand-overs 0.01 each.
    assert comm["rank"] == 1 and comm["s"] == pytest.approx(0.08) and comm["share"] == pytest.approx(0.08 / STEP)
    assert comm["parts"] == pytest.approx({"bridge_recv": 0.06 / STEP, "p2p_recv": 0.0, "send": 0.02 / STEP})
    assert comm["mean_share"] == pytest.approx((0.08 + 0.05) / 2 / STEP)
    assert comm["reduce_share"] is None          # the fixture's steps do not time their reductions


def test_timeline_agrees_with_bench_runtime():
    from hetero.bench.runtime import exposed_bridge_per_step

    run = load_run(FIXTURE)
    per_rank = timeline.breakdown(run.plan, run.ranks, run.steps)
    for step, worst in exposed_bridge_per_step(FIXTURE, run.plan).items():
        assert max(cells[step]["bridge"] for cells in per_rank.values()) == pytest.approx(worst)
    parts = timeline.segments(run.plan, run.ranks, 2, 1001.5, STEP)
    assert ("bridge", pytest.approx(0.61), pytest.approx(0.03)) in parts[1]
    assert sum(width for _, _, width in parts[1]) == pytest.approx(STEP)


def test_report_writes_self_contained_html(hetero_cli, tmp_path):
    out = tmp_path / "page" / "report.html"
    code, stdout, stderr = hetero_cli("report", FIXTURE, "--out", str(out))
    assert code == 0, stderr
    page = out.read_text()
    assert page.count("src='data:image/png;base64,") == 6
    assert "EMULATED" in page and "1.100 s" in page and "35.0%" in page and "46.6%" in page
    assert "Efficiency" not in page
    for name in ("where_time_went", "timeline", "step_times", "mfu", "memory", "loss"):
        assert (tmp_path / "page" / f"report-{name}.png").read_bytes().startswith(b"\x89PNG")
    lines = stdout.strip().splitlines()
    assert 5 <= len(lines) <= 8 and str(out) in lines[-1]
    assert not os.path.exists(os.path.join(FIXTURE, "report.html"))


def _rewrite_steps(run_dir, change) -> None:
    steps = run_dir / "metrics" / "steps.jsonl"
    records = [json.loads(line) for line in steps.read_text().splitlines()]
    steps.write_text("".join(json.dumps(change(r)) + "\n" for r in records))


def test_measured_peak_memory_beside_predicted(hetero_cli, tmp_path):
    report = analysis.analyse(load_run(FIXTURE))
    slow, fast = report["memory"]
    assert (slow["predicted_gb"], slow["measured_gb"]) == (0.006, 0.0058)     # the larger of the two steps
    assert (fast["predicted_gb"], fast["measured_gb"]) == (0.013, 0.0124)
    assert fast["measured_over_predicted"] == pytest.approx(0.0124 / 0.013)
    code, stdout, stderr = hetero_cli("report", FIXTURE, "--json", "--out", str(tmp_path / "r.html"))
    assert code == 0, stderr
    assert [(m["predicted_gb"], m["measured_gb"]) for m in json.loads(stdout)["memory"]] == [(0.006, 0.0058),
                                                                                            (0.013, 0.0124)]
    page = (tmp_path / "r.html").read_text()
    assert "measured peak GB per chip" in page and "<td>0.006</td><td>0.0058</td><td>×0.97</td>" in page
    assert "<td>0.013</td><td>0.0124</td><td>×0.95</td>" in page


def test_a_run_recorded_before_peak_memory_still_reports(run_copy):
    _rewrite_steps(run_copy, lambda r: {k: v for k, v in r.items() if k != "peak_memory_gb"})
    report, out = build(str(run_copy))
    assert [m["measured_gb"] for m in report["memory"]] == [None, None]
    assert any("no measured peak memory" in note for note in report["notes"])
    assert "not measured" in open(out).read()


def test_a_stage_its_chips_cannot_measure_is_not_measured(run_copy):
    _rewrite_steps(run_copy, lambda r: dict(r, peak_memory_gb=[None, r["peak_memory_gb"][1]]))
    slow, fast = analysis.analyse(load_run(str(run_copy)))["memory"]
    assert slow["measured_gb"] is None and slow["measured_over_predicted"] is None
    assert fast["measured_gb"] == 0.0124


@pytest.mark.parametrize("peaks, message", [
    ([0.005], "peak_memory_gb: expected 2 entries (one per plan stage), got 1"),
    ([0.005, -1.0], "peak_memory_gb: [1]: expected a number >= 0, got -1.0"),
    ("0.005", "peak_memory_gb: expected a list of numbers or null"),
])
def test_bad_peak_memory_is_named(hetero_cli, run_copy, peaks, message):
    _rewrite_steps(run_copy, lambda r: dict(r, peak_memory_gb=peaks))
    code, _, stderr = hetero_cli("report", str(run_copy))
    assert code == 2 and "steps.jsonl" in stderr and message in stderr, stderr


def _efficiency_out(tmp_path) -> str:
    out = tmp_path / "bench"
    shutil.copytree(FIXTURE, out / "mixed")
    (out / "efficiency.json").write_text(json.dumps({
        "efficiency": 0.8, "predicted_efficiency": 0.9,
        "mixed": {"tokens_per_s": 300.0, "plan": {"provenance": {"label": "mixed plan"}}, "run_dir": str(out / "mixed")},
        "subfleets": {"fast": {"tokens_per_s": 250.0, "plan": "fast alone", "run_dir": "x"},
                      "slow": {"tokens_per_s": 125.0, "plan": "slow alone", "run_dir": "y"}}}))
    return str(out)


@pytest.mark.parametrize("where", ["top", "mixed"])
def test_efficiency_from_bench_output(hetero_cli, tmp_path, where):
    out = _efficiency_out(tmp_path)
    target = out if where == "top" else os.path.join(out, "mixed")
    code, stdout, stderr = hetero_cli("report", target, "--json")
    assert code == 0, stderr
    numbers = json.loads(stdout)
    assert numbers["efficiency"]["efficiency"] == pytest.approx(300 / (250 + 125))
    assert numbers["efficiency"]["subfleet_sum_tokens_per_s"] == pytest.approx(375)
    assert numbers["run_dir"] == os.path.join(out, "mixed")
    page = open(numbers["html"]).read()
    assert "Efficiency E = 0.800" in page and page.count("data:image/png;base64,") == 7


def test_catalog_drift_uses_the_run_s_peak(run_copy):
    cluster = (run_copy / "cluster.yaml").read_text().replace("fp32: 0.0008", "fp32: 0.0006")
    (run_copy / "cluster.yaml").write_text(cluster)
    report = analysis.analyse(load_run(str(run_copy)))
    assert report["mfu"]["fixture-slow"]["mfu"] == pytest.approx(SLOW_FLOPS / (STEP * 0.8e9))
    assert any("fixture-slow" in note for note in report["notes"])


def test_a_dilated_run_says_its_times_are_chip_time(run_copy):
    steps = run_copy / "metrics" / "steps.jsonl"
    records = [json.loads(line) for line in steps.read_text().splitlines()]
    steps.write_text("".join(json.dumps(dict(r, time_dilation=2.0)) + "\n" for r in records))
    report = analysis.analyse(load_run(str(run_copy)))
    assert report["measured_step_s"] == pytest.approx(STEP)   # recorded in chip time already
    assert any("time-dilated (x2 wall seconds per chip second)" in note for note in report["notes"])
    assert not any("dilated" in note for note in analysis.analyse(load_run(FIXTURE))["notes"])


def _remove(path):
    os.remove(path)


def _garble(path):
    with open(path, "a") as handle:
        handle.write('{"step": 3, "loss": \n')


def _truncate_fields(path):
    with open(path, "w") as handle:
        handle.write('{"step": 1}\n')


@pytest.mark.parametrize("relative, damage", [
    ("plan.json", _remove), ("plan.json", _truncate_fields),
    ("metrics/steps.jsonl", _remove), ("metrics/steps.jsonl", _garble), ("metrics/steps.jsonl", _truncate_fields),
    ("metrics/rank00001.jsonl", _remove), ("metrics/rank00001.jsonl", _garble),
    ("model.yaml", _remove),
])
def test_bad_file_is_named(hetero_cli, run_copy, relative, damage):
    path = os.path.join(run_copy, relative)
    damage(path)
    code, stdout, stderr = hetero_cli("report", str(run_copy))
    assert code == 2
    assert stderr.startswith("hetero report: error: ") and path in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_corrupt_plan_json_and_efficiency(run_copy, tmp_path):
    (run_copy / "plan.json").write_text("{not json")
    with pytest.raises(UserError, match="plan.json: not valid JSON"):
        load_run(str(run_copy))
    out = _efficiency_out(tmp_path)
    with open(os.path.join(out, "efficiency.json"), "w") as handle:
        handle.write(json.dumps({"mixed": {"tokens_per_s": "fast"}, "subfleets": {}}))
    with pytest.raises(UserError, match="efficiency.json"):
        analysis.analyse(load_run(out))


def test_missing_run_dir(hetero_cli, tmp_path):
    code, _, stderr = hetero_cli("report", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere: no such run directory" in stderr
