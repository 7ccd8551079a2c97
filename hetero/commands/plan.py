"""`hetero plan`: search the parallel layout of a model on a mixed fleet."""

from __future__ import annotations

import json
import os
import sys

from hetero.commands.flags import add_job_files, whole
from hetero.config import load_job
from hetero.errors import UserError
from hetero.planning import Progress, headroom, load_profile, plan_job
from partitioner import explain
from partitioner.plan import Plan, layers_span_text

MAX_TOP = 1000
MAX_VIRTUAL_STAGES = 4     # the chunk counts the cost model is checked for (tests/partitioner/test_interleave_costs.py)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="search stages, layers per stage, TP/DP per island, micro-batching and recompute",
        description=(
            "Search the plan that minimises the predicted step time: islands in pipeline order, "
            "uneven layers per stage, a TP degree per island, DP, micro-batch size and count, and "
            "recompute per stage, under each chip's memory; or one replica per island with an "
            "uneven batch split; or (three islands or more) several pipelines, some over a group of "
            "islands, with the batch split between them. Layer times come from --profile where measured, else from the "
            "chip catalog (analytic model). Prints a table, or one JSON object with --json."
        ),
    )
    add_job_files(parser)
    parser.add_argument("--profile", metavar="FILE", help="measured profile from 'hetero profile'")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--top", type=whole(1, MAX_TOP), default=1, metavar="K", help="show the K best plans (default 1)")
    parser.add_argument("--explain", action="store_true", help="say why the runner-up lost")
    parser.add_argument("--out", metavar="FILE", help="also write the chosen Plan (JSON) to FILE")
    parser.add_argument("--virtual-stages", type=whole(1, MAX_VIRTUAL_STAGES), default=1, metavar="V",
                        help="let each pipeline hold up to V model chunks per stage (interleaved 1F1B, "
                             f"1-{MAX_VIRTUAL_STAGES}; default 1: plain 1F1B). A plan with V > 1 is format "
                             "version 2 (docs/plan-format.md)")
    parser.add_argument("--whole-layers", action="store_true",
                        help="keep every stage boundary between layers (by default a boundary may sit "
                             "inside a layer, between its attention and MLP halves, where that balances the "
                             "stages better: such a plan is format version 4, docs/plan-format.md)")
    parser.set_defaults(func=run)


def run(args) -> int:
    job = load_job(cluster=args.cluster, model=args.model, train=args.train).require("cluster", "model", "train")
    profile = load_profile(args.profile)
    # A bar on a terminal only: in logs and pipes the one-line answer (or error) stands alone.
    progress = Progress("searching plans") if not args.json and sys.stderr.isatty() else None
    result = plan_job(job, profile=profile, top=max(args.top, 2), progress=progress,
                      max_virtual_stages=args.virtual_stages, half_layers=not args.whole_layers)
    best = result.best
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as fh:
                fh.write(best.to_json() + "\n")
        except OSError as exc:
            raise UserError(f"--out {args.out}: cannot write: {exc.strerror or exc}") from None
    emulated = sorted({i.chip for i in job.cluster.islands if job.cluster.chip(i.chip).emulated})
    if args.json:
        print(json.dumps(to_json(result, args.top, args.explain, emulated), indent=2))
    else:
        for line in to_text(job, result, args.top, args.explain, emulated, args.profile):
            print(line)
        if args.out:
            print(f"plan written to {os.path.abspath(args.out)}")
    return 0


def to_json(result, top: int, want_explain: bool, emulated: list) -> dict:
    best = result.best
    out = best.to_dict()
    base = result.baseline_plan
    out["baseline_step_s"] = base.predicted_step_s if base else None
    out["baseline"] = _summary(base) if base else None
    out["speedup"] = (base.predicted_step_s / best.predicted_step_s) if base else None
    out["search_s"] = result.search_s
    out.update(headroom(result))
    out["search_stats"] = dict(result.stats)
    out["emulated_chips"] = emulated
    out["alternatives"] = [_summary(p) for p in result.plans[1:top]]
    if want_explain:
        out["explain"] = explain.compare(best, result.plans[1]) if len(result.plans) > 1 else []
        if base:
            out["explain"] += explain.compare(best, base, "naive")
    return out


def _summary(plan) -> dict:
    return {"label": plan.provenance.get("label"), "kind": plan.kind, "predicted_step_s": plan.predicted_step_s,
            "tokens_per_s": plan.tokens_per_s, "mfu": dict(plan.mfu),
            "stages": [{"island": s.island, "chip": s.chip, "tp": s.tp, "dp": s.dp, "layers": list(s.layers),
                        **({"chunks": [list(c) for c in s.chunks]} if s.chunks else {}),
                        **({"blocks": list(s.blocks)} if s.blocks else {}),
                        "recompute": s.recompute} for s in plan.stages]}


def layers_text(stage) -> str:
    """A stage's layers for the table: its range, or its chunks' ranges when interleaved, and the count;
    a boundary inside a layer as ".5", with the layers' worth it holds ("0-2.5 (2.5)")."""
    if stage.blocks:
        return f"{layers_span_text(stage)} ({stage.held_layers:g})"
    return ",".join(f"{start}-{end}" for start, end in stage.layer_ranges) + f" ({stage.num_layers})"


def to_text(job, result, top: int, want_explain: bool, emulated: list, profile_path) -> list[str]:
    best = result.best
    lines = []
    note = f" (emulated chips: {', '.join(emulated)})" if emulated else ""
    lines.append(f"plan for {job.model.name} on {job.cluster.name}: {job.cluster.total_chips} chips, "
                 f"{best.world_size} used{note}")
    lines.append(_candidate(best))
    lines.append("")
    header = f"{'stage':>5}  {'pipe':>4}  {'island':<10} {'chip':<13} {'tp':>3} {'dp':>4}  {'layers':<12} " \
             f"{'recompute':<9} {'time/mb':>10}  {'memory GB':>16}  source"
    lines.append(header)
    usable = {i.name: job.cluster.chip(i.chip).memory_gb - job.cluster.chip(i.chip).memory_reserve_gb
              for i in job.cluster.islands}
    for s in best.stages:
        layers = layers_text(s)
        lines.append(f"{s.index:>5}  {s.pipeline:>4}  {s.island:<10} {s.chip:<13} {s.tp:>3} {s.dp:>4}  {layers:<12} "
                     f"{s.recompute:<9} {_secs(s.time_s):>10}  {s.memory_gb:>7.3g} / {usable[s.island]:<6.3g}  {s.source}")
    lines.append("")
    mfu = ", ".join(f"{chip} {value:.2f}" for chip, value in best.mfu.items())
    lines.append(f"predicted step {_secs(best.predicted_step_s)}, {best.tokens_per_s:,.0f} tokens/s, MFU {mfu} "
                 f"(fleet {best.breakdown.get('mfu_fleet', 0):.2f})")
    idle = {k: v for k, v in best.idle.items() if v}
    if idle:
        lines.append("idle chips: " + ", ".join(f"{k} {v}" for k, v in idle.items()))
    base = result.baseline_plan
    if base:
        lines.append(f"naive baseline (equal layers per stage, one TP for the fleet): {_secs(base.predicted_step_s)} "
                     f"-> predicted speed-up {base.predicted_step_s / best.predicted_step_s:.2f}x")
    else:
        lines.append("naive baseline (equal layers per stage, one TP for the fleet): does not fit in memory")
    sources = best.provenance.get("layer_time", {})
    measured = "all layer times measured" if best.measured else (
        "layer times: " + ", ".join(f"{c} {src}" for c, src in sources.items()))
    bridge = best.provenance.get("bridge", "config")
    lines.append(f"{measured}; bridge figures from {'the profile' if bridge == 'measured' else 'the cluster file'}"
                 + ("" if profile_path else " (run 'hetero profile' to measure)"))
    lines.extend(headroom_lines(headroom(result)))
    lines.append(search_line(result))
    if top > 1:
        lines.append("")
        lines.append(f"top {min(top, len(result.plans))}:")
        for rank, plan in enumerate(result.plans[:top], 1):
            lines.append(f"  {rank}. {_secs(plan.predicted_step_s):>10}  {_candidate(plan)}")
    if want_explain:
        lines.append("")
        if len(result.plans) > 1:
            lines.extend(explain.compare(best, result.plans[1]))
        else:
            lines.append("no runner-up: only one plan fits")
        if base:
            lines.extend(explain.compare(best, base, "naive"))
    return lines


def search_line(result) -> str:
    """How long the search took and what it costed: hetero-PP configurations, replica options, and
    the hybrid part (groupings of the islands into pipelines, pipelines costed over groups)."""
    stats = result.stats
    hybrid = (f", {stats.get('hybrid_evaluated', 0)} hybrid pipelines costed for {stats['hybrid_groupings']} "
              f"groupings of the islands in {stats.get('hybrid_s', 0.0):.2f} s" if stats.get("hybrid_groupings") else "")
    return (f"searched in {result.search_s:.2f} s ({stats.get('pp_evaluated', 0)} hetero-PP configurations costed "
            f"of {stats.get('pp_groups', 0)} groups bounded, {stats.get('dp_evaluated', 0)} replica options{hybrid}"
            + (", hetero-PP cut at its costing budget" if stats.get("pp_cut_at_budget") else "") + ")")


def headroom_lines(room: dict) -> list[str]:
    """The plan against each island alone and against its lower bounds, in words."""
    alone = dict(room["islands_alone_tokens_per_s"])
    total = alone.pop("sum")
    if not alone or len(alone) < 2:
        return []
    parts = " + ".join(f"{name} {_mtok(v)}" for name, v in alone.items())
    lines = [f"islands alone (each on the whole batch): {parts} = {_mtok(total)} tokens/s; "
             f"this plan reaches {room['efficiency_vs_islands']:.3f} of their sum"]
    bounds = room["lower_bounds"]
    words = []
    if "best_island_alone" in bounds:
        words.append(f"best island alone ({bounds['best_island_alone']['island']}) "
                     f"{_mtok(bounds['best_island_alone']['tokens_per_s'])}")
    if "hetero_dp" in bounds:
        words.append(f"best hetero-DP {_mtok(bounds['hetero_dp']['tokens_per_s'])}")
    if words:
        lines.append("lower bounds: " + ", ".join(words) + " tokens/s: "
                     + ("met" if room["meets_lower_bounds"] else "NOT met"))
    if "hetero_dp" in bounds:
        lines.append(f"the islands on their hetero-DP shares of the batch, each on its own: "
                     f"{_mtok(bounds['hetero_dp']['islands_at_share_tokens_per_s'])} tokens/s "
                     f"(a share has more pipeline bubble than the whole batch)")
    return lines


def _mtok(value: float) -> str:
    return f"{value / 1e6:.3g} M" if value >= 1e5 else f"{value:,.0f}"


def _candidate(plan: Plan) -> str:
    """A candidate in the ranked list: the planner's label (Plan.label) and its recompute mode."""
    return f"{plan.label}, recompute {plan.recompute}"


def _secs(value: float) -> str:
    if value >= 1:
        return f"{value:.3f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.1f} us"
