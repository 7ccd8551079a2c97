"""`hetero bench efficiency`: how much of its islands' combined power the mixed fleet keeps.

Each island trains the model alone, on its own best plan, then the whole mixed
fleet trains it; same model, same global batch. E = tokens/s(mixed) /
sum over islands of tokens/s(island alone). The sub-fleet runs are the anchor,
measured in the same invocation. The cost model's E (predicted_efficiency) is
printed beside it, and for the 1,024-chip example as well (planned only).

An all-emulated fleet runs every chip's math on this host. With more emulated
chips than host cores, a fast chip's ops wait on the shared CPU rather than on
its clock, and more so in the mixed run (every chip at once) than alone, which
would charge the host's shortfall to the mixed fleet. So by default every run
(alone and mixed alike) is time-dilated by k = ceil(emulated chips / host
cores): k wall seconds per chip second, all figures in chip time.

The mixed fleet is planned from the islands' runs alone (issue 19): an emulated
chip is charged exactly the cost model's roofline, so what an island's step takes
beyond its prediction is host work a stage pays per micro-batch whatever its
layers (island_host_cost); the planner adds it per stage and micro-batch, so a
pipeline of more stages is charged more. What the run spends after its last compute
beyond the predicted DP reduction and update is charged per step instead, so a plan
that gives the island few micro-batches still pays it whole. A TP degree a candidate
gives an island that its run alone did not use is probed first (a short run of the
island alone at that TP) and the candidates re-planned (hetero.bench.calibration;
--no-tp-probes skips it). Each candidate's measured step is reported beside its
predicted one (--no-host-costs: the model before, which scaled the layer times instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
from dataclasses import asdict

import yaml

from hetero.bench.calibration import (after_compute, alone, calibration_profile, fitting_probe_plan, island_host_cost,
                                      missing_tps, probe_job, probe_record, subfleet_name)
from hetero.config import load_job
from hetero.errors import UserError
from hetero.runner import KINDS, ROOT, add_job_arguments, default_paths, hybrid_possible, search_plan, train_fleet

HELP = "mixed-fleet efficiency E against each island training alone (goal E >= 0.97 on emulated-mixed)"
GOAL = 0.97
GOALS = {"emulated-three": 0.93}     # issue 19: three chip types in miniature
BIG_EXAMPLE = ("a800-910b-kunlun-1024.yaml", "llama2-70b.yaml", "train-llama2.yaml")


def add_arguments(parser) -> None:
    add_job_arguments(parser, train_default="train-efficiency.yaml")
    parser.add_argument("--steps", type=int, default=4, help="steps per run; the first is warm-up (default 4)")
    parser.add_argument("--time-dilation", metavar="K", default="auto",
                        help="emulated fleets only: wall seconds per chip second in every run, so that a small "
                             "host keeps ahead of its emulated chips (auto, the default: ceil(emulated chips / "
                             "host cores); 1 turns it off)")
    parser.add_argument("--no-host-costs", action="store_true",
                        help="plan the mixed fleet without the host costs its islands' runs alone show (the cost "
                             "model before issue 19: layer times scaled to match instead)")
    parser.add_argument("--no-tp-probes", action="store_true",
                        help="plan the mixed fleet without probing the TP degrees its candidate plans give an "
                             "island that the island's run alone did not use (each probe trains that island alone "
                             "at that TP on a quarter of the global batch)")
    parser.add_argument("--out", metavar="DIR", help="where every run directory goes (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    paths = default_paths(cluster=args.cluster, model=args.model,
                          train=args.train or os.path.join(ROOT, "configs", "train-efficiency.yaml"))
    job = load_job(**paths).require("cluster", "model", "train")
    if len(job.cluster.islands) < 2:
        raise UserError(f"{paths['cluster']}: efficiency compares islands; this cluster has only one")
    if args.steps < 2:
        raise UserError("--steps must be at least 2 (the first step is warm-up)")
    dilation, why = time_dilation(job.cluster, args.time_dilation)
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="hetero-bench-efficiency-"))
    if os.path.exists(os.path.join(out, "mixed")):
        raise UserError(f"{out} already holds an efficiency run; pass another --out")
    os.makedirs(out, exist_ok=True)
    say = (lambda message: None) if args.json else (lambda message: print(f"bench efficiency: {message}", flush=True))
    say(f"time dilation {dilation:g}: {why}")
    with _dilated(dilation):
        report = _measure(in_chip_time(job, dilation), paths, out, args, say)
    report["time_dilation"] = dilation
    report["goal"] = GOALS.get(job.cluster.name, GOAL)
    report["goal_met"] = report["efficiency"] >= report["goal"]
    with open(os.path.join(out, "efficiency.json"), "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0 if report["goal_met"] else 1


def _measure(job, paths, out, args, say) -> dict:
    """Each island alone, then the mixed fleet; E and its evidence."""
    subfleets, predicted_sub = {}, 0.0
    for island in job.cluster.islands:
        sub_paths = dict(paths, cluster=_write_subfleet(paths["cluster"], island.name, out))
        sub_job = alone(job, island)
        say(f"island {island.name} alone ({island.size} x {island.chip})")
        result = _train(sub_job, sub_paths, os.path.join(out, "subfleets", island.name), args, say)
        subfleets[island.name] = _summary(result, job)
        if not args.no_host_costs:
            subfleets[island.name]["host_cost"] = asdict(island_host_cost(result.plan.to_dict(), result.steady_step_s,
                                                                          after_compute(result.run_dir)))
        predicted_sub += result.plan.tokens_per_s
    # Plan the mixed fleet with each island's speed and host costs as just measured
    # alone (as `hetero profile` would), so the split between islands follows reality.
    plans = _calibrated_plans(job, paths, subfleets, out, args, say)
    candidates = []
    for plan in plans:
        say(f"the mixed fleet as {plan.kind}, planned with the measured island speeds")
        plan_file = os.path.join(out, "candidates", f"{plan.kind}-plan.json")
        os.makedirs(os.path.dirname(plan_file), exist_ok=True)
        with open(plan_file, "w", encoding="utf-8") as handle:
            handle.write(plan.to_json())
        result = _train(job, paths, os.path.join(out, "candidates", plan.kind), args, say, plan_file=plan_file)
        candidates.append(_summary(result, job))
    mixed = max(candidates, key=lambda c: c["tokens_per_s"])
    # The measured winner is the mixed fleet's run: out/mixed, where `hetero report` looks.
    winner = os.path.join(out, "mixed")
    os.replace(mixed["run_dir"], winner)
    mixed["run_dir"] = winner

    combined = sum(s["tokens_per_s"] for s in subfleets.values())
    return {
        "efficiency": mixed["tokens_per_s"] / combined,
        "mixed": mixed, "subfleets": subfleets,
        "mixed_candidates": [{"kind": c["plan"]["kind"], "tokens_per_s": c["tokens_per_s"],
                              "efficiency": c["tokens_per_s"] / combined,
                              # what the plan's shape allows before any engine loss: the calibrated
                              # cost model's tokens/s for it over the measured anchors
                              "predicted_efficiency": c["predicted_tokens_per_s"] / combined,
                              "predicted_tokens_per_s": c["predicted_tokens_per_s"],
                              "step_s": c["step_s"], "predicted_step_s": c["predicted_step_s"],
                              "measured_over_predicted": c["step_s"] / c["predicted_step_s"],
                              "run_dir": c["run_dir"]}
                             for c in candidates],
        "host_costs": {name: sub["host_cost"] for name, sub in subfleets.items() if "host_cost" in sub},
        # The cost model alone, before any measurement: its mixed plan against its island plans.
        "predicted_efficiency": search_plan(job, args.kind).tokens_per_s / predicted_sub,
        "emulated": any(job.cluster.chip(i.chip).emulated for i in job.cluster.islands),
        "cluster": job.cluster.name, "model": job.model.name, "global_batch": job.train.global_batch,
        "big_example": predicted_efficiency_of(*BIG_EXAMPLE), "out": out,
    }


def _calibrated_plans(job, paths, subfleets: dict, out: str, args, say) -> list:
    """The candidate plans, planned with the islands' runs alone and, for each TP degree a candidate
    gives an island that no run measured, a probe of it (hetero.bench.calibration); re-planned after
    each round of probes until every TP degree the candidates use is measured (or cannot be: no
    one-stage plan of the island at that TP fits its chips)."""
    profile = calibration_profile(job, subfleets)
    plans = candidate_plans(job, args.kind, profile)
    unprobed: set = set()
    while not args.no_tp_probes and (missing := missing_tps(plans, subfleets, unprobed)):
        for name, t, b in missing:
            island = job.cluster.island(name)
            plan = fitting_probe_plan(job, island, t, b, profile)
            if plan is None:
                say(f"island {name} at TP {t}: not probed, no one-stage plan at that TP fits its chips; "
                    "planned from its run alone")
                unprobed.add((name, t))
                continue
            say(f"island {name} alone at TP {t} (a candidate runs it so; its run alone did not): "
                f"{plan.global_batch} samples, micro-batch {plan.micro_batch}")
            subfleets[name].setdefault("tp_probes", []).append(_probe(job, paths, island, plan, out, args, say))
        profile = calibration_profile(job, subfleets)
        plans = candidate_plans(job, args.kind, profile)
    return plans


def _probe(job, paths, island, plan, out: str, args, say) -> dict:
    """Train the probe's plan on its island alone; its record (calibration.probe_record)."""
    t, b = plan.stages[0].tp, plan.micro_batch
    run_dir = os.path.join(out, "probes", f"{island.name}-tp{t}")
    sub_paths = dict(paths, cluster=_write_subfleet(paths["cluster"], island.name, out),
                     train=_write_train(paths["train"], plan, run_dir + ".train.yaml"))
    plan_file = run_dir + ".plan.json"
    with open(plan_file, "w", encoding="utf-8") as handle:
        handle.write(plan.to_json())
    result = _train(probe_job(job, island, t, b), sub_paths, run_dir, args, say, plan_file=plan_file)
    return probe_record(plan, t, b, result.steady_step_s, after_compute(result.run_dir), result.run_dir)


def _write_train(train_path: str, plan, path: str) -> str:
    """The train file with the probe's global batch and micro-batch."""
    return _write_yaml(path, dict(_section(train_path, "train"), global_batch=plan.global_batch,
                                  micro_batch=plan.micro_batch))


def _section(source: str, key: str) -> dict:
    """The `key` section of the YAML file `source` (the whole file where it holds that section alone)."""
    with open(source, encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    return data[key] if key in data else data


def _write_yaml(path: str, data: dict) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(data, handle, sort_keys=False)
    return path


def candidate_plans(job, kind: str, profile) -> list:
    """The best plan of each kind asked for (auto: hetero-PP, hetero-DP and, on three islands or
    more, hybrid). The cost model ranks plans well within a kind but can misjudge one kind
    against another (per-stage costs it only scales from whole-model runs), so each is measured."""
    kinds = auto_kinds(job.cluster) if kind == "auto" else (kind,)
    plans = []
    for each in kinds:
        try:
            plans.append(search_plan(job, each, profile))
        except UserError:
            if len(kinds) == 1:
                raise
    if not plans:
        raise UserError(f"no plan of kind {' or '.join(kinds)} fits {job.cluster.name}")
    return plans


def auto_kinds(cluster) -> tuple[str, ...]:
    """The plan kinds `--kind auto` measures: those `hetero run --kind auto` chooses from, hybrid
    where one can exist."""
    return tuple(kind for kind in KINDS["auto"] if kind != "hybrid" or hybrid_possible(cluster))


def time_dilation(cluster, given: str = "auto", cores: int | None = None) -> tuple[float, str]:
    """(k, why) for `--time-dilation`: how much to stretch the emulated chips' time."""
    real = [i.name for i in cluster.islands if not _emulated(cluster, i)]
    cores = cores or _host_cores()
    if given != "auto":
        try:
            k = float(given)
        except ValueError:
            raise UserError(f"--time-dilation must be a number >= 1 or 'auto', got {given!r}") from None
        if not 1.0 <= k < math.inf:
            raise UserError(f"--time-dilation must be a number >= 1 or 'auto', got {given!r}")
        if k != 1.0 and real:
            raise UserError(f"--time-dilation stretches emulated chips only, and island(s) {', '.join(real)} "
                            "are real chips: their time cannot be stretched")
        return k, "as given"
    if real:
        return 1.0, f"island(s) {', '.join(real)} are real chips, so no run is stretched"
    chips = cluster.total_chips
    k = float(max(1, math.ceil(chips / cores)))
    return k, (f"{chips} emulated chips share {cores} host core(s); every run's chips take {k:g} wall "
               "seconds per chip second and figures are in chip time")


def in_chip_time(job, k: float):
    """The job with its network figures as a run dilated k times sees them: host-side
    communication (gloo, the bridge) is not stretched, so in chip time it is k times
    faster, and plans made for the run must know it."""
    if k == 1.0:
        return job
    net = job.cluster.network
    network = dataclasses.replace(
        net, intra_node_latency_us=net.intra_node_latency_us / k, inter_node_latency_us=net.inter_node_latency_us / k,
        intra_node_gbps=None if net.intra_node_gbps is None else net.intra_node_gbps * k,
        inter_node_gbps=net.inter_node_gbps * k,
        bridge=dataclasses.replace(net.bridge, gbps=net.bridge.gbps * k, latency_us=net.bridge.latency_us / k))
    return dataclasses.replace(job, cluster=dataclasses.replace(job.cluster, network=network))


def _host_cores() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than the host has)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _emulated(cluster, island) -> bool:
    return island.accelerator == "emulated" or cluster.chip(island.chip).emulated


@contextlib.contextmanager
def _dilated(k: float):
    """Workers inherit the launcher's environment: the emulated accelerator reads k there."""
    from accelerators.emulated import DILATION_ENV

    before = os.environ.get(DILATION_ENV)
    if k != 1.0:
        os.environ[DILATION_ENV] = f"{k:g}"
    else:
        os.environ.pop(DILATION_ENV, None)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DILATION_ENV, None)
        else:
            os.environ[DILATION_ENV] = before


def _train(job, paths, run_dir, args, say, plan_file=None):
    result = train_fleet(job, paths, run_dir, args.steps, plan_file=plan_file, progress=not args.json, say=say)
    if result.code != 0:
        raise UserError(f"the run in {run_dir} failed (exit {result.code}); see its launcher.log")
    return result


def _summary(result, job) -> dict:
    tokens = job.train.global_batch * job.model.seq_len
    plan = result.plan.to_dict()
    return {
        "tokens_per_s": tokens / result.steady_step_s, "step_s": result.steady_step_s,
        "predicted_tokens_per_s": plan["tokens_per_s"], "predicted_step_s": plan["predicted_step_s"],
        "run_dir": result.run_dir,
        "plan": {"kind": plan["kind"],
                 "stages": [{k: s[k] for k in ("island", "chip", "tp", "dp", "layers")} for s in plan["stages"]],
                 "samples": [p["samples"] for p in plan["pipelines"]], "micro_batch": plan["micro_batch"],
                 "micro_batches": [p["micro_batch"] for p in plan["pipelines"]],   # each pipeline's (plan version 3)
                 "summary": result.plan.summary()},
    }


def _write_subfleet(cluster_path: str, island: str, out: str) -> str:
    """The cluster file with only one island, for that island's run alone."""
    section = _section(cluster_path, "cluster")
    return _write_yaml(os.path.join(out, "subfleets", f"{island}.yaml"),
                       dict(section, name=subfleet_name(section["name"], island),
                            islands=[i for i in section["islands"] if i["name"] == island]))


def predicted_efficiency_of(cluster: str, model: str, train: str) -> dict:
    """The cost model's E for a fleet that is only planned (never launched from here)."""
    configs = os.path.join(ROOT, "configs")
    job = load_job(cluster=os.path.join(configs, cluster), model=os.path.join(configs, model),
                   train=os.path.join(configs, train)).require("cluster", "model", "train")
    mixed = search_plan(job).tokens_per_s
    island_tokens_per_s = {}
    for island in job.cluster.islands:
        try:
            island_tokens_per_s[island.name] = search_plan(alone(job, island)).tokens_per_s
        except UserError:
            island_tokens_per_s[island.name] = 0.0   # the model does not fit that island alone
    return {"cluster": job.cluster.name, "model": job.model.name, "mixed_tokens_per_s": mixed,
            "subfleet_tokens_per_s": island_tokens_per_s,
            "predicted_efficiency": mixed / sum(island_tokens_per_s.values())}


def _print(report: dict) -> None:
    label = " (EMULATED chips)" if report["emulated"] else ""
    print(f"efficiency on {report['cluster']} x {report['model']}{label}, global batch {report['global_batch']}")
    if report["time_dilation"] != 1.0:
        print(f"  every run time-dilated x{report['time_dilation']:g}: tokens/s in chip time "
              f"(wall-clock rates are {report['time_dilation']:g}x lower)")
    for name, sub in report["subfleets"].items():
        print(f"  {name:10s} alone  {sub['tokens_per_s']:9.1f} tokens/s   <- anchor (measured in this run)")
    print(f"  {'sum':10s}        {sum(s['tokens_per_s'] for s in report['subfleets'].values()):9.1f} tokens/s")
    mixed = report["mixed"]
    kind = mixed["plan"]["kind"]
    sizes = mixed["plan"]["micro_batches"]
    each = f", micro-batches {sizes}" if len(set(sizes)) > 1 else ""
    print(f"  mixed fleet   {mixed['tokens_per_s']:9.1f} tokens/s   ({kind}, samples {mixed['plan']['samples']}{each})")
    if len(report["mixed_candidates"]) > 1:
        tried = ", ".join(f"{c['kind']} {c['tokens_per_s']:.1f} (predicted {c['predicted_tokens_per_s']:.1f})"
                          for c in report["mixed_candidates"])
        print(f"  measured both kinds of plan, kept the faster: {tried} tokens/s")
    for candidate in report["mixed_candidates"]:
        print(f"  E({candidate['kind']}) = {candidate['efficiency']:.3f} (the calibrated cost model's for this plan: "
              f"{candidate['predicted_efficiency']:.3f}); step {candidate['step_s']:.2f} s measured, "
              f"{candidate['predicted_step_s']:.2f} s predicted (ratio {candidate['measured_over_predicted']:.3f})")
    for name, cost in report["host_costs"].items():
        print(f"  host cost per micro-batch and stage on {name} (fitted from its run alone): "
              f"{cost['launch_s'] * 1e3:.1f} ms; per step: {cost.get('optimizer_step_s', 0.0) * 1e3:.1f} ms")
    for name, sub in report["subfleets"].items():
        for probe in sub.get("tp_probes", ()):
            print(f"  TP probe on {name}: TP {probe['tp']}, {probe['samples']} samples as micro-batches of "
                  f"{probe['micro_batch']}, computed {probe['compute_s']:.3f} s a step against "
                  f"{probe['predicted_compute_s']:.3f} s predicted from its run alone (fitted since)")
    verdict = "met" if report["goal_met"] else "MISSED"
    print(f"  E = {report['efficiency']:.3f} (goal >= {report['goal']}: {verdict}); cost model's E {report['predicted_efficiency']:.3f}")
    big = report["big_example"]
    print(f"  cost model's E for {big['cluster']} x {big['model']} (planned only): {big['predicted_efficiency']:.3f}")
    print(f"  run directories under {report['out']}")
