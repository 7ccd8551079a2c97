"""Where a job's workers go on a Ray cluster: one placement group per island, one bundle per chip.

Pure data (no Ray calls), so it is tested without a cluster. A bundle asks for the
island's accelerator as Ray names it (the accelerator class's `ray_resource`: GPU for
cuda, NPU for ascend, a custom resource for kunlun) plus WORKER_CPUS CPUs, or only CPUs
for a cpu or emulated island (its chips are the host's cores); and for its node's Ray
node resource `node:<ip>` (a sliver of it), which pins the bundle to the host the
cluster file names, the way vLLM pins its driver's bundle. Bundles follow the layout:
island by island, node by node, chip by chip, so the bundles of one node are
consecutive and a node's workers (a TP group) never leave it.

A `host: auto` node is pinned nowhere: it gets a placement group of its own, STRICT_PACK
(its chips on one Ray node, wherever Ray finds room). Once Ray has placed it, the node
IP it landed on replaces `auto` (placed_cluster, placed_yaml) and the launch goes on as
if the cluster file had named that host. TP groups never straddle a cluster node
(partitioner: tp divides every node of its island), so they stay on one Ray node too.
Two nodes of one island on one Ray node are refused (crowded): an island lists a host once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hetero.config import ClusterConfig
from hetero.config.cluster import AUTO, AUTO_PREFIX
from hetero.launch.layout import FleetLayout, IslandLayout, NodeWorkers

WORKER_CPUS = 1.0     # CPUs a worker reserves beside its chip
NODE_SLIVER = 0.001   # of `node:<ip>`: enough to pin a bundle, never to exhaust the node


@dataclass(frozen=True)
class NodeShare:
    """One island's workers on one node: bundles first .. first + nproc - 1 of the island's group."""

    island: IslandLayout
    node: NodeWorkers
    ip: str | None     # the node's address as Ray knows it (None: a host: auto node Ray has not placed yet)
    first: int         # index of its first bundle in the island's placement group
    resource: str | None   # the accelerator's Ray resource (None: CPUs only)
    node_id: str | None = None   # the Ray node its bundles were reserved on (hex), once reserved

    @property
    def bundles(self) -> range:
        return range(self.first, self.first + self.node.nproc)


@dataclass
class IslandPlacement:
    """One placement group: an island's named nodes (PACK, each bundle pinned), or one auto node (STRICT_PACK)."""

    island: IslandLayout
    bundles: tuple[dict, ...]
    shares: tuple[NodeShare, ...]
    group: Any = None   # its Ray placement group (ray.util.placement_group.PlacementGroup), once reserved
    strategy: str = "PACK"

    @property
    def auto(self) -> bool:
        return self.strategy == "STRICT_PACK"

    @property
    def label(self) -> str:
        return f"{self.island.name}.{self.shares[0].node.node}" if self.auto else self.island.name


def ray_resource(accelerator: str) -> str | None:
    from accelerators.registry import accelerator_class

    return getattr(accelerator_class(accelerator), "ray_resource", None)


def chip_bundle(resource: str | None, ip: str | None) -> dict:
    """One chip's bundle: its accelerator (or one CPU for a CPU chip), a worker's CPU, its node (if named)."""
    bundle = {"CPU": WORKER_CPUS}
    if ip is not None:
        bundle[f"node:{ip}"] = NODE_SLIVER
    if resource:
        bundle[resource] = 1.0
    return bundle


def is_auto(host: str) -> bool:
    return host.startswith(AUTO_PREFIX)


def plan_placement(layout: FleetLayout, ips: dict) -> list[IslandPlacement]:
    """The placement groups of `layout`: per island, one for its named nodes and one per auto node.
    `ips` maps each named cluster host to its Ray node IP."""
    placements = []
    for island in layout.islands:
        resource = ray_resource(island.accelerator)
        bundles: list[dict] = []
        shares: list[NodeShare] = []
        for node in island.nodes:
            if is_auto(node.host):
                share = NodeShare(island, node, None, 0, resource)
                placements.append(IslandPlacement(island, tuple(chip_bundle(resource, None) for _ in share.bundles),
                                                  (share,), strategy="STRICT_PACK"))
                continue
            shares.append(NodeShare(island, node, ips[node.host], len(bundles), resource))
            bundles += [chip_bundle(resource, ips[node.host]) for _ in range(node.nproc)]
        if shares:
            placements.append(IslandPlacement(island, tuple(bundles), tuple(shares)))
    return placements


def with_node_ids(placement: IslandPlacement, bundle_nodes: dict) -> IslandPlacement:
    """`placement` with each share's Ray node id, from its group's bundle index -> node id table."""
    shares = tuple(dataclasses.replace(share, node_id=bundle_nodes.get(share.first)) for share in placement.shares)
    return dataclasses.replace(placement, shares=shares)


def crowded(placements: list[IslandPlacement], landed: dict) -> list[str]:
    """Islands with two nodes on one Ray node once the auto nodes have `landed` (auto host -> IP):
    'slow: auto:slow:1 and 10.0.0.2 on 10.0.0.2'."""
    seen: dict = {}
    out = []
    for placement in placements:
        for share in placement.shares:
            ip = landed.get(share.node.host, share.ip)
            other = seen.setdefault((share.island.name, ip), share.node.host)
            if other != share.node.host:
                out.append(f"{share.island.name}: {other} and {share.node.host} on {ip}")
    return out


def placed_cluster(cluster: ClusterConfig, landed: dict) -> ClusterConfig:
    """`cluster` with each auto node's host replaced by the Ray node IP it `landed` on."""
    islands = tuple(dataclasses.replace(island, nodes=tuple(
        dataclasses.replace(node, host=landed[node.host]) if node.auto else node for node in island.nodes))
        for island in cluster.islands)
    return dataclasses.replace(cluster, islands=islands)


def placed_yaml(data: dict, landed: dict) -> dict:
    """The cluster section `data` (as read from its YAML file) with `host: auto` replaced by the
    IPs the auto nodes `landed` on: what the workers read as their cluster file."""
    data = dict(data)
    islands = []
    for island in data["islands"]:
        nodes = [dict(node, host=landed[f"{AUTO_PREFIX}{island['name']}:{index}"]) if node.get("host") == AUTO
                 else node for index, node in enumerate(island["nodes"])]
        islands.append(dict(island, nodes=nodes))
    data["islands"] = islands
    return data


def rebind(placements: list[IslandPlacement], layout: FleetLayout, landed: dict) -> list[IslandPlacement]:
    """`placements` (reserved) with their shares on `layout`, the layout of the placed cluster."""
    islands = {island.name: island for island in layout.islands}
    out = []
    for placement in placements:
        island = islands[placement.island.name]
        nodes = {node.node: node for node in island.nodes}
        shares = tuple(dataclasses.replace(share, island=island, node=nodes[share.node.node],
                                           ip=landed.get(share.node.host, share.ip)) for share in placement.shares)
        out.append(dataclasses.replace(placement, island=island, shares=shares))
    return out


def missing_hosts(hosts, ray_nodes: dict) -> list[str]:
    """The hosts (resolved to IPs in `hosts`: host -> ip) that are no live node of the Ray cluster
    (`ray_nodes`: ip -> resources)."""
    return [f"{host} ({ip})" if ip != host else host for host, ip in hosts.items() if ip not in ray_nodes]


def short_of(placements: list[IslandPlacement], ray_nodes: dict) -> list[str]:
    """What the cluster's nodes lack for the bundles pinned to them: 'ip: needs 4 GPU, has 2', and
    each auto node no single Ray node could hold: 'auto node slow.0: needs 2 CPU on one node'."""
    need: dict = {}
    out = []
    for placement in placements:
        if placement.auto:
            total = _summed(placement.bundles)
            if not any(all(resources.get(k, 0.0) >= v for k, v in total.items()) for resources in ray_nodes.values()):
                out.append(f"auto node {placement.label}: needs "
                           f"{', '.join(f'{v:g} {k}' for k, v in total.items())} on one node")
            continue
        for bundle in placement.bundles:
            ip = next(k[len("node:"):] for k in bundle if k.startswith("node:"))
            for name, amount in bundle.items():
                if not name.startswith("node:"):
                    need[(ip, name)] = need.get((ip, name), 0.0) + amount
    return [f"{ip}: needs {amount:g} {name}, has {ray_nodes.get(ip, {}).get(name, 0.0):g}"
            for (ip, name), amount in need.items() if ray_nodes.get(ip, {}).get(name, 0.0) < amount] + out


def _summed(bundles) -> dict:
    total: dict = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            total[name] = total.get(name, 0.0) + amount
    return total
