"""Who runs where: the cluster (and optional Plan) turned into per-node, per-island worker lists.

Pure data, no processes. Rules the rest of the launcher relies on:

- One native world per island. Its island-local ranks (torchrun's RANK) go
  node by node in the island's node-list order, and inside a node by chip
  index; a node is the island's rendezvous member number `group_rank` (only
  nodes that run at least one worker count).
- Global ranks: with a Plan, the Plan's rank table (island + local_rank ->
  rank); a chip the Plan leaves idle runs no worker. Without a Plan, every chip
  runs a worker and global ranks go island by island in cluster order, then by
  chip index (the same numbering a Plan uses).
- MASTER_PORT of island i (cluster order, from 0): coordinator.port + 1 + i;
  MASTER_ADDR is the island's first node (with a worker). Nothing of hetero's
  listens there (islands meet in the coordinator's store); they are torchrun's
  variables, kept for scripts that read them.
- Device indices on a host: per accelerator kind, islands in cluster order take
  consecutive indices, so two islands of one vendor on one host never share a
  device. A worker sees its node's devices of its island (LOCAL_RANK picks one).
- Local mode (no --node): every node of the fleet runs on this host and every
  address (coordinator, rendezvous) becomes 127.0.0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetero.config import ClusterConfig
from hetero.errors import UserError

LOCAL_HOST = "127.0.0.1"


@dataclass(frozen=True)
class NodeWorkers:
    """The workers one island runs on one node."""

    host: str                        # as written in the cluster file
    node: int                        # index of the node in the island's node list
    group_rank: int                  # this node's member number in the island's rendezvous
    island_ranks: tuple[int, ...]    # RANK of each worker, in LOCAL_RANK order
    global_ranks: tuple[int, ...]    # HETERO_GLOBAL_RANK of each worker, same order
    devices: tuple[int, ...]         # host device index of each worker, same order

    @property
    def nproc(self) -> int:
        return len(self.global_ranks)


@dataclass(frozen=True)
class IslandLayout:
    index: int                       # position in the cluster file
    name: str
    accelerator: str
    chip: str
    backend: str
    master_addr: str                 # the rendezvous store's host: the island's first node
    rdzv_port: int
    nodes: tuple[NodeWorkers, ...]   # only nodes with at least one worker

    @property
    def world_size(self) -> int:
        return sum(n.nproc for n in self.nodes)

    @property
    def rank_table(self) -> tuple[int, ...]:
        """Global rank of each island-local rank."""
        return tuple(g for n in self.nodes for g in n.global_ranks)


@dataclass(frozen=True)
class FleetLayout:
    cluster: ClusterConfig
    islands: tuple[IslandLayout, ...]   # only islands with at least one worker
    coordinator_host: str               # where workers and other nodes reach the coordinator
    coordinator_port: int
    local: bool                         # the whole fleet on this host

    @property
    def world_size(self) -> int:
        return sum(i.world_size for i in self.islands)

    @property
    def coordinator_address(self) -> str:
        return f"{self.coordinator_host}:{self.coordinator_port}"

    @property
    def head(self) -> str:
        """The host that runs the coordinator and decides each attempt's outcome."""
        return self.cluster.coordinator.host

    @property
    def hosts(self) -> tuple[str, ...]:
        """Hosts that run workers, in first-appearance order."""
        seen: dict = {}
        for island in self.islands:
            for node in island.nodes:
                seen.setdefault(node.host, None)
        return tuple(seen)

    def on_host(self, host: str | None) -> list[tuple[IslandLayout, NodeWorkers]]:
        """(island, node) pairs this launcher starts; host None: all of them (local mode)."""
        return [(island, node) for island in self.islands for node in island.nodes
                if host is None or node.host == host]


def build_layout(cluster: ClusterConfig, plan=None, node: str | None = None, auto: bool = False) -> FleetLayout:
    """The fleet layout for `cluster`, following `plan` (a partitioner Plan) if given.

    `node` is the host this launcher runs (None: the whole fleet here). `auto`: the caller
    (--on ray) learns the hosts of `host: auto` nodes later; anyone else refuses them. Raises
    UserError for a host not in the cluster, an auto node it cannot place, or ports out of range."""
    if not auto:
        refuse_auto(cluster)
    local = node is None
    known = {n.host for i in cluster.islands for n in i.nodes} | {cluster.coordinator.host}
    if node is not None and node not in known:
        raise UserError(f"--node {node} is not a host of cluster '{cluster.name}' "
                        f"(its hosts: {', '.join(sorted(known))})")
    last_port = cluster.coordinator.port + len(cluster.islands)
    if last_port > 65535:
        raise UserError(f"coordinator port {cluster.coordinator.port} leaves no room for the islands' "
                        f"rendezvous ports (port + 1 .. port + {len(cluster.islands)} must be <= 65535)")
    chosen = _chosen_chips(cluster, plan)
    device_base = _device_bases(cluster)
    islands = []
    for index, island in enumerate(cluster.islands):
        nodes: list[NodeWorkers] = []
        first_chip = 0
        for node_index, spec in enumerate(island.nodes):
            locals_here = [c for c in range(first_chip, first_chip + spec.chips) if (island.name, c) in chosen]
            if locals_here:
                base = device_base[(index, node_index)]
                nodes.append(NodeWorkers(
                    host=spec.host, node=node_index, group_rank=len(nodes),
                    island_ranks=(), global_ranks=tuple(chosen[(island.name, c)] for c in locals_here),
                    devices=tuple(base + c - first_chip for c in locals_here)))
            first_chip += spec.chips
        if not nodes:
            continue
        # Island-local ranks are dense, node by node: what torch elastic assigns.
        rank = 0
        numbered = []
        for n in nodes:
            numbered.append(NodeWorkers(n.host, n.node, n.group_rank, tuple(range(rank, rank + n.nproc)),
                                        n.global_ranks, n.devices))
            rank += n.nproc
        master = LOCAL_HOST if local else numbered[0].host
        islands.append(IslandLayout(index, island.name, island.accelerator, island.chip, island.backend,
                                    master, cluster.coordinator.port + 1 + index, tuple(numbered)))
    coordinator_host = LOCAL_HOST if local else cluster.coordinator.host
    return FleetLayout(cluster, tuple(islands), coordinator_host, cluster.coordinator.port, local)


def refuse_auto(cluster: ClusterConfig, how: str = "a launch without --on ray") -> None:
    """A UserError when `cluster` has `host: auto` nodes: only Ray picks their hosts."""
    autos = [island.name for island in cluster.islands if any(n.auto for n in island.nodes)]
    if autos:
        raise UserError(f"cluster '{cluster.name}': host: auto (island{'s' if len(autos) > 1 else ''} "
                        f"{', '.join(autos)}) needs --on ray, "
                        f"where Ray picks the node; {how} needs every node's host named in the cluster file")


def _chosen_chips(cluster: ClusterConfig, plan) -> dict:
    """(island, chip index) -> global rank, for every chip that runs a worker."""
    if plan is None:
        chosen, rank = {}, 0
        for island in cluster.islands:
            for chip in range(island.size):
                chosen[(island.name, chip)] = rank
                rank += 1
        return chosen
    return {(r.island, r.local_rank): r.rank for r in plan.ranks}


def _device_bases(cluster: ClusterConfig) -> dict:
    """(island index, node index) -> first device index that island uses on that host."""
    taken: dict = {}   # (host, accelerator) -> devices handed out so far
    bases = {}
    for index, island in enumerate(cluster.islands):
        for node_index, n in enumerate(island.nodes):
            key = (n.host, island.accelerator)
            bases[(index, node_index)] = taken.get(key, 0)
            taken[key] = taken.get(key, 0) + n.chips
    return bases
