"""Read a recorded run directory into plain data, or say which file is wrong.

A run directory (what `hetero run` writes) holds plan.json, cluster.yaml,
model.yaml and metrics/steps.jsonl plus metrics/rank*.jsonl. A `hetero bench
efficiency` output directory holds efficiency.json and the mixed run under
mixed/; either that directory or its mixed/ may be given.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from hetero.errors import UserError

EFFICIENCY_FILE = "efficiency.json"
MIXED_DIR = "mixed"
STEP_FIELDS = ("step", "loss", "tokens_per_s", "step_s")
RANK_FIELDS = ("step", "mb", "phase", "compute_s", "p2p_wait_s", "posted_at", "received_at")
PLAN_FIELDS = ("stages", "pipelines", "ranks", "predicted_step_s", "global_batch", "dtype")


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


def load_run(path: str) -> Run:
    run_dir, efficiency_path = locate(path)
    plan = read_json(os.path.join(run_dir, "plan.json"), PLAN_FIELDS)
    steps = _last_per_key(read_jsonl(os.path.join(run_dir, "metrics", "steps.jsonl"), STEP_FIELDS),
                          lambda r: r["step"])
    if not steps:
        raise UserError(f"{os.path.join(run_dir, 'metrics', 'steps.jsonl')}: no finished step recorded")
    ranks = {}
    for entry in plan["ranks"]:
        rank_path = os.path.join(run_dir, "metrics", f"rank{int(entry['rank']):05d}.jsonl")
        ranks[int(entry["rank"])] = _last_per_key(read_jsonl(rank_path, RANK_FIELDS),
                                                  lambda r: (r["step"], r["mb"], r["phase"]))
    cluster, model = _configs(run_dir)
    efficiency = read_json(efficiency_path, ("mixed", "subfleets")) if efficiency_path else None
    run = Run(run_dir, plan, steps, ranks, cluster, model, efficiency, efficiency_path)
    dilation = steps[0].get("time_dilation")
    if dilation:
        run.notes.append(f"the emulated chips ran time-dilated (x{dilation:g} wall seconds per chip second); "
                         "every time here is the chips' time")
    return run


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


def read_jsonl(path: str, required=()) -> list[dict]:
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
        records.append(record)
    return records


def _require_fields(data: dict, required, where: str) -> None:
    missing = [key for key in required if key not in data]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None


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
