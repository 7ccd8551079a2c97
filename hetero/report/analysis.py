"""The report's numbers, computed from a loaded run (hetero.report.load.Run).

Definitions (the page repeats them):
- measured step time: median step_s of the steady steps (all but the first,
  which pays for allocation and first touch, when there are two or more);
- MFU of a chip type: model FLOPs its stages do per step (forward + backward,
  no recompute; the partitioner's FLOP count) / (measured step time x its
  chips x their peak FLOP/s at the training dtype);
- idle (bubble) of a rank in a step: step time - compute - exposed bridge
  time; bubble share = sum of idle over ranks / (ranks x step time);
- exposed bridge share: exposed bridge time of the worst receiving rank /
  step time (hetero.bench.runtime's definition), median over steady steps;
- exposed communication: per rank and step, the receive waits after the sender
  handed the data over (bridge and in-island p2p) plus the time actions spent
  handing their outputs over (sends); the share is the worst rank's sum / step
  time, median over steady steps (bridge receives, p2p receives and sends apart);
- E = mixed fleet tokens/s / sum of the sub-fleets' tokens/s;
- refused: connections and calls the coordinator (wrong or missing job token)
  and the bridge endpoints (bad frames, failed hellos) turned away, by reason;
- events (events.jsonl): each placed on the step axis after the last step whose
  record (of the attempt that counted) was written before it.
"""

from __future__ import annotations

import statistics

from hetero.errors import UserError
from hetero.report import timeline
from hetero.report.units import flops_text

GB = 1e9


def analyse(run) -> dict:
    plan = run.plan
    steady = steady_steps(run.steps)
    measured = statistics.median(s["step_s"] for s in steady)
    predicted = float(plan["predicted_step_s"])
    per_rank = timeline.breakdown(plan, run.ranks, run.steps)
    exposed = timeline.exposed_per_step(plan, run.ranks)
    tokens_per_step = plan["global_batch"] * run.model.seq_len
    notes = list(run.notes)
    if not any("peak_memory_gb" in s for s in run.steps):
        notes.append("this run recorded no measured peak memory (metrics/steps.jsonl has no peak_memory_gb); "
                     "memory shows the plan's prediction only")
    return {
        "run_dir": run.run_dir, "cluster": plan.get("cluster"), "model": plan.get("model"),
        "plan_label": (plan.get("provenance") or {}).get("label", ""),
        "emulated": any(c["emulated"] for c in chip_types(run).values()),
        "steps": len(run.steps), "steady_steps": [s["step"] for s in steady],
        "measured_step_s": measured, "predicted_step_s": predicted, "ratio": measured / predicted,
        "tokens_per_s": tokens_per_step / measured,
        "predicted_tokens_per_s": tokens_per_step / predicted,
        "mfu": mfu_per_chip(run, measured, notes),
        "bubble_share": bubble_share(per_rank, steady),
        "predicted_bubble_share": predicted_bubble_share(plan),
        "exposed_bridge_s": statistics.median(exposed.get(s["step"], 0.0) for s in steady),
        "exposed_bridge_share": statistics.median(exposed.get(s["step"], 0.0) / s["step_s"] for s in steady),
        "exposed_comm": exposed_comm(plan, run.ranks, steady),
        "time_split": time_split(per_rank, steady),
        "ranks": rank_rows(run, per_rank, steady),
        "memory": memory_per_stage(run),
        "loss": [[s["step"], s["loss"]] for s in run.steps],
        "step_times": [[s["step"], s["step_s"]] for s in run.steps],
        "efficiency": efficiency(run.efficiency, run.efficiency_path) if run.efficiency else None,
        "refusals": refusals(run.refusals),
        "events": placed_events(run),
        "notes": notes,
    }


MARKED_EVENTS = ("hang", "failure", "restart", "resume", "replan", "rejoin")   # drawn on the charts


def placed_events(run) -> list[dict]:
    """Every event, with `at_step` (where it falls on the step axis: after the last step recorded
    before it, + 0.5) and `text` (one line that says it)."""
    dilation = float(run.steps[0].get("time_dilation") or 1.0)   # step times are the chips' (wall / dilation)
    stamped = [s for s in run.steps if "time" in s]
    placed = []
    for event in run.events:
        before = [s["step"] for s in stamped if s["time"] <= event["time"] / dilation]
        placed.append(dict(event, at_step=(max(before) if before else 0) + 0.5, text=event_text(event)))
    return placed


def event_text(event: dict) -> str:
    """One line for an event."""
    kind = event["event"]
    if kind == "hang":
        return (f"rank {event.get('rank')} (island {event.get('island')}, host {event.get('host')}) hung in "
                f"{event.get('phase')} for {float(event.get('stalled_s') or 0):.0f} s; stacks {event.get('stacks')}")
    if kind == "failure":
        return f"attempt {event.get('attempt')} failed{' (restarting)' if event.get('restart') else ''}: {event.get('reason')}"
    if kind == "restart":
        return f"restart {event.get('attempt')} from step {event.get('from_step')}"
    if kind == "resume":
        return f"resumed from step {event.get('from_step')} to step {event.get('steps')}"
    if kind == "replan":
        new: dict = event["new"] if isinstance(event.get("new"), dict) else {}
        why = (f"lost {', '.join(map(str, event.get('gone') or []))}" if event.get("gone")
               else f"{', '.join(map(str, event.get('back') or []))} back")
        speed = f", predicted {float(new['predicted_step_s']):.3f} s/step" if new.get("predicted_step_s") else ""
        return f"re-planned ({why}) from step {event.get('from_step')}: {new.get('plan')}{speed}"
    if kind == "rejoin":
        return f"node {event.get('host')} taken back at step {event.get('at_step')}"
    if kind == "start":
        return f"attempt {event.get('attempt')} started (hang timeout {event.get('hang_timeout_s')} s)"
    details = {k: v for k, v in event.items() if k not in ("time", "event")}
    return ", ".join(f"{k} {v}" for k, v in details.items())


def event_counts(events: list[dict]) -> str:
    """'hang 1, failure 1, restart 1' (the marked kinds only), or 'none'."""
    counts: dict[str, int] = {}
    for event in events:
        if event["event"] in MARKED_EVENTS:
            counts[event["event"]] = counts.get(event["event"], 0) + 1
    return ", ".join(f"{kind} {n}" for kind, n in counts.items()) or "none"


def steady_steps(steps: list[dict]) -> list[dict]:
    return steps[1:] if len(steps) > 1 else steps


def chip_types(run) -> dict:
    """{chip: {peak_flops, memory_gb, usable_gb, emulated, chips}} for the chip types the plan uses."""
    out: dict[str, dict] = {}
    for stage in run.plan["stages"]:
        spec = run.cluster.chip(stage["chip"])
        entry = out.setdefault(stage["chip"], {
            "peak_flops": spec.peak_flops(run.plan["dtype"]), "memory_gb": spec.memory_gb,
            "usable_gb": spec.memory_gb - spec.memory_reserve_gb, "emulated": bool(spec.emulated), "chips": 0})
        entry["chips"] += stage["tp"] * stage["dp"]
    return out


def stage_flops(run) -> dict:
    """{stage index: model FLOPs per step}: the partitioner's count, so plan and report agree (a stage
    with a boundary inside a layer counts its half layers by their FLOPs: partitioner.costs.blocks_layers)."""
    from hetero.planning import model_spec
    from partitioner.costs import blocks_layers, head_forward_flops, layer_forward_flops

    spec = model_spec(run.model)
    per_layer = 3.0 * layer_forward_flops(spec, 1)      # forward + backward (2x) per sample
    head = 3.0 * head_forward_flops(spec, 1)
    out = {}
    for pipeline in run.plan["pipelines"]:
        samples = pipeline["dp"] * replica_samples(pipeline)
        last = pipeline["stages"][-1]
        for index in pipeline["stages"]:
            stage = run.plan["stages"][index]
            layers = blocks_layers(spec, *stage["blocks"]) if "blocks" in stage else stage_layers(stage)
            out[index] = samples * (layers * per_layer + (head if index == last else 0.0))
    return out


def replica_samples(pipeline: dict) -> int:
    """Samples one DP replica of a plan's pipeline (its JSON object) takes per step: its micro-batches, the
    last one `last_micro_batch` when the plan has one (version 5)."""
    whole = pipeline["num_micro_batches"] - (1 if pipeline.get("last_micro_batch") else 0)
    return whole * pipeline["micro_batch"] + pipeline.get("last_micro_batch", 0)


def micro_batch_work(pipeline: dict) -> float:
    """A replica's micro-batches in whole micro-batches' work: a smaller last one counts by its samples
    (a stage's `time_s` is one whole micro-batch's)."""
    return replica_samples(pipeline) / pipeline["micro_batch"]


def stage_layers(stage: dict) -> int:
    """The layers a stage holds: its chunks' (interleaved 1F1B: `layers` is only their span), else `layers`."""
    return sum(end - start for start, end in stage.get("chunks") or [stage["layers"]])


def mfu_per_chip(run, step_s: float, notes: list | None = None) -> dict:
    types = chip_types(run)
    flops = stage_flops(run)
    done = dict.fromkeys(types, 0.0)
    for stage in run.plan["stages"]:
        done[stage["chip"]] += flops[stage["index"]]
    predicted = run.plan.get("mfu") or {}
    out = {}
    for chip, info in types.items():
        peak = run_peak(run, chip, info, done[chip], notes)
        per_chip = done[chip] / step_s / info["chips"]
        out[chip] = {"chips": info["chips"], "emulated": info["emulated"], "flops_per_step": done[chip],
                     "peak_tflops": peak / 1e12, "achieved_tflops": per_chip / 1e12,
                     "mfu": per_chip / peak, "predicted_mfu": predicted.get(chip)}
    return out


def run_peak(run, chip: str, info: dict, flops_per_step: float, notes: list | None) -> float:
    """The peak FLOP/s the run was planned with. The run directory keeps no copy of the chip
    catalog, so a catalog edited since the run would skew MFU; the plan's own MFU and step time
    give the figure it used (peak = FLOPs / (mfu x step x chips)), which wins when they differ."""
    catalog = info["peak_flops"]
    planned_mfu = (run.plan.get("mfu") or {}).get(chip)
    if not planned_mfu:
        return catalog
    planned = flops_per_step / (planned_mfu * run.plan["predicted_step_s"] * info["chips"])
    if abs(planned - catalog) > 0.01 * catalog:
        if notes is not None:
            notes.append(f"the catalog's peak for {chip} ({flops_text(catalog)}) differs from the one this run "
                         f"was planned with ({flops_text(planned)}); MFU uses the run's")
        return planned
    return catalog


def bubble_share(per_rank: dict, steady: list[dict]) -> float:
    shares = []
    for s in steady:
        idle = sum(cells[s["step"]][timeline.WAIT] + cells[s["step"]][timeline.TAIL] for cells in per_rank.values())
        shares.append(idle / (len(per_rank) * s["step_s"]))
    return statistics.median(shares)


def predicted_bubble_share(plan: dict) -> float:
    """The same quantity from the plan: 1 - mean over ranks of (micro-batches x stage time) / step.
    Each rank counts its own pipeline's micro-batches (replicas and hybrid plans give pipelines
    different counts), and a pipeline that finishes before the slowest one is idle until the
    gradient sum across them, as the measured bubble counts it (the tail). Not the plan's
    breakdown.bubble_fraction: that is the slowest pipeline's 1F1B fill and drain alone."""
    m = {p["index"]: micro_batch_work(p) for p in plan["pipelines"]}
    stages = {s["index"]: s for s in plan["stages"]}
    busy = [m[stages[r["stage"]]["pipeline"]] * stages[r["stage"]]["time_s"] for r in plan["ranks"]]
    return 1.0 - sum(busy) / len(busy) / plan["predicted_step_s"]


def exposed_comm(plan: dict, ranks: dict, steady: list[dict]) -> dict:
    """Communication not hidden behind compute, per steady step on the rank that had the most
    (timeline.exposed_comm: receives after the hand-over, bridge and native, and sends), median
    over the steady steps: {"s", "share" (of the step), "parts": {kind: share}, "rank",
    "mean_share" (over all ranks), "reduce_share"}. The gradient reductions have no timing
    lines; rank 0's step record times the part of them after its compute (`dp_reduce_exposed_s`,
    `cross_island_reduce_s`): their share of the step is `reduce_share` (None if not recorded)."""
    per_step = timeline.exposed_comm(plan, ranks)
    rows: list[tuple[float, int | None, float, dict[str, float], float]] = []   # step_s, worst, its s, parts, mean
    for s in steady:
        cells = per_step.get(s["step"], {})
        totals = {rank: sum(cell.values()) for rank, cell in cells.items()}
        if not totals:      # a step without timing lines: nothing seen, nothing exposed
            rows.append((s["step_s"], None, 0.0, dict.fromkeys(timeline.COMM_KINDS, 0.0), 0.0))
            continue
        worst = max(totals, key=lambda rank: totals[rank])
        rows.append((s["step_s"], worst, totals[worst], cells[worst], sum(totals.values()) / len(totals)))
    median_row = sorted(rows, key=lambda row: row[2] / row[0])[(len(rows) - 1) // 2]
    return {"s": statistics.median(row[2] for row in rows),
            "share": statistics.median(row[2] / row[0] for row in rows),
            "parts": {kind: statistics.median(row[3][kind] / row[0] for row in rows) for kind in timeline.COMM_KINDS},
            "rank": median_row[1],
            "mean_share": statistics.median(row[4] / row[0] for row in rows),
            "reduce_share": reduce_share(steady)}


def reduce_share(steady: list[dict]) -> float | None:
    """Rank 0's gradient reductions after its compute (DP within the island, then across
    islands) over the step time, median over steady steps; None when the steps do not say."""
    keys = ("dp_reduce_exposed_s", "cross_island_reduce_s")
    shares = [sum(float(s.get(k) or 0.0) for k in keys) / s["step_s"] for s in steady if any(k in s for k in keys)]
    return statistics.median(shares) if shares else None


def time_split(per_rank: dict, steady: list[dict]) -> dict:
    """Share of all ranks' steady step time in each kind (adds up to 1)."""
    total = sum(s["step_s"] for s in steady) * len(per_rank)
    return {kind: sum(cells[s["step"]][kind] for cells in per_rank.values() for s in steady) / total
            for kind in timeline.KINDS}


def rank_rows(run, per_rank: dict, steady: list[dict]) -> list[dict]:
    """Per rank: where it sits and its mean seconds per steady step in each kind."""
    rows = []
    stages = {s["index"]: s for s in run.plan["stages"]}
    micro_batches = {p["index"]: micro_batch_work(p) for p in run.plan["pipelines"]}
    for entry in sorted(run.plan["ranks"], key=lambda r: (r["pipeline"], stages[r["stage"]]["index"], r["rank"])):
        stage = stages[entry["stage"]]
        cells = per_rank[entry["rank"]]
        mean = {k: statistics.fmean(cells[s["step"]][k] for s in steady) for k in timeline.KINDS}
        rows.append({"rank": entry["rank"], "island": entry["island"], "chip": stage["chip"],
                     "emulated": bool(run.cluster.chip(stage["chip"]).emulated), "stage": stage["index"],
                     "tp_rank": entry["tp_rank"], "dp_rank": entry["dp_rank"], "seconds": mean,
                     "predicted_compute_s": micro_batches[stage["pipeline"]] * stage["time_s"]})
    return rows


def memory_per_stage(run) -> list[dict]:
    """Per stage: the plan's predicted peak per chip beside the measured one (measured_peaks)."""
    measured = measured_peaks(run.steps, len(run.plan["stages"]))
    rows = []
    for stage in run.plan["stages"]:
        spec = run.cluster.chip(stage["chip"])
        predicted, got = stage["memory_gb"], measured[stage["index"]]
        rows.append({"stage": stage["index"], "island": stage["island"], "chip": stage["chip"],
                     "emulated": bool(spec.emulated), "predicted_gb": predicted, "measured_gb": got,
                     "measured_over_predicted": got / predicted if got is not None and predicted > 0 else None,
                     "capacity_gb": spec.memory_gb, "usable_gb": spec.memory_gb - spec.memory_reserve_gb})
    return rows


def measured_peaks(steps: list[dict], stages: int) -> list:
    """Per stage, the largest `peak_memory_gb` over the recorded steps (the largest peak device
    memory of the stage's ranks); None where no step measured it (a run recorded before the
    field existed, or chips that keep no memory counters, like the plain host)."""
    out = [None] * stages
    for record in steps:
        for index, value in enumerate(record.get("peak_memory_gb") or []):
            if value is not None and (out[index] is None or value > out[index]):
                out[index] = value
    return out


def refusals(counts: dict) -> dict:
    """{"coordinator": {reason: n}, "bridge": {reason: n}, "total": n}, zero when nothing knocked."""
    coordinator, bridge = dict(counts.get("coordinator", {})), dict(counts.get("bridge", {}))
    return {"coordinator": coordinator, "bridge": bridge,
            "total": sum(coordinator.values()) + sum(bridge.values())}


def refusal_text(r: dict) -> str:
    """One line: the total, then who refused what."""
    if not r["total"]:
        return "0 connections / calls"
    parts = [f"{who} " + ", ".join(f"{reason} {n}" for reason, n in sorted(r[who].items()))
             for who in ("coordinator", "bridge") if r[who]]
    return f"{r['total']} connections / calls ({'; '.join(parts)})"


def efficiency(data: dict, source: str = "efficiency.json") -> dict:
    """E recomputed from the recorded tokens/s (and the recorded value beside it)."""
    try:
        mixed = float(data["mixed"]["tokens_per_s"])
        subs = {str(name): float(entry["tokens_per_s"]) for name, entry in data["subfleets"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{source}: expected mixed.tokens_per_s and subfleets.<island>.tokens_per_s "
                        f"as numbers ({type(exc).__name__}: {exc})") from None
    total = sum(subs.values())
    return {"efficiency": mixed / total if total else None, "recorded_efficiency": data.get("efficiency"),
            "predicted_efficiency": data.get("predicted_efficiency"), "mixed_tokens_per_s": mixed,
            "subfleet_tokens_per_s": subs, "subfleet_sum_tokens_per_s": total,
            "subfleet_plans": {name: _plan_label(entry.get("plan")) for name, entry in data["subfleets"].items()},
            "subfleet_predicted_tokens_per_s": {name: entry.get("predicted_tokens_per_s")
                                                for name, entry in data["subfleets"].items()},
            "mixed_predicted_tokens_per_s": data["mixed"].get("predicted_tokens_per_s"),
            "mixed_plan": _plan_label(data["mixed"].get("plan"))}


def _plan_label(plan) -> str:
    """One line for a plan as `bench efficiency` records it (its Plan.summary(); kind and stages in
    records written before it had one), a full plan, or text."""
    if not isinstance(plan, dict):
        return str(plan or "")
    label = plan.get("summary") or (plan.get("provenance") or {}).get("label") or plan.get("label")
    if label:
        return label
    try:
        stages = " -> ".join(f"{s['island']}(tp{s['tp']} dp{s['dp']} layers {s['layers'][0]}-{s['layers'][1]})"
                             for s in plan.get("stages", []))
    except (KeyError, TypeError, IndexError):
        stages = ""
    return f"{plan.get('kind', '')} {stages}".strip()
