"""`hetero report` on a hybrid run (tests/fixtures/report-hybrid-run, recorded).

The fixture is `hetero run --kind hybrid --steps 3` on configs/emulated-three.yaml with
llama-tiny and train-tiny (checkpoints, logs and the bridge/coordinator counters left out):
the planner's plan is two pipelines, mid (layers 0-2) -> fast (layers 3-7) on 6 samples
(3 micro-batches of one, DP 2) beside big (every layer) on 2 samples (1 micro-batch, DP 2),
their gradients summed over the bridge. Its plan predicts 1.329 s per step; the run measured
2.06, 2.01 and 1.94 s.

The predicted bubble is the rank-time idle the plan implies, the quantity the measured bubble
is: each rank is busy its own pipeline's micro-batches x its stage time, and idle the rest of
the predicted step (waiting for its neighbours, or for the other pipeline at the gradient sum).
"""

import os

import pytest

from hetero.report import analysis, build, load_run, summary_lines
from tests.conftest import FIXTURES

FIXTURE = os.path.join(FIXTURES, "report-hybrid-run")

# plan.json: stage time_s (one micro-batch, forward + backward) and the predicted step
MID, FAST, BIG = 0.26933657599999994, 0.337608704, 1.0343328426666667
STEP = 1.3292467839999997


@pytest.fixture(scope="module")
def report():
    return analysis.analyse(load_run(FIXTURE))


def test_predicted_bubble_weighs_each_rank_by_its_own_pipeline(report):
    # two ranks per stage; pipeline 0 runs 3 micro-batches, pipeline 1 one
    busy = (2 * 3 * MID + 2 * 3 * FAST + 2 * 1 * BIG) / 6
    assert report["predicted_bubble_share"] == pytest.approx(1 - busy / STEP)     # 0.284
    assert 0.25 < report["predicted_bubble_share"] < 0.3
    # not the first pipeline's micro-batch count for every rank (the plan's top-level
    # num_micro_batches): that would make big's ranks busy 3 x 1.03 s in a 1.33 s step
    assert report["predicted_bubble_share"] > 0 > 1 - (2 * 3 * (MID + FAST + BIG)) / 6 / STEP
    line = next(line for line in summary_lines({**report, "html": "r.html"}) if "bubble" in line)
    assert "(predicted 28.4%)" in line


def test_every_rank_of_both_pipelines_is_read(report):
    rows = {row["rank"]: row for row in report["ranks"]}
    assert sorted(rows) == list(range(6))
    assert {row["stage"] for row in rows.values()} == {0, 1, 2}
    assert rows[2]["predicted_compute_s"] == pytest.approx(3 * MID)
    assert rows[0]["predicted_compute_s"] == pytest.approx(3 * FAST)
    assert rows[4]["predicted_compute_s"] == pytest.approx(BIG)
    # big's pipeline has no neighbour to wait for: its idle is the tail, waiting for the
    # first pipeline at the gradient sum
    for rank in (4, 5):
        seconds = rows[rank]["seconds"]
        assert seconds["wait"] < 0.01 and seconds["tail"] > 0.5
    assert report["measured_step_s"] == pytest.approx((2.009086070000194 + 1.9417859889999818) / 2)
    assert report["predicted_bubble_share"] < report["bubble_share"] < 0.6
    assert sorted(report["mfu"]) == ["emu-big-60mb", "emu-fast-40mb", "emu-mid-30mb"]
    assert [row["stage"] for row in report["memory"]] == [0, 1, 2]


def test_page_shows_both_pipelines_and_the_predicted_bubble(tmp_path):
    report, html = build(FIXTURE, out=str(tmp_path / "report.html"))
    text = open(html, encoding="utf-8").read()
    assert "predicted 28.4%" in text
    assert all(island in text for island in ("mid", "fast", "big"))
    assert report["plan_label"].startswith("hybrid [mid(tp1 x1) -> fast(tp1 x1), dp 2, 6 samples] + [big")
