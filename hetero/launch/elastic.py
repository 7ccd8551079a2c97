"""The elastic re-plan: a plan for the chips that remain when nodes are lost, written against the whole
cluster file so that every launcher, worker and checkpoint keeps reading the same cluster.

The planner (partitioner `search`, through hetero.runner.search_plan) runs on the survivors: the
cluster with the lost nodes taken out (an island with none left goes; one that lost a node in the
middle keeps its longest run of consecutive surviving nodes, since a stage's chips are one block of
island-local ranks). Its plan is then widened back to the whole cluster's numbering (local ranks
and node indices shifted past the nodes dropped before the run, the lost chips listed as idle), so
the launch layout places no worker on a lost node and the engine (hetero.engine.topology: idle chips
leave gaps) runs it unchanged. The global batch is the train file's; the planner picks the
micro-batching for the chips that remain.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from hetero.errors import UserError


@dataclass(frozen=True)
class Kept:
    """What an island keeps: its surviving nodes, and where they sit in the whole island."""

    nodes: tuple            # hetero.config.cluster.Node, the run kept
    first_node: int         # index of the run's first node in the island's node list
    first_chip: int         # island-local rank of the run's first chip


def survivors(cluster, lost) -> tuple[object, dict]:
    """(the cluster without the `lost` hosts, {island: Kept}); a UserError when no chip is left."""
    kept: dict = {}
    islands = []
    for island in cluster.islands:
        best, run, chip = None, None, 0
        for index, node in enumerate(island.nodes):
            if node.host in lost:
                run = None
            else:
                run = Kept(run.nodes + (node,), run.first_node, run.first_chip) if run else Kept((node,), index, chip)
                if best is None or sum(n.chips for n in run.nodes) > sum(n.chips for n in best.nodes):
                    best = run
            chip += node.chips
        if best is not None:
            kept[island.name] = best
            islands.append(dataclasses.replace(island, nodes=best.nodes))
    if not islands:
        raise UserError(f"no chip is left once {', '.join(sorted(lost))} are gone: nothing to re-plan on")
    return dataclasses.replace(cluster, islands=tuple(islands)), kept


def widen(plan, cluster, kept: dict):
    """`plan` (made for the survivors) in the whole `cluster`'s numbering, checked against it."""
    from hetero.planning import fleet_spec

    stages = tuple(dataclasses.replace(s, offset=s.offset + kept[s.island].first_chip) for s in plan.stages)
    ranks = tuple(dataclasses.replace(r, local_rank=r.local_rank + kept[r.island].first_chip,
                                      node=r.node + kept[r.island].first_node) for r in plan.ranks)
    used: dict = {}
    for r in ranks:
        used[r.island] = used.get(r.island, 0) + 1
    idle = {island.name: island.size - used.get(island.name, 0) for island in cluster.islands}
    return dataclasses.replace(plan, stages=stages, ranks=ranks, idle=idle).validate(fleet_spec(cluster))


class Replanner:
    """Plans a job on the chips that remain: `replanner(cluster, lost_hosts)` -> Plan for the whole
    cluster. `job`: a hetero.config.Job with the model and train (the cluster comes with each call);
    `kind`: hetero.runner.KINDS' key the first plan was searched with."""

    def __init__(self, job, kind: str = "auto"):
        self.job = job.require("model", "train")
        self.kind = kind

    def __call__(self, cluster, lost):
        from hetero.plan_check import check_supported
        from hetero.runner import search_plan

        reduced, kept = survivors(cluster, set(lost))
        job = dataclasses.replace(self.job, cluster=reduced)
        plan = check_supported(search_plan(job, self.kind), "the re-plan")
        return widen(plan, cluster, kept)


def summary(plan) -> dict:
    """A plan in short, for the replan event and the lines that announce it."""
    if plan is None:
        return {"plan": "every chip, no plan"}
    return {"plan": plan.summary(), "kind": plan.kind, "world_size": plan.world_size,
            "micro_batch": plan.micro_batch, "num_micro_batches": plan.num_micro_batches,
            "predicted_step_s": plan.predicted_step_s, "tokens_per_s": plan.tokens_per_s}


def hosts_of(cluster) -> list[str]:
    """Every host that holds chips, in cluster order."""
    return list(dict.fromkeys(node.host for island in cluster.islands for node in island.nodes))
