"""The Plan: the contract between planning and running. Frozen, serialisable, validated.

See docs/plan-format.md for the JSON form. Two kinds:

- "pipeline" (hetero-PP): one pipeline whose stages sit on one or more islands,
  every stage with the same DP degree; activations cross islands over the bridge.
- "replicas" (hetero-DP): one pipeline per island, each a whole model replica
  with its own stages, TP and DP; the global batch is split unevenly between
  them and gradients are reduced across islands over the bridge.

Global ranks are numbered island by island (islands in cluster order), and
inside an island by island-local rank; a stage owns a contiguous block of
tp*dp island-local ranks, local = offset + dp_rank*tp + tp_rank, so a TP group
is tp consecutive chips inside one node.

This module holds the records and their JSON form; the format's constants and field readers live
in partitioner.plan_format, the invariants in partitioner.plan_invariants (both re-exported here:
`from partitioner.plan import PlanError, FORMAT` keeps working).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from partitioner.inputs import DTYPE_BYTES, RECOMPUTE_MODES
from partitioner.plan_format import (FORMAT, INTERLEAVED_VERSION, KINDS, MAX_BATCH, MAX_COUNT, MIXED_MICRO_BATCH_VERSION,
                                     SHORT_LAST_VERSION, SUBLAYER_VERSION, VERSION, VERSIONS,
                                     PlanError, get_field, read_flag, read_int, read_items, read_mapping, read_number,
                                     read_pair, read_table, read_text, show, unique_keys)
from partitioner.plan_invariants import problems as plan_problems

__all__ = ["FORMAT", "INTERLEAVED_VERSION", "KINDS", "MAX_BATCH", "MAX_COUNT", "SHORT_LAST_VERSION", "SUBLAYER_VERSION",
           "VERSION",
           "VERSIONS", "PipelinePlan", "Plan", "PlanError", "RankPlan", "StagePlan", "assign_ranks", "interleaved",
           "layers_span_text"]


@dataclass(frozen=True)
class StagePlan:
    index: int
    pipeline: int
    island: str
    chip: str
    tp: int
    dp: int
    layers: tuple[int, int]          # half-open [start, end)
    recompute: str                   # none | selective | full
    offset: int                      # first island-local rank of this stage's block
    time_s: float                    # forward + backward of one micro-batch
    memory_gb: float                 # peak per chip, GB (1e9 bytes)
    source: str = "estimated"        # where the layer time came from: measured | calibrated | estimated
    # Interleaved 1F1B (its pipeline's virtual_stages v > 1): the stage's v half-open layer ranges in
    # model order, pieces i, i+p, ... of the model cut into p*v; `layers` is then their span, for display.
    chunks: tuple[tuple[int, int], ...] = ()
    # A boundary inside a layer (version 4): the half-open range [a, b) of half-layer blocks the stage holds
    # (block 2k: layer k's attention half, 2k+1: its MLP half), set only when a or b is odd; `layers` is then
    # the layers it touches, (a // 2, (b + 1) // 2), so a split layer is in both neighbours' `layers`.
    blocks: tuple[()] | tuple[int, int] = ()

    @property
    def layer_ranges(self) -> tuple[tuple[int, int], ...]:
        """The layers this stage holds, as ranges in model order: what code that builds or
        counts the stage's layers must use (`layers` is only their span when interleaved)."""
        return self.chunks or (self.layers,)

    @property
    def num_layers(self) -> int:
        """The layers this stage touches (a layer it holds half of counts whole)."""
        return sum(end - start for start, end in self.layer_ranges)

    @property
    def block_range(self) -> tuple[int, int]:
        """The half-layer blocks [a, b) a plain (not interleaved) stage holds: `blocks`, or its layers' blocks."""
        return self.blocks or (2 * self.layers[0], 2 * self.layers[1])

    @property
    def held_layers(self) -> float:
        """The layers' worth of blocks it holds, a half for each half layer (for display: the cost model
        weights an attention and an MLP half by their FLOPs)."""
        start, end = self.block_range
        return (end - start) / 2 if self.blocks else float(self.num_layers)

    @property
    def chips(self) -> int:
        return self.tp * self.dp


@dataclass(frozen=True)
class PipelinePlan:
    index: int
    stages: tuple[int, ...]          # stage indices, first to last
    dp: int
    micro_batch: int
    num_micro_batches: int           # per DP replica per step
    virtual_stages: int = 1          # v: model chunks per stage (interleaved 1F1B when > 1)
    # A smaller last micro-batch (version 5): the last of the num_micro_batches holds this many samples
    # (1 <= last_micro_batch < micro_batch), the others micro_batch each; 0: every one holds micro_batch.
    last_micro_batch: int = 0

    @property
    def replica_samples(self) -> int:
        """Samples one DP replica takes per step."""
        return self.micro_batch * (self.num_micro_batches - 1) + self.micro_batch_size(self.num_micro_batches - 1)

    @property
    def samples(self) -> int:
        return self.dp * self.replica_samples

    def micro_batch_size(self, mb: int) -> int:
        """Samples in micro-batch `mb` (0-based) of a replica's step: micro_batch, the last one
        last_micro_batch when set."""
        return self.last_micro_batch if self.last_micro_batch and mb == self.num_micro_batches - 1 else self.micro_batch

    @property
    def micro_batches_text(self) -> str:
        """"7 x micro-batch 4", or with a smaller last one "8 x micro-batch 4 (the last of 1)"."""
        last = f" (the last of {self.last_micro_batch})" if self.last_micro_batch else ""
        return f"{self.num_micro_batches} x micro-batch {self.micro_batch}{last}"


@dataclass(frozen=True)
class RankPlan:
    rank: int
    island: str
    local_rank: int
    node: int                        # index of the node inside its island
    pipeline: int
    stage: int
    tp_rank: int
    dp_rank: int


@dataclass(frozen=True)
class Plan:
    kind: str
    cluster: str
    model: str
    dtype: str
    layers: int
    heads: int
    kv_heads: int
    global_batch: int
    micro_batch: int
    num_micro_batches: int           # pipeline 0's; each pipeline has its own
    recompute: str                   # the stages' mode, or "mixed" (then see each stage)
    zero1: bool
    stages: tuple[StagePlan, ...]
    pipelines: tuple[PipelinePlan, ...]
    ranks: tuple[RankPlan, ...]
    predicted_step_s: float
    tokens_per_s: float
    mfu: Mapping[str, float]         # per chip type: model FLOPs done / peak of its chips
    breakdown: Mapping[str, float] = field(default_factory=dict)
    measured: bool = False           # every stage's layer time came from a profile
    provenance: Mapping[str, object] = field(default_factory=dict)
    idle: Mapping[str, int] = field(default_factory=dict)   # unused chips per island

    @property
    def memory_gb(self) -> list[float]:
        return [s.memory_gb for s in self.stages]

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def label(self) -> str:
        """The planner's name for this plan ("pipeline a(tp2 x2 stages) -> ..."), or its kind when it
        has none (a hand-written plan): what tells candidates apart in `hetero plan`'s lists."""
        return str(self.provenance.get("label") or self.kind)

    def summary(self) -> str:
        """The plan in one line, as it runs: each stage (island, TP, DP, layers) in pipeline order, then
        the micro-batches: "a(tp1 dp2 layers 0-3) -> b(tp1 dp1 layers 3-8), 4 x micro-batch 2"; several
        pipelines (replicas, hybrid) joined by " + ", each with its own micro-batches.
        Every message that names a run's plan in a line (run, resume, re-plan, compare) uses this."""
        lines = []
        for p in self.pipelines:
            parts = [f"{s.island}(tp{s.tp} dp{s.dp} layers {layers_span_text(s)})"
                     for s in (self.stages[i] for i in p.stages if 0 <= i < len(self.stages))]
            lines.append(" -> ".join(parts) + f", {p.micro_batches_text}")
        return " + ".join(lines)

    # -- serialisation ---------------------------------------------------------

    @property
    def version(self) -> int:
        """The format version this plan is written as: 5 when a pipeline's last micro-batch is smaller, else 4
        when a stage boundary falls inside a layer, else 3 when its pipelines' micro-batches differ, else 2
        when a pipeline is interleaved, else 1."""
        if any(p.last_micro_batch for p in self.pipelines):
            return SHORT_LAST_VERSION
        if any(s.blocks for s in self.stages):
            return SUBLAYER_VERSION
        if len({p.micro_batch for p in self.pipelines}) > 1:
            return MIXED_MICRO_BATCH_VERSION
        return INTERLEAVED_VERSION if any(p.virtual_stages > 1 for p in self.pipelines) else VERSION

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": self.version, "kind": self.kind,
            "cluster": self.cluster, "model": self.model, "dtype": self.dtype,
            "layers": self.layers, "heads": self.heads, "kv_heads": self.kv_heads,
            "global_batch": self.global_batch, "micro_batch": self.micro_batch,
            "num_micro_batches": self.num_micro_batches, "recompute": self.recompute, "zero1": self.zero1,
            "stages": [_stage_dict(s) for s in self.stages],
            "pipelines": [_pipeline_dict(p) for p in self.pipelines],
            "ranks": [asdict(r) for r in self.ranks],
            "predicted_step_s": self.predicted_step_s, "tokens_per_s": self.tokens_per_s,
            "mfu": dict(self.mfu), "memory_gb": self.memory_gb, "breakdown": dict(self.breakdown),
            "measured": self.measured, "provenance": dict(self.provenance), "idle": dict(self.idle),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping) -> "Plan":
        """A Plan from its JSON object, every field checked for type and range (a PlanError
        naming the field otherwise: a fractional `tp` or a NaN time is refused, not truncated)."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise PlanError(f"not a hetero plan (expected \"format\": \"{FORMAT}\")")
        version = data.get("version")
        if version not in VERSIONS or isinstance(version, bool):
            raise PlanError(f"plan version {version!r} is not supported (expected {VERSION}, {INTERLEAVED_VERSION} "
                            f"for interleaved pipelines, {MIXED_MICRO_BATCH_VERSION} for pipelines of different "
                            f"micro-batches, {SUBLAYER_VERSION} for stage boundaries inside a layer, or {SHORT_LAST_VERSION} for a "
                            f"smaller last micro-batch)", "version")
        plan = cls(
            kind=read_text(data, "kind", choices=KINDS), cluster=read_text(data, "cluster"), model=read_text(data, "model"),
            dtype=read_text(data, "dtype", choices=tuple(DTYPE_BYTES)), layers=read_int(data, "layers", low=1),
            heads=read_int(data, "heads", low=1), kv_heads=read_int(data, "kv_heads", low=1),
            global_batch=read_int(data, "global_batch", low=1, high=MAX_BATCH),
            micro_batch=read_int(data, "micro_batch", low=1, high=MAX_BATCH),
            num_micro_batches=read_int(data, "num_micro_batches", low=1, high=MAX_BATCH),
            recompute=read_text(data, "recompute", choices=RECOMPUTE_MODES + ("mixed",)), zero1=read_flag(data, "zero1"),
            stages=tuple(_stage(s, f"stages[{i}]") for i, s in enumerate(read_items(data, "stages"))),
            pipelines=tuple(_pipeline(p, f"pipelines[{i}]") for i, p in enumerate(read_items(data, "pipelines"))),
            ranks=tuple(_rank(r, f"ranks[{i}]") for i, r in enumerate(read_items(data, "ranks"))),
            predicted_step_s=read_number(data, "predicted_step_s"),
            tokens_per_s=read_number(data, "tokens_per_s"),
            mfu=read_table(data, "mfu", read_number), breakdown=read_table(data, "breakdown", read_number, low=None, default={}),
            measured=read_flag(data, "measured", default=False),
            provenance=dict(read_mapping(data, "provenance", default={})),
            idle=read_table(data, "idle", read_int, default={}),
        )
        if version != plan.version:      # it says: a boundary inside a layer, micro-batches differ, interleaved
            raise PlanError(_version_mismatch(version, plan.version), "version")
        return plan

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            # NaN / Infinity parse, and the field readers refuse them by name.
            data = json.loads(text, object_pairs_hook=unique_keys)
        except json.JSONDecodeError as exc:
            raise PlanError(f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        except RecursionError:
            raise PlanError("not valid JSON (nested too deeply)") from None
        return cls.from_dict(data)

    def problems(self, fleet=None) -> list[str]:
        """Every broken invariant, as sentences; [] for a valid plan (partitioner.plan_invariants). With a
        FleetSpec, also islands, chips, node placement of TP groups and memory against each chip."""
        return plan_problems(self, fleet)

    def validate(self, fleet=None) -> "Plan":
        problems = self.problems(fleet)
        if problems:
            raise PlanError("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        return self


def assign_ranks(fleet, stages: list[StagePlan]) -> tuple[RankPlan, ...]:
    """Global ranks island by island (cluster order), island-local ranks by chip index."""
    ranks: list[RankPlan] = []
    for island in fleet.islands:
        mine = sorted((s for s in stages if s.island == island.name), key=lambda s: s.offset)
        entries = []
        for s in mine:
            for dp_rank in range(s.dp):
                for tp_rank in range(s.tp):
                    local = s.offset + dp_rank * s.tp + tp_rank
                    entries.append((local, s, tp_rank, dp_rank))
        entries.sort(key=lambda e: e[0])
        for local, s, tp_rank, dp_rank in entries:
            ranks.append(RankPlan(rank=len(ranks), island=island.name, local_rank=local,
                                  node=island.node_of(local), pipeline=s.pipeline, stage=s.index,
                                  tp_rank=tp_rank, dp_rank=dp_rank))
    return tuple(ranks)


def interleaved(plan: Plan, virtual_stages: int) -> Plan:
    """The same plan run as interleaved 1F1B with `virtual_stages` chunks per stage: each stage keeps
    its number of layers, split as evenly as it goes into v chunks, and the model is re-cut into the
    p*v pieces in the order the format prescribes. Pipelines of one stage stay plain. For tests and
    measurements of the engine; predictions (times, memory) are the plain plan's, not re-costed.
    A plan with a stage boundary inside a layer is refused: interleaved pipelines keep whole layers."""
    if any(s.blocks for s in plan.stages):
        raise PlanError("an interleaved pipeline keeps whole layers, and this plan has a stage boundary inside a "
                        "layer (blocks)")
    stages, pipelines = list(plan.stages), []
    for p in plan.pipelines:
        v = virtual_stages if len(p.stages) > 1 else 1
        sizes = [_split(stages[i].num_layers, v) for i in p.stages]
        start = 0
        cut: list[list[tuple[int, int]]] = [[] for _ in p.stages]
        for c in range(v):
            for position, size in enumerate(sizes):
                cut[position].append((start, start + size[c]))
                start += size[c]
        for position, i in enumerate(p.stages):
            chunks = tuple(cut[position])
            stages[i] = replace(stages[i], chunks=chunks if v > 1 else (), layers=(chunks[0][0], chunks[-1][1]))
        pipelines.append(replace(p, virtual_stages=v))
    return replace(plan, stages=tuple(stages), pipelines=tuple(pipelines))


def _split(layers: int, parts: int) -> list[int]:
    """`layers` in `parts` sizes that differ by at most one, larger ones first."""
    if layers < parts:
        raise PlanError(f"a stage of {layers} layers cannot hold {parts} non-empty chunks")
    return [layers // parts + (1 if c < layers % parts else 0) for c in range(parts)]


def layers_span_text(stage: StagePlan) -> str:
    """A stage's span in layers, a boundary inside a layer as ".5": "0-3", blocks [0, 5) "0-2.5",
    [5, 16) "2.5-8" (an interleaved stage: the span of its chunks)."""
    return "-".join(f"{block // 2}.5" if block % 2 else str(block // 2) for block in stage.block_range)


def _version_mismatch(given: int, needed: int) -> str:
    """Why a plan written as version `given` is refused when its content is version `needed`."""
    if needed == SHORT_LAST_VERSION:
        return f"a smaller last micro-batch (last_micro_batch) needs plan version {SHORT_LAST_VERSION}"
    if given == SHORT_LAST_VERSION:
        return (f"plan version {given} is not supported without a smaller last micro-batch (last_micro_batch) "
                f"(such a plan is version {needed})")
    if needed == SUBLAYER_VERSION:
        return f"stage boundaries inside a layer (blocks) need plan version {SUBLAYER_VERSION}"
    if given == SUBLAYER_VERSION:
        return (f"plan version {given} is not supported without a stage boundary inside a layer (blocks) "
                f"(such a plan is version {needed})")
    if needed == MIXED_MICRO_BATCH_VERSION:
        return f"pipelines of different micro_batch need plan version {MIXED_MICRO_BATCH_VERSION}"
    if needed == INTERLEAVED_VERSION and given == VERSION:
        return f"virtual_stages > 1 needs plan version {INTERLEAVED_VERSION}"
    if given == MIXED_MICRO_BATCH_VERSION:
        return (f"plan version {given} is not supported when every pipeline has the same micro_batch "
                f"(such a plan is version {needed})")
    return (f"plan version {given} is not supported without a pipeline of virtual_stages > 1 "
            f"(a plain plan is version {VERSION})")


def _stage_dict(s: StagePlan) -> dict:
    """A stage's JSON object; `chunks` only when interleaved and `blocks` only when set, so every other
    plan reads as before (a v == 1 plan as format version 1)."""
    out = {**asdict(s), "layers": list(s.layers)}
    for key, value in (("chunks", [list(c) for c in s.chunks]), ("blocks", list(s.blocks))):
        if value:
            out[key] = value
        else:
            del out[key]
    return out


def _pipeline_dict(p: PipelinePlan) -> dict:
    out = {**asdict(p), "stages": list(p.stages), "samples": p.samples}
    if p.virtual_stages == 1:
        del out["virtual_stages"]
    if not p.last_micro_batch:
        del out["last_micro_batch"]
    return out


# -- the JSON form's parts, read with partitioner.plan_format's field readers --------------------

def _stage(data: Any, where: str) -> StagePlan:
    start, end = read_pair(get_field(data, "layers", where), f"{where}.layers")
    chunks = get_field(data, "chunks", where, default=[])
    if not isinstance(chunks, list):
        raise PlanError(f"expected a list, got {show(chunks)}", f"{where}.chunks")
    return StagePlan(
        index=read_int(data, "index", where), pipeline=read_int(data, "pipeline", where), island=read_text(data, "island", where),
        chip=read_text(data, "chip", where), tp=read_int(data, "tp", where, low=1), dp=read_int(data, "dp", where, low=1),
        layers=(start, end), recompute=read_text(data, "recompute", where, choices=RECOMPUTE_MODES),
        offset=read_int(data, "offset", where), time_s=read_number(data, "time_s", where),
        memory_gb=read_number(data, "memory_gb", where), source=read_text(data, "source", where, default="estimated"),
        chunks=tuple(read_pair(chunk, f"{where}.chunks[{c}]") for c, chunk in enumerate(chunks)),
        blocks=read_pair(data["blocks"], f"{where}.blocks") if "blocks" in data else ())


def _pipeline(data: Any, where: str) -> PipelinePlan:
    stages = read_items(data, "stages", where)
    return PipelinePlan(
        index=read_int(data, "index", where),
        stages=tuple(read_int({"stages": stages}, "stages", where, index=i) for i in range(len(stages))),
        dp=read_int(data, "dp", where, low=1), micro_batch=read_int(data, "micro_batch", where, low=1, high=MAX_BATCH),
        num_micro_batches=read_int(data, "num_micro_batches", where, low=1, high=MAX_BATCH),
        virtual_stages=read_int(data, "virtual_stages", where, low=1, default=1),
        last_micro_batch=read_int(data, "last_micro_batch", where, low=1, high=MAX_BATCH) if "last_micro_batch" in data else 0)


def _rank(data: Any, where: str) -> RankPlan:
    fields: dict[str, Any] = {key: read_text(data, key, where) if key == "island" else read_int(data, key, where)
                              for key in RankPlan.__dataclass_fields__}
    return RankPlan(**fields)


