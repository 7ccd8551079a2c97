"""The cost model fitted to measured runs, for `hetero bench efficiency`'s mixed plans.

An emulated chip is charged exactly the cost model's roofline, so what a run takes
beyond its prediction is the engine's own work on the host. Each island's run
alone gives two things:

- its layer times, scaled per chip until the planner predicts that run's step as
  measured (calibration_profile);
- host costs (island_host_cost): what the run spends after its last compute beyond
  the predicted DP reduction and update, per step; the rest per micro-batch and stage.

It says nothing about a TP degree its plan alone does not use. A mixed plan may run
an island at another TP than its best plan alone (a hetero-DP replica is one stage,
at the island's whole TP, where alone a TP-1 pipeline may be faster), and a TP
degree costs collectives and smaller kernels that one degree's scale does not carry
over to another. So each TP degree a candidate plan gives an island that no run
measured is probed (missing_tps, probe_plan): the island alone, one stage at that TP
and micro-batch, a quarter of the global batch; its compute span fits the layer
times at that TP (a profile entry at its (TP, micro-batch), the other micro-batches
at that TP calibrated from it: ProfileDB's ratio per TP degree).
"""

from __future__ import annotations

import dataclasses

from hetero.errors import UserError
from hetero.runner import search_plan

PROBE_SHARE = 4        # a probe trains 1/PROBE_SHARE of the global batch a step
ROUNDS = 4


def alone(job, island):
    """The job on one island of its cluster: that island's sub-fleet."""
    return dataclasses.replace(job, cluster=dataclasses.replace(
        job.cluster, name=subfleet_name(job.cluster.name, island.name), islands=(island,)))


def subfleet_name(cluster: str, island: str) -> str:
    return f"{cluster}-{island}"


# -- host costs from an island's run alone ------------------------------------------------

def island_host_cost(plan: dict, step_s: float, after_compute_s: float | None = None):
    """The fixed host seconds an island's run alone shows beyond the cost model's prediction (made
    without host costs). An emulated chip is charged exactly the cost model's roofline, so what its
    run takes beyond that is host work.

    Per step (`optimizer_step_s`), where the run's seconds after its last compute are known
    (`after_compute_s`, `after_compute`): what they exceed the plan's predicted tail by (its DP
    reduction and update): the engine's per-step work around the update, paid once a step however
    few micro-batches a plan gives the island. The rest per micro-batch (`launch_s`), spread over the
    stage-slots its 1F1B runs in series, m + P - 1 for the longest pipeline: the first ops of each
    action issued on an idle queue, the synchronize after it, the bookkeeping between actions."""
    from partitioner.profile import HostCost

    per_step = 0.0
    if after_compute_s is not None:
        per_step = max(0.0, after_compute_s - _predicted_tail(plan))
    slots = max(p["num_micro_batches"] + len(p["stages"]) - 1 for p in plan["pipelines"])
    return HostCost(launch_s=max(0.0, step_s - plan["predicted_step_s"] - per_step) / slots, optimizer_step_s=per_step)


def after_compute(run_dir: str) -> float | None:
    """Seconds a run's steady step spends after its last compute: the least any rank waits between
    its last action and the step's end (`hetero report`'s per-rank tail), i.e. the tail of the rank
    that computes last. None where the run has no per-rank record."""
    from hetero.report.analysis import analyse
    from hetero.report.load import load_run

    try:
        ranks = analyse(load_run(run_dir)).get("ranks") or []
    except (UserError, OSError, ValueError, KeyError):    # no run there, or no record to read
        return None
    tails = [r["seconds"]["tail"] for r in ranks if "tail" in r.get("seconds", {})]
    return min(tails) if tails else None


def _predicted_tail(plan: dict) -> float:
    return plan.get("breakdown", {}).get("dp_reduce_and_optimizer_s", 0.0)


# -- the calibrated profile ----------------------------------------------------------------

def calibration_profile(job, subfleets: dict, rounds: int = ROUNDS):
    """A profile whose layer times are the analytic ones scaled, per chip, until the
    planner predicts each island's step alone as measured; the planner calibrates
    every other entry. (One scale from measured/predicted is not enough: it would
    scale only the layers' share of a step that also holds TP collectives, the
    embedding, the head and the optimizer, and misjudge the split between islands.)
    Each island's TP probes (`subfleets[name]["tp_probes"]`, probe_record) then fit
    the layer times at their TP degree the same way, from their compute span."""
    from hetero.planning import fleet_spec, model_spec, train_spec
    from partitioner.costs import CostModel

    fleet, model, train = fleet_spec(job.cluster), model_spec(job.model), train_spec(job.train)
    costs = CostModel(fleet, model, train)
    factors = {island.name: _first_factor(subfleets[island.name]) for island in fleet.islands}
    for _ in range(rounds):
        profile = _scaled_profile(costs, fleet, model, subfleets, factors)
        for island in job.cluster.islands:
            predicted = search_plan(alone(job, island), "auto", profile).predicted_step_s
            factors[island.name] *= subfleets[island.name]["step_s"] / predicted
    profile = _scaled_profile(costs, fleet, model, subfleets, factors)
    for island in job.cluster.islands:
        for probe in subfleets[island.name].get("tp_probes", ()):
            _fit_probe(job, island, probe, profile, costs, factors[island.name], rounds)
    return profile


def _first_factor(sub: dict) -> float:
    """The layers' first scale: the whole gap to the prediction, or none when the run's host
    costs (island_host_cost) already account for it."""
    return 1.0 if sub.get("host_cost") else sub["step_s"] / sub["predicted_step_s"]


def _scaled_profile(costs, fleet, model, subfleets: dict, factors: dict):
    from partitioner.profile import HostCost, ProfileDB

    profile = ProfileDB(model={k: getattr(model, k) for k in ("hidden", "heads", "kv_heads", "ffn_hidden", "seq_len")})
    for island in fleet.islands:
        plan = subfleets[island.name]["plan"]
        tp, micro_batch = plan["stages"][0]["tp"], plan["micro_batch"]
        layer = costs.layer_cost(island.name, tp, micro_batch)
        factor = factors[island.name]
        profile.add_layer(island.chip.name, tp, micro_batch, factor * layer.forward_s, factor * layer.backward_s)
        profile.chips[island.chip.name] = island.chip
        if subfleets[island.name].get("host_cost"):
            profile.add_host_cost(island.chip.name, HostCost(**subfleets[island.name]["host_cost"]),
                                  island.chip.accelerator, micro_batch)
    return profile


def _fit_probe(job, island, probe: dict, profile, costs, factor: float, rounds: int) -> None:
    """Set the profile's layer times at the probe's (TP, micro-batch) so that the probe's plan is
    predicted to compute for as long as it measured (starting from the island's own scale)."""
    chip = job.cluster.chip(island.chip).name
    t, b = probe["tp"], probe["micro_batch"]
    analytic = costs.layer_cost(island.name, t, b)
    for _ in range(rounds):
        profile.add_layer(chip, t, b, factor * analytic.forward_s, factor * analytic.backward_s)
        plan = probe_plan(job, island, t, b, probe["num_micro_batches"], profile)
        factor *= probe["compute_s"] / compute_span(plan.to_dict())
    profile.add_layer(chip, t, b, factor * analytic.forward_s, factor * analytic.backward_s)


# -- TP probes -----------------------------------------------------------------------------

def measured_tps(sub: dict) -> set:
    """The TP degrees an island's runs have measured: its plan alone's and its probes'."""
    return {s["tp"] for s in sub["plan"]["stages"]} | {p["tp"] for p in sub.get("tp_probes", ())}


def missing_tps(plans, subfleets: dict, skip=frozenset()) -> list[tuple[str, int, int]]:
    """(island, TP, micro-batch) for each TP degree a plan gives an island that no run measured (nor
    `skip` holds as (island, TP)), at the micro-batch the first such plan runs it at."""
    missing: dict = {}
    for plan in plans:
        for stage in plan.stages:
            if stage.tp not in measured_tps(subfleets[stage.island]) and (stage.island, stage.tp) not in skip:
                missing.setdefault((stage.island, stage.tp), plan.pipelines[stage.pipeline].micro_batch)
    return [(island, t, b) for (island, t), b in missing.items()]


def probe_job(job, island, t: int, b: int):
    """The island alone, trained on 1/PROBE_SHARE of the global batch (at least two micro-batches a
    replica) at micro-batch b: what a probe at TP t runs."""
    dp = island.size // t
    samples = dp * b * max(2, job.train.global_batch // (PROBE_SHARE * dp * b))
    return dataclasses.replace(alone(job, island), train=dataclasses.replace(
        job.train, global_batch=samples, micro_batch=b))


def probe_plan(job, island, t: int, b: int, m: int | None = None, profile=None):
    """The probe's plan: `island` alone as one stage at TP t (DP the rest of its chips), m
    micro-batches of b a replica (probe_job's share when None), costed with `profile`."""
    from hetero.engine import support
    from hetero.planning import fleet_spec, model_spec, train_spec
    from partitioner.build import to_plan
    from partitioner.candidates import stage_layout
    from partitioner.costs import CostModel
    from partitioner.evaluate import evaluate_pipeline
    from partitioner.replicas import replica_candidate

    if island.size % t:
        raise UserError(f"island {island.name}: TP {t} does not divide its {island.size} chips")
    sub = probe_job(job, island, t, b)
    dp = island.size // t
    m = m or sub.train.global_batch // (dp * b)
    fleet, model = fleet_spec(sub.cluster), model_spec(sub.model)
    train = train_spec(dataclasses.replace(sub.train, global_batch=dp * b * m),
                       recompute_modes=support.RECOMPUTE_MODES, zero1=None if support.ZERO1 else False)
    if profile is not None:
        profile.chips.update({i.chip.name: i.chip for i in fleet.islands})
    cm = CostModel(fleet, model, train, profile)
    spec = fleet.island(island.name)
    pe = evaluate_pipeline(cm, stage_layout([(spec, t, 1)], dp), dp, b, m)
    if pe is None:
        raise UserError(f"island {island.name}: no one-stage plan at TP {t}, micro-batch {b} fits its chips")
    return to_plan(cm, fleet, replica_candidate(cm, [pe]))


def fitting_probe_plan(job, island, t: int, b: int, profile=None):
    """probe_plan at micro-batch b, else at b halved (b/2, b/4, ... 1) until its stage fits the
    island's chips (a candidate's stage at TP t may hold only some of the layers); None where none fits."""
    for size in (b >> k for k in range(b.bit_length())):
        try:
            return probe_plan(job, island, t, size, profile=profile)
        except UserError:
            continue
    return None


def compute_span(plan: dict) -> float:
    """Predicted seconds of a plan's step up to its last compute (the step less its DP reduction
    and update)."""
    return plan["predicted_step_s"] - _predicted_tail(plan)


def probe_record(plan, t: int, b: int, step_s: float, after_compute_s: float | None, run_dir: str) -> dict:
    """What calibration_profile needs of a probe's run, and what the report shows of it."""
    predicted = plan.to_dict()
    measured = step_s - after_compute_s if after_compute_s is not None else step_s - _predicted_tail(predicted)
    return {"tp": t, "micro_batch": b, "num_micro_batches": plan.pipelines[0].num_micro_batches,
            "samples": plan.global_batch, "step_s": step_s, "compute_s": measured,
            "predicted_compute_s": compute_span(predicted), "run_dir": run_dir}
