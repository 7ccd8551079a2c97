"""The search's records: a stage's place (Slot), one costed pipeline (PipeEval), a candidate plan
(Candidate: one pipeline, a replica per island, or several pipelines over groups of islands) and the
search's answer (SearchResult); how they are labelled and deduplicated. No search logic here (docs/architecture.md: partitioner)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

from partitioner.costs import interleaved_cycle_fill, pipeline_step_s
from partitioner.inputs import IslandSpec
from partitioner.plan import Plan


class Slot(NamedTuple):
    """One stage's place: its island, TP degree and first local rank (of DP replica 0)."""

    island: IslandSpec
    tp: int
    offset: int


@dataclass
class PipeEval:
    layout: list                     # [Slot] per stage
    dp: int
    b: int
    m: int
    counts: tuple
    modes: tuple
    stage_times: list
    boundary: list
    tail: float
    memory: list                     # bytes per chip per stage
    sources: list
    v: int = 1                       # model chunks per stage (interleaved 1F1B when > 1)
    wrap: float = 0.0                # last stage -> first stage, per crossing (v > 1 goes round)
    # evaluate.stage_tail_parts of its layout and counts (None: not kept), for its interleaved twins
    tail_parts: tuple | None = field(default=None, repr=False, compare=False)
    # its P - 1 inner stage boundaries in half-layer blocks (partitioner/halves.py; () for `counts`' whole
    # layers) and, where there are some, the stages' times at whole layers (an interleaved twin's start)
    cuts: tuple = ()
    whole_times: list | None = field(default=None, repr=False, compare=False)
    # A one-stage plain pipeline only (`shortens`): its stage's time at 1 .. b-1 samples in the same
    # recompute mode, and the samples of the step's last micro-batch when fewer than b (0: it holds b)
    short_times: tuple = field(default=(), repr=False, compare=False)
    last_b: int = 0

    @property
    def cycle(self) -> float:
        if self.v == 1:
            return max(max(self.stage_times), max(self.boundary, default=0.0))
        return interleaved_cycle_fill(self.stage_times, self.boundary, self.wrap, self.v)[0]

    @property
    def fill(self) -> float:
        if self.v == 1:
            return sum(self.stage_times) + 2.0 * sum(self.boundary) + self.tail
        return interleaved_cycle_fill(self.stage_times, self.boundary, self.wrap, self.v)[1] + self.tail

    def step(self, m: int | None = None) -> float:
        if m is None and self.last_b:        # one stage: the whole micro-batches, then the short one
            return (self.m - 1) * self.stage_times[0] + self.short_times[self.last_b - 1] + self.tail
        m = self.m if m is None else m
        if self.v == 1:
            return pipeline_step_s(self.stage_times, self.boundary, m, self.tail)
        return (m - 1) * self.cycle + self.fill

    def takes(self, m: int) -> bool:
        """Can this pipeline run m micro-batches per replica (interleaving needs a multiple of its stages)?"""
        return self.v == 1 or m % len(self.layout) == 0

    @property
    def island(self) -> IslandSpec:
        """The first stage's island (a replica's only one)."""
        return self.layout[0].island

    @property
    def chips(self) -> int:
        return sum(slot.tp for slot in self.layout) * self.dp

    @property
    def shortens(self) -> bool:
        """Can its last micro-batch be smaller (one plain stage, its times at fewer samples costed)?"""
        return len(self.short_times) == self.b - 1 > 0

    @property
    def replica_samples(self) -> int:
        """Samples one replica takes per step."""
        return self.b * (self.m - 1) + (self.last_b or self.b)

    @property
    def samples(self) -> int:
        return self.dp * self.replica_samples

    def with_micro_batches(self, m: int) -> PipeEval:
        return replace(self, m=m, last_b=0)

    def with_samples(self, k: int) -> PipeEval:
        """Each replica on k samples: whole micro-batches of b, the last one smaller where k is not a
        multiple of b (only where it `shortens`)."""
        m = -(-k // self.b)
        last = k - (m - 1) * self.b
        if last == self.b:
            return replace(self, m=m, last_b=0)
        if not self.shortens:
            raise ValueError(f"a pipeline of micro-batch {self.b} cannot take {k} samples per replica")
        if m == 1:      # one micro-batch of `last` samples (its memory still costed at b: an upper bound)
            return replace(self, b=last, m=1, last_b=0, stage_times=[self.short_times[last - 1]],
                           short_times=self.short_times[:last - 1])
        return replace(self, m=m, last_b=last)


@dataclass
class Candidate:
    kind: str                        # pipeline | replicas | hybrid
    pipes: list                      # PipeEval per pipeline
    step: float
    cross_s: float = 0.0
    label: str = ""


@dataclass
class SearchResult:
    plans: list                      # best first (Plan)
    candidates: list                 # the matching Candidates
    baseline: Candidate | None
    baseline_plan: Plan | None
    search_s: float
    evaluated: int
    bounded: int
    stats: dict = field(default_factory=dict)
    islands_alone: dict = field(default_factory=dict)    # island name -> Candidate (whole batch, others idle)
    hetero_dp: Candidate | None = None                   # best replica per island, exact batch split

    @property
    def best(self) -> Plan:
        return self.plans[0]


def stage_layout(order_tps_stages, dp: int) -> list:
    """[(island, tp, n_stages)] in pipeline order -> [(island, tp, offset)] per stage."""
    layout = []
    for island, t, s in order_tps_stages:
        for j in range(s):
            layout.append(Slot(island, t, j * t * dp))
    return layout


def label_pp(pe: PipeEval) -> str:
    chain = " -> ".join(f"{name}(tp{t} x{s} stage{'s' if s > 1 else ''})" for name, t, s in _island_runs(pe))
    chunks = f", {pe.v} chunks per stage (interleaved)" if pe.v > 1 else ""
    return f"pipeline {chain}, dp {pe.dp}, micro-batch {pe.b} x {pe.m}{chunks}"


def replica_label(pes: list) -> str:
    """"replicas a(pp1 tp2 dp1, 28 samples) + b(...), micro-batch 2"; each replica's own micro-batch
    in its parentheses when they differ."""
    mixed = len({p.b for p in pes}) > 1 or any(p.last_b for p in pes)
    return "replicas " + " + ".join(
        f"{p.island.name}(pp{len(p.layout)}{f' x{p.v} chunks' if p.v > 1 else ''} tp{p.layout[0].tp} dp{p.dp}, "
        f"{p.samples} samples{f', micro-batch {p.b}' if mixed else ''})"
        for p in pes) + ("" if mixed else f", micro-batch {pes[0].b}")


def hybrid_label(pes: list, b: int) -> str:
    """"hybrid [a(tp2 x3) -> b(tp1 x2), dp 4, 96 samples] + [c(tp4 x2), dp 2, 32 samples], micro-batch 1"."""
    return "hybrid " + " + ".join(f"[{_chain(p)}, dp {p.dp}, {p.samples} samples"
                                  f"{f', {p.v} chunks per stage' if p.v > 1 else ''}]" for p in pes) \
        + f", micro-batch {b}"


def _chain(pe: PipeEval) -> str:
    """A pipeline's islands in order, with each one's TP and number of stages: "a(tp2 x3) -> b(tp1 x2)"."""
    return " -> ".join(f"{name}(tp{t} x{s})" for name, t, s in _island_runs(pe))


def _island_runs(pe: PipeEval) -> list[list]:
    """[island name, TP, stages] for each run of consecutive stages on one island at one TP."""
    parts: list[list] = []
    for island, t, _off in pe.layout:
        if parts and parts[-1][0] == island.name and parts[-1][1] == t:
            parts[-1][2] += 1
        else:
            parts.append([island.name, t, 1])
    return parts


def dedup(cands: list) -> list:
    seen, out = set(), []
    for c in cands:
        key = (c.label, round(c.step, 12))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out
