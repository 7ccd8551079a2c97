"""<run dir>/events.jsonl: what happened to the job, one JSON object per line.

Every line has `time` (epoch seconds) and `event`, plus its details:

    start    {"attempt", "hang_timeout_s", "rejoin_timeout_s"}     the head starts an attempt's watch
    hang     {"attempt", "rank", "island", "host", "phase", "step", "micro_batch", "stalled_s", "stacks", "silent"}
    failure  {"attempt", "reason", "restart", "fatal"}             an attempt failed
    restart  {"attempt", "from_step"}                              the whole job starts again
    resume   {"from_step", "steps", "replanned"}                   hetero run --resume goes on
    replan   {"attempt", "from_step", "lost", "gone", "back", "waited_s", "old", "new", "kept"}
             the elastic re-plan (hetero.launch.fleet): nodes lost (`gone`) or back; old and new plan in
             short (plan, world_size, micro-batching, predicted_step_s, tokens_per_s); `kept`: the old
             plan's file (plan-until-step-N.json)
    rejoin   {"attempt", "host", "at_step", "seen_at_step"}        a lost node is back: the attempt stops at
                                                                   the checkpoint of `at_step` to re-plan up

Only the head writes it (members may not share the run directory); `hetero report`
lists the events and marks them on its charts (hetero.report). A line is written whole
with one append, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import time

FILE = "events.jsonl"


def events_path(run_dir: str) -> str:
    return os.path.join(run_dir, FILE)


def record(run_dir: str | None, event: str, **details) -> dict:
    """Append one event to <run_dir>/events.jsonl (nothing without a run directory); returns it."""
    entry = {"time": time.time(), "event": event, **details}
    if run_dir:
        try:
            with open(events_path(run_dir), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")
        except OSError:
            pass   # a full disk: the job's own failure says so; events are a record, not a control
    return entry


def read(run_dir: str) -> list[dict]:
    """Every whole, well-formed event in the run directory, in order (none: [])."""
    try:
        with open(events_path(run_dir), encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("event"), str) and isinstance(entry.get("time"), (int, float)):
            found.append(entry)
    return found
