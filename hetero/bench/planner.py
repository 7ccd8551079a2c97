"""`hetero bench planner`: search time at 1,024 chips, gap to brute force, speed-up, A100 MFU anchor."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from hetero.config import load_catalog, load_job
from hetero.planning import Progress, chip_model, fleet_spec, headroom, model_spec, plan_job, train_spec
from partitioner.costs import CostModel
from partitioner.evaluate import tail_parts
from partitioner.inputs import ChipModel, FleetSpec, IslandSpec, ModelSpec, TrainSpec
from partitioner.search import brute_force, search

HELP = ("plan search at 1,024 and 8,192 chips (time, tokens/s, ratio to the islands alone), gap to "
        "brute force, speed-up over naive, A100 MFU anchor")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(ROOT, "configs")
SEARCH_GOAL_S = 10.0
GAP_GOAL = 0.01
RATIO_GOAL = 0.95          # issue #20: within 5% of the sum of the islands planned alone
INTERLEAVE_V = 4           # issue #19: chunks per stage the interleaved search may use
# (report key, cluster, train): the 1,024-chip three-kind example and the 8,192-chip four-kind fleet
FLEETS = (("search_1024", "a800-910b-kunlun-1024.yaml", "train-llama2.yaml"),
          ("search_8192", "mixed-8192.yaml", "train-llama2-4096.yaml"))
# Narayanan et al. 2021 (SC'21, "Efficient Large-Scale Language Model Training on GPU
# Clusters Using Megatron-LM"), Table 1: 138-163 TFLOP/s per A100 = 44-52% of the 312
# TFLOP/s bf16/fp16 peak, counting the FLOPs of full activation recomputation.
ANCHOR: dict = {"source": "Narayanan et al. 2021, Table 1 (Megatron-LM on A100, GPT models 1.7B-1T)",
                "tflops_per_gpu": [138, 163], "fraction_of_peak": [0.44, 0.52]}
ISSUE_RANGE = [0.35, 0.55]


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="skip the slowest brute-force case")


def _cfg(name: str) -> str:
    return os.path.join(CONFIGS, name)


def _log(args, text: str) -> None:
    if not args.json:
        print(text, flush=True)
    else:
        print(text, file=sys.stderr, flush=True)


def _island(name: str, chip: str, nodes: tuple) -> IslandSpec:
    return IslandSpec(name, chip_model(load_catalog()[chip]), nodes)


def _emu(name: str, tflops: float, memory_gb: float, bandwidth_gbps: float) -> ChipModel:
    """An emulated chip for the brute-force cases (efficiencies 1, the reference ops' memory)."""
    return ChipModel(name, {"fp32": tflops * 1e12}, memory_gb * 1e9, 0.0, bandwidth_gbps * 1e9,
                     bandwidth_gbps / 2 * 1e9, emulated=True, accelerator="emulated")


def _tty(args) -> bool:
    return not args.json and sys.stderr.isatty()


def fleet_row(result) -> dict:
    """One fleet's numbers: search time, predicted tokens/s, the islands' sum and the ratio."""
    best = result.best
    room = headroom(result)
    ratio = room["efficiency_vs_islands"]
    return {"search_s": result.search_s, "goal_s": SEARCH_GOAL_S, "ok": result.search_s <= SEARCH_GOAL_S,
            "configs_bounded": result.stats.get("pp_groups"), "configs_evaluated": result.evaluated,
            "kind": best.kind, "plan": best.label, "predicted_step_s": best.predicted_step_s,
            "tokens_per_s": best.tokens_per_s, "mfu": dict(best.mfu),
            "islands_alone_tokens_per_s": room["islands_alone_tokens_per_s"],
            "ratio_vs_islands": ratio, "ratio_goal": RATIO_GOAL,
            "ratio_ok": ratio is not None and ratio >= RATIO_GOAL,
            "lower_bounds": room["lower_bounds"], "meets_lower_bounds": room["meets_lower_bounds"],
            "stats": dict(result.stats),
            "baseline_step_s": result.baseline_plan.predicted_step_s if result.baseline_plan else None}


def fleet_line(row: dict) -> str:
    alone = row["islands_alone_tokens_per_s"]
    return (f"searched in {row['search_s']:.2f} s, {row.get('search_cpu_s', 0.0):.2f} s of CPU "
            f"(goal <= {SEARCH_GOAL_S:g} s: {'met' if row['ok'] else 'MISSED'}); "
            f"{row['tokens_per_s'] / 1e6:.3f} M tokens/s, islands alone sum {alone['sum'] / 1e6:.3f} M, "
            f"ratio {row['ratio_vs_islands']:.3f} (goal >= {RATIO_GOAL}: {'met' if row['ratio_ok'] else 'MISSED'}); "
            f"{row['kind']} plan won: {row['plan']}")


def interleaving_row(job, plain) -> dict:
    """The same fleet searched with interleaved 1F1B allowed (up to INTERLEAVE_V chunks per stage)
    beside `plain` (the default search's result): tokens/s, the ratio to the islands alone (each
    island alone may interleave too), the chosen plan's chunks and bubble, the search's CPU time."""
    specs = fleet_spec(job.cluster), model_spec(job.model), train_spec(job.train, max_virtual_stages=INTERLEAVE_V)
    cpu = time.process_time()
    result = search(*specs, top=2)
    cpu = time.process_time() - cpu
    room = headroom(result)
    best = result.best
    cm = CostModel(*specs)
    return {"max_virtual_stages": INTERLEAVE_V, "search_s": result.search_s, "search_cpu_s": cpu,
            "tokens_per_s": best.tokens_per_s, "islands_alone_tokens_per_s": room["islands_alone_tokens_per_s"],
            "ratio_vs_islands": room["efficiency_vs_islands"], "plan": best.label,
            "virtual_stages": [p.virtual_stages for p in best.pipelines],
            "bubble_fraction": best.breakdown["bubble_fraction"],
            "plain_bubble_fraction": plain.best.breakdown["bubble_fraction"],
            "meets_lower_bounds": room["meets_lower_bounds"], "gap": gap_rows(result, cm)}


def homogeneous_row(job, result) -> dict:
    """The same ratio on the fleet made homogeneous: every island's chips replaced by the chip of the
    island fastest alone (same islands, nodes, network and bridge), searched the same way. No chip
    differs there, so what it misses of its islands' sum is the anchor's, not the mix's: each island
    alone trains on the whole global batch, a quarter of the chips on it has four times the samples
    per chip, so fewer bubbles and less communication per sample than the fleet on its share."""
    fleet = fleet_spec(job.cluster)
    fastest = min(result.islands_alone, key=lambda name: result.islands_alone[name].step)
    chip = next(i.chip for i in fleet.islands if i.name == fastest)
    same = dataclasses.replace(fleet, islands=tuple(dataclasses.replace(i, chip=chip) for i in fleet.islands))
    cpu = time.process_time()
    res = search(same, model_spec(job.model), train_spec(job.train), top=2)
    room = headroom(res)
    return {"chip": chip.name, "search_cpu_s": time.process_time() - cpu, "tokens_per_s": res.best.tokens_per_s,
            "islands_alone_tokens_per_s": room["islands_alone_tokens_per_s"],
            "ratio_vs_islands": room["efficiency_vs_islands"], "plan": res.best.label}


def homogeneous_line(row: dict) -> str:
    return (f"the same fleet with every chip a {row['chip']} (no mix at all): {row['tokens_per_s'] / 1e6:.3f} M "
            f"tokens/s, islands alone sum {row['islands_alone_tokens_per_s']['sum'] / 1e6:.3f} M, ratio "
            f"{row['ratio_vs_islands']:.3f}: the ratio's ceiling comes from the anchor (each island alone on "
            f"the whole batch), not from mixing chips; plan: {row['plan']}")


def gap_rows(result, cm: CostModel | None = None) -> list[dict]:
    """Where the ratio to the islands alone goes, per island of the best hetero-DP plan: its share
    of the batch, its step, the part of the step that does not shrink with the share (fill and
    drain plus the DP reduction and optimizer tail), and the step its share would take at the
    island's alone rate. Each island alone spreads that fixed part over the whole batch, the
    fleet over its share: the ceiling the ratio meets (issue #20). With the cost model `cm`, the tail
    in its parts: the DP reduction's exposed part (the rest overlaps the backward) beside the whole
    reduction, and the update (with ZeRO-1's all-gather of the parameters)."""
    hdp, alone = result.hetero_dp, result.islands_alone
    if hdp is None:
        return []
    batch = sum(pe.samples for pe in hdp.pipes)
    out = []
    for pe in hdp.pipes:
        share = pe.samples
        solo = alone.get(pe.island.name)
        out.append({"island": pe.island.name, "share": share / batch, "step_s": pe.step(), "fixed_s": pe.fill,
                    "tail_s": pe.tail, "virtual_stages": pe.v, "micro_batches": pe.m,
                    "at_alone_rate_s": solo.step * share / batch if solo else None,
                    "alone_fixed_s": solo.pipes[0].fill if solo and len(solo.pipes) == 1 else None})
        if cm is not None:
            exposed, update, whole = tail_parts(cm, pe.layout, pe.dp, pe.counts, pe.stage_times, pe.boundary, pe.v)
            out[-1].update({"dp_reduce_exposed_s": exposed, "dp_reduce_s": whole, "update_s": update})
    return out


def gap_line(row: dict) -> str:
    return (f"{row['island']}: share {row['share']:.3f}, step {row['step_s']:.2f} s (at its alone rate "
            f"{row['at_alone_rate_s']:.2f} s), fixed per step {row['fixed_s']:.2f} s of which DP reduce + "
            f"optimizer {row['tail_s']:.2f} s{_tail_detail(row)}, {row['virtual_stages']} chunk(s) per stage, "
            f"m {row['micro_batches']}")


def _tail_detail(row: dict) -> str:
    if "dp_reduce_s" not in row:
        return ""
    return (f" (DP reduce exposed {row['dp_reduce_exposed_s']:.2f} s of {row['dp_reduce_s']:.2f} s, "
            f"update {row['update_s']:.2f} s)")


def interleaving_line(row: dict) -> str:
    return (f"interleaved (<= {row['max_virtual_stages']} chunks per stage): {row['tokens_per_s'] / 1e6:.3f} M tokens/s, "
            f"islands alone sum {row['islands_alone_tokens_per_s']['sum'] / 1e6:.3f} M, ratio "
            f"{row['ratio_vs_islands']:.3f}, bubble {row['bubble_fraction']:.3f} (plain 1F1B's plan "
            f"{row['plain_bubble_fraction']:.3f}), searched in {row['search_cpu_s']:.2f} s of CPU; "
            f"plan: {row['plan']}")


def small_cases(quick: bool) -> list:
    """(name, fleet, model, train) with at most 16 chips, for brute force."""
    job = load_job(cluster=_cfg("emulated-mixed.yaml"), model=_cfg("llama-tiny.yaml"), train=_cfg("train-tiny.yaml"))
    cases = [("emulated-mixed x llama-tiny (4 chips)", fleet_spec(job.cluster), model_spec(job.model),
              train_spec(job.train))]
    emu3 = FleetSpec("emu-3x4", (_island("fast", "emu-fast", (2, 2)), _island("slow", "emu-slow", (2, 2)),
                                 _island("tiny", "emu-tiny", (4,))), 1e9, 1e9, 50e-6)
    cases.append(("emu-fast 4 + emu-slow 4 + emu-tiny 4 x llama-tiny (12 chips)", emu3, model_spec(job.model),
                  TrainSpec(global_batch=8, micro_batch=2, dtype="fp32")))
    gpu = FleetSpec("a800-910b-16", (_island("a800", "A800-80G", (4, 4)), _island("ascend", "Ascend-910B", (8,))),
                    25e9, 12.5e9, 30e-6)
    small_llama = ModelSpec(layers=12, hidden=2048, heads=16, kv_heads=8, ffn_hidden=5632, vocab=32000,
                            seq_len=2048, name="llama-12L-2048")
    # two islands that hold the model only together beside one that holds it alone: a hybrid plan wins
    hyb = FleetSpec("emu-hybrid-8", (IslandSpec("a", _emu("emu-a", 0.006, 0.014, 3), (2,)),
                                     IslandSpec("b", _emu("emu-b", 0.004, 0.014, 2), (2,)),
                                     IslandSpec("c", _emu("emu-c", 0.008, 0.1, 4), (4,))), 1e9, 1e9, 50e-6)
    cases.append(("emu-a 2 + emu-b 2 (hold it only together) + emu-c 4 x llama-tiny (8 chips)", hyb,
                  model_spec(job.model), TrainSpec(global_batch=8, micro_batch=2, dtype="fp32")))
    if not quick:
        cases.append(("A800 8 + Ascend-910B 8 x llama 12 layers/2048 (16 chips)", gpu, small_llama,
                      TrainSpec(global_batch=32, micro_batch=1, dtype="bf16", max_micro_batch=4)))
    return cases


def run(args) -> int:
    report: dict = {"anchor_search_goal_s": SEARCH_GOAL_S, "brute_force_gap_goal": GAP_GOAL}

    # 1. Search time, throughput and headroom at 1,024 and 8,192 chips.
    fleets = {}
    for key, cluster, train in FLEETS:
        job = load_job(cluster=_cfg(cluster), model=_cfg("llama2-70b.yaml"), train=_cfg(train))
        chips = job.cluster.total_chips if job.cluster is not None else 0
        _log(args, f"1. {cluster} ({chips:,} chips) x llama2-70b x {train}")
        cpu = time.process_time()
        result = plan_job(job, top=2, progress=Progress("   searching") if _tty(args) else None)
        fleets[key] = result
        report[key] = fleet_row(result)
        # on a shared host the wall clock counts other processes' time; the CPU time does not
        report[key]["search_cpu_s"] = time.process_time() - cpu
        _log(args, "   " + fleet_line(report[key]))
        report[key]["homogeneous"] = homogeneous_row(job, result)
        _log(args, "   " + homogeneous_line(report[key]["homogeneous"]))
        report[key]["interleaving"] = interleaving_row(job, result)
        _log(args, "   " + interleaving_line(report[key]["interleaving"]))
        for gap in report[key]["interleaving"]["gap"]:
            _log(args, "     hetero-DP " + gap_line(gap))
    result = fleets["search_1024"]
    report["goal_ratio_vs_islands"] = RATIO_GOAL

    # 2. Brute force on small fleets.
    _log(args, "2. searched plan vs brute-force enumeration of the same space (fleets <= 16 chips)")
    gaps = []
    for name, fleet, model, train in small_cases(args.quick):
        t0 = time.perf_counter()
        res = search(fleet, model, train)
        t1 = time.perf_counter()
        bf = brute_force(fleet, model, train)
        t2 = time.perf_counter()
        assert bf is not None, name      # the search found a plan, so the same space has one
        gap = res.best.predicted_step_s / bf.step - 1.0
        gaps.append({"case": name, "search_kind": res.best.kind, "brute_force_kind": bf.kind,
                     "search_step_s": res.best.predicted_step_s, "brute_force_step_s": bf.step,
                     "gap": gap, "ok": gap <= GAP_GOAL, "search_s": t1 - t0, "brute_force_s": t2 - t1,
                     "search_plan": res.best.label, "brute_force_plan": bf.label})
        _log(args, f"   {name}: search {res.best.predicted_step_s:.5g} s ({res.best.kind}), brute force "
                   f"{bf.step:.5g} s ({bf.kind}), "
                   f"gap {100 * gap:+.3f}% (goal <= {100 * GAP_GOAL:g}%); search {t1 - t0:.2f} s, "
                   f"brute force {t2 - t1:.1f} s")
    report["brute_force"] = gaps

    # 3. Speed-up over the naive plan on the mixed examples.
    _log(args, "3. predicted speed-up over the naive plan (equal layers per stage, one TP for the fleet)")
    speedups = []
    for cluster, model, train in (("emulated-mixed.yaml", "llama-tiny.yaml", "train-tiny.yaml"),
                                  ("a800-910b-32.yaml", "llama2-7b.yaml", "train-llama2.yaml"),
                                  ("a800-910b-32.yaml", "llama2-70b.yaml", "train-llama2.yaml"),
                                  ("a800-910b-kunlun-1024.yaml", "llama2-70b.yaml", "train-llama2.yaml")):
        if cluster.startswith("a800-910b-kunlun"):
            res = result
        else:
            res = plan_job(load_job(cluster=_cfg(cluster), model=_cfg(model), train=_cfg(train)))
        base = res.baseline_plan
        row = {"cluster": cluster, "model": model, "predicted_step_s": res.best.predicted_step_s,
               "baseline_step_s": base.predicted_step_s if base else None,
               "speedup": base.predicted_step_s / res.best.predicted_step_s if base else None,
               "plan": res.best.label, "baseline": base.label if base else None}
        speedups.append(row)
        sp = f"{row['speedup']:.2f}x" if row["speedup"] else "naive plan does not fit"
        _log(args, f"   {cluster} x {model}: {res.best.predicted_step_s:.4g} s vs naive "
                   f"{row['baseline_step_s'] if row['baseline_step_s'] is None else format(row['baseline_step_s'], '.4g')} s"
                   f" -> {sp}")
    report["speedup"] = speedups

    # 4. MFU anchor: GPT-3 175B on 1,024 A100s.
    _log(args, "4. homogeneous A100 fleet: GPT-3 175B on 1,024 A100-80G (configs/a100-1024.yaml, gpt3-175b.yaml)")
    job = load_job(cluster=_cfg("a100-1024.yaml"), model=_cfg("gpt3-175b.yaml"), train=_cfg("train-llama2.yaml"))
    res = plan_job(job)
    p = res.best
    mfu = p.breakdown["mfu_used_chips"]
    hfu = p.breakdown["hfu_used_chips"]
    peak = 312.0
    anchor = {"plan": p.label, "recompute": p.recompute, "predicted_step_s": p.predicted_step_s,
              "mfu": mfu, "hfu": hfu, "tflops_per_gpu_hardware": hfu * peak, "anchor": ANCHOR,
              "issue_range": ISSUE_RANGE, "mfu_in_issue_range": ISSUE_RANGE[0] <= mfu <= ISSUE_RANGE[1],
              "hfu_in_anchor_range": bool(ANCHOR["fraction_of_peak"][0] <= hfu <= ANCHOR["fraction_of_peak"][1]),
              "search_s": res.search_s}
    report["a100_anchor"] = anchor
    _log(args, f"   plan: {anchor['plan']}, recompute {p.recompute}")
    _log(args, f"   predicted MFU {mfu:.3f} (model FLOPs), HFU {hfu:.3f} = {hfu * peak:.0f} TFLOP/s per A100 "
               f"(with recompute FLOPs)")
    _log(args, f"   anchor: {ANCHOR['source']}: {ANCHOR['tflops_per_gpu'][0]}-{ANCHOR['tflops_per_gpu'][1]} "
               f"TFLOP/s = {ANCHOR['fraction_of_peak'][0]:.2f}-{ANCHOR['fraction_of_peak'][1]:.2f} of peak "
               f"(issue's range {ISSUE_RANGE[0]}-{ISSUE_RANGE[1]}): "
               f"{'inside' if anchor['hfu_in_anchor_range'] else 'OUTSIDE'}")
    _log(args, "   note: the analytic model assumes 70% matmul efficiency on vendor chips (partitioner/inputs.py); "
               "the anchor checks the whole step model, not that constant alone")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0
