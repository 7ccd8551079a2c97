"""Read a recorded run directory into plain data, or say which file is wrong.

A run directory (what `hetero run` writes) holds plan.json, cluster.yaml,
model.yaml and metrics/steps.jsonl plus metrics/rank*.jsonl, and events.jsonl when
anything happened to the job (hetero.launch.events: hangs, failures, restarts,
resumes; a malformed line is skipped, events are a record). A `hetero bench
efficiency` output directory holds efficiency.json and the mixed run under
mixed/; either that directory or its mixed/ may be given.
"""

from __future__ import annotations

import glob
import json
import math
import os
from dataclasses import dataclass, field

from hetero.errors import UserError

EFFICIENCY_FILE = "efficiency.json"
MIXED_DIR = "mixed"
COORDINATOR_FILE = "coordinator.json"     # metrics/: the launcher's coordinator refusals
BRIDGE_FILES = "bridge-rank*.json"        # metrics/: each rank's bridge endpoint stats


def whole(low: int):
    """A field check: a whole number >= low (not a bool, not a string)."""
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"expected a whole number, got {_show(value)}"
        return None if value >= low else f"expected a whole number >= {low}, got {value}"
    return check


def finite(low: float | None = None, above: bool = False, nullable: bool = False):
    """A field check: a finite number (>= low, or > low with `above`; None allowed with `nullable`)."""
    def check(value):
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"expected a number, got {_show(value)}"
        if not math.isfinite(value):
            return f"expected a finite number, got {value}"
        if low is not None and (value <= low if above else value < low):
            return f"expected a number {'>' if above else '>='} {low:g}, got {value}"
        return None
    return check


def one_of(*choices: str):
    def check(value):
        return None if value in choices else f"expected one of {', '.join(choices)}, got {_show(value)}"
    return check


def numbers_or_null(low: float):
    """A field check: a list whose entries are finite numbers >= low or null (not measured)."""
    entry = finite(low, nullable=True)

    def check(value):
        if not isinstance(value, list):
            return f"expected a list of numbers or null, got {_show(value)}"
        problems = [f"[{i}]: {p}" for i, p in ((i, entry(v)) for i, v in enumerate(value)) if p]
        return problems[0] if problems else None
    return check


# Required fields of each record, and optional ones checked when present.
STEP_FIELDS = {"step": whole(1), "loss": finite(0.0), "tokens_per_s": finite(0.0), "step_s": finite(0.0, above=True)}
STEP_OPTIONAL = {"time": finite(), "time_dilation": finite(0.0, above=True, nullable=True),
                 "peak_memory_gb": numbers_or_null(0.0)}
RANK_FIELDS = {"step": whole(1), "mb": whole(0), "phase": one_of("forward", "backward"),
               "compute_s": finite(0.0), "p2p_wait_s": finite(0.0), "posted_at": finite(), "received_at": finite()}
RANK_OPTIONAL = {"sent_at": finite(nullable=True), "chunk": whole(0)}


@dataclass
class Run:
    run_dir: str
    plan: dict
    steps: list                      # steps.jsonl, one record per step (the last attempt of each)
    ranks: dict                      # global rank -> its timing records (last attempt per micro-batch action)
    cluster: object                  # hetero.config.ClusterConfig
    model: object                    # hetero.config.ModelConfig
    efficiency: dict | None = None   # efficiency.json, when the run came from `bench efficiency`
    efficiency_path: str | None = None
    notes: list = field(default_factory=list)
    refusals: dict = field(default_factory=dict)   # read_refusals: who knocked and was turned away
    events: list = field(default_factory=list)     # events.jsonl: what happened to the job, in order


def load_run(path: str) -> Run:
    run_dir, efficiency_path = locate(path)
    plan = read_plan(os.path.join(run_dir, "plan.json"))
    steps = _last_per_key(read_jsonl(os.path.join(run_dir, "metrics", "steps.jsonl"), STEP_FIELDS, STEP_OPTIONAL),
                          lambda r: r["step"])
    steps_path = os.path.join(run_dir, "metrics", "steps.jsonl")
    if not steps:
        raise UserError(f"{steps_path}: no finished step recorded")
    _check_peaks_fit(steps, len(plan["stages"]), steps_path)
    ranks = {}
    for entry in plan["ranks"]:
        rank_path = os.path.join(run_dir, "metrics", f"rank{entry['rank']:05d}.jsonl")
        ranks[entry["rank"]] = _last_per_key(read_jsonl(rank_path, RANK_FIELDS, RANK_OPTIONAL), action_key)
    cluster, model = _configs(run_dir)
    efficiency = read_json(efficiency_path, ("mixed", "subfleets")) if efficiency_path else None
    from hetero.launch import events

    run = Run(run_dir, plan, steps, ranks, cluster, model, efficiency, efficiency_path,
              refusals=read_refusals(os.path.join(run_dir, "metrics")), events=events.read(run_dir))
    dilation = steps[0].get("time_dilation")
    if dilation:
        run.notes.append(f"the emulated chips ran time-dilated (x{dilation:g} wall seconds per chip second); "
                         "every time here is the chips' time")
    return run


def action_key(record: dict) -> tuple[int, int, str, int]:
    """A timing line's action: (step, micro-batch, phase, chunk). Interleaved 1F1B runs each
    micro-batch once per chunk (the line's `chunk`; a plain run's lines name none: 0)."""
    return record["step"], record["mb"], record["phase"], int(record.get("chunk") or 0)


def _check_peaks_fit(steps: list[dict], stages: int, path: str) -> None:
    """`peak_memory_gb` has one entry per plan stage (a run recorded before it existed has none)."""
    for record in steps:
        peaks = record.get("peak_memory_gb")
        if peaks is not None and len(peaks) != stages:
            raise UserError(f"{path}: step {record['step']}: peak_memory_gb: expected {stages} entries "
                            f"(one per plan stage), got {len(peaks)}")


def locate(path: str) -> tuple[str, str | None]:
    """(run directory, efficiency.json or None) for what the user named."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such run directory")
    here = os.path.join(path, EFFICIENCY_FILE)
    if os.path.isfile(here):
        mixed = os.path.join(path, MIXED_DIR)
        if not os.path.isdir(mixed):
            raise UserError(f"{here} is here but the mixed run is not ({mixed} is missing)")
        return mixed, here
    above = os.path.join(os.path.dirname(path), EFFICIENCY_FILE)
    if os.path.basename(path) == MIXED_DIR and os.path.isfile(above):
        return path, above
    return path, None


def read_json(path: str, required=()) -> dict:
    text = _read(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object at the top level")
    _require_fields(data, required, path)
    return data


def read_plan(path: str) -> dict:
    """plan.json as a dict, every field checked (partitioner.plan.Plan.from_dict) and its
    invariants held, with a step-time prediction to compare against."""
    from partitioner.plan import Plan, PlanError

    data = read_json(path)
    try:
        plan = Plan.from_dict(data)
    except PlanError as exc:
        raise UserError(f"{path}: {exc}") from None
    problems = plan.problems()
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{path}: {problems[0]}{more}")
    if plan.predicted_step_s <= 0:
        raise UserError(f"{path}: predicted_step_s: expected a number > 0 to compare the run against, "
                        f"got {plan.predicted_step_s}")
    return {**data, **plan.to_dict()}


def read_refusals(metrics_dir: str) -> dict:
    """Connections and calls turned away during the run, by whom and why:
    {"coordinator": {reason: n}, "bridge": {reason: n}, "total": n}. The launcher writes
    metrics/coordinator.json ({"refusals": {reason: n}, "refused_total": n}); each rank's
    bridge endpoint metrics/bridge-rankNNNNN.json ({"rejected": {reason: n}, "rejected_total": n}).
    A file that is absent counts nothing."""
    out: dict[str, dict[str, int]] = {"coordinator": {}, "bridge": {}}
    files = [("coordinator", os.path.join(metrics_dir, COORDINATOR_FILE), "refusals", "refused_total")]
    files += [("bridge", path, "rejected", "rejected_total")
              for path in sorted(glob.glob(os.path.join(metrics_dir, BRIDGE_FILES)))]
    for who, path, by_reason, total_key in files:
        if not os.path.exists(path):
            continue
        data = read_json(path)
        reasons = data.get(by_reason, {})
        if not isinstance(reasons, dict):
            raise UserError(f"{path}: {by_reason}: expected an object of reason: count, got {_show(reasons)}")
        for reason, count in reasons.items():
            problem = whole(0)(count)
            if problem:
                raise UserError(f"{path}: {by_reason}.{reason}: {problem}")
            if count:
                out[who][reason] = out[who].get(reason, 0) + count
        total = data.get(total_key, sum(reasons.values()))
        problem = whole(0)(total)
        if problem:
            raise UserError(f"{path}: {total_key}: {problem}")
        if total > sum(reasons.values()):        # counted without a reason: keep the total right
            out[who]["unspecified"] = out[who].get("unspecified", 0) + total - sum(reasons.values())
    return {**out, "total": sum(sum(counts.values()) for counts in out.values())}


def read_jsonl(path: str, required=(), optional=None) -> list[dict]:
    """One JSON object per line. A last line without its newline is a write still under way: skipped."""
    text = _read(path)
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        unfinished = number == len(lines)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if unfinished:
                continue
            raise UserError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}: line {number}: expected a JSON object")
        _require_fields(record, required, f"{path}: line {number}")
        _check_fields(record, required, optional or {}, f"{path}: line {number}")
        records.append(record)
    return records


def _require_fields(data: dict, required, where: str) -> None:
    missing = [key for key in required if key not in data]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")


def _check_fields(record: dict, required, optional: dict, where: str) -> None:
    """Each field that has a check (a dict of name: check) holds a value it accepts."""
    checks = dict(required) if isinstance(required, dict) else {}
    checks.update({key: check for key, check in optional.items() if key in record})
    for key, check in checks.items():
        problem = check(record[key])
        if problem:
            raise UserError(f"{where}: {key}: {problem}")


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}): not a file hetero wrote") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _last_per_key(records: list[dict], key) -> list[dict]:
    """After a restart the job rewinds and re-records steps: keep the last record of each."""
    latest = {}
    for record in records:
        latest[key(record)] = record
    return sorted(latest.values(), key=key)


def _configs(run_dir: str):
    from hetero.config import load_job

    paths = {kind: os.path.join(run_dir, f"{kind}.yaml") for kind in ("cluster", "model")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise UserError(f"{path}: missing (the run directory's copy of the {os.path.basename(path)[:-5]} file)")
    job = load_job(**paths)
    return job.cluster, job.model
