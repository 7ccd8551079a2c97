"""Where this process sits in the Plan, and who its neighbours are.

Pure bookkeeping over the Plan's rank table (docs/plan-format.md): no process
groups here, so it is the same on every rank and easy to test.
"""

from __future__ import annotations

from dataclasses import dataclass

from partitioner.plan import Plan, RankPlan, StagePlan


@dataclass(frozen=True)
class Place:
    rank: int                        # global rank
    island: str
    local_rank: int                  # island-local rank (the island world's rank)
    stage: StagePlan
    pipeline_stages: tuple[int, ...]  # the stage indices of this rank's pipeline, in order
    tp_rank: int
    dp_rank: int
    micro_batch: int
    num_micro_batches: int
    first_sample: int                # this DP replica's first sample in the global batch
    virtual_stages: int = 1          # model chunks per stage of this pipeline (interleaved 1F1B when > 1)
    last_micro_batch: int = 0        # samples in the step's last micro-batch when fewer than micro_batch

    def micro_batch_size(self, mb: int) -> int:
        """Samples in micro-batch `mb` of this replica's step (its first sample: first_sample + mb * micro_batch)."""
        return self.last_micro_batch if self.last_micro_batch and mb == self.num_micro_batches - 1 else self.micro_batch

    @property
    def position(self) -> int:
        """Index of this stage within its pipeline."""
        return self.pipeline_stages.index(self.stage.index)

    @property
    def is_first(self) -> bool:
        return self.position == 0

    @property
    def is_last(self) -> bool:
        return self.position == len(self.pipeline_stages) - 1



class Topology:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.by_rank = {r.rank: r for r in plan.ranks}
        self.island_of = {r.rank: r.island for r in plan.ranks}

    def world_rank(self, rank: int) -> int:
        """Rank inside the island's native world: the plan's used chips of that island,
        in local-rank order (idle chips get no process, so local ranks may have gaps)."""
        entry = self.by_rank[rank]
        used = sorted(r.local_rank for r in self.plan.ranks if r.island == entry.island)
        return used.index(entry.local_rank)

    def place(self, rank: int) -> Place:
        entry = self.by_rank[rank]
        stage = self.plan.stages[entry.stage]
        pipeline = self.plan.pipelines[entry.pipeline]
        first_sample = sum(p.samples for p in self.plan.pipelines[:entry.pipeline])
        first_sample += entry.dp_rank * pipeline.replica_samples
        return Place(rank, entry.island, entry.local_rank, stage, tuple(pipeline.stages), entry.tp_rank,
                     entry.dp_rank, pipeline.micro_batch, pipeline.num_micro_batches, first_sample,
                     pipeline.virtual_stages, pipeline.last_micro_batch)

    def stage_ranks(self, stage: int, dp_rank: int | None = None) -> list[RankPlan]:
        """Ranks of a stage (one DP replica's TP group when dp_rank is given), by tp_rank."""
        found = [r for r in self.plan.ranks if r.stage == stage and (dp_rank is None or r.dp_rank == dp_rank)]
        return sorted(found, key=lambda r: (r.dp_rank, r.tp_rank))

    def neighbour(self, place: Place, step: int, chunk: int = 0) -> list[int] | None:
        """Global ranks (by tp_rank) of the same DP replica one stage before (-1) or after (+1)
        `chunk` of this stage in the model: interleaved, the last stage's chunk c feeds the first
        stage's chunk c+1 (wrap-around). None where the model starts or ends."""
        count = len(place.pipeline_stages)
        position = place.position + step
        if position in (-1, count):          # wrap to the other end, one chunk over
            position, chunk = position % count, chunk + step
        if not 0 <= chunk < place.virtual_stages:
            return None
        return [r.rank for r in self.stage_ranks(place.pipeline_stages[position], place.dp_rank)]

    def island_groups(self, island: str) -> tuple[list[list[int]], list[list[int]]]:
        """The island's TP groups and DP groups, as island world ranks, in a fixed order.

        Every rank of the island creates every group in this order (torch.distributed
        requires all members of the world to take part in each new_group call).
        """
        tp_groups, dp_groups = [], []
        for stage in self.plan.stages:
            if stage.island != island:
                continue
            ranks = self.stage_ranks(stage.index)
            for d in range(stage.dp):
                tp_groups.append([self.world_rank(r.rank) for r in ranks if r.dp_rank == d])
            for t in range(stage.tp):
                dp_groups.append([self.world_rank(r.rank) for r in ranks if r.tp_rank == t])
        return tp_groups, dp_groups

    def island_holdings(self) -> dict[str, list[tuple[tuple[tuple[int, int], ...], bool, bool]]]:
        """What each island's stages hold, islands in rank order: per stage its ranges of half-layer
        blocks (block 2k: layer k's attention half, 2k+1 its MLP half), whether it holds the
        embedding (its pipeline's first stage) and whether the final norm and LM head (the last).
        A hybrid plan's pipeline over several islands leaves each of them part of the model: the
        hetero-DP bucket sum runs only over the islands holding a bucket's values."""
        out: dict[str, list[tuple[tuple[tuple[int, int], ...], bool, bool]]] = {r.island: [] for r in self.plan.ranks}
        for pipeline in self.plan.pipelines:
            for position, index in enumerate(pipeline.stages):
                stage = self.plan.stages[index]
                blocks = (stage.blocks,) if stage.blocks else tuple((2 * a, 2 * b) for a, b in stage.layer_ranges)
                out[stage.island].append((blocks, position == 0, position == len(pipeline.stages) - 1))
        return out

    def tied_partners(self, place: Place) -> list[int] | None:
        """For tied embeddings split over two stages: the other copy's ranks (by tp_rank)."""
        if place.is_first == place.is_last:
            return None   # one stage holds both (or neither)
        other = place.pipeline_stages[-1] if place.is_first else place.pipeline_stages[0]
        return [r.rank for r in self.stage_ranks(other, place.dp_rank)]
