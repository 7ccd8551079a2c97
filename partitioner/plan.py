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
from dataclasses import asdict, dataclass, field
from typing import Mapping

FORMAT = "hetero-plan"
VERSION = 1
KINDS = ("pipeline", "replicas")


class PlanError(ValueError):
    """A plan that breaks the format or its invariants."""


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

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

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

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "kind": self.kind,
            "cluster": self.cluster, "model": self.model, "dtype": self.dtype,
            "layers": self.layers, "heads": self.heads, "kv_heads": self.kv_heads,
            "global_batch": self.global_batch, "micro_batch": self.micro_batch,
            "num_micro_batches": self.num_micro_batches, "recompute": self.recompute, "zero1": self.zero1,
            "stages": [{**asdict(s), "layers": list(s.layers)} for s in self.stages],
            "pipelines": [{**asdict(p), "stages": list(p.stages), "samples": p.samples} for p in self.pipelines],
            "ranks": [asdict(r) for r in self.ranks],
            "predicted_step_s": self.predicted_step_s, "tokens_per_s": self.tokens_per_s,
            "mfu": dict(self.mfu), "memory_gb": self.memory_gb, "breakdown": dict(self.breakdown),
            "measured": self.measured, "provenance": dict(self.provenance), "idle": dict(self.idle),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping) -> "Plan":
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise PlanError(f"not a hetero plan (expected \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise PlanError(f"plan version {data.get('version')!r} is not supported (expected {VERSION})")
        try:
            stages = tuple(StagePlan(
                index=int(s["index"]), pipeline=int(s["pipeline"]), island=str(s["island"]),
                chip=str(s["chip"]), tp=int(s["tp"]), dp=int(s["dp"]),
                layers=(int(s["layers"][0]), int(s["layers"][1])), recompute=str(s["recompute"]),
                offset=int(s["offset"]), time_s=float(s["time_s"]), memory_gb=float(s["memory_gb"]),
                source=str(s.get("source", "estimated"))) for s in data["stages"])
            pipelines = tuple(PipelinePlan(
                index=int(p["index"]), stages=tuple(int(i) for i in p["stages"]), dp=int(p["dp"]),
                micro_batch=int(p["micro_batch"]), num_micro_batches=int(p["num_micro_batches"]))
                for p in data["pipelines"])
            ranks = tuple(RankPlan(**{k: (str(r[k]) if k == "island" else int(r[k]))
                                      for k in RankPlan.__dataclass_fields__}) for r in data["ranks"])
            plan = cls(
                kind=str(data["kind"]), cluster=str(data["cluster"]), model=str(data["model"]),
                dtype=str(data["dtype"]), layers=int(data["layers"]), heads=int(data["heads"]),
                kv_heads=int(data["kv_heads"]), global_batch=int(data["global_batch"]),
                micro_batch=int(data["micro_batch"]), num_micro_batches=int(data["num_micro_batches"]),
                recompute=str(data["recompute"]), zero1=bool(data["zero1"]),
                stages=stages, pipelines=pipelines, ranks=ranks,
                predicted_step_s=float(data["predicted_step_s"]), tokens_per_s=float(data["tokens_per_s"]),
                mfu={str(k): float(v) for k, v in dict(data["mfu"]).items()},
                breakdown={str(k): float(v) for k, v in dict(data.get("breakdown", {})).items()},
                measured=bool(data.get("measured", False)), provenance=dict(data.get("provenance", {})),
                idle={str(k): int(v) for k, v in dict(data.get("idle", {})).items()},
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise PlanError(f"malformed plan: {type(exc).__name__}: {exc}") from None
        return plan

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

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
            start = 0
            for i in p.stages:
                if i in seen_stages or not 0 <= i < len(self.stages):
                    out.append(f"pipeline {p.index}: stage {i} missing or used twice")
                    continue
                seen_stages.add(i)
                s = self.stages[i]
                if s.pipeline != p.index:
                    out.append(f"stage {i} says pipeline {s.pipeline}, listed under {p.index}")
                if s.layers[0] != start or s.layers[1] <= s.layers[0]:
                    out.append(f"pipeline {p.index}: stage {i} has layers {list(s.layers)}, expected to start at {start} and be non-empty")
                start = s.layers[1]
                if s.dp != p.dp:
                    out.append(f"stage {i}: dp {s.dp} differs from its pipeline's {p.dp}")
            if start != self.layers:
                out.append(f"pipeline {p.index}: layers end at {start}, the model has {self.layers}")
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
