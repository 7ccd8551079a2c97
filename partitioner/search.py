"""Plan search: hetero-PP (one pipeline across islands) against hetero-DP (a replica per island)
and hybrid (hetero-DP of hetero-PP pipelines, each over one island or a group of them).

hetero-PP space: which islands and in what pipeline order; a TP degree per island
(a power of two dividing heads and kv_heads, within one node); one DP degree for
every stage; stages per island; micro-batch size (count follows from the global
batch); then the exact uneven layer split (layer_split.py) with each stage's
recompute mode the fastest that fits its memory.

hetero-DP space: per island a homogeneous pipeline (TP, stages, DP, same
micro-batch everywhere) and an uneven split of the global batch between the
islands; gradients are reduced over the bridge. Every option an island has is
kept until the batch is split: per island, the fastest option at every share of
the batch (an Envelope), then the exact min-max split over the envelopes (on large fleets
an option whose lower bounds cannot be the fastest at any share is not costed:
replicas.replica_options).

hybrid space (three islands or more; partitioner/hybrid.py): every grouping of the islands
into pipelines, each group's hetero-PP pipelines kept as an Envelope over batch shares like an
island's replica options, the same exact min-max split across the groups.

Order (issue #20): the replica envelopes first (cheap); they give each island
alone on the whole batch, which seeds that island's own hetero-PP search; the
islands alone and the best hetero-DP plans bound the hybrid search, and all of
them seed the whole fleet's hetero-PP search, so the chosen plan is never slower
than either lower bound. hetero-PP
configurations are grouped by (order, TPs, DP, micro-batch); a group has a floor
(every island at its most stages), its configurations a bound (balanced layers,
no memory limit) that is tightened to whole layers when reached; everything is
visited best bound first and the search stops when the next bound cannot beat
the K-th best plan -- the same result as costing them all -- or after
SearchLimits.max_pp_evaluations costings (fleets of thousands of chips; the
stats say so). Stage rows and per-layer costs are memoised.

One job per module: partitioner/candidates.py (the records), evaluate.py (costing one
pipeline), bounds.py, pipeline_search.py (hetero-PP), replicas.py (hetero-DP and the islands
alone), hybrid.py (hybrid), build.py (the Plan), brute_force.py; this module runs them in order
(`search`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from partitioner.bounds import Bounds
from partitioner.brute_force import brute_force
from partitioner.build import to_plan
from partitioner.candidates import Candidate, PipeEval, SearchResult, Slot, dedup, label_pp, stage_layout
from partitioner.costs import CostModel, divisors, tp_choices
from partitioner.evaluate import evaluate_pipeline, evaluate_uniform, in_flight, interleaved_twin
from partitioner.hybrid import Hybrid, search_hybrid
from partitioner.inputs import FleetSpec, InfeasibleError, ModelSpec, SearchLimits, TrainSpec
from partitioner.pipeline_search import search_pp
from partitioner.replicas import (
    Envelope,
    alone_candidates,
    best_batch_split,
    envelope,
    island_envelopes,
    search_replicas,
    split_batch,
)

__all__ = ["Candidate", "Envelope", "PipeEval", "SearchResult", "Slot", "best_batch_split", "brute_force",
           "envelope", "evaluate_pipeline", "in_flight", "interleaved_twin", "naive_baseline", "search",
           "split_batch", "stage_layout", "to_plan"]


def check_inputs(fleet: FleetSpec, model: ModelSpec, train: TrainSpec) -> None:
    if model.heads % model.kv_heads:
        raise InfeasibleError(f"model {model.name}: kv_heads ({model.kv_heads}) must divide heads ({model.heads})")
    if model.hidden % model.heads:
        raise InfeasibleError(f"model {model.name}: hidden ({model.hidden}) must be a multiple of heads ({model.heads})")
    if not fleet.islands or fleet.total_chips < 1:
        raise InfeasibleError(f"cluster {fleet.name} has no chips")
    if train.global_batch < 1 or train.micro_batch < 1 or train.global_batch % train.micro_batch:
        raise InfeasibleError(f"micro_batch ({train.micro_batch}) must divide global_batch ({train.global_batch})")


def explain_infeasible(cm: CostModel, fleet: FleetSpec, model: ModelSpec, train: TrainSpec) -> str:
    """Why no plan exists, and what to change."""
    b = min(train.micro_batch_choices())
    best_single = 0.0
    for island in fleet.islands:
        t = max(tp_choices(model, island))
        mode = "full" if "full" in train.recompute_modes else train.recompute_modes[-1]
        one = cm.stage_memory(t, b, 1, 1, first=False, last=False, inflight=1, mode=mode)
        best_single = max(best_single, island.chip.usable_bytes / one)
    if best_single < 1:
        largest = max(fleet.islands, key=lambda i: i.chip.usable_bytes)
        t = max(tp_choices(model, largest))
        one = cm.stage_memory(t, b, 1, 1, first=False, last=False, inflight=1, mode="full")
        return (f"model {model.name} fits nowhere: one layer needs {one / 1e9:.3g} GB per chip even with "
                f"TP {t}, micro-batch {b} and full recompute, and the largest chip ({largest.chip.name}) has "
                f"{largest.chip.usable_bytes / 1e9:.3g} GB usable; use chips with more memory, a shorter "
                f"seq_len or a narrower model")
    # Whole-model memory against the whole fleet.
    zero_dp = max(1, fleet.total_chips)
    per_layer_min = min(cm.stage_memory(max(tp_choices(model, i)), b, zero_dp, 1, first=False, last=False,
                                         inflight=1, mode="full")
                        for i in fleet.islands)
    need = model.layers * per_layer_min
    have = sum(i.size * i.chip.usable_bytes for i in fleet.islands)
    alone = model.layers * cm.stage_memory(1, b, 1, 1, first=False, last=False, inflight=1, mode="full")
    return (f"no plan fits: model {model.name} ({model.layers} layers) needs roughly "
            f"{alone / 1e9:.3g} GB of weights, "
            f"gradients, optimizer state and activations, and cluster {fleet.name} has {fleet.total_chips} chips "
            f"with {have / 1e9:.3g} GB usable in all (at least {math.ceil(need / max(1.0, have / fleet.total_chips))} "
            f"chips of this kind would be needed); add chips, or use fewer layers, a shorter seq_len or a "
            f"smaller global/micro batch")


def naive_baseline(cm: CostModel, fleet: FleetSpec) -> Candidate | None:
    """Equal layers per stage, one TP for the whole fleet, islands in cluster order, every
    island full, the user's micro-batch, one recompute mode (the fastest that fits), best DP."""
    model, train = cm.model, cm.train
    G, L, b = train.global_batch, model.layers, train.micro_batch
    common = set.intersection(*[set(tp_choices(model, i)) for i in fleet.islands])
    best = None
    for t in sorted(common):
        for dp in divisors(G // b):
            S = [i.size // (t * dp) for i in fleet.islands]
            if min(S) < 1:
                continue
            P = sum(S)
            if P > L:
                continue
            m = G // (dp * b)
            counts = tuple(L // P + (1 if i < L % P else 0) for i in range(P))
            layout = stage_layout([(i, t, s) for i, s in zip(fleet.islands, S)], dp)
            for mode in train.recompute_modes:
                pe = evaluate_uniform(cm, layout, dp, b, m, counts, mode)
                if pe is not None:
                    cand = Candidate("pipeline", [pe], pe.step(), 0.0, "naive " + label_pp(pe))
                    if best is None or cand.step < best.step:
                        best = cand
                    break
    return best


@dataclass
class _Run:
    """What every phase of one search shares: the cost model, limits, bounds, statistics, clock."""

    cm: CostModel
    fleet: FleetSpec
    limits: SearchLimits
    bounds: Bounds
    keep: int
    progress: Callable[..., None] | None
    t0: float = field(default_factory=time.perf_counter)
    stats: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict)

    def lap(self, name: str) -> None:
        """Seconds since the previous lap (or the start) as timing[name]."""
        self.timing[name] = time.perf_counter() - self.t0 - sum(self.timing.values())


def search(fleet: FleetSpec, model: ModelSpec, train: TrainSpec, profile=None, top: int = 1,
           limits: SearchLimits | None = None, progress=None) -> SearchResult:
    """The best plans (best first), the naive baseline, the lower bounds the best plan is held
    to (each island alone, hetero-DP with an exact batch split) and how long the search took.

    Order matters for speed: the replica envelopes come first (cheap), they seed each
    island's own search, and the best of those seeds the whole fleet's hetero-PP search,
    whose configurations are then cut by their bounds against that incumbent."""
    t0 = time.perf_counter()
    check_inputs(fleet, model, train)
    cm = CostModel(fleet, model, train, profile)
    run = _Run(cm, fleet, limits or SearchLimits(), Bounds(cm), max(2, top), progress, t0)
    envelopes = island_envelopes(cm, fleet, run.limits, run.bounds, run.stats, progress)
    run.lap("replica_options_s")
    alone = _islands_alone(run, envelopes)
    run.lap("islands_alone_s")
    hetero_dp = []
    if "replicas" in train.modes and len(fleet.islands) >= 2:
        hetero_dp = search_replicas(cm, envelopes, run.keep, run.stats)
    run.lap("hetero_dp_s")
    hybrid = []
    if "hybrid" in train.modes and len(fleet.islands) >= 3:      # two pipelines, one over two islands
        space = Hybrid(fleet.islands, envelopes, run.limits, run.bounds, hetero_dp + list(alone.values()))
        hybrid = search_hybrid(cm, space, run.keep, run.stats, progress)
    run.lap("hybrid_s")
    cands = _best_candidates(run, envelopes, alone, hetero_dp + hybrid)
    run.lap("hetero_pp_s")
    if len(fleet.islands) == 1:
        alone = {fleet.islands[0].name: cands[0]}
    return _result(run, cands, alone, hetero_dp)


def _best_candidates(run: _Run, envelopes: dict, alone: dict, known: list) -> list:
    """The K best plans of any kind: the hetero-DP and hybrid plans (`known`) and the islands alone
    seed the hetero-PP search."""
    cm, fleet, train = run.cm, run.fleet, run.cm.train
    cands = known + ([c for c in alone.values() if c.kind in train.modes] if len(fleet.islands) > 1 else [])
    if "pipeline" in train.modes:
        seeds = cands if len(fleet.islands) > 1 else alone_candidates(envelopes, fleet.islands[0].name)
        cands = search_pp(cm, fleet, run.limits, run.keep, run.bounds, run.stats, run.progress, seeds=seeds)
    cands = dedup(sorted(cands, key=lambda c: c.step))[:run.keep]
    if not cands:
        raise InfeasibleError(explain_infeasible(cm, fleet, cm.model, train))
    return cands


def _result(run: _Run, cands: list, alone: dict, hetero_dp: list) -> SearchResult:
    """The plans built from the candidates, the naive baseline beside them, the statistics."""
    cm, fleet, stats = run.cm, run.fleet, run.stats
    plans = [to_plan(cm, fleet, c) for c in cands]
    base = naive_baseline(cm, fleet)
    base_plan = to_plan(cm, fleet, base) if base else None
    elapsed = time.perf_counter() - run.t0
    stats.update({k: round(v, 4) for k, v in run.timing.items()})
    return SearchResult(plans=plans, candidates=cands, baseline=base,
                        baseline_plan=base_plan, search_s=elapsed,
                        evaluated=stats.get("pp_evaluated", 0) + stats.get("dp_evaluated", 0)
                        + stats.get("hybrid_evaluated", 0),
                        bounded=stats.get("pp_configs", 0), stats=stats,
                        islands_alone=alone, hetero_dp=hetero_dp[0] if hetero_dp else None)


def _islands_alone(run: _Run, envelopes: dict) -> dict:
    """{island: its best plan on the whole batch with the other islands idle}: a lower bound the
    fleet's plan must meet, and the denominator of its efficiency (issue #20)."""
    out: dict = {}
    fleet = run.fleet
    if len(fleet.islands) < 2:
        return out
    sub_stats: dict = {}
    for k, island in enumerate(fleet.islands):
        seeds = alone_candidates(envelopes, island.name)
        if "pipeline" in run.cm.train.modes:
            seeds = search_pp(run.cm, replace(fleet, islands=(island,)), run.limits, 1, run.bounds, sub_stats,
                              seeds=seeds)
        if seeds:
            out[island.name] = min(seeds, key=lambda c: c.step)
        if run.progress:
            run.progress(k + 1, len(fleet.islands), "islands alone")
    run.stats["alone_pp_configs"] = sub_stats.get("pp_configs", 0)
    run.stats["alone_pp_evaluated"] = sub_stats.get("pp_evaluated", 0)
    return out
