"""events.jsonl: written one whole line per event, read back skipping what is malformed, and
listed and marked on the step-time and loss charts by `hetero report` (on the hand-made
two-step run in tests/fixtures/report-run: step 1 ends at 1001.5, step 2 at 1002.6)."""

import json
import os
import shutil

import matplotlib.pyplot as plt

from hetero.launch import events
from hetero.report import analysis, build, figures, summary_lines
from hetero.report.load import load_run
from tests.conftest import FIXTURES

FIXTURE = os.path.join(FIXTURES, "report-run")
HANG = {"time": 1002.0, "event": "hang", "attempt": 0, "rank": 1, "island": "slow", "host": "127.0.0.1",
        "phase": "bridge receive", "stalled_s": 61.2, "step": 2, "micro_batch": 0, "pid": 4242,
        "stacks": "stacks/attempt_0/rank00001.txt", "silent": True}


def _run_with_events(tmp_path, lines):
    path = tmp_path / "run"
    shutil.copytree(FIXTURE, path)
    (path / "events.jsonl").write_text("".join(line + "\n" for line in lines))
    return path


def test_record_appends_whole_lines_and_read_skips_malformed(tmp_path):
    first = events.record(str(tmp_path), "start", attempt=0, hang_timeout_s=60.0, rejoin_timeout_s=None)
    events.record(str(tmp_path), "restart", attempt=1, from_step=4)
    with open(events.events_path(str(tmp_path)), "a") as handle:
        handle.write('{"event": "hang"}\nnot json\n[1, 2]\n{"time": 5, "event": "resu')   # no time; junk; torn
    found = events.read(str(tmp_path))
    assert [e["event"] for e in found] == ["start", "restart"]
    assert found[0] == first and isinstance(first["time"], float)
    assert found[1]["from_step"] == 4
    assert events.read(str(tmp_path / "absent")) == []
    assert events.record(None, "hang", rank=1)["rank"] == 1          # no run directory: nothing written


def test_report_lists_the_events_and_places_them_between_steps(tmp_path):
    failure = {"time": 1002.1, "event": "failure", "attempt": 0, "reason": "rank 1 hung", "restart": True}
    restart = {"time": 1002.2, "event": "restart", "attempt": 1, "from_step": 0}
    late = {"time": 1003.0, "event": "resume", "from_step": 2, "steps": 4, "replanned": False}
    path = _run_with_events(tmp_path, [json.dumps(e) for e in (HANG, failure, restart, late)] + ["garbage"])
    report, out = build(str(path))
    placed = report["events"]
    assert [e["event"] for e in placed] == ["hang", "failure", "restart", "resume"]
    assert [e["at_step"] for e in placed] == [1.5, 1.5, 1.5, 2.5]      # after step 1; the resume after step 2
    assert placed[0]["text"] == ("rank 1 (island slow, host 127.0.0.1) hung in bridge receive for 61 s; "
                                 "stacks stacks/attempt_0/rank00001.txt")
    lines = summary_lines(report)
    assert "  events      hang 1, failure 1, restart 1, resume 1" in lines
    assert any(line.strip().startswith("hang") and "hung in bridge receive" in line for line in lines)
    page = open(out).read()
    assert "<h2>Events: 4</h2>" in page and "hung in bridge receive for 61 s" in page
    assert "restart 1 from step 0" in page


def test_a_run_without_events_reports_as_before(tmp_path):
    path = tmp_path / "run"
    shutil.copytree(FIXTURE, path)
    report, out = build(str(path))
    assert report["events"] == []
    assert not any(line.startswith("  events") for line in summary_lines(report))
    assert "<h2>Events: 0</h2>" in open(out).read()


def test_charts_mark_each_event_worth_marking_once_per_line(tmp_path):
    start = {"time": 1000.0, "event": "start", "attempt": 0, "hang_timeout_s": 60.0}
    path = _run_with_events(tmp_path, [json.dumps(start), json.dumps(HANG)])
    placed = analysis.placed_events(load_run(str(path)))
    fig, ax = plt.subplots()
    try:
        assert figures.mark_events(ax, placed) == 1                   # the hang; `start` is listed, not drawn
        assert [line.get_xdata()[0] for line in ax.get_lines()] == [1.5]
        assert ax.get_lines()[0].get_label() == "hang"
    finally:
        plt.close(fig)
