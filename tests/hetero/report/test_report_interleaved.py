"""`hetero report` on an interleaved 1F1B run (plan virtual_stages 2) beside the same plan run plain.

The run directories are synthesised: the report fixture's two-stage plan (slow island: layers 0-2,
fast: 2-8; every hop crosses the bridge), as recorded (v = 1) and re-cut by
partitioner.plan.interleaved(plan, 2), each stage's 1F1B actions laid out in the engine's own
order (partitioner.interleave.chunk_order), each action as early as its input allows, and written
as the engine writes its timing lines (hetero.engine.metrics.MetricsRecorder.action: a `chunk`
only when interleaved). The expected numbers come from that layout, not from the report's code.
"""

import glob
import json
import os
import shutil

import pytest

from hetero.report import analysis, build, load_run, summary_lines, timeline
from partitioner.interleave import chunk_order
from partitioner.plan import Plan, interleaved
from tests.conftest import FIXTURES

FIXTURE = os.path.join(FIXTURES, "report-run")
FORWARD = {"slow": 0.2, "fast": 0.3}     # a stage's forward of one micro-batch (all its chunks), s
BACKWARD = {"slow": 0.4, "fast": 0.6}
HOP, SEND, TAIL = 0.02, 0.01, 0.05        # bridge transfer, handing over (inside compute), step tail
REDUCE = 0.03                             # rank 0's gradient reduction after its compute (in the tail)
STEPS = 2


def lay_out(plan: dict) -> tuple[dict, float, dict]:
    """({rank: [line]}, makespan, {rank: (compute, exposed bridge, exposed comm)}) of one step from 0."""
    pipeline = plan["pipelines"][0]
    stages, v, m = pipeline["stages"], pipeline.get("virtual_stages", 1), pipeline["num_micro_batches"]
    p = len(stages)
    island = {s["index"]: s["island"] for s in plan["stages"]}
    rank_of = {r["stage"]: r["rank"] for r in plan["ranks"]}
    orders = [chunk_order(p, s, v, m) for s in range(p)]
    done: dict = {}                               # (kind, virtual stage, mb) -> (finish, sent_at)
    free, nxt = [0.0] * p, [0] * p
    lines: dict = {rank_of[s]: [] for s in stages}
    totals = {rank_of[s]: [0.0, 0.0, 0.0] for s in stages}
    while any(nxt[s] < len(orders[s]) for s in range(p)):
        for s in range(p):
            while nxt[s] < len(orders[s]):
                kind, chunk, mb = orders[s][nxt[s]]
                g = chunk * p + s
                dep = ("F", g - 1, mb) if kind == "F" and g > 0 else ("B", g + 1, mb) if kind == "B" and g < p * v - 1 else None
                if (dep and dep not in done) or (kind == "B" and ("F", g, mb) not in done):
                    break
                posted = free[s]
                handed = done[dep][1] if dep else None
                received = max(posted, handed + HOP) if dep else posted
                name = island[stages[s]]
                compute = (FORWARD if kind == "F" else BACKWARD)[name] / v
                finish = received + compute
                sends = (kind == "F" and g < p * v - 1) or (kind == "B" and g > 0)
                sent_at = finish - SEND if sends else None
                done[(kind, g, mb)] = (finish, sent_at)
                free[s] = finish
                rank = rank_of[stages[s]]
                bridge = received - max(handed, posted) if dep else 0.0
                totals[rank][0] += compute
                totals[rank][1] += bridge
                totals[rank][2] += bridge + (SEND if sends else 0.0)
                lines[rank].append({"mb": mb, "phase": "forward" if kind == "F" else "backward", "compute_s": compute,
                                    "p2p_wait_s": received - posted, "posted_at": posted, "received_at": received,
                                    "sent_at": sent_at, "recv_link": "bridge" if dep else None,
                                    **({"chunk": chunk} if v > 1 else {})})
                nxt[s] += 1
    return lines, max(free), totals


def record(tmp_path, name: str, plan: dict) -> tuple[str, float, dict]:
    """A run directory for `plan` (the fixture's configs); (path, step time, per-rank totals)."""
    run_dir = tmp_path / name
    shutil.copytree(FIXTURE, run_dir)
    (run_dir / "plan.json").write_text(json.dumps(plan))
    lines, makespan, totals = lay_out(plan)
    step_s = makespan + TAIL
    start = 1000.0
    steps = []
    for step in range(1, STEPS + 1):
        for rank, records in lines.items():
            path = run_dir / "metrics" / f"rank{rank:05d}.jsonl"
            shift = ("posted_at", "received_at", "sent_at")
            with path.open("w" if step == 1 else "a") as handle:
                for line in records:
                    moved = {k: (line[k] + start if k in shift and line[k] is not None else line[k]) for k in line}
                    handle.write(json.dumps({"step": step, **moved}) + "\n")
        start += step_s
        steps.append({"step": step, "loss": 6.9, "tokens_per_s": 128 / step_s, "step_s": step_s, "time": start,
                      "dp_reduce_exposed_s": REDUCE, "cross_island_reduce_s": 0.0})
    (run_dir / "metrics" / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    return str(run_dir), step_s, totals


@pytest.fixture
def runs(tmp_path):
    plan = load_run(FIXTURE).plan
    twice = interleaved(Plan.from_dict(plan), 2).to_dict()
    return record(tmp_path, "plain", plan), record(tmp_path, "interleaved", twice)


def expected_bubble(step_s: float, totals: dict) -> float:
    return sum(step_s - compute - bridge for compute, bridge, _ in totals.values()) / (len(totals) * step_s)


def test_interleaved_bubble_counts_every_chunk(runs):
    (plain_dir, plain_s, plain_totals), (twice_dir, twice_s, twice_totals) = runs
    plain, twice = analysis.analyse(load_run(plain_dir)), analysis.analyse(load_run(twice_dir))
    assert plain["bubble_share"] == pytest.approx(expected_bubble(plain_s, plain_totals))
    assert twice["bubble_share"] == pytest.approx(expected_bubble(twice_s, twice_totals))
    assert twice["bubble_share"] < plain["bubble_share"]            # what interleaving is for
    run = load_run(twice_dir)
    assert sum(len(records) for records in run.ranks.values()) == STEPS * 2 * 2 * 2 * 2   # ranks x v x m x F/B
    # The same layers per stage: the same model FLOPs, whatever the chunks' span.
    assert {c: v["flops_per_step"] for c, v in twice["mfu"].items()} == pytest.approx(
        {c: v["flops_per_step"] for c, v in plain["mfu"].items()})


def test_interleaved_exposed_transfer_pairs_chunks(runs):
    for run_dir, step_s, totals in runs:
        report = analysis.analyse(load_run(run_dir))
        rows = {row["rank"]: row["seconds"] for row in report["ranks"]}
        for rank, (compute, bridge, _) in totals.items():
            assert rows[rank]["bridge"] == pytest.approx(bridge)
            assert rows[rank]["forward"] + rows[rank]["backward"] == pytest.approx(compute)
        worst = max(comm for _, _, comm in totals.values())
        assert report["exposed_comm"]["s"] == pytest.approx(worst)
        assert report["exposed_comm"]["share"] == pytest.approx(worst / step_s)
        assert report["exposed_comm"]["reduce_share"] == pytest.approx(REDUCE / step_s)
        run = load_run(run_dir)
        parts = timeline.segments(run.plan, run.ranks, 2, run.steps[1]["time"] - step_s, step_s)
        for segments in parts.values():
            assert sum(width for _, _, width in segments) == pytest.approx(step_s)


def test_interleaved_report_page(runs, tmp_path):
    twice_dir = runs[1][0]
    report, out = build(twice_dir, str(tmp_path / "page.html"))
    lines = summary_lines(report)
    assert any(line.strip().startswith("comm") and "of the step exposed" in line for line in lines)
    assert "exposed communication" in open(out, encoding="utf-8").read()


def test_native_p2p_waits_count_as_exposed_p2p(runs):
    run_dir, step_s, totals = runs[1]
    for path in glob.glob(os.path.join(run_dir, "metrics", "rank*.jsonl")):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text.replace('"recv_link": "bridge"', '"recv_link": "native"'))
    comm = analysis.analyse(load_run(run_dir))["exposed_comm"]
    worst = max(totals.values(), key=lambda t: t[2])
    assert comm["parts"] == pytest.approx({"bridge_recv": 0.0, "p2p_recv": worst[1] / step_s,
                                           "send": (worst[2] - worst[1]) / step_s})
