"""What makes a Plan valid beyond its fields' types: pipelines own their stages once and tile the
model's layers (or its half-layer blocks, when a stage boundary falls inside a layer), ranks cover
every stage's tp x dp block, and (given the fleet) the islands, chips, nodes and memory exist. Each
broken invariant is a sentence; Plan.problems and Plan.validate use these (kept apart from
partitioner.plan, which holds the records and their JSON form).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from partitioner.plan_format import KINDS

if TYPE_CHECKING:
    from partitioner.plan import PipelinePlan, Plan, StagePlan


def problems(plan: Plan, fleet: Any = None) -> list[str]:
    """Every broken invariant of `plan`, as sentences; [] for a valid plan. With a FleetSpec, also
    islands, chips, node placement of TP groups and memory against each chip's usable memory."""
    out: list[str] = []
    if plan.kind not in KINDS:
        out.append(f"kind must be one of {KINDS}, got {plan.kind!r}")
    if plan.kind == "pipeline" and len(plan.pipelines) != 1:
        out.append(f"a 'pipeline' plan has exactly one pipeline, got {len(plan.pipelines)}")
    if plan.kind == "hybrid":
        out.extend(_hybrid_problems(plan))
    if [s.index for s in plan.stages] != list(range(len(plan.stages))):
        out.append("stage indices must be 0..n-1 in order")
    out.extend(_pipeline_problems(plan))
    for s in plan.stages:
        if s.tp < 1 or s.dp < 1:
            out.append(f"stage {s.index}: tp and dp must be >= 1")
        elif plan.heads % s.tp or plan.kv_heads % s.tp:
            out.append(f"stage {s.index}: tp {s.tp} must divide heads ({plan.heads}) and kv_heads ({plan.kv_heads})")
    out.extend(_rank_problems(plan))
    if fleet is not None:
        out.extend(_fleet_problems(plan, fleet))
    return out


def _hybrid_problems(plan: Plan) -> list[str]:
    """Several pipelines, each island in one of them, and one at least over several islands (a
    pipeline per island is a 'replicas' plan)."""
    if len(plan.pipelines) < 2:
        return [f"a 'hybrid' plan has several pipelines, got {len(plan.pipelines)}"]
    out: list[str] = []
    owner: dict[str, int] = {}
    spans = False
    for p in plan.pipelines:
        islands = {plan.stages[i].island for i in p.stages if 0 <= i < len(plan.stages)}
        spans = spans or len(islands) > 1
        for island in sorted(islands):
            if owner.setdefault(island, p.index) != p.index:
                out.append(f"island {island} has stages of pipelines {owner[island]} and {p.index} (in a "
                           f"'hybrid' plan each island belongs to one pipeline)")
    if not spans:
        out.append("a 'hybrid' plan has a pipeline over several islands (one pipeline per island is 'replicas')")
    return out


def _pipeline_problems(plan: Plan) -> list[str]:
    """Each stage in exactly one pipeline, with its pipeline's DP; the samples add up to the batch."""
    out: list[str] = []
    seen_stages: set[int] = set()
    total = 0
    for p in plan.pipelines:
        if not p.stages:
            out.append(f"pipeline {p.index} has no stages")
            continue
        mine = []
        for i in p.stages:
            if i in seen_stages or not 0 <= i < len(plan.stages):
                out.append(f"pipeline {p.index}: stage {i} missing or used twice")
                continue
            seen_stages.add(i)
            s = plan.stages[i]
            mine.append(s)
            if s.pipeline != p.index:
                out.append(f"stage {i} says pipeline {s.pipeline}, listed under {p.index}")
            if s.dp != p.dp:
                out.append(f"stage {i}: dp {s.dp} differs from its pipeline's {p.dp}")
        out.extend(_layer_problems(plan, p, mine))
        if p.index == 0 and p.micro_batch != plan.micro_batch:
            out.append(f"pipeline 0: micro_batch {p.micro_batch} != plan's {plan.micro_batch}")
        if p.num_micro_batches < 1:
            out.append(f"pipeline {p.index}: needs at least one micro-batch")
        if p.last_micro_batch and not 1 <= p.last_micro_batch < p.micro_batch:
            out.append(f"pipeline {p.index}: last_micro_batch {p.last_micro_batch} must be smaller than its "
                       f"micro_batch {p.micro_batch} (leave it out when every micro-batch is whole)")
        total += p.samples
    if seen_stages != set(range(len(plan.stages))):
        out.append("some stages belong to no pipeline")
    if total != plan.global_batch:
        out.append(f"pipelines process {total} samples per step, global_batch is {plan.global_batch}")
    return out


def _layer_problems(plan: Plan, p: PipelinePlan, stages: list[StagePlan]) -> list[str]:
    """A pipeline's stages tile [0, layers) in order: plainly, or (virtual_stages v > 1) as p*v
    pieces, the stage at position i holding pieces i, i+p, ..., i+(v-1)p as its `chunks`; or, when a
    stage boundary falls inside a layer, the half-layer blocks (_block_problems)."""
    out, v = [], p.virtual_stages
    if v < 1:
        return [f"pipeline {p.index}: virtual_stages must be >= 1, got {v}"]
    if any(s.blocks for s in stages):
        return _block_problems(plan, p, stages)
    if v > 1:
        if len(stages) < 2:
            out.append(f"pipeline {p.index}: virtual_stages {v} needs at least 2 stages, it has {len(stages)}")
        if p.num_micro_batches % max(len(stages), 1):
            out.append(f"pipeline {p.index}: virtual_stages {v} needs num_micro_batches "
                       f"({p.num_micro_batches}) to be a multiple of its {len(stages)} stages")
    pieces: list[tuple[int, tuple[int, int]] | None] = [None] * (len(stages) * v)
    for position, s in enumerate(stages):
        if v == 1 and s.chunks:
            out.append(f"stage {s.index}: has chunks but its pipeline's virtual_stages is 1")
            continue
        if v > 1 and len(s.chunks) != v:
            out.append(f"stage {s.index}: expected {v} chunks (its pipeline's virtual_stages), got {len(s.chunks)}")
            continue
        if v > 1 and s.layers != (s.chunks[0][0], s.chunks[-1][1]):
            out.append(f"stage {s.index}: layers {list(s.layers)} must be the span of its chunks, "
                       f"[{s.chunks[0][0]}, {s.chunks[-1][1]}]")
        for c, piece in enumerate(s.layer_ranges):
            pieces[c * len(stages) + position] = (s.index, piece)
    start = 0
    for index, (stage, (first, end)) in ((j, piece) for j, piece in enumerate(pieces) if piece is not None):
        if first != start or end <= first:
            what = f"chunk {index // len(stages)} " if v > 1 else ""
            out.append(f"pipeline {p.index}: stage {stage} {what}has layers [{first}, {end}], expected to "
                       f"start at {start} and be non-empty")
        start = end
    if start != plan.layers:
        out.append(f"pipeline {p.index}: layers end at {start}, the model has {plan.layers}")
    return out


def _block_problems(plan: Plan, p: PipelinePlan, stages: list[StagePlan]) -> list[str]:
    """A pipeline with a stage boundary inside a layer: plain (interleaved pipelines keep whole layers),
    its stages tile the half-layer blocks [0, 2 * layers) in order, and a stage with `blocks` has an odd
    end (else it writes `layers` alone) and `layers` the layers they touch."""
    out = []
    if p.virtual_stages != 1:
        out.append(f"pipeline {p.index}: has a stage boundary inside a layer (blocks), so its virtual_stages "
                   f"must be 1, got {p.virtual_stages}")
    start = 0
    for s in stages:
        if s.chunks:
            out.append(f"stage {s.index}: has chunks, but its pipeline has a stage boundary inside a layer "
                       f"(blocks) and interleaved pipelines keep whole layers")
        first, end = s.block_range
        if s.blocks and not first % 2 and not end % 2:
            out.append(f"stage {s.index}: blocks [{first}, {end}] start and end on whole layers: write layers "
                       f"[{first // 2}, {end // 2}] without blocks")
        if s.blocks and s.layers != (first // 2, (end + 1) // 2):
            out.append(f"stage {s.index}: layers {list(s.layers)} must be the layers its blocks touch, "
                       f"[{first // 2}, {(end + 1) // 2}]")
        if first != start or end <= first:
            out.append(f"pipeline {p.index}: stage {s.index} has blocks [{first}, {end}], expected to start at "
                       f"{start} and be non-empty")
        start = end
    if start != 2 * plan.layers:
        out.append(f"pipeline {p.index}: blocks end at {start}, the model has {2 * plan.layers} "
                   f"({plan.layers} layers)")
    return out


def _rank_problems(plan: Plan) -> list[str]:
    """Ranks 0..n-1, one chip each, each where its stage's block puts it, every stage's tp x dp covered."""
    out: list[str] = []
    if [r.rank for r in plan.ranks] != list(range(len(plan.ranks))):
        out.append("global ranks must be 0..n-1 in order")
    chips_seen: dict[tuple[str, int], int] = {}
    per_stage: dict[int, set[tuple[int, int]]] = {}
    for r in plan.ranks:
        key = (r.island, r.local_rank)
        if key in chips_seen:
            out.append(f"chip {r.island}[{r.local_rank}] is used by ranks {chips_seen[key]} and {r.rank}")
        chips_seen[key] = r.rank
        if not 0 <= r.stage < len(plan.stages):
            out.append(f"rank {r.rank}: unknown stage {r.stage}")
            continue
        s = plan.stages[r.stage]
        if r.island != s.island or r.pipeline != s.pipeline:
            out.append(f"rank {r.rank}: island/pipeline differ from its stage {s.index}")
        if not (0 <= r.tp_rank < s.tp and 0 <= r.dp_rank < s.dp):
            out.append(f"rank {r.rank}: tp_rank/dp_rank out of range for stage {s.index}")
        if r.local_rank != s.offset + r.dp_rank * s.tp + r.tp_rank:
            out.append(f"rank {r.rank}: local rank {r.local_rank} is not offset + dp_rank*tp + tp_rank")
        per_stage.setdefault(r.stage, set()).add((r.tp_rank, r.dp_rank))
    for s in plan.stages:
        if len(per_stage.get(s.index, ())) != s.tp * s.dp:
            out.append(f"stage {s.index}: expected {s.tp * s.dp} ranks (tp x dp), got {len(per_stage.get(s.index, ()))}")
    return out


def _fleet_problems(plan: Plan, fleet: Any) -> list[str]:
    out = []
    islands = {i.name: i for i in fleet.islands}
    for s in plan.stages:
        island = islands.get(s.island)
        if island is None:
            out.append(f"stage {s.index}: unknown island {s.island!r}")
            continue
        if island.chip.name != s.chip:
            out.append(f"stage {s.index}: island {s.island} has chip {island.chip.name}, plan says {s.chip}")
        if island.tp_limit % s.tp:
            out.append(f"stage {s.index}: tp {s.tp} does not divide every node of island {s.island} "
                       f"(node sizes {list(island.nodes)}), so a TP group would straddle nodes")
        if s.offset + s.tp * s.dp > island.size:
            out.append(f"stage {s.index}: needs chips {s.offset}..{s.offset + s.tp * s.dp - 1} of island "
                       f"{s.island}, which has {island.size}")
        usable = island.chip.usable_bytes / 1e9
        if s.memory_gb > usable * (1 + 1e-9):
            out.append(f"stage {s.index}: needs {s.memory_gb:.3f} GB per chip, {island.chip.name} has "
                       f"{usable:.3f} GB usable")
    for r in plan.ranks:
        island = islands.get(r.island)
        if island is None:
            continue
        if not 0 <= r.local_rank < island.size:
            out.append(f"rank {r.rank}: local rank {r.local_rank} beyond island {r.island} ({island.size} chips)")
        elif island.node_of(r.local_rank) != r.node:
            out.append(f"rank {r.rank}: node {r.node} but local rank {r.local_rank} sits on node "
                       f"{island.node_of(r.local_rank)}")
    # TP groups inside one node
    groups: dict[tuple[int, int], set[int]] = {}
    for r in plan.ranks:
        groups.setdefault((r.stage, r.dp_rank), set()).add(r.node)
    for (stage, dp_rank), nodes in groups.items():
        if len(nodes) > 1:
            out.append(f"stage {stage}: TP group of dp_rank {dp_rank} spans nodes {sorted(nodes)}")
    return out
