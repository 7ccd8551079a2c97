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
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Mapping

from partitioner.inputs import DTYPE_BYTES, RECOMPUTE_MODES

FORMAT = "hetero-plan"
VERSION = 1
INTERLEAVED_VERSION = 2     # written when any pipeline has virtual_stages > 1 (docs/plan-format.md)
VERSIONS = (VERSION, INTERLEAVED_VERSION)
KINDS = ("pipeline", "replicas")


MAX_COUNT = 1 << 20      # chips, ranks, stages, layers, heads: far beyond any fleet or model
MAX_BATCH = 10 ** 9


class PlanError(ValueError):
    """A plan that breaks the format or its invariants. `field` names the offending
    field ("stages[1].tp") when there is one; `reason` is the message without it."""

    def __init__(self, reason: str, field: str = ""):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)


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

    @property
    def layer_ranges(self) -> tuple[tuple[int, int], ...]:
        """The layers this stage holds, as ranges in model order: what code that builds or
        counts the stage's layers must use (`layers` is only their span when interleaved)."""
        return self.chunks or (self.layers,)

    @property
    def num_layers(self) -> int:
        return sum(end - start for start, end in self.layer_ranges)

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

    @property
    def samples(self) -> int:
        return self.dp * self.micro_batch * self.num_micro_batches


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

    # -- serialisation ---------------------------------------------------------

    @property
    def version(self) -> int:
        """The format version this plan is written as: 1 unless a pipeline is interleaved."""
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
            raise PlanError(f"plan version {version!r} is not supported (expected {VERSION}, or "
                            f"{INTERLEAVED_VERSION} for interleaved pipelines)", "version")
        plan = cls(
            kind=_text(data, "kind", choices=KINDS), cluster=_text(data, "cluster"), model=_text(data, "model"),
            dtype=_text(data, "dtype", choices=tuple(DTYPE_BYTES)), layers=_int(data, "layers", low=1),
            heads=_int(data, "heads", low=1), kv_heads=_int(data, "kv_heads", low=1),
            global_batch=_int(data, "global_batch", low=1, high=MAX_BATCH),
            micro_batch=_int(data, "micro_batch", low=1, high=MAX_BATCH),
            num_micro_batches=_int(data, "num_micro_batches", low=1, high=MAX_BATCH),
            recompute=_text(data, "recompute", choices=RECOMPUTE_MODES + ("mixed",)), zero1=_flag(data, "zero1"),
            stages=tuple(_stage(s, f"stages[{i}]") for i, s in enumerate(_items(data, "stages"))),
            pipelines=tuple(_pipeline(p, f"pipelines[{i}]") for i, p in enumerate(_items(data, "pipelines"))),
            ranks=tuple(_rank(r, f"ranks[{i}]") for i, r in enumerate(_items(data, "ranks"))),
            predicted_step_s=_number(data, "predicted_step_s"),
            tokens_per_s=_number(data, "tokens_per_s"),
            mfu=_table(data, "mfu", _number), breakdown=_table(data, "breakdown", _number, low=None, default={}),
            measured=_flag(data, "measured", default=False),
            provenance=dict(_mapping(data, "provenance", default={})),
            idle=_table(data, "idle", _int, default={}),
        )
        if version != plan.version:      # the version says whether a pipeline is interleaved
            raise PlanError(f"virtual_stages > 1 needs plan version {INTERLEAVED_VERSION}" if version == VERSION else
                            f"plan version {version} is not supported without a pipeline of virtual_stages > 1 "
                            f"(a plain plan is version {VERSION})", "version")
        return plan

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            # NaN / Infinity parse, and the field readers refuse them by name.
            data = json.loads(text, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            raise PlanError(f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        except RecursionError:
            raise PlanError("not valid JSON (nested too deeply)") from None
        return cls.from_dict(data)

    # -- checks ------------------------------------------------------------------

    def problems(self, fleet=None) -> list[str]:
        """Every broken invariant, as sentences; [] for a valid plan.

        With a FleetSpec, also checks islands, chips, node placement of TP groups
        and memory against each chip's usable memory."""
        out: list[str] = []
        if self.kind not in KINDS:
            out.append(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "pipeline" and len(self.pipelines) != 1:
            out.append(f"a 'pipeline' plan has exactly one pipeline, got {len(self.pipelines)}")
        if [s.index for s in self.stages] != list(range(len(self.stages))):
            out.append("stage indices must be 0..n-1 in order")
        seen_stages: set = set()
        total = 0
        for p in self.pipelines:
            if not p.stages:
                out.append(f"pipeline {p.index} has no stages")
                continue
            mine = []
            for i in p.stages:
                if i in seen_stages or not 0 <= i < len(self.stages):
                    out.append(f"pipeline {p.index}: stage {i} missing or used twice")
                    continue
                seen_stages.add(i)
                s = self.stages[i]
                mine.append(s)
                if s.pipeline != p.index:
                    out.append(f"stage {i} says pipeline {s.pipeline}, listed under {p.index}")
                if s.dp != p.dp:
                    out.append(f"stage {i}: dp {s.dp} differs from its pipeline's {p.dp}")
            out.extend(self._layer_problems(p, mine))
            if p.micro_batch != self.micro_batch:
                out.append(f"pipeline {p.index}: micro_batch {p.micro_batch} != plan's {self.micro_batch}")
            if p.num_micro_batches < 1:
                out.append(f"pipeline {p.index}: needs at least one micro-batch")
            total += p.samples
        if seen_stages != set(range(len(self.stages))):
            out.append("some stages belong to no pipeline")
        if total != self.global_batch:
            out.append(f"pipelines process {total} samples per step, global_batch is {self.global_batch}")
        for s in self.stages:
            if s.tp < 1 or s.dp < 1:
                out.append(f"stage {s.index}: tp and dp must be >= 1")
            elif self.heads % s.tp or self.kv_heads % s.tp:
                out.append(f"stage {s.index}: tp {s.tp} must divide heads ({self.heads}) and kv_heads ({self.kv_heads})")
        # ranks
        if [r.rank for r in self.ranks] != list(range(len(self.ranks))):
            out.append("global ranks must be 0..n-1 in order")
        chips_seen: dict = {}
        per_stage: dict = {}
        for r in self.ranks:
            key = (r.island, r.local_rank)
            if key in chips_seen:
                out.append(f"chip {r.island}[{r.local_rank}] is used by ranks {chips_seen[key]} and {r.rank}")
            chips_seen[key] = r.rank
            if not 0 <= r.stage < len(self.stages):
                out.append(f"rank {r.rank}: unknown stage {r.stage}")
                continue
            s = self.stages[r.stage]
            if r.island != s.island or r.pipeline != s.pipeline:
                out.append(f"rank {r.rank}: island/pipeline differ from its stage {s.index}")
            if not (0 <= r.tp_rank < s.tp and 0 <= r.dp_rank < s.dp):
                out.append(f"rank {r.rank}: tp_rank/dp_rank out of range for stage {s.index}")
            if r.local_rank != s.offset + r.dp_rank * s.tp + r.tp_rank:
                out.append(f"rank {r.rank}: local rank {r.local_rank} is not offset + dp_rank*tp + tp_rank")
            per_stage.setdefault(r.stage, set()).add((r.tp_rank, r.dp_rank))
        for s in self.stages:
            if len(per_stage.get(s.index, ())) != s.tp * s.dp:
                out.append(f"stage {s.index}: expected {s.tp * s.dp} ranks (tp x dp), got {len(per_stage.get(s.index, ()))}")
        if fleet is not None:
            out.extend(self._fleet_problems(fleet))
        return out

    def _layer_problems(self, p: PipelinePlan, stages: list[StagePlan]) -> list[str]:
        """A pipeline's stages tile [0, layers) in order: plainly, or (virtual_stages v > 1) as p*v
        pieces, the stage at position i holding pieces i, i+p, ..., i+(v-1)p as its `chunks`."""
        out, v = [], p.virtual_stages
        if v < 1:
            return [f"pipeline {p.index}: virtual_stages must be >= 1, got {v}"]
        if v > 1:
            if len(stages) < 2:
                out.append(f"pipeline {p.index}: virtual_stages {v} needs at least 2 stages, it has {len(stages)}")
            if p.num_micro_batches % max(len(stages), 1):
                out.append(f"pipeline {p.index}: virtual_stages {v} needs num_micro_batches "
                           f"({p.num_micro_batches}) to be a multiple of its {len(stages)} stages")
        pieces: list = [None] * (len(stages) * v)
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
        if start != self.layers:
            out.append(f"pipeline {p.index}: layers end at {start}, the model has {self.layers}")
        return out

    def _fleet_problems(self, fleet) -> list[str]:
        out = []
        islands = {i.name: i for i in fleet.islands}
        for s in self.stages:
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
        for r in self.ranks:
            island = islands.get(r.island)
            if island is None:
                continue
            if not 0 <= r.local_rank < island.size:
                out.append(f"rank {r.rank}: local rank {r.local_rank} beyond island {r.island} ({island.size} chips)")
            elif island.node_of(r.local_rank) != r.node:
                out.append(f"rank {r.rank}: node {r.node} but local rank {r.local_rank} sits on node "
                           f"{island.node_of(r.local_rank)}")
        # TP groups inside one node
        groups: dict = {}
        for r in self.ranks:
            groups.setdefault((r.stage, r.dp_rank), set()).add(r.node)
        for (stage, dp_rank), nodes in groups.items():
            if len(nodes) > 1:
                out.append(f"stage {stage}: TP group of dp_rank {dp_rank} spans nodes {sorted(nodes)}")
        return out

    def validate(self, fleet=None) -> "Plan":
        problems = self.problems(fleet)
        if problems:
            raise PlanError("; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))
        return self


def assign_ranks(fleet, stages: list[StagePlan]) -> tuple[RankPlan, ...]:
    """Global ranks island by island (cluster order), island-local ranks by chip index."""
    ranks = []
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
    measurements of the engine; predictions (times, memory) are the plain plan's, not re-costed."""
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


def _stage_dict(s: StagePlan) -> dict:
    """A stage's JSON object; `chunks` only when interleaved, so a v == 1 plan reads as format version 1."""
    out = {**asdict(s), "layers": list(s.layers)}
    if s.chunks:
        out["chunks"] = [list(c) for c in s.chunks]
    else:
        del out["chunks"]
    return out


def _pipeline_dict(p: PipelinePlan) -> dict:
    out = {**asdict(p), "stages": list(p.stages), "samples": p.samples}
    if p.virtual_stages == 1:
        del out["virtual_stages"]
    return out


# -- reading the JSON form: one function per field type, each naming the field it refuses --------

_MISSING = object()


def _pair(pair, name: str) -> tuple[int, int]:
    """A [start, end] layer range, `name` the field it is read from."""
    if not isinstance(pair, list) or len(pair) != 2:
        raise PlanError(f"expected [start, end], got {_show(pair)}", name)
    start, end = (_int({name: pair}, name, index=i) for i in (0, 1))
    return start, end


def _stage(data, where: str) -> StagePlan:
    start, end = _pair(_get(data, "layers", where), f"{where}.layers")
    chunks = _get(data, "chunks", where, default=[])
    if not isinstance(chunks, list):
        raise PlanError(f"expected a list, got {_show(chunks)}", f"{where}.chunks")
    return StagePlan(
        index=_int(data, "index", where), pipeline=_int(data, "pipeline", where), island=_text(data, "island", where),
        chip=_text(data, "chip", where), tp=_int(data, "tp", where, low=1), dp=_int(data, "dp", where, low=1),
        layers=(start, end), recompute=_text(data, "recompute", where, choices=RECOMPUTE_MODES),
        offset=_int(data, "offset", where), time_s=_number(data, "time_s", where),
        memory_gb=_number(data, "memory_gb", where), source=_text(data, "source", where, default="estimated"),
        chunks=tuple(_pair(chunk, f"{where}.chunks[{c}]") for c, chunk in enumerate(chunks)))


def _pipeline(data, where: str) -> PipelinePlan:
    stages = _items(data, "stages", where)
    return PipelinePlan(
        index=_int(data, "index", where),
        stages=tuple(_int({"stages": stages}, "stages", where, index=i) for i in range(len(stages))),
        dp=_int(data, "dp", where, low=1), micro_batch=_int(data, "micro_batch", where, low=1, high=MAX_BATCH),
        num_micro_batches=_int(data, "num_micro_batches", where, low=1, high=MAX_BATCH),
        virtual_stages=_int(data, "virtual_stages", where, low=1, default=1))


def _rank(data, where: str) -> RankPlan:
    return RankPlan(**{key: _text(data, key, where) if key == "island" else _int(data, key, where)
                       for key in RankPlan.__dataclass_fields__})


def _get(data, key: str, where: str, default=_MISSING):
    if not isinstance(data, Mapping):
        raise PlanError(f"expected an object, got {_show(data)}", where)
    if key not in data:
        if default is _MISSING:
            raise PlanError("missing", _join(where, key))
        return default
    return data[key]


def _int(data, key: str, where: str = "", low: int = 0, high: int = MAX_COUNT, index: int | None = None,
         default=_MISSING) -> int:
    value = _get(data, key, where, default)
    name = _join(where, key)
    if index is not None:
        value, name = value[index], f"{name}[{index}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"expected a whole number, got {_show(value)}", name)
    if not low <= value <= high:
        raise PlanError(f"expected a whole number from {low} to {high}, got {value}", name)
    return value


def _number(data, key: str, where: str = "", low: float | None = 0.0) -> float:
    value = _get(data, key, where)
    name = _join(where, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"expected a number, got {_show(value)}", name)
    if not math.isfinite(value):
        raise PlanError(f"expected a finite number, got {value}", name)
    if low is not None and value < low:
        raise PlanError(f"expected a number >= {low:g}, got {value}", name)
    return float(value)


def _text(data, key: str, where: str = "", choices: tuple | None = None, default=_MISSING) -> str:
    value = _get(data, key, where, default)
    name = _join(where, key)
    if not isinstance(value, str) or not value:
        raise PlanError(f"expected a non-empty string, got {_show(value)}", name)
    if choices is not None and value not in choices:
        raise PlanError(f"expected one of {', '.join(choices)}, got {_show(value)}", name)
    return value


def _flag(data, key: str, where: str = "", default=_MISSING) -> bool:
    value = _get(data, key, where, default)
    if not isinstance(value, bool):
        raise PlanError(f"expected true or false, got {_show(value)}", _join(where, key))
    return value


def _items(data, key: str, where: str = "") -> list:
    value = _get(data, key, where)
    if not isinstance(value, list):
        raise PlanError(f"expected a list, got {_show(value)}", _join(where, key))
    return value


def _mapping(data, key: str, where: str = "", default=_MISSING) -> Mapping:
    value = _get(data, key, where, default)
    if not isinstance(value, Mapping):
        raise PlanError(f"expected an object, got {_show(value)}", _join(where, key))
    return value


def _table(data, key: str, read, default=_MISSING, **limits) -> dict:
    """{name: value} with every value read by `read` (_int or _number) under `limits`."""
    table = _mapping(data, key, default=default)
    return {name: read(table, name, key, **limits) for name in table}


def _unique_keys(pairs: list) -> dict:
    """A JSON object whose keys are unique: a hand-edited plan naming a field twice is ambiguous."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise PlanError(f"not valid JSON: the key {_show(key)} appears twice in one object")
        out[key] = value
    return out


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _show(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."
