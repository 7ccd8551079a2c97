"""Adapter between hetero's configs and the partitioner, and the glue `hetero profile` measures with.

The partitioner speaks SI units and plain dataclasses; the config speaks GB and
GB/s. This module converts, runs the search, and turns the partitioner's
infeasibility into a UserError (one line, exit 2).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

from hetero.config.load import Job
from hetero.errors import UserError
from partitioner.inputs import ChipModel, FleetSpec, InfeasibleError, IslandSpec, ModelSpec, TrainSpec
from partitioner.profile import ProfileDB, ProfileError
from partitioner.search import SearchResult, search

GB = 1e9


def chip_model(spec, intra_node_gbps: float | None = None) -> ChipModel:
    """A catalog ChipSpec as the cost model sees it."""
    return ChipModel(
        name=spec.name,
        peak_flops={dtype: tflops * 1e12 for dtype, tflops in spec.tflops.items()},
        memory_bytes=spec.memory_gb * GB,
        reserve_bytes=spec.memory_reserve_gb * GB,
        memory_bandwidth=spec.memory_bandwidth_gbps * GB,
        intra_node_bandwidth=(intra_node_gbps if intra_node_gbps is not None else spec.intra_node_gbps) * GB,
        host_link_bandwidth=spec.host_link_gbps * GB,
        emulated=spec.emulated,
        accelerator=spec.accelerator,
    )


def fleet_spec(cluster) -> FleetSpec:
    net = cluster.network
    islands = tuple(
        IslandSpec(name=i.name, chip=chip_model(cluster.chip(i.chip), net.intra_node_gbps),
                   nodes=tuple(n.chips for n in i.nodes))
        for i in cluster.islands)
    return FleetSpec(name=cluster.name, islands=islands, inter_node_bandwidth=net.inter_node_gbps * GB,
                     bridge_bandwidth=net.bridge.gbps * GB, bridge_latency=net.bridge.latency_us * 1e-6,
                     intra_node_latency=net.intra_node_latency_us * 1e-6,
                     inter_node_latency=net.inter_node_latency_us * 1e-6)


def model_spec(model) -> ModelSpec:
    return ModelSpec(layers=model.layers, hidden=model.hidden, heads=model.heads, kv_heads=model.kv_heads,
                     ffn_hidden=model.ffn_hidden, vocab=model.vocab, seq_len=model.seq_len,
                     tie_embeddings=model.tie_embeddings, name=model.name)


def train_spec(train, **overrides) -> TrainSpec:
    return TrainSpec(global_batch=train.global_batch, micro_batch=train.micro_batch, dtype=train.dtype, **overrides)


def load_profile(path: str | None) -> ProfileDB | None:
    if path is None:
        return None
    try:
        return ProfileDB.load(path)
    except ProfileError as exc:
        raise UserError(str(exc)) from None


def plan_job(job: Job, profile: ProfileDB | None = None, top: int = 1, progress=None,
             **train_overrides) -> SearchResult:
    """Search plans for a loaded Job (cluster, model and train all present)."""
    job = job.require("cluster", "model", "train")
    fleet = fleet_spec(job.cluster)
    model = model_spec(job.model)
    train = train_spec(job.train, **train_overrides)
    if profile is not None:
        profile.chips.update({i.chip.name: i.chip for i in fleet.islands})
    try:
        result = search(fleet, model, train, profile=profile, top=top, progress=progress)
    except InfeasibleError as exc:
        raise UserError(str(exc)) from None
    pretrained = job.pretrained
    if pretrained is not None:
        result.plans = [with_pretrained(plan, pretrained) for plan in result.plans]
    return result


def with_pretrained(plan, pretrained):
    """`plan` recording the Hugging Face model its run starts from (provenance.pretrained: path and
    fingerprint), so a plan file says what it was made for; informational, the engine reads no
    decision from it."""
    return dataclasses.replace(plan, provenance={**plan.provenance, "pretrained": pretrained.to_dict()})


class Progress:
    """A progress bar on a TTY (stderr), plain log lines otherwise."""

    def __init__(self, label: str, stream=None, min_interval: float = 0.2):
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_interval = min_interval
        self._last = 0.0
        self._logged = -1

    def __call__(self, done: int, total: int, note: str = "") -> None:
        now = time.monotonic()
        final = done >= total
        if self.tty:
            if not final and now - self._last < self.min_interval:
                return
            width = 30
            filled = int(width * done / max(total, 1))
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {note}".ljust(80))
            if final:
                self.stream.write("\n")
            self.stream.flush()
        else:
            # Plain logs: at most every 10% (and the end).
            step = max(1, total // 10)
            if final or done // step != self._logged:
                self._logged = done // step
                print(f"{self.label}: {done}/{total} {note}".rstrip(), file=self.stream, flush=True)
        self._last = now


def headroom(result: SearchResult) -> dict:
    """The plan against its lower bounds and against its islands (issue #20).

    islands_alone_tokens_per_s: each island planned alone on the whole global batch (the
    others idle) and their sum; efficiency_vs_islands: the plan's predicted tokens/s over
    that sum. The sum is not reachable by construction (each island alone gets the whole
    batch, so fewer pipeline bubbles than with its share of it); it is the honest ceiling.
    lower_bounds: the best island alone and the best hetero-DP plan (every replica option,
    exact batch split), both of which the chosen plan is never slower than."""
    best = result.best
    tokens = best.tokens_per_s * best.predicted_step_s          # per step
    alone = {name: tokens / c.step for name, c in result.islands_alone.items()}
    total = sum(alone.values())
    bounds: dict[str, dict] = {}
    out: dict[str, Any] = {"islands_alone_tokens_per_s": {**alone, "sum": total},
                           "efficiency_vs_islands": best.tokens_per_s / total if total else None,
                           "lower_bounds": bounds}
    if alone:
        name = max(alone, key=lambda island: alone[island])
        cand = result.islands_alone[name]
        bounds["best_island_alone"] = {"island": name, "tokens_per_s": alone[name], "label": cand.label}
    dp = result.hetero_dp
    if dp is not None:
        samples = {pe.island.name: pe.samples for pe in dp.pipes}
        speed = sum(alone.get(n, 0.0) for n in samples)
        bounds["hetero_dp"] = {
            "tokens_per_s": tokens / dp.step, "label": dp.label,
            "batch_share": {n: s / sum(samples.values()) for n, s in samples.items()},
            "speed_share": {n: alone.get(n, 0.0) / speed for n in samples} if speed else {},
            # each replica at its share on its own (no waiting for the slowest, no bridge
            # reduction): what splitting the batch costs, against islands_alone's whole batch
            "islands_at_share_tokens_per_s": sum(tokens * pe.samples / sum(samples.values()) / pe.step()
                                                 for pe in dp.pipes)}
    out["meets_lower_bounds"] = all(best.tokens_per_s >= b["tokens_per_s"] * (1 - 1e-9)
                                    for b in bounds.values())
    return out
