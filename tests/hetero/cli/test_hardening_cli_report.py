"""`hetero report` on damaged run directories: one line naming the file, the line and the field,
exit 2, never a traceback; and the refusals a run counted (coordinator, bridge) on the page and in
--json. Each case copies the hand-made run tests/fixtures/report-run and changes one thing."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from tests.conftest import FIXTURES

FIXTURE = os.path.join(FIXTURES, "report-run")
STEPS = os.path.join("metrics", "steps.jsonl")
RANK1 = os.path.join("metrics", "rank00001.jsonl")


@pytest.fixture
def run_copy(tmp_path):
    path = tmp_path / "run"
    shutil.copytree(FIXTURE, path)
    return path


def _edit_record(relative: str, line: int, **changes):
    """Set fields of one JSONL record (1-based line); a value of ... deletes the field."""
    def damage(run):
        path = os.path.join(run, relative)
        with open(path, encoding="utf-8") as handle:
            records = [json.loads(text) for text in handle]
        for key, value in changes.items():
            if value is ...:
                del records[line - 1][key]
            else:
                records[line - 1][key] = value
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in records))   # NaN is written as NaN
    return damage


def _edit_plan(*edits):
    """Set fields of plan.json; each edit is (path tuple, value)."""
    def damage(run):
        path = os.path.join(run, "plan.json")
        with open(path, encoding="utf-8") as handle:
            plan = json.load(handle)
        for keys, value in edits:
            target = plan
            for key in keys[:-1]:
                target = target[key]
            target[keys[-1]] = value
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(plan, handle)
    return damage


def _write(relative: str, content):
    def damage(run):
        path = os.path.join(run, relative)
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(path, mode) as handle:
            handle.write(content)
    return damage


def _truncate(relative: str):
    def damage(run):
        path = os.path.join(run, relative)
        with open(path, "rb") as handle:
            data = handle.read()
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
    return damage


CASES = [
    # steps.jsonl records of the wrong type or range
    ("step-string", _edit_record(STEPS, 2, step="3"), STEPS, 'line 2: step: expected a whole number, got "3"'),
    ("step-bool", _edit_record(STEPS, 1, step=True), STEPS, "line 1: step: expected a whole number, got true"),
    ("step-zero", _edit_record(STEPS, 1, step=0), STEPS, "line 1: step: expected a whole number >= 1, got 0"),
    ("step-s-zero", _edit_record(STEPS, 2, step_s=0), STEPS, "line 2: step_s: expected a number > 0, got 0"),
    ("step-s-negative", _edit_record(STEPS, 2, step_s=-1.1), STEPS, "line 2: step_s: expected a number > 0"),
    ("step-s-nan", _edit_record(STEPS, 2, step_s=float("nan")), STEPS, "line 2: step_s: expected a finite number"),
    ("loss-nan", _edit_record(STEPS, 1, loss=float("nan")), STEPS, "line 1: loss: expected a finite number"),
    ("loss-negative", _edit_record(STEPS, 1, loss=-6.9), STEPS, "line 1: loss: expected a number >= 0"),
    ("tokens-string", _edit_record(STEPS, 1, tokens_per_s="fast"), STEPS, "line 1: tokens_per_s: expected a number"),
    ("time-infinite", _edit_record(STEPS, 2, time=float("inf")), STEPS, "line 2: time: expected a finite number"),
    ("dilation-zero", _edit_record(STEPS, 1, time_dilation=0), STEPS, "line 1: time_dilation: expected a number > 0"),
    ("step-missing", _edit_record(STEPS, 2, step=...), STEPS, "line 2: missing field(s) step"),
    ("steps-binary", _write(STEPS, bytes(range(256))), STEPS, "not UTF-8 text"),
    # per-rank timing records
    ("mb-negative", _edit_record(RANK1, 1, mb=-1), RANK1, "line 1: mb: expected a whole number >= 0, got -1"),
    ("phase-unknown", _edit_record(RANK1, 1, phase="sideways"), RANK1, 'line 1: phase: expected one of forward, '
     'backward, got "sideways"'),
    ("compute-nan", _edit_record(RANK1, 2, compute_s=float("nan")), RANK1, "line 2: compute_s: expected a finite"),
    ("wait-negative", _edit_record(RANK1, 2, p2p_wait_s=-0.5), RANK1, "line 2: p2p_wait_s: expected a number >= 0"),
    ("posted-string", _edit_record(RANK1, 3, posted_at="1000"), RANK1, "line 3: posted_at: expected a number"),
    ("sent-string", _edit_record(RANK1, 1, sent_at="soon"), RANK1, "line 1: sent_at: expected a number"),
    ("rank-step-string", _edit_record(RANK1, 1, step="1"), RANK1, 'line 1: step: expected a whole number, got "1"'),
    # plan.json
    ("plan-binary", _write("plan.json", b"\x89PNG\r\n\x1a\n" + bytes(range(256))), "plan.json", "not UTF-8 text"),
    ("plan-truncated", _truncate("plan.json"), "plan.json", "not valid JSON"),
    ("plan-empty", _write("plan.json", ""), "plan.json", "not valid JSON"),
    ("plan-tp-fraction", _edit_plan((("stages", 0, "tp"), 1.5)), "plan.json", "stages[0].tp: expected a whole number"),
    ("plan-time-nan", _edit_plan((("stages", 1, "time_s"), float("nan"))), "plan.json",
     "stages[1].time_s: expected a finite number"),
    ("plan-step-zero", _edit_plan((("predicted_step_s",), 0)), "plan.json", "predicted_step_s: expected a number > 0"),
    ("plan-rank-string", _edit_plan((("ranks", 0, "rank"), "0")), "plan.json", "ranks[0].rank: expected a whole"),
    ("plan-inconsistent", _edit_plan((("stages", 1, "layers"), [3, 8])), "plan.json", "expected to start at 2"),
    ("plan-format", _edit_plan((("format",), "other")), "plan.json", "not a hetero plan"),
    # refusal counts
    ("coordinator-garbled", _write("metrics/coordinator.json", '{"refusals": '), "metrics/coordinator.json",
     "not valid JSON"),
    ("coordinator-list", _write("metrics/coordinator.json", '{"refusals": [1, 2]}'), "metrics/coordinator.json",
     "refusals: expected an object of reason: count"),
    ("coordinator-negative", _write("metrics/coordinator.json", '{"refusals": {"bad-token": -2}, "refused_total": 0}'),
     "metrics/coordinator.json", "refusals.bad-token: expected a whole number >= 0"),
    ("bridge-binary", _write("metrics/bridge-rank00001.json", bytes(range(200, 256))), "metrics/bridge-rank00001.json",
     "not UTF-8 text"),
    ("bridge-total-string", _write("metrics/bridge-rank00000.json", '{"rejected": {}, "rejected_total": "3"}'),
     "metrics/bridge-rank00000.json", 'rejected_total: expected a whole number, got "3"'),
]


@pytest.mark.parametrize("damage,relative,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_damaged_run_is_one_line_naming_file_and_field(hetero_cli, run_copy, damage, relative, fragment):
    damage(str(run_copy))
    code, stdout, stderr = hetero_cli("report", str(run_copy))
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("hetero report: error: ")
    assert os.path.join(str(run_copy), relative) in lines[0]
    assert fragment in lines[0], lines[0]
    assert not os.path.exists(os.path.join(run_copy, "report.html"))


def test_no_refusal_files_means_zero(hetero_cli, run_copy):
    code, stdout, stderr = hetero_cli("report", str(run_copy), "--json")
    assert code == 0, stderr
    numbers = json.loads(stdout)
    assert numbers["refusals"] == {"coordinator": {}, "bridge": {}, "total": 0}
    page = open(numbers["html"], encoding="utf-8").read()
    assert "Refused connections / calls: 0" in page and "no call or connection was refused" in page
    code, stdout, _ = hetero_cli("report", str(run_copy))
    assert "refused     0 connections / calls" in stdout


def test_refusals_are_summed_from_the_coordinator_and_every_bridge(hetero_cli, run_copy):
    metrics = run_copy / "metrics"
    (metrics / "coordinator.json").write_text(json.dumps(
        {"refusals": {"bad-token": 3, "no-token": 1}, "refused_total": 4}))
    (metrics / "bridge-rank00000.json").write_text(json.dumps(
        {"sent_bytes": 1024, "rejected": {"bad-magic": 2}, "rejected_total": 2}))
    (metrics / "bridge-rank00001.json").write_text(json.dumps(
        {"rejected": {"bad-magic": 1, "hello-timeout": 1}, "rejected_total": 5}))   # 3 counted without a reason
    code, stdout, stderr = hetero_cli("report", str(run_copy), "--json")
    assert code == 0, stderr
    refused = json.loads(stdout)["refusals"]
    assert refused == {"coordinator": {"bad-token": 3, "no-token": 1},
                       "bridge": {"bad-magic": 3, "hello-timeout": 1, "unspecified": 3}, "total": 11}
    page = open(json.loads(stdout)["html"], encoding="utf-8").read()
    assert "Refused connections / calls: 11" in page
    assert "<td>coordinator</td><td>bad-token</td><td>3</td>" in page
    assert "<td>bridge</td><td>bad-magic</td><td>3</td>" in page
    code, stdout, _ = hetero_cli("report", str(run_copy))
    assert code == 0
    line = next(line for line in stdout.splitlines() if line.strip().startswith("refused"))
    assert "11 connections / calls (" in line and "coordinator bad-token 3, no-token 1" in line
    assert len(stdout.strip().splitlines()) <= 8


def test_a_coordinator_file_without_reasons_still_counts(hetero_cli, run_copy):
    (run_copy / "metrics" / "coordinator.json").write_text(json.dumps({"refused_total": 2}))
    code, stdout, stderr = hetero_cli("report", str(run_copy), "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["refusals"]["total"] == 2


def test_reasons_counted_zero_are_not_listed(hetero_cli, run_copy):
    """What the launcher writes when nobody knocked: every reason at 0."""
    (run_copy / "metrics" / "coordinator.json").write_text(json.dumps(
        {"refusals": {"missing_token": 0, "wrong_token": 0}, "refused_total": 0}))
    (run_copy / "metrics" / "bridge-rank00000.json").write_text(json.dumps({"rejected": {}, "rejected_total": 0}))
    code, stdout, stderr = hetero_cli("report", str(run_copy), "--json")
    assert code == 0, stderr
    numbers = json.loads(stdout)
    assert numbers["refusals"] == {"coordinator": {}, "bridge": {}, "total": 0}
    assert "<th>reason</th>" not in open(numbers["html"], encoding="utf-8").read()
