"""Building the Plan from a searched Candidate: stages (with their chunks when interleaved),
pipelines, ranks, MFU per chip type and the step's breakdown. No costing here: every number
comes from the Candidate's evaluated pipelines."""

from __future__ import annotations

from partitioner.candidates import Candidate, PipeEval
from partitioner.costs import CostModel, blocks_layers, head_forward_flops, layer_forward_flops
from partitioner.halves import spans as block_spans
from partitioner.inputs import FleetSpec
from partitioner.plan import PipelinePlan, Plan, StagePlan, assign_ranks


def to_plan(cm: CostModel, fleet: FleetSpec, cand: Candidate) -> Plan:
    model, train = cm.model, cm.train
    stages: list[StagePlan] = []
    pipelines = []
    for k, pe in enumerate(cand.pipes):
        idx = []
        pieces = chunk_ranges(pe.counts, pe.v)
        spans = block_spans(pe.counts, pe.cuts)
        for i, (island, t, off) in enumerate(pe.layout):
            chunks = tuple(pieces[i]) if pe.v > 1 else ()
            a, z = spans[i]
            layers = (chunks[0][0], chunks[-1][1]) if chunks else (a // 2, (z + 1) // 2)
            stages.append(StagePlan(
                index=len(stages), pipeline=k, island=island.name, chip=island.chip.name, tp=t, dp=pe.dp,
                layers=layers, recompute=pe.modes[i], offset=off, time_s=pe.stage_times[i],
                memory_gb=pe.memory[i] / 1e9, source=pe.sources[i], chunks=chunks,
                blocks=(a, z) if a % 2 or z % 2 else ()))
            idx.append(stages[-1].index)
        pipelines.append(PipelinePlan(index=k, stages=tuple(idx), dp=pe.dp, micro_batch=pe.b,
                                      num_micro_batches=pe.m, virtual_stages=pe.v, last_micro_batch=pe.last_b))
    ranks = assign_ranks(fleet, stages)
    step = cand.step
    # Model FLOPs (no recompute) and hardware FLOPs (with it) per chip type.
    f_layer = 3.0 * layer_forward_flops(model, 1)
    f_head = 3.0 * head_forward_flops(model, 1)
    done: dict = {}
    hw: dict = {}
    chips: dict = {}
    peak: dict = {}
    for st, pe in zip(_stages_by_pipe(stages, pipelines), cand.pipes):
        samples = pe.samples
        for s in st:
            held = blocks_layers(model, *s.blocks) if s.blocks else s.num_layers
            flops = samples * (held * f_layer + (f_head if s.index == st[-1].index else 0.0))
            if s.recompute == "full":
                extra = samples * held * f_layer / 3.0
            elif s.recompute == "selective":      # the attention core: whole in a layer or an attention half
                extra = samples * _cores(s) * 4.0 * model.seq_len * model.seq_len * model.hidden
            else:
                extra = 0.0
            done[s.chip] = done.get(s.chip, 0.0) + flops
            hw[s.chip] = hw.get(s.chip, 0.0) + flops + extra
            chips[s.chip] = chips.get(s.chip, 0) + s.chips
            peak[s.chip] = fleet.island(s.island).chip.flops(train.dtype)
    mfu = {c: done[c] / (step * chips[c] * peak[c]) for c in done}
    all_peak = sum(i.size * i.chip.flops(train.dtype) for i in fleet.islands)
    used_peak = sum(chips[c] * peak[c] for c in chips)
    slowest = max(cand.pipes, key=lambda p: p.step())
    breakdown = {
        "cycle_s": slowest.cycle,
        "steady_s": (slowest.m - 1) * slowest.cycle,
        "fill_drain_s": (sum(slowest.stage_times) if slowest.v == 1
                         else slowest.fill - 2.0 * sum(slowest.boundary) - slowest.tail),
        "p2p_s": 2.0 * sum(slowest.boundary),
        "max_boundary_s": max(slowest.boundary, default=0.0),
        "dp_reduce_and_optimizer_s": slowest.tail,
        "cross_island_reduce_s": cand.cross_s,
        "bubble_fraction": _bubble(slowest),
        "mfu_used_chips": sum(done.values()) / (step * used_peak),
        "mfu_fleet": sum(done.values()) / (step * all_peak),
        "hfu_used_chips": sum(hw.values()) / (step * used_peak),
    }
    modes = {s.recompute for s in stages}
    sources: dict[str, set] = {}
    for s in stages:
        sources.setdefault(s.chip, set()).add(s.source)
    layer_src = {c: (v.pop() if len(v) == 1 else "mixed") for c, v in sources.items()}
    used_by_island: dict[str, int] = {}
    for r in ranks:
        used_by_island[r.island] = used_by_island.get(r.island, 0) + 1
    return Plan(
        kind=cand.kind, cluster=fleet.name, model=model.name, dtype=train.dtype, layers=model.layers,
        heads=model.heads, kv_heads=model.kv_heads, global_batch=train.global_batch,
        micro_batch=cand.pipes[0].b, num_micro_batches=cand.pipes[0].m,
        recompute=modes.pop() if len(modes) == 1 else "mixed", zero1=cm.zero1(max(p.dp for p in cand.pipes)),
        stages=tuple(stages), pipelines=tuple(pipelines), ranks=ranks, predicted_step_s=step,
        tokens_per_s=train.global_batch * model.seq_len / step, mfu=mfu, breakdown=breakdown,
        measured=all(s.source == "measured" for s in stages),
        provenance={"layer_time": layer_src, "bridge": cm.bridge_source, "host_costs": _host_sources(cm, layer_src),
                    "matmul_efficiency": {i.chip.name: i.chip.mm_eff for i in fleet.islands
                                          if layer_src.get(i.chip.name, "estimated") != "measured"},
                    "label": cand.label},
        idle={i.name: i.size - used_by_island.get(i.name, 0) for i in fleet.islands},
    )


def chunk_ranges(counts, v: int) -> list[list[tuple[int, int]]]:
    """Each stage's v layer ranges: its layers split as evenly as they go (larger chunks first),
    the model cut into the p*v pieces in the order docs/plan-format.md prescribes (stage i
    holds pieces i, i+p, ...). v == 1: one range per stage, the stages in order."""
    sizes = [[n // v + (1 if c < n % v else 0) for c in range(v)] for n in counts]
    out: list[list[tuple[int, int]]] = [[] for _ in counts]
    start = 0
    for c in range(v):
        for i, size in enumerate(sizes):
            out[i].append((start, start + size[c]))
            start += size[c]
    return out


def _cores(stage) -> int:
    """Attention cores a stage runs: one per layer, or per attention half it holds."""
    if not stage.blocks:
        return stage.num_layers
    a, z = stage.blocks
    return sum(1 for block in range(a, z) if block % 2 == 0)


def _bubble(pe: PipeEval) -> float:
    """Idle share of the pipeline's compute time (communication and tail aside): plain 1F1B's
    (m-1)*max + sum against m*mean, the fill and drain shrunk by v when interleaved."""
    T, m = pe.stage_times, pe.m
    top, total = max(T), sum(T)
    span = (m - 1) * top + top + (total - top) / pe.v if pe.v > 1 else (m - 1) * top + total
    return 1.0 - (m * total / len(T)) / span


def _host_sources(cm: CostModel, chips) -> dict:
    """Per chip the plan uses: 'measured' when the profile states its host costs, else 'none' (0 s)."""
    have = cm.profile.host_costs if cm.profile is not None else {}
    return {chip: "measured" if chip in have else "none" for chip in chips}


def _stages_by_pipe(stages, pipelines):
    return [[stages[i] for i in p.stages] for p in pipelines]
