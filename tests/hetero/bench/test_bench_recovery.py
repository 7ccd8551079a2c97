"""hetero bench recovery's numbers from a scenario's events and step records, and its lines beside
torchft's published anchor (the scenarios themselves: tests/hetero/launch/test_elastic.py, tests/hetero/launch/test_hang.py)."""

from hetero.bench import recovery


def _events(fault_at: float) -> list[dict]:
    return [{"time": fault_at - 20, "event": "start", "attempt": 0},
            {"time": fault_at + 4.5, "event": "failure", "attempt": 0, "reason": "rank 2 ...", "restart": True},
            {"time": fault_at + 9.0, "event": "replan", "attempt": 1, "from_step": 2, "lost": ["127.0.0.3"]},
            {"time": fault_at + 9.5, "event": "start", "attempt": 1}]


def test_timings_measure_from_the_fault_and_count_the_steps_trained_again():
    fault_at = 1000.0
    records = [{"step": s, "time": fault_at - 10 + s} for s in (1, 2, 3, 4)]          # before the fault
    records += [{"step": 3, "time": fault_at + 21.0}, {"step": 4, "time": fault_at + 22.0}]
    got = recovery.timings(_events(fault_at), records, fault_at, last_step_before=4)
    assert got["detection_s"] == 4.5 and got["replan_s"] == 9.0
    assert got["first_step_s"] == 21.0 and got["first_step_after_detection_s"] == 16.5
    assert got["resumed_from_step"] == 2 and got["steps_lost"] == 2 and got["steps_done"] == 4


def test_a_scenario_without_a_resume_is_not_ok():
    got = recovery.timings(_events(1000.0)[:2], [{"step": 1, "time": 990.0}], 1000.0, 1)
    assert got["ok"] is False and "no failure and resume" in got["error"]


def test_lines_put_the_published_anchor_beside_the_measured_numbers():
    scenario = {"ok": True, "detection_s": 4.5, "replan_s": 9.0, "first_step_s": 21.0,
                "first_step_after_detection_s": 16.5, "steps_lost": 1, "steps_done": recovery.STEPS}
    result = {"scenarios": {"node": scenario, "stop": dict(scenario, replan_s=None)}, "anchor": recovery.ANCHOR}
    text = "\n".join(recovery.lines(result))
    assert "torchft (published, not measured here): 100 ms heartbeats, 5 s timeout" in text
    assert "node SIGKILLed (127.0.0.3, every process): detected after 4.5 s, re-planned after 9.0 s" in text
    assert "worker SIGSTOPped: detected after 4.5 s, first step after resume 21.0 s" in text
